"""Finished tasks' results as plain JSON data for ``task_result``: copied once, kept with
their JSON while unchanged.

A large result (a million floats) took ~0.5 s to copy and encode for each request, so a
few clients reading it at once made every other client wait past queueserver's 2 s (found
by a hostile test).  :class:`ResultCopies` keeps the copies of the results read last, each
with its JSON (:class:`qmagic.jsonreply.Encoded`), within a bound on their bytes.  A kept
copy answers a later request only if the result still holds the very objects it held when
copied: the same exact lists, tuples and dicts, the same keys in the same order, the same
numbers and strings (by identity; these do not change).  That check runs none of the
result's own code (exact built-in types only), so it needs no deadline; a result changed
since, or not made of those types, is copied anew.  No stale value is ever shown.
Checking a kept copy and making a new copy of a large result are both *large work*, asked
for before they are done (``admit`` of :meth:`ResultCopies.get`): the control channel
rations them while other clients wait (:mod:`qmagic.remote.large_work`).

No IPython, widgets or zmq here.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict, deque
from operator import is_
from typing import Any, Callable

from . import probe
from .jsonreply import LARGE_BYTES, Encoded, encoded
from .texts import valid_unicode

__all__ = ["BUSY", "NOT_AT_ONCE", "UNSURE", "ResultCopies", "copy_at_once", "may_be_large", "plain_copy"]

#: Most bytes of JSON kept for all results together, counting each result's JSON twice: its
#: own and the last reply made with it (their copies take about as much again: a pointer
#: per item; the numbers and strings are the result's own).  The newest copy is kept even
#: if it alone is larger (the others are dropped).
KEEP_BYTES = 64 * 1024 * 1024
KEEP_MOST = 8  # results kept at most
_WALK_DEPTH = 100
_JSON_INT_BITS = 14_000  # (json refuses ints of more digits: sys.get_int_max_str_digits)


def plain_copy(value: Any) -> Any:
    """``value`` as plain JSON data (a copy; numbers and strings are shared).  Exact lists,
    tuples, dicts with str keys and scalars are walked in Python, so a large result never
    holds the GIL for long in one C call (that made the control thread wait past its
    deadline: 2.9 s for 3 million floats); anything else goes through ``json`` (its own code
    runs here: call this through :mod:`qmagic.probe`).  Raises what ``json.dumps`` raises,
    and ValueError for a dict whose keys read the same as JSON text (see :func:`_object`).
    A value nested too deeply for the walk's frames (900 lists in one another) goes through
    ``json`` whole, as the rule for remote results checked it when its task ended: a task
    that completed never reads "can not be serialized" here (a hostile test)."""
    try:
        return _walked(value, 0)
    except RecursionError:
        return json.loads(json.dumps(value), object_pairs_hook=_object)


def _walked(value: Any, depth: int) -> Any:
    """:func:`plain_copy`'s walk, ``depth`` levels down."""
    cls = type(value)
    if cls in probe.PLAIN_TYPES and not (cls is int and value.bit_length() > _JSON_INT_BITS):
        return value
    if depth < _WALK_DEPTH:
        if cls is list or cls is tuple:
            return [_walked(item, depth + 1) for item in value]
        if cls is dict and all(type(key) is str for key in value):
            if not all(map(str.isascii, value)):
                _distinct(value)
            return {key: _walked(item, depth + 1) for key, item in value.items()}
    return json.loads(json.dumps(value), object_pairs_hook=_object)


#: Why a dict's copy fails when two of its keys read the same as JSON text.
SAME_KEYS = "two keys of a dict read the same as JSON text (1 and '1', a lone surrogate and U+FFFD)"


