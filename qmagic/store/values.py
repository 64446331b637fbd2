"""Reading task values as the built-in types hold them, for the experiment log's encoder
(:mod:`qmagic.store.records`): which values are small strict JSON, which hold a NaN, the
length and items of a list, tuple or dict.  None of these runs code of the value's own (a
subclass's ``__len__``, ``__iter__``, ``items``): on the task path such code has no deadline,
and it may block.

Only the standard library here.
"""

from __future__ import annotations

import array
import collections
import itertools
import math
import reprlib
from typing import Any

__all__ = ["I64", "U64", "HeadRepr", "bulk", "finite", "members", "no_surrogates", "plain", "size"]

_FAST_ITEMS = 64  # containers up to this size are checked by the encoder's fast path
I64, U64 = -(2**63), 2**64  # integers JSON readers take whole: [I64, U64)
_LEAVES = frozenset((type(None), str, int, bool))
#: Longer strings are not small JSON (the encoder keeps the start of a string longer than
#: its max_value_chars: such a string is not encoded whole on the fast path first).
_TEXT_CHARS = 1 << 16
#: Built-in types whose repr grows with their length, as the reprlib method that keeps it short.
_BULKY = {bytes: "bytes", bytearray: "bytes", array.array: "array", collections.deque: "deque",
          type({}.keys()): "list", type({}.values()): "list", type({}.items()): "list"}


def no_surrogates(text: str) -> str:
    """``text`` with every lone surrogate escaped (``\\udcff``): UTF-8 cannot hold them."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def plain(v: Any, depth: int = 0) -> bool:
    """True if ``v`` is small strict JSON made of builtin types (orjson may still refuse a
    lone surrogate: the caller falls back to the careful path then)."""
    cls = type(v)  # (not v.__class__, which an object may fake: a Mock(spec=list))
    if cls is str:
        return len(v) <= _TEXT_CHARS
    if cls is bool or v is None:
        return True
    if cls is int:
        return I64 <= v < U64
    if cls is float:
        return v - v == 0.0  # False for NaN and +-inf
    if depth < 3:
        if cls is list or cls is tuple:
            if len(v) > _FAST_ITEMS:
                return False
            for x in v:
                if not plain(x, depth + 1):
                    return False
            return True
        if cls is dict:
            if len(v) > _FAST_ITEMS:
                return False
            for k, x in v.items():
                if type(k) is not str or not plain(x, depth + 1):
                    return False
            return True
    return False


def finite(v: Any, depth: int = 0) -> bool:
    """False if ``v`` holds a NaN or an infinity anywhere (JSON has none: orjson writes null
    for them, in subclasses of list and dict too: an OrderedDict, a defaultdict) or nests
    too deep to look; reads what the built-in types hold (no code of a subclass runs)."""
    cls = type(v)
    if cls is float:
        return v - v == 0.0
    if cls in _LEAVES:
        return True
    if cls is list or cls is tuple:
        items = v
    elif cls is dict:
        items = v.values()
    elif issubclass(cls, float):
        return math.isfinite(v)
    elif issubclass(cls, (list, tuple, dict)):
        items = members(v)
    else:
        return True
    return depth < 32 and all(finite(x, depth + 1) for x in items)


def size(v: Any) -> int | None:
    """The length of a list, tuple or dict as the built-in type holds it (a subclass's own
    ``__len__`` never runs: it may block), else None."""
    cls = type(v)
    return (list.__len__(v) if issubclass(cls, list) else tuple.__len__(v) if issubclass(cls, tuple)
            else dict.__len__(v) if issubclass(cls, dict) else None)


def members(v: list | tuple | dict) -> Any:
    """The items of a list or tuple, the values of a dict, as the built-in type holds them."""
    cls = type(v)
    return list.__iter__(v) if issubclass(cls, list) else tuple.__iter__(v) if issubclass(cls, tuple) \
        else dict.values(v)


def bulk(v: Any) -> tuple[str, int] | None:
    """(kind, length) of a value whose repr grows with its length -- a list, tuple, dict, set,
    frozenset or str (a subclass too), bytes, bytearray, an array, a deque, a dict's view --
    read without its own code (kind: the reprlib method that keeps its repr short); else None."""
    for base in (list, tuple, dict, set, frozenset, str):
        if issubclass(type(v), base):
            return base.__name__, base.__len__(v)
    kind = _BULKY.get(type(v))
    return None if kind is None else (kind, len(v))


class HeadRepr(reprlib.Repr):
    """reprlib's short reprs, with a dict's or a set's first items as they come: reprlib
    sorts them all first (a dict of a million keys: 0.8 s, and the start it kept was not the
    value's own)."""

    def repr_dict(self, x: Any, level: int) -> str:
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in itertools.islice(x.items(), self.maxdict)] if level > 0 else ["..."]
        return self._joined(items, len(x), self.maxdict, "{", "}", "{}")

    def repr_set(self, x: Any, level: int) -> str:
        return self._members(x, level, self.maxset, "{", "}", "set()")

    def repr_frozenset(self, x: Any, level: int) -> str:
        return self._members(x, level, self.maxfrozenset, "frozenset({", "})", "frozenset()")

    def _members(self, x: Any, level: int, most: int, left: str, right: str, empty: str) -> str:
        items = [self.repr1(m, level - 1) for m in itertools.islice(x, most)] if level > 0 else ["..."]
        return self._joined(items, len(x), most, left, right, empty)

    @staticmethod
    def _joined(items: list[str], n: int, most: int, left: str, right: str, empty: str) -> str:
        if not n:
            return empty
        return left + ", ".join(items + (["..."] if n > most and items != ["..."] else [])) + right

