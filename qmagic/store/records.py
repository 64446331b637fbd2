"""Making task records storable, and checking the records read back.

A task record (PLAN.md: a plain dict) may hold anything in ``args``, ``kwargs`` and
``result``: numpy arrays, objects whose ``__repr__`` raises, huge lists, NaN, lone
surrogates.  :class:`RecordEncoder` turns it into ONE line of strict JSON (UTF-8, ending in
``\\n``) for the spool of the experiment log, ``[rank, "uid", {record}]`` (so the writer
can fold a task's lines without parsing them), keeping every value it can and replacing the
others by a summary marked with :data:`SUMMARY_KEY`::

    {"__qmagic_summary__": "repr" | "json", "type": "numpy.ndarray", "repr": "array([...",
     "truncated": true, "length": 5008, "items": 3, "shape": [3], "dtype": "float64"}

("repr": not JSON — NaN, a datetime, your own object; "json": JSON but larger than
``max_value_chars``, the start of its JSON kept).  Over-long ``error``/``traceback`` texts
keep their head and tail around a marker.  Names (``name``, ``user``, ``user_group`` ...)
are validated before they are stored: a lone surrogate or a control character is escaped,
an over-long name is cut, so no view can fail on them later.

The common record (small plain arguments and result) takes a fast path: a few type checks
and one ``orjson.dumps``, 0.6-1.5 µs here.

:func:`record_from_row` is the other direction: a row of the log, checked field by field;
a row that does not validate (status "bogus", ``submitted_at`` "yesterday", a record that
is not a JSON object) is skipped with ONE :class:`JournalWarning` per process and kind.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import itertools
import math
import operator
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import orjson

__all__ = [
    "FINAL_STATUSES", "ORPHAN_REASON", "ORPHAN_QUEUED_REASON", "ORPHAN_REASONS", "RANKS", "STATUSES",
    "SUMMARY_KEY", "JournalWarning", "RecordEncoder", "clean_name", "record_from_row",
    "warn_once",
]

#: Task statuses, in the order a task goes through them.
STATUSES = ("queued", "running", "completed", "failed", "cancelled")
FINAL_STATUSES = frozenset(("completed", "failed", "cancelled"))
#: How far along a task is: a later rank always wins when records of one task are merged.
RANKS = {"queued": 1, "running": 2, "completed": 3, "failed": 3, "cancelled": 3}
#: ``error`` of a task whose kernel died (or whose log was closed) before the task ended.
ORPHAN_REASON = "kernel stopped while the task was running"
#: The same for a task that was still queued (it never started).
ORPHAN_QUEUED_REASON = "kernel stopped before the task started"
#: Both: the errors of the tasks a stopped kernel left unfinished.
ORPHAN_REASONS = (ORPHAN_REASON, ORPHAN_QUEUED_REASON)
#: Key that marks a value the log replaced by a summary.
from ..texts import SUMMARY_KEY, printable, safe_repr  # noqa: E402 - one definition, shared with the text forms
from .values import (  # noqa: E402 - as above
    I64,
    U64,
    HeadRepr,
    bulk,
    finite,
    members,
    no_surrogates,
    plain,
    size,
)

_TEXT_KEYS = ("error", "traceback")
_NAME_KEYS = ("name", "user", "user_group")
_OTHER_NAME_KEYS = ("kind", "origin", "error_type")
_TIME_KEYS = ("submitted_at", "started_at", "finished_at", "timeout")
_NAME_CHARS = 500  # longer names are cut (with a marker)
_NAMES_KEPT = 256  # name triples the encoder remembers as checked
_FIELD_KEYS = ("uid", "status", "name", "user", "user_group", "args", "kwargs", "result", "progress")
_FIELDS = operator.itemgetter(*_FIELD_KEYS)
_UID_CHARS = 128
_WALK_ITEMS = 100  # containers up to this size are summarised item by item
_SCALARS = frozenset((type(None), str, int, bool))
_KEY_TYPES = frozenset((*_SCALARS, float))
#: A spool line is never longer than this (a quarter of a spool segment).
MAX_LINE = 1 << 20
_FAST_OPTIONS = (orjson.OPT_APPEND_NEWLINE | orjson.OPT_PASSTHROUGH_DATETIME
                 | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_SUBCLASS)


class JournalWarning(UserWarning):
    """A row of the experiment log was skipped, or a file of it could not be used."""


_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(kind: str, message: str, stacklevel: int = 3) -> None:
    """Issue ``message`` as a :class:`JournalWarning`, once per process and ``kind``."""
    with _warned_lock:
        if kind in _warned:
            return
        _warned.add(kind)
    warnings.warn(message, JournalWarning, stacklevel=stacklevel)


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def clean_name(value: Any, limit: int = _NAME_CHARS) -> str | None:
    """A name fit to store and print: None stays None, anything else becomes a str without
    lone surrogates or control characters (escaped as ``\\udcff``, ``\\n``), cut to ``limit``."""
    if value is None:
        return None
    return printable(value, limit) if isinstance(value, str) else safe_repr(value, limit)


class RecordEncoder:
    """Turns task records into lines of strict JSON for the log (see the module docstring).

    ``summary_chars``: length of the ``repr`` kept for a value that is not JSON;
    ``max_value_chars``: a JSON value longer than this is summarised; ``max_text_chars``:
    longer tracebacks/errors keep their head and tail; ``run_value_code(fn)`` runs a repr.
    """

    def __init__(self, summary_chars: int = 2000, max_value_chars: int = 100_000,
                 max_text_chars: int = 20_000,
                 run_value_code: Callable[[Callable[[], Any]], Any] | None = None) -> None:
        for label, limit in (("summary_chars", summary_chars), ("max_value_chars", max_value_chars),
                             ("max_text_chars", max_text_chars)):
            if not isinstance(limit, int) or limit <= 0:
                raise ValueError(f"The experiment log's {label} must be a positive integer (got {limit!r}).")
        self.summary_chars, self.max_value_chars = summary_chars, max_value_chars
        self.max_text_chars = max_text_chars
        # a record up to this size cannot hold a value or text over its limit: fast path
        self._fast_limit = min(max_value_chars, max_text_chars)
        self._names_ok: set[tuple[str | None, str | None, str | None]] = set()  # (name, user, group) that passed
        #: runs a value's own code (its repr) for a summary; the worker gives one with a
        #: deadline, so that a repr that blocks cannot hold up a task's end (and the kernel)
        self._run_value_code = run_value_code or (lambda fn: fn())
        self._reprlib = HeadRepr()
        self._reprlib.maxstring = self._reprlib.maxother = summary_chars
        self._reprlib.maxlist = self._reprlib.maxtuple = self._reprlib.maxdict = 50
        self._reprlib.maxset = self._reprlib.maxfrozenset = self._reprlib.maxarray = self._reprlib.maxdeque = 50

    def encode(self, record: Mapping[str, Any], final: bool = False) -> bytes:
        """The spool line of ``record``: ``[rank, "uid", {record}]`` as strict JSON, ending
        in a newline (rank 1 queued, 2 running, 3 ended: the writer folds a task's lines by
        uid without parsing them).

        Raises ValueError for a programming error: not a dict, a ``uid`` that is not a
        string of 1-128 printable characters without ``"`` and ``\\``, a ``status`` that is
        not a task status (with ``final``: not completed, failed or cancelled).
        """
        if record.__class__ is not dict:
            if not isinstance(record, Mapping):
                raise ValueError("A task record must be a dict.")
            record = dict(record)
        try:  # (one call for the usual record, where every field is present)
            uid, status, n, u, g, a, k, r, p = _FIELDS(record)
        except KeyError:
            uid, status, n, u, g, a, k, r, p = map(record.get, _FIELD_KEYS)
        if (uid.__class__ is not str or not 0 < len(uid) <= _UID_CHARS or not uid.isprintable()
                or '"' in uid or "\\" in uid):
            raise ValueError(f"A task record needs a 'uid' of 1 to {_UID_CHARS} printable characters "
                             f"without quotes or backslashes (got {safe_repr(uid, 80)}).")
        rank = RANKS[status] if status.__class__ is str and status in RANKS else None
        if rank is None or (final and rank != 3):
            raise ValueError(f"A task record's status must be one of "
                             f"{'completed, failed, cancelled' if final else ', '.join(STATUSES)} "
                             f"(got {safe_repr(status, 80)}).")
        # Fast path: orjson refuses (with these options) lone surrogates, datetimes,
        # dataclasses, subclasses, huge ints and non-str keys; what it would change silently
        # is NaN/infinity (written as null), so the values that may hold floats are checked;
        # names longer than _NAME_CHARS take the careful path, which cuts them.  Name triples
        # that passed are remembered (a handful recur in every record); only exact str or
        # None is looked up among them: an object equal to one (an Enum) must not pass.
        names = (n, u, g)
        if ((n is None or type(n) is str) and (u is None or type(u) is str) and (g is None or type(g) is str)
                and (names in self._names_ok or self._check_names(names))
                and ((type(a) is list or type(a) is tuple) and not a or a is None or plain(a))
                and (type(k) is dict and not k or k is None or plain(k))
                and (type(r) in _SCALARS and type(r) is not str or plain(r)) and (p is None or plain(p))):
            try:
                line = orjson.dumps([rank, uid, record], option=_FAST_OPTIONS)
            except (TypeError, ValueError):  # a lone surrogate, a datetime, a non-str key ...
                pass
            else:
                if len(line) <= self._fast_limit:
                    return line
        line = orjson.dumps([rank, uid, self.clean(record)], option=orjson.OPT_APPEND_NEWLINE)
        if len(line) > MAX_LINE:
            line = orjson.dumps([rank, uid, self.clean(record, small=True)], option=orjson.OPT_APPEND_NEWLINE)
        return line

    def _check_names(self, names: tuple[str | None, str | None, str | None]) -> bool:
        """True if name, user and user_group (each a str or None) are short and printable
        (then remembered, up to _NAMES_KEPT triples)."""
        for v in names:
            if v is not None and not (len(v) <= _NAME_CHARS and v.isprintable()):
                return False
        if len(self._names_ok) < _NAMES_KEPT:
            self._names_ok.add(names)
        return True

    # ---- the careful path ---------------------------------------------------------------
    def clean(self, record: Mapping[str, Any], small: bool = False) -> dict[str, Any]:
        """A copy of ``record`` that encodes as strict JSON of bounded size (``small``: every
        value and text summarised to ``summary_chars``, for a record still too large)."""
        out: dict[str, Any] = {}
        for key, v in record.items():
            key = clean_name(key)
            if key in ("uid", "status"):
                out[key] = v
            elif small and key in _TEXT_KEYS and isinstance(v, str):
                out[key] = self.text(v)[: self.summary_chars]
            elif small and key not in _NAME_KEYS and key not in _OTHER_NAME_KEYS and key not in _TIME_KEYS \
                    and key != "provenance" and v is not None:
                value = self.value(v)
                out[key] = value if len(orjson.dumps(value)) <= self.summary_chars else self.summary(v, "repr")
            elif key in _NAME_KEYS or key in _OTHER_NAME_KEYS:
                out[key] = clean_name(v)
            elif key in _TEXT_KEYS:
                out[key] = self.text(v) if isinstance(v, str) else clean_name(v)
            elif key in _TIME_KEYS:
                out[key] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) \
                    and math.isfinite(v) else None
            elif key == "provenance":
                out[key] = self._provenance(v)
            else:
                out[key] = self.value(v)
        return out

    def _provenance(self, v: Any) -> dict[str, Any] | None:
        if not isinstance(v, Mapping):
            return None
        count, nb = v.get("execution_count"), v.get("notebook")
        # (the path as the fast path keeps it, whatever else the record holds: escaped here,
        # a path with a control character was another notebook, named after its last '\\')
        return {"notebook": no_surrogates(nb)[:4096] if type(nb) is str else clean_name(nb, 4096),
                "cell_id": clean_name(v.get("cell_id")),
                "execution_count": count if type(count) is int and I64 <= count < U64 else None,
                "cell_hash": clean_name(v.get("cell_hash"))}

    def text(self, s: str) -> str:
        """``s`` without lone surrogates, or its head and tail around a marker when longer
        than max_text_chars."""
        s = no_surrogates(s)
        if len(s) <= self.max_text_chars:
            return s
        head = self.max_text_chars // 4
        tail = self.max_text_chars - head
        return (f"{s[:head]}\n... [qmagic log: {len(s) - head - tail} characters "
                f"omitted] ...\n{s[-tail:]}")

    def value(self, v: Any, outer: tuple[int, ...] = ()) -> Any:
        """``v`` if it is small strict JSON, else its items made safe (small containers, not
        too deep, no cycles), else a summary.  ``outer``: ids of the enclosing containers.
        Never raises: a value that cannot even be read (its ``len``, ``str`` or ``float``
        raises) becomes a summary that says so."""
        try:
            return self._value(v, outer)
        except Exception as exc:  # noqa: BLE001 - odd objects may raise anything
            return self.summary(v, "repr", f"<{_type_name(v)} object that could not be read: {exc!r}>")

    def _value(self, v: Any, outer: tuple[int, ...]) -> Any:
        cls = type(v)  # (not v.__class__, which an object may fake: a Mock(spec=dict))
        if v is None or cls is bool:
            return v
        # A subclass of str, int, float, list, tuple or dict is read as the built-in type
        # holds it, as JSON writes it: none of its own code runs on the task path, where it
        # has no deadline (a __len__ or __str__ that blocked held up the task's end; a str
        # Enum was logged as its str(), "Mode.FAST", for "fast").
        if issubclass(cls, str):
            if str.__len__(v) + 2 <= self.max_value_chars:
                return no_surrogates(v if cls is str else str.__str__(v))
            head = no_surrogates(str.__getitem__(v, slice(0, self.summary_chars)))  # (a 100 MB text was
            return self._start_summary(v, orjson.dumps(head).decode())  # encoded whole: 2.5 s, 2 GB)
        if issubclass(cls, float):
            return (v if cls is float else float.__float__(v)) if math.isfinite(v) else self.summary(v, "repr")
        if issubclass(cls, int):
            n = v if cls is int else int.__int__(v)
            return n if I64 <= n < U64 else self.summary(v, "repr")
        if plain(v):
            try:
                text = orjson.dumps(v).decode()
            except (TypeError, ValueError):
                text = None
            if text is not None:
                return v if len(text) <= self.max_value_chars else self.summary(v, "json", text)
        n_items = size(v)
        if n_items is not None and n_items <= _WALK_ITEMS and len(outer) < 3 and id(v) not in outer:
            inner = (*outer, id(v))
            if issubclass(cls, dict):
                pairs = self._pairs(v)
                out: Any = {k: self.value(x, inner) for k, (_, x) in zip(self._keys(pairs), pairs)}
                if len(out) < len(pairs):  # (keys that read the same as text, 1 and "1": none is lost)
                    return self.summary(v, "repr")
            else:
                out = [self.value(x, inner) for x in members(v)]
            text = orjson.dumps(out).decode()
            return out if len(text) <= self.max_value_chars else self.summary(v, "json", text)
        if n_items is not None and n_items > _WALK_ITEMS:
            if n_items > self.max_value_chars // 2:  # (its JSON, 2 characters an item or more, is too long)
                return self._head_summary(v)
            try:  # a large container of plain values: summarised as JSON (with its length)
                text = orjson.dumps(v).decode()
            except (TypeError, ValueError, RecursionError):
                text = None
            if text is not None and ("null" not in text or finite(v)):  # (orjson writes NaN as null)
                return v if len(text) <= self.max_value_chars else self.summary(v, "json", text)
        return self.summary(v, "repr")

    def _pairs(self, v: dict) -> list[tuple[Any, Any]]:
        """The (key, value) pairs of a dict; a subclass with its own ``items`` (JSON reads
        it through them) gets them with the deadline of a repr."""
        items = type(v).items
        if items is dict.items or items is OrderedDict.items:  # (theirs: no code of the value's own)
            return list(items(v))
        return list(self._run_value_code(lambda: [(k, x) for k, x in v.items()]))

    def _keys(self, pairs: list[tuple[Any, Any]]) -> list[str]:
        """The keys of ``pairs`` as text: a str as it is (no lone surrogates), another key its
        repr (with the deadline of a repr where the key's own code makes it)."""
        keep = self.max_value_chars  # (a longer key makes the whole a summary anyway)
        keys = [k for k, _ in pairs]
        if all(map(_KEY_TYPES.__contains__, map(type, keys))):  # (their repr is Python's own)
            return [no_surrogates(k) if type(k) is str else safe_repr(k, keep) for k in keys]

        def texts() -> list[str]:
            return [no_surrogates(str.__str__(k)) if issubclass(type(k), str) else safe_repr(k, keep) for k in keys]
        return texts() if all(issubclass(type(k), str) for k in keys) else self._run_value_code(texts)

    def _head_summary(self, v: list | tuple | dict) -> dict[str, Any]:
        """The "json" summary of a container far too long to keep, from the JSON of its first
        items alone: a list of millions of numbers was encoded whole, 0.16 s a million on the
        task path (twice: when submitted and when it ended), for a summary of its start."""
        is_dict = issubclass(type(v), dict)
        text = bytearray(b"{" if is_dict else b"[")
        for item in itertools.islice(dict.items(v) if is_dict else members(v), self.summary_chars):
            key, x = item if is_dict else (None, item)
            if not plain(x) or is_dict and type(key) is not str:  # (NaN, an object...: its repr,
                return self.summary(v, "repr")  # which reprlib keeps short)
            try:  # (item by item, up to what the summary keeps: 2,000 texts of 64K were 130 MB)
                text += (orjson.dumps(key) + b":" + orjson.dumps(x)) if is_dict else orjson.dumps(x)
            except (TypeError, ValueError):  # (a lone surrogate)
                return self.summary(v, "repr")
            text += b","
            if len(text) > self.summary_chars:
                break
        text[-1:] = b"}" if is_dict else b"]"
        return self._start_summary(v, text.decode())

    def _start_summary(self, v: Any, text: str) -> dict[str, Any]:
        """The "json" summary of ``v`` from ``text``, the JSON of its start alone (its whole
        length unknown)."""
        return {**self.summary(v, "json", text), "truncated": True, "length": None}

    def summary(self, v: Any, kind: str, text: str | None = None) -> dict[str, Any]:
        """The marker dict standing for ``v``: kind "json" (too large) or "repr" (not JSON)."""
        bulky, items = bulk(v) or (None, None)
        long = self.summary_chars if bulky in ("bytes", "str") else _WALK_ITEMS  # (their repr: its start)
        big = text is None and items is not None and items > long
        extra: dict[str, Any] = {}
        if text is None:
            def read() -> tuple[str, dict[str, Any]]:  # (the value's own code: with the deadline of a repr)
                text, extra = self._short_repr(v, bulky) if big else repr(v), {}
                try:  # (its shape and dtype too: a __getattr__ may block as well)
                    shape, dtype = getattr(v, "shape", None), getattr(v, "dtype", None)
                    if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape):
                        extra["shape"] = [int.__int__(n) for n in tuple.__iter__(shape)]
                    if dtype is not None:
                        extra["dtype"] = no_surrogates(str.__str__(str(dtype)))[:200]
                except Exception:  # noqa: BLE001, S110 - attributes of odd objects may raise anything
                    pass
                return text, extra
            try:  # reprlib keeps the repr of a huge container short (and fast)
                text, extra = self._run_value_code(read)
            except TimeoutError as exc:  # (the deadline of run_value_code: the repr may block)
                text = f"<{_type_name(v)} object; its repr was not read: {exc}>"
            except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not lose the record
                text = f"<{_type_name(v)} object; repr() failed: {safe_repr(exc, 200)}>"
            text = no_surrogates(str.__str__(text))
        out: dict[str, Any] = {SUMMARY_KEY: kind, "type": _type_name(v), "repr": text[: self.summary_chars],
                               "truncated": big or len(text) > self.summary_chars,
                               "length": None if big else len(text)}
        if items is not None and bulky in ("list", "tuple", "dict", "set", "frozenset"):
            out["items"] = items
        return {**out, **extra}

    def _short_repr(self, v: Any, kind: str) -> str:
        """The repr of a long ``v`` (see values.bulk) cut after its first items: a repr of
        all of them (5M numbers in an array: 14 s, on the task path) kept only its start."""
        if kind == "bytes":
            return repr(v[: self.summary_chars])  # (exact bytes and bytearray: no code of their own)
        return getattr(self._reprlib, f"repr_{kind}")(v, self._reprlib.maxlevel)