def _distinct(keys: Any) -> None:
    """Raise ValueError if two of ``keys`` (str) read the same once their lone surrogates are
    read as U+FFFD, as the reply's JSON writes them (:mod:`qmagic.jsonreply`)."""
    if len(set(map(valid_unicode, keys))) < len(keys):
        raise ValueError(SAME_KEYS)


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object read back as a dict, refused (ValueError) if two of its keys are the
    same: json writes {1: "a", "1": "b"} as two keys "1", and the client kept the last, one
    value dropped without a word (found by a hostile test)."""
    obj = dict(pairs)
    if len(obj) < len(pairs):
        raise ValueError(SAME_KEYS)
    if not all(map(str.isascii, obj)):
        _distinct(obj)
    return obj


class _TooLong(Exception):
    """A check looked at more items than it may (see ``CHECK_STEPS``), or a value's JSON
    passed ``LARGE_BYTES`` (see :func:`may_be_large`)."""


#: The longest JSON of a float and its ", " (``repr`` of a float: at most 24 characters).
_FLOAT_JSON = 26


def _scalar_json(value: Any, cls: type) -> int | None:
    """The most JSON a number or a text makes (read as the built-in type holds it: json
    writes a subclass so too); None for any other value."""
    if issubclass(cls, float):
        return _FLOAT_JSON
    if issubclass(cls, int):  # (and bool)
        return int.bit_length(value) * 77 // 256 + 4  # (digits: 0.301 per bit; sign, ", ")
    if issubclass(cls, str):
        return str.__len__(value) + 4
    return None


def may_be_large(value: Any) -> bool:
    """True if making ``value``'s copy and JSON may be large work, told before it is done:
    its JSON may be larger than :data:`qmagic.jsonreply.LARGE_BYTES` (each number counted
    at its longest: a list of more than ~2,500 numbers is large), or it is a subclass of
    list, tuple or dict (``json`` reads it through its own methods, however long they take).
    Exact lists, tuples and dicts are read item by item only until that passes
    ``LARGE_BYTES`` (a long one at once, by its length: at most ~22,000 items, milliseconds);
    runs none of the value's own code.  A value JSON cannot encode (a set, an array) is
    not large: its copy fails at once."""
    try:
        _count(value, [LARGE_BYTES], 0)
    except (_TooLong, RuntimeError):  # (RuntimeError: a dict changed size meanwhile)
        return True
    return False


def _count(value: Any, left: list[int], depth: int) -> None:
    """Take the most JSON ``value`` may make (see :func:`may_be_large`) from ``left[0]``;
    raises _TooLong once that is below 0, or for a value whose JSON its own code makes."""
    cls = type(value)
    scalar = _scalar_json(value, cls)
    if scalar is not None:
        left[0] -= scalar
    elif cls is list or cls is tuple or cls is dict:
        if depth >= _WALK_DEPTH:
            raise _TooLong
        left[0] -= 2 + 3 * len(value)  # (at least 3 per item, counted at once)
        if left[0] < 0:
            raise _TooLong
        for item in ((*value.keys(), *value.values()) if cls is dict else value):
            if type(item) is float:  # (the common case, inline)
                left[0] -= _FLOAT_JSON - 3
                if left[0] < 0:
                    raise _TooLong
                continue
            left[0] += 3
            _count(item, left, depth + 1)
    elif issubclass(cls, (list, tuple, dict)):
        raise _TooLong  # (json reads it through its own methods)
    else:
        left[0] -= 6  # (None; or a value JSON cannot encode: its copy fails at once)
    if left[0] < 0:
        raise _TooLong


#: What :func:`copy_at_once` returns for a value it leaves to the probe thread.
NOT_AT_ONCE: Any = object()


class _NotExact(Exception):
    """A value :func:`copy_at_once` leaves to the probe thread."""


def copy_at_once(value: Any) -> Any:
    """``value``'s copy as :func:`plain_copy` makes it, made at once on the asking thread, or
    :data:`NOT_AT_ONCE`.  Only for a value of exact str, int, float, bool and None, lists,
    tuples and dicts with str keys (no code of its own runs), nested less deep than
    :func:`plain_copy` walks, whose JSON is not large (counted as by :func:`may_be_large`: a
    copy of milliseconds at most); read once, as it is copied (a task that changes it
    meanwhile changes only what is copied).  Raises ValueError for a dict whose keys read the
    same as JSON text.  Such a result was read through the probe thread like any other, so
    while that thread was busy with another (a large copy, a result whose own code blocks),
    a small result was told it "could not be read" (a hostile test)."""
    try:
        return _exact_copy(value, [LARGE_BYTES], 0)
    except (_TooLong, _NotExact, RuntimeError):  # (RuntimeError: a dict changed size meanwhile)
        return NOT_AT_ONCE


def _exact_copy(value: Any, left: list[int], depth: int) -> Any:
    """The copy of :func:`copy_at_once`; takes what its JSON may make from ``left[0]``
    (raises _TooLong once that is below 0, _NotExact for a value it leaves)."""
    cls = type(value)
    if cls is float or cls is str or (cls is int or cls is bool) and value.bit_length() <= _JSON_INT_BITS:
        left[0] -= _scalar_json(value, cls)
        copy = value
    elif value is None:
        left[0] -= 6
        copy = None
    elif (cls is list or cls is tuple or cls is dict) and depth < _WALK_DEPTH:
        left[0] -= 2 + 3 * len(value)  # (at least 3 per item, counted at once)
        if left[0] < 0:
            raise _TooLong
        if cls is dict:
            if not all(type(key) is str for key in value):
                raise _NotExact
            left[0] -= sum(map(len, value)) + len(value)  # (each key: its text and its ":")
            if not all(map(str.isascii, value)):
                _distinct(value)
            copy = {}
            for key, item in value.items():
                left[0] += 3
                copy[key] = _exact_copy(item, left, depth + 1)
        else:
            copy = []
            for item in value:
                left[0] += 3
                copy.append(_exact_copy(item, left, depth + 1))
    else:
        raise _NotExact
    if left[0] < 0:
        raise _TooLong
    return copy


def _unchanged(value: Any, copy: Any, steps: list[int] | None, depth: int = 0) -> bool:
    """True if ``value`` still holds the objects ``copy`` was made of (see the module
    docstring); runs no code of ``value``'s own.  ``steps``: how many more items it may look
    into one by one (a one-item list, counted down; None: any), else raises _TooLong."""
    if value is copy:  # (a number or string: shared with the copy)
        return True
    if steps is not None:
        steps[0] -= 1
        if steps[0] < 0:
            raise _TooLong
    cls = type(value)
    if depth > _WALK_DEPTH or not isinstance(copy, (list, dict)):
        return False
    if cls is list or cls is tuple:
        items, copied = value, copy
        if not isinstance(copy, list):
            return False
    elif cls is dict:
        if not isinstance(copy, dict) or len(value) != len(copy) or not all(map(is_, value, copy)):
            return False
        items, copied = value.values(), copy.values()
    else:
        return False
    if len(items) != len(copied):
        return False
    if all(map(is_, items, copied)):  # (numbers and strings: one C loop)
        return True
    return all(_unchanged(item, was, steps, depth + 1) for item, was in zip(items, copied))


#: What :meth:`ResultCopies.get` answers when a quick check could not tell.
UNSURE = object()
#: What :meth:`ResultCopies.get` answers when a check may not be made now (its ``admit``).
BUSY = object()
#: Items a quick check may look into one by one (a few milliseconds); the numbers and
#: strings of a list or dict that are all unchanged are one step in all.
CHECK_STEPS = 10_000


class ResultCopies:
    """The copies of the results read last, with their JSON (see the module docstring);
    thread-safe (the control thread reads, the probe thread may keep a late copy)."""

    def __init__(self, keep_bytes: int = KEEP_BYTES) -> None:
        self.keep_bytes = keep_bytes
        self._lock = threading.Lock()
        self._kept: OrderedDict[str, Any] = OrderedDict()
        self._fresh: set[str] = set()  # copies made after their request gave up
        self._owned: set[str] = set()  # uids whose task's end of life drops their copy
        self._gone: deque[str] = deque()  # tasks gone whose copies are still to drop

    def get(self, uid: str, value: Any, *, thorough: bool = False,
            admit: Callable[[], bool] | None = None) -> Any:
        """The kept copy of task ``uid``'s result ``value`` if it is unchanged, else None
        (a changed one is dropped): the caller makes a new copy.  The check is quick
        (``CHECK_STEPS``): where it cannot tell, :data:`UNSURE`; ``thorough``: however long
        it takes (on the probe thread).  ``admit`` is asked before large work on a large
        result: checking its kept copy (~50 ms per million items), or, with none kept, making
        a new one (~0.5 s per million items; :func:`may_be_large`): if it says no,
        :data:`BUSY`, neither done.
        A copy made after its request gave up (``put(fresh=True)`` or ``refresh``) answers the next request
        once unchecked: it is newer than that request, as a copy made for it would be."""
        with self._lock:
            self._purge()
            kept = self._kept.get(uid)
            if kept is not None and uid in self._fresh:
                self._fresh.discard(uid)
                self._kept.move_to_end(uid)
                return kept
        if kept is None:  # (a new copy: large work if the value may be large)
            return BUSY if admit is not None and may_be_large(value) and not admit() else None
        if admit is not None and not admit():
            return BUSY
        try:
            same = _unchanged(value, kept, None if thorough else [CHECK_STEPS])
        except _TooLong:
            return UNSURE
        except RuntimeError:  # (a dict changed size while it was checked: changed)
            same = False
        with self._lock:
            if self._kept.get(uid) is not kept:
                return None
            if same:
                self._kept.move_to_end(uid)
                return kept
            del self._kept[uid]
        return None

    def put(self, task: Any, copy: Any, *, fresh: bool = False) -> Any:
        """``copy`` of ``task``'s result (made by :func:`plain_copy`) with its JSON
        (:func:`qmagic.jsonreply.encoded`), kept for later requests (see ``KEEP_BYTES``)
        until the task itself is forgotten (its retention time); a small one (JSON of at
        most :data:`qmagic.jsonreply.LARGE_BYTES`: cheap to make again) as it is, not kept.
        ``fresh``: made after its request gave up (see :meth:`get`).  Raises what ``json.dumps`` raises."""
        uid = task.uid
        kept = encoded(copy)
        if not isinstance(kept, Encoded):
            return kept
        size = len(kept.json)
        if size <= LARGE_BYTES:  # (small: the plain copy, encoded with the reply)
            with self._lock:
                self._kept.pop(uid, None)
                self._fresh.discard(uid)
            return copy
        with self._lock:
            self._purge()
            self._kept.pop(uid, None)
            self._fresh.discard(uid)
            self._kept[uid] = kept
            if fresh:
                self._fresh.add(uid)
            if uid not in self._owned:  # (a copy never outlives its task: memory goes with it)
                self._owned.add(uid)
                weakref.finalize(task, self.discard, uid)
            total = sum(2 * len(k.json) for k in self._kept.values())
            # The newest always stays, alone if need be: a result that takes longer to
            # copy than a request waits is answered from its copy by the next request.
            while len(self._kept) > 1 and (total > self.keep_bytes or len(self._kept) > KEEP_MOST):
                dropped_uid, dropped = self._kept.popitem(last=False)
                self._fresh.discard(dropped_uid)
                total -= 2 * len(dropped.json)
        return kept

    def discard(self, uid: str) -> None:
        """Forget task ``uid``'s copy (the task is gone).  Called by the garbage collector,
        which may run inside this object's own lock (an allocation in :meth:`put`): then the
        uid waits in ``_gone`` for the next :meth:`get` or :meth:`put`."""
        self._gone.append(uid)
        if self._lock.acquire(blocking=False):
            try:
                self._purge()
            finally:
                self._lock.release()

    def _purge(self) -> None:
        """Drop the copies of tasks that are gone (the caller holds the lock)."""
        while self._gone:
            uid = self._gone.popleft()
            self._kept.pop(uid, None)
            self._fresh.discard(uid)
            self._owned.discard(uid)

    def refresh(self, uid: str, kept: Any) -> None:
        """``kept`` (task ``uid``'s kept copy) was found unchanged after its request gave
        up: the next request takes it unchecked (see :meth:`get`)."""
        with self._lock:
            if self._kept.get(uid) is kept:
                self._fresh.add(uid)

    def __len__(self) -> int:
        with self._lock:
            return len(self._kept)
