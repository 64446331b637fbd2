"""Permission patterns that cannot freeze the kernel: checked when set, timed when matched.

A ``":regex"`` item of the permission rules is matched against function names that remote
clients choose.  A careless or hostile pattern such as ``^(a+)+$`` backtracks
exponentially: with Python's ``re`` a 27-letter name took 5 s, holding the GIL.  Two
defences, both needed:

1. **When the rules are set** (:func:`compile_pattern`) a pattern is refused, with the
   reason and what to write instead, if it

   - is longer than :data:`MAX_PATTERN_LENGTH` characters, or is not valid for Python's
     ``re`` (queueserver's dialect);
   - uses a backreference (``\\1``, ``(?P=name)``, ``(?(1)...)``);
   - repeats more than :data:`MAX_REPEAT_COUNT` times (no function name is longer), or
     grows beyond :data:`MAX_EXPANDED_SIZE` elements once its counted repetitions are
     expanded (the ``regex`` engine expands them when compiling: ``(((a{100}){100}){100}){100}``
     exhausts the memory);
   - can split one name between the iterations of a repetition in several ways, the cause
     of exponential backtracking: a variable repetition inside a repetition whose characters
     can also follow it (``(a+)+``, ``(\\w+_)+``, ``(.*a){12}``), or alternatives inside a
     repetition that can start with the same character (``(a|aa)+``, ``(\\w|_)+``).
     ``[a-z]+(_[a-z]+)*`` or ``(foo|bar)+`` are accepted: each iteration starts unambiguously.
     An atomic group ``(?>...)`` or a possessive quantifier (``a++``) removes the ambiguity.

2. **When a name is matched** (:func:`timed_search`) the ``regex`` engine runs with a
   CPU-time limit: first a short slice holding the GIL (legitimate patterns answer in
   microseconds), then, if needed, the rest of the budget with the GIL released, so that
   the kernel's main thread keeps running while a slow pattern is stopped.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from re import _parser as _sre  # type: ignore[attr-defined]  # the parser behind re.compile
from typing import Any

import regex

from ..errors import PermissionsFormatError

__all__ = [
    "FAST_SLICE",
    "MAX_EXPANDED_SIZE",
    "MAX_NAME_LENGTH",
    "MAX_PATTERN_LENGTH",
    "MAX_REPEAT_COUNT",
    "compile_pattern",
    "timed_search",
]

MAX_NAME_LENGTH = 100
"""Longest function name that is checked at all (longer names are refused before matching)."""
MAX_PATTERN_LENGTH = 200
"""Longest regular expression (after the ':' prefix and spaces are removed)."""
MAX_REPEAT_COUNT = MAX_NAME_LENGTH
"""Largest repetition count ``{m,n}``: a count above the longest name can never matter."""
MAX_EXPANDED_SIZE = 5000
"""Largest pattern size with counted repetitions expanded (compiles in a few ms at most)."""
FAST_SLICE = 0.005
"""CPU seconds a search may run holding the GIL before it continues with the GIL released."""

_MAXREPEAT = _sre.MAXREPEAT
_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT)
_POSSESSIVE = _sre.POSSESSIVE_REPEAT
_ATOMIC = _sre.ATOMIC_GROUP
_GROUPREFS = tuple(getattr(_sre, n) for n in ("GROUPREF", "GROUPREF_EXISTS") if hasattr(_sre, n))

# ---- character sets over the characters of function names ---------------------------------
# Names are identifiers, so only these characters matter: the 63 ASCII identifier characters,
# and "some non-ASCII identifier character" as one flag.  Sets over-approximate (never miss a
# character), so an overlap may be reported where there is none, never the reverse.
_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_DIGITS = frozenset("0123456789")
_Chars = tuple  # (frozenset of ASCII identifier characters, may contain a non-ASCII one)
_NONE: _Chars = (frozenset(), False)
_ALL: _Chars = (_ALPHABET, True)


def _fold(chars: Iterable[str]) -> frozenset:
    """Both cases of every letter: patterns may use ``(?i)``; folding is the safe side."""
    return frozenset(c for ch in chars for c in (ch.lower(), ch.upper())) & _ALPHABET


def _union(a: _Chars, b: _Chars) -> _Chars:
    return (a[0] | b[0], a[1] or b[1])


def _overlap(a: _Chars, b: _Chars) -> bool:
    return bool(a[0] & b[0]) or (a[1] and b[1])


def _class_chars(items: list) -> _Chars:
    """Characters of a ``[...]`` set (IN node)."""
    ascii_chars: set = set()
    other = False
    negate = False
    for op, av in items:
        if op is _sre.NEGATE:
            negate = True
        elif op is _sre.LITERAL:
            ascii_chars |= _fold(chr(av)) if av < 128 else set()
            other = other or av >= 128
        elif op is _sre.RANGE:
            lo, hi = av
            ascii_chars |= {c for c in _ALPHABET if lo <= ord(c.lower()) <= hi or lo <= ord(c.upper()) <= hi}
            other = other or hi >= 128
        elif op is _sre.CATEGORY and av in (_sre.CATEGORY_DIGIT,):
            ascii_chars |= _DIGITS
            other = True
        elif op is _sre.CATEGORY and av in (_sre.CATEGORY_SPACE, _sre.CATEGORY_LINEBREAK):
            pass
        else:  # \w, \W, \D, \S, unknown: anything (the safe side)
            return _ALL
    if negate:
        return (_ALPHABET - frozenset(ascii_chars), True)
    return (frozenset(ascii_chars), other)


def _atom_chars(op: Any, av: Any) -> _Chars | None:
    """Characters one consuming atom can match, or None if the node is not an atom."""
    if op is _sre.LITERAL:
        return (_fold(chr(av)), False) if av < 128 else (frozenset(), True)
    if op is _sre.NOT_LITERAL or op is _sre.ANY:
        return _ALL
    if op is _sre.IN:
        return _class_chars(av)
    return None


def _first(seq: Any) -> tuple[_Chars, bool]:
    """(characters that can start a match of ``seq``, whether ``seq`` can match empty)."""
    chars = _NONE
    for op, av in seq:
        item, nullable = _first_item(op, av)
        chars = _union(chars, item)
        if not nullable:
            return chars, False
    return chars, True


def _first_item(op: Any, av: Any) -> tuple[_Chars, bool]:
    atom = _atom_chars(op, av)
    if atom is not None:
        return atom, False
    if op in _REPEATS or op is _POSSESSIVE:
        lo, hi, sub = av
        if hi == 0:
            return _NONE, True
        chars, nullable = _first(sub)
        return chars, nullable or lo == 0
    if op is _sre.SUBPATTERN:
        return _first(av[-1])
    if op is _ATOMIC:
        return _first(av)
    if op is _sre.BRANCH:
        chars, nullable = _NONE, False
        for branch in av[1]:
            c, n = _first(branch)
            chars, nullable = _union(chars, c), nullable or n
        return chars, nullable
    if op is _sre.AT or op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return _NONE, True  # zero-width
    return _ALL, True  # unknown node: the safe side


def _all_chars(seq: Any) -> _Chars:
    """Every character ``seq`` can consume anywhere (lookarounds excluded)."""
    chars = _NONE
    for op, av in seq:
        atom = _atom_chars(op, av)
        if atom is not None:
            chars = _union(chars, atom)
        elif op in _REPEATS or op is _POSSESSIVE:
            chars = _union(chars, _all_chars(av[2]))
        elif op is _sre.SUBPATTERN:
            chars = _union(chars, _all_chars(av[-1]))
        elif op is _ATOMIC:
            chars = _union(chars, _all_chars(av))
        elif op is _sre.BRANCH:
            for branch in av[1]:
                chars = _union(chars, _all_chars(branch))
        elif not (op is _sre.AT or op in (_sre.ASSERT, _sre.ASSERT_NOT)):
            return _ALL
    return chars


# ---- the checks ---------------------------------------------------------------------------
_NESTED = (
    "a repetition inside a repetition can split a name in many ways (like '(a+)+' or "
    "'(\\w+_)+'), which takes exponential time on a name that almost matches; write the "
    "repetition once (':^a+$' instead of ':^(a+)+$'), start each iteration with a character "
    "the inner repetition cannot match (':^[a-z]+(_[a-z]+)*$'), or make the inner part atomic "
    "with '(?>...)'"
)
_ALTERNATIVES = (
    "alternatives inside a repetition can start the same way or be empty (like '(a|ab)+', "
    "'(\\w+|_)+' or '(a|)+'), which takes exponential time on a name that almost matches; use "
    "a character set ('[a-z_]+'), alternatives that start with different characters, or an "
    "atomic group ('(?>a|ab)+')"
)


def _size(seq: Any) -> int:
    """Pattern size with counted repetitions expanded, as the regex engine compiles it."""
    total = 0
    for op, av in seq:
        if op in _REPEATS or op is _POSSESSIVE:
            lo, hi, sub = av
            count = lo if hi == _MAXREPEAT else hi
            total += max(count, 1) * _size(sub) + 1
        elif op is _sre.SUBPATTERN:
            total += _size(av[-1]) + 1
        elif op is _ATOMIC:
            total += _size(av) + 1
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            total += _size(av[1]) + 1
        elif op is _sre.BRANCH:
            total += sum(_size(b) for b in av[1]) + 1
        else:
            total += 1
        if total > MAX_EXPANDED_SIZE:
            break
    return total


def _walk(seq: Any, follow: _Chars, in_loop: bool) -> str | None:
    """Find what makes ``seq`` ambiguous inside a repetition; ``follow``: what can come
    next inside the innermost enclosing repetition (its next iteration included)."""
    after = follow
    for op, av in reversed(list(seq)):
        problem = _walk_item(op, av, after, in_loop)
        if problem:
            return problem
        chars, nullable = _first_item(op, av)
        after = _union(chars, after) if nullable else chars
    return None


def _walk_item(op: Any, av: Any, follow: _Chars, in_loop: bool) -> str | None:
    if op in _GROUPREFS:
        return ("backreferences ('\\1', '(?P=name)', '(?(1)...)') are not supported in "
                "permission patterns: they can make matching take exponential time")
    if op in _REPEATS or op is _POSSESSIVE:
        lo, hi, sub = av
        for count in (lo, hi):
            if count != _MAXREPEAT and count > MAX_REPEAT_COUNT:
                return (f"the repetition count {count} is larger than the longest function name "
                        f"({MAX_NAME_LENGTH} characters); use a count up to {MAX_REPEAT_COUNT} or "
                        "'+' / '*'")
        if op is _POSSESSIVE:  # gives nothing back: a fresh, atomic context
            return _walk(sub, _first(sub)[0], hi > 1)
        if in_loop and lo != hi and _overlap(_all_chars(sub), follow):
            return _NESTED
        if hi > 1:  # a loop: the next iteration follows each iteration
            first = _first(sub)[0]
            return _walk(sub, _union(first, follow) if in_loop else first, True)
        return _walk(sub, follow, in_loop)
    if op is _sre.SUBPATTERN:
        return _walk(av[-1], follow, in_loop)
    if op is _ATOMIC:
        return _walk(av, _NONE, False)
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        return _walk(av[1], _NONE, False)
    if op is _sre.BRANCH:
        branches = av[1]
        if in_loop:
            firsts = [_first(b) for b in branches]
            if any(nullable for _, nullable in firsts):
                return _ALTERNATIVES
            for i, (a, _) in enumerate(firsts):
                if any(_overlap(a, b) for b, _ in firsts[i + 1:]):
                    return _ALTERNATIVES
        for branch in branches:
            problem = _walk(branch, follow, in_loop)
            if problem:
                return problem
    return None


def compile_pattern(body: str) -> regex.Pattern[str]:
    """Check a permission regular expression (the text after ``':'``) and compile it.

    Raises :class:`~qmagic.errors.PermissionsFormatError` with the reason (without the
    place in the rules: the caller adds it) if the pattern is invalid or risky.
    """
    if len(body) > MAX_PATTERN_LENGTH:
        raise PermissionsFormatError(
            f"the regular expression is {len(body)} characters long, more than "
            f"{MAX_PATTERN_LENGTH}; split it into several items of the list"
        )
    try:
        parsed = _sre.parse(body)
        re.compile(body)  # errors raised by the compiler (e.g. look-behind width)
    except (re.error, RecursionError, OverflowError) as exc:
        raise PermissionsFormatError(f"invalid regular expression ({exc})") from None
    try:
        problem = _walk(parsed, _NONE, False)  # first: it refuses counts that _size would multiply
        too_large = problem is None and _size(parsed) > MAX_EXPANDED_SIZE
    except (AttributeError, TypeError, ValueError, IndexError, RecursionError) as exc:  # pragma: no cover
        # re's parse tree is not a public API: a Python that changed it refuses, never guesses
        raise PermissionsFormatError(f"the pattern could not be checked on this Python ({exc!r}); "
                                     "please report this to qmagic") from None
    if too_large:
        problem = (f"the pattern is too large once its counted repetitions are expanded (more "
                   f"than {MAX_EXPANDED_SIZE} elements); use fewer or smaller '{{m,n}}' counts")
    if problem:
        raise PermissionsFormatError(problem)
    try:
        return regex.compile(body, flags=regex.VERSION0)
    except (regex.error, ValueError, OverflowError, MemoryError) as exc:
        raise PermissionsFormatError(f"regular expression not supported ({exc})") from None


def timed_search(pattern: regex.Pattern[str], name: str, budget: float,
                 gil_slice: float = FAST_SLICE) -> bool | None:
    """``pattern.search(name)`` within ``budget`` CPU seconds: True/False, or None if the
    time ran out.

    The search first runs at most ``gil_slice`` seconds holding the GIL (cheap, and enough
    for every reasonable pattern on a name of at most 100 characters), then the rest of the
    budget with the GIL released; a caller that makes several searches passes what is left
    of its own slice.  The ``regex`` engine measures process CPU time, so other busy
    threads of the kernel make the limit shorter in wall time, never longer.
    """
    if budget <= 0:
        return None
    held = min(gil_slice, budget)
    if held > 0:
        try:
            return pattern.search(name, timeout=held) is not None
        except TimeoutError:
            pass
    left = budget - max(held, 0.0)  # the first part used at most `held` of CPU time
    if left <= 0:
        return None
    try:
        return pattern.search(name, concurrent=True, timeout=left) is not None
    except TimeoutError:
        return None