# ---- reading back ---------------------------------------------------------------------------
def _time_ok(v: Any) -> bool:
    return v is None or (v.__class__ in (float, int) and v - v == 0)


def record_from_row(uid: Any, status: Any, started_at: Any, finished_at: Any, orphaned: Any,
                    record_text: Any, journal: dict[str, Any]) -> dict[str, Any] | None:
    """The task dict of one row (its columns override the stored record: status, start and
    end times, orphan mark), with ``journal`` as its "journal" entry; None (and one warning
    per process and kind) when the row does not validate."""
    problem = kind = None
    rec = None
    if status not in RANKS:
        kind, problem = "status", f"status {str(status)[:40]!r} is not a task status"
    elif not (_time_ok(started_at) and _time_ok(finished_at)):
        kind, problem = "time", "a start or end time is not a number"
    else:
        try:
            rec = orjson.loads(record_text) if isinstance(record_text, (str, bytes)) else None
        except orjson.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or rec.get("uid") != uid:
            kind, problem = "record", "its record is not a JSON object of that task"
        elif not _time_ok(rec.get("submitted_at")):
            kind, problem = "time", "its submission time is not a number"
        elif not all(rec.get(k) is None or isinstance(rec.get(k), str) for k in ("name", "user")):
            kind, problem = "name", "its name or user is not text"
    if problem is not None:
        warn_once(f"row-{kind}", f"qmagic experiment log: skipped a task record that does not "
                  f"validate (task {clean_name(uid, 60)!r}: {problem}); further such records are "
                  "skipped silently.", stacklevel=4)
        return None
    started = started_at is not None or rec.get("started_at") is not None or rec.get("status") == "running"
    rec["status"] = status
    if started_at is not None:
        rec["started_at"] = started_at
    if orphaned:
        rec.update(status="failed", error=ORPHAN_REASON if started else ORPHAN_QUEUED_REASON,
                   finished_at=finished_at)
    rec["journal"] = journal
    return rec
