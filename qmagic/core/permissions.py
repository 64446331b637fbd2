"""Which user group may call which function: bluesky-queueserver's ``user_group_permissions``.

The rules have queueserver's format::

    {"user_groups": {GROUP: {"allowed_functions": [...], "forbidden_functions": [...]}}}

A function name is allowed for a group when it passes the ``root`` group's lists *and* the
group's own lists.  A name passes a pair of lists when it matches the allowed list and does
not match the forbidden list.  List items, as in queueserver:

- ``None`` (YAML ``null``) as the *first* item: "everything" in an allowed list (the rest of
  the list is ignored), "nothing" in a forbidden list (the whole list is ignored).  ``None``
  anywhere else is an error.
- ``"name"``: exactly this name (letters, digits and ``_``; no dots).
- ``":regex"``: a regular-expression search (unanchored: write ``^...$`` for a whole name).
  One optional ``+``, ``-`` or ``?`` after the colon is ignored, like queueserver does for
  functions; the expression itself may not contain ``:``.  Spaces in items are removed, as
  queueserver does.  Patterns that could take exponential time are refused when the rules
  are set, and every match runs with a time limit (see :mod:`qmagic.core.patterns`).
- A missing ``allowed_functions`` allows nothing; a missing ``forbidden_functions`` forbids
  nothing.  ``allowed_plans`` / ``forbidden_plans`` / ``allowed_devices`` /
  ``forbidden_devices`` are accepted (lists of strings or nulls) and ignored.  Any other key
  is refused (queueserver's schema does the same: it catches typos).

Only the groups the rules define exist: a request from another group is refused with
queueserver's ``"Error: Unknown user group: 'g'"``, also with the default rules.  Names are
checked before any matching: a Python identifier of at most 100 characters
(:func:`function_name_error`).  Results are cached per (name, group) in a bounded cache.
This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import copy
import keyword
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

from ..errors import PermissionRefused, PermissionsFormatError
from ..texts import printable, safe_repr
from ..yamlfile import load_yaml_file
from .patterns import FAST_SLICE, MAX_NAME_LENGTH, compile_pattern, timed_search

__all__ = [
    "DEFAULT_MATCH_TIMEOUT",
    "DEFAULT_PERMISSIONS",
    "MAX_NAME_LENGTH",
    "MSG_NO_GROUP",
    "Permissions",
    "function_name_error",
    "require_caller",
]

DEFAULT_PERMISSIONS: dict = {
    "user_groups": {
        "root": {"allowed_functions": [None], "forbidden_functions": [":^_"]},
        "primary": {"allowed_functions": [None], "forbidden_functions": [":^_"]},
    }
}
"""The rules used when none are configured: the groups of queueserver's default
``user_group_permissions.yaml`` that clients use (``root``, and ``primary``, the group
REManagerAPI, ``qserver`` and bluesky-httpserver send by default) may call any function
whose name does not start with ``_``.  Any other group is unknown and refused."""

DEFAULT_MATCH_TIMEOUT = 0.05
"""CPU seconds that deciding one name may take; a listing gets ten times this in total."""

_GROUP_KEYS = (
    "allowed_functions",
    "forbidden_functions",
    "allowed_plans",
    "forbidden_plans",
    "allowed_devices",
    "forbidden_devices",
)
_MAX_GROUPS = 1000
_MAX_ITEMS = 10_000  # list items in all groups together
_MAX_PATTERNS = 1000  # ':regex' function items in all groups together
_MAX_ITEM_LENGTH = 1000
_MAX_GROUP_NAME = 100
_CACHE_LIMIT = 4096  # (name, group) results kept, the oldest dropped first
_LISTING_FACTOR = 10  # allowed_names(): total budget, in units of the per-name timeout


def function_name_error(name: object) -> str | None:
    """None if ``name`` may be checked; else the refusal message (queueserver style).

    A checkable name is a ``str`` that is a Python identifier (no lone surrogates, no dots),
    not a keyword, of at most :data:`MAX_NAME_LENGTH` characters.
    """
    if isinstance(name, str):
        if len(name) <= MAX_NAME_LENGTH and name.isidentifier() and not keyword.iskeyword(name):
            return None
        shown = safe_repr(name[:60]) + (f"... ({len(name)} characters)" if len(name) > 60 else "")
    else:
        shown = f"of type {type(name).__name__}"
    return (f"Error: Invalid function name {shown}: a function name is a Python identifier "
            f"of at most {MAX_NAME_LENGTH} characters.")


#: queueserver's words for a request without a user group (most methods prefix "Error: ").
MSG_NO_GROUP = "Incorrect request format: user group is not specified"


def require_caller(user: object, user_group: object) -> None:
    """Raise :class:`~qmagic.errors.PermissionRefused` with queueserver's text unless the
    request names a user group and a user (non-empty strings; the group is checked first,
    as queueserver does)."""
    if not isinstance(user_group, str) or not user_group:
        raise PermissionRefused(f"Error: {MSG_NO_GROUP}")
    if not isinstance(user, str) or not user:
        raise PermissionRefused("Error: Incorrect request format: user name is not specified")


def _error(where: str, what: str) -> PermissionsFormatError:
    return PermissionsFormatError(f"{where}: {what}" if where else what)


class _Pattern:
    """One ``':regex'`` item: the text as written, its place, the compiled expression."""

    __slots__ = ("compiled", "text", "where")

    def __init__(self, text: str, where: str, compiled: Any) -> None:
        self.text, self.where, self.compiled = text, where, compiled


class _Matcher:
    """One compiled list: exact names, patterns, or everything."""

    __slots__ = ("everything", "names", "patterns")

    def __init__(self, everything: bool = False, names: Iterable[str] = (),
                 patterns: Iterable[_Pattern] = ()) -> None:
        self.everything = everything
        self.names = frozenset(names)
        self.patterns = tuple(patterns)


class _Run:
    """The time budget of deciding one name, in CPU seconds of this thread; the clock is
    read only when a pattern must be searched (a cached or exact-name answer costs none)."""

    __slots__ = ("budget", "end", "started", "timed_out")

    def __init__(self, budget: float, end: float | None = None) -> None:
        self.budget = budget
        self.end = end  # time.thread_time() at which a whole listing stops deciding
        self.started: float | None = None  # time.thread_time() at the first search
        self.timed_out = False  # a search was stopped by its time limit

    def left(self) -> float:
        now = time.thread_time()
        if self.started is None:
            self.started = now
        left = self.budget - (now - self.started)
        return left if self.end is None else min(left, self.end - now)


class _Compiler:
    """Validates the whole rule dict and compiles the function lists, counting sizes."""

    def __init__(self) -> None:
        self.items = 0
        self.patterns = 0

    def rules(self, rules: Any) -> dict[str, tuple[_Matcher, _Matcher]]:
        if not isinstance(rules, dict):
            raise _error("", f"user group permissions must be a mapping with the key 'user_groups', "
                             f"not {type(rules).__name__}")
        for key in rules:
            if key != "user_groups":
                raise _error("", f"unsupported top-level key {safe_repr(key, 100)}: the only top-level "
                                 "key is 'user_groups'")
        if "user_groups" not in rules:
            raise _error("", "'user_groups' is a required property: write the rules as "
                             "{'user_groups': {GROUP: {...}}}")
        groups = rules["user_groups"]
        if not isinstance(groups, dict):
            raise _error("user_groups", f"must be a mapping of group name to rules, not {type(groups).__name__}")
        if "root" not in groups:
            raise _error("user_groups", "Missing required user group: 'root' (its lists filter the names "
                                        "for every group; use allowed_functions: [null] to allow all)")
        if len(groups) > _MAX_GROUPS:
            raise _error("user_groups", f"{len(groups)} groups, more than {_MAX_GROUPS}")
        return {self._group_name(group): self.group(group, spec) for group, spec in groups.items()}

    @staticmethod
    def _group_name(group: Any) -> str:
        if not (isinstance(group, str) and group and len(group) <= _MAX_GROUP_NAME and group.isprintable()):
            raise _error("user_groups", f"group name {safe_repr(group, 100)} must be a non-empty string "
                                        f"of at most {_MAX_GROUP_NAME} printable characters")
        return group

    def group(self, group: str, spec: Any) -> tuple[_Matcher, _Matcher]:
        where = f"user_groups.{group}"
        if not isinstance(spec, dict):
            raise _error(where, f"must be a mapping with 'allowed_functions' / 'forbidden_functions' "
                                f"lists, not {type(spec).__name__}")
        for key in spec:
            if key not in _GROUP_KEYS:
                raise _error(where, f"unsupported key {safe_repr(key, 100)}; supported keys: "
                                    f"{', '.join(_GROUP_KEYS)}")
        lists = {key: self.list(spec[key], f"{where}.{key}", key) for key in spec}
        empty = _Matcher()
        return lists.get("allowed_functions", empty), lists.get("forbidden_functions", empty)

    def list(self, items: Any, where: str, key: str) -> _Matcher:
        if not isinstance(items, list):
            raise _error(where, f"must be a list (of names, ':regex' items, or null first), not "
                                f"{type(items).__name__}; an empty value is not a list: write [] or '- null'")
        self.items += len(items)
        if self.items > _MAX_ITEMS:
            raise _error(where, f"the lists hold more than {_MAX_ITEMS} items in total")
        names, patterns = [], []
        for i, item in enumerate(items):
            at = f"{where}[{i}]"
            if item is None:
                if i:
                    raise _error(at, "null is only allowed as the first item (null first means "
                                     "'everything' in allowed lists and 'nothing' in forbidden lists)")
            elif not isinstance(item, str):
                raise _error(at, f"{safe_repr(item, 100)} must be a string or null, not {type(item).__name__}")
            elif len(item) > _MAX_ITEM_LENGTH:
                raise _error(at, f"the item is {len(item)} characters long, more than {_MAX_ITEM_LENGTH}")
            elif key.endswith("_functions"):
                name, pattern = self.item(item, at)
                if pattern is None:
                    names.append(name)
                else:
                    patterns.append(pattern)
        if items and items[0] is None:  # queueserver ignores the rest of the list
            return _Matcher(everything=key.startswith("allowed"))
        return _Matcher(False, names, patterns)

    def item(self, item: str, where: str) -> tuple[str | None, _Pattern | None]:
        """(exact name, None) or (None, pattern) for one function-list item."""
        text = item.replace(" ", "")
        hint = "write a regular expression with a leading ':' (e.g. ':^count$')"
        if text.startswith(":"):
            body = text[1:]
            if body[:1] in ("+", "-", "?"):
                body = body[1:]
            if not body:
                raise _error(where, f"empty regular expression {item!r}")
            if ":" in body:
                raise _error(where, f"{item!r}: a function pattern is one ':' followed by a regular "
                                    "expression without ':' (device-style ':a:b' patterns do not apply "
                                    "to functions)")
            self.patterns += 1
            if self.patterns > _MAX_PATTERNS:
                raise _error(where, f"more than {_MAX_PATTERNS} regular expressions in the function lists")
            try:
                compiled = compile_pattern(body)
            except PermissionsFormatError as exc:
                raise _error(where, f"{item!r}: {exc}") from None
            return None, _Pattern(item, where, compiled)
        if ":" in text:
            raise _error(where, f"{item!r}: a regular expression must start with ':'; {hint}")
        if not text.isidentifier():
            raise _error(where, f"{item!r} is not a valid function name; to match several names, {hint}")
        return text, None


class Permissions:
    """Immutable, validated permission rules (queueserver's ``user_group_permissions``).

    ``Permissions()`` (or ``None``) gives :data:`DEFAULT_PERMISSIONS`.  Malformed or risky
    rules raise :class:`~qmagic.errors.PermissionsFormatError` naming the faulty entry.
    ``match_timeout``: CPU seconds that deciding one name may take (a name whose decision
    takes longer is refused, never allowed).  Thread-safe.
    """

    __slots__ = ("_cache", "_default", "_groups", "_lock", "_rules", "_slow", "_timeout")

    def __init__(self, user_group_permissions: dict | None = None, *,
                 match_timeout: float = DEFAULT_MATCH_TIMEOUT) -> None:
        if not isinstance(match_timeout, (int, float)) or not 0 < match_timeout <= 10:
            raise ValueError(f"match_timeout must be a number of seconds in (0, 10], not {match_timeout!r}")
        self._default = user_group_permissions is None
        rules = DEFAULT_PERMISSIONS if self._default else user_group_permissions
        self._groups = _Compiler().rules(rules)
        self._rules = copy.deepcopy(rules)  # after validation: only dicts, lists, str, None
        self._timeout = float(match_timeout)
        self._cache: dict[tuple[str, str], bool] = {}  # read without the lock, written under it
        self._slow: dict[_Pattern, int] = {}  # pattern -> number of timeouts
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, match_timeout: float = DEFAULT_MATCH_TIMEOUT) -> Permissions:
        """Load rules from a YAML file (queueserver's ``user_group_permissions.yaml`` format).

        The file must be a regular file of at most 1 MiB; it is opened without blocking (a
        FIFO or device at the path is refused, never waited for).
        """
        path = os.fspath(path)
        what = f"User group permissions file '{path}'"
        data = load_yaml_file(path, what, PermissionsFormatError)
        if data is None:
            raise PermissionsFormatError(f"{what} is empty: it must contain a 'user_groups' mapping.")
        try:
            return cls(data, match_timeout=match_timeout)
        except PermissionsFormatError as exc:
            raise PermissionsFormatError(f"{what}: {exc}") from None

    # -- questions ------------------------------------------------------------------------
    def check(self, name: object, user: object, user_group: object) -> None:
        """Raise :class:`~qmagic.errors.PermissionRefused` (with the queueserver protocol's
        message) unless ``user`` of ``user_group`` may call function ``name``."""
        if (type(name) is str and type(user_group) is str and type(user) is str and user
                and self._cache.get((name, user_group)) is True):
            return  # allowed before (only valid names of known groups are ever cached)
        problem = function_name_error(name)
        if problem:
            raise PermissionRefused(problem)
        require_caller(user, user_group)
        self.check_group(user_group)
        outcome = self._decide(name, user_group, _Run(self._timeout))
        if isinstance(outcome, _Pattern):
            raise PermissionRefused(
                f"Error: Function {name!r} is not allowed for users from {user_group!r} group: "
                f"matching the permission pattern {outcome.text!r} ({outcome.where}) took longer "
                f"than the {self._timeout * 1000:g} ms allowed; simplify that pattern."
            )
        if not outcome:
            raise PermissionRefused(f"Error: Function {name!r} is not allowed for users from {user_group!r} group.")

    def check_group(self, user_group: object) -> None:
        """Raise :class:`~qmagic.errors.PermissionRefused` (queueserver's text) unless
        ``user_group`` is a group of these rules."""
        if not isinstance(user_group, str) or user_group not in self._groups:
            shown = printable("None" if user_group is None else user_group, 103)  # (100 and "...")
            raise PermissionRefused(f"Error: Unknown user group: '{shown}'")

    def is_allowed(self, name: object, user_group: object) -> bool:
        """Whether ``user_group`` may call ``name``: False for an unknown group, an invalid
        name, or a decision that ran out of time."""
        if type(name) is str and type(user_group) is str:
            cached = self._cache.get((name, user_group))
            if cached is not None:
                return cached
        if function_name_error(name) or not isinstance(user_group, str) or user_group not in self._groups:
            return False
        return self._decide(name, user_group, _Run(self._timeout)) is True

    def allowed_names(self, names: Iterable[str], user_group: str) -> list[str]:
        """The items of ``names`` that ``user_group`` may call, in their order ([] for an
        unknown group).  The whole listing has a CPU budget of ten times the per-name
        timeout; names left undecided when it runs out are left out."""
        if not isinstance(user_group, str) or user_group not in self._groups:
            return []
        end = time.thread_time() + self._timeout * _LISTING_FACTOR
        allowed = []
        for name in names:
            if function_name_error(name):
                continue
            if self._decide(name, user_group, _Run(self._timeout, end)) is True:
                allowed.append(name)
        return allowed

    def groups(self) -> list[str]:
        """The group names the rules define (every other group is unknown)."""
        return list(self._groups)

    def to_dict(self) -> dict:
        """A deep copy of the rules, JSON-able (for ``permissions_get`` replies)."""
        return copy.deepcopy(self._rules)

    def is_default(self) -> bool:
        """True when no rules were given and :data:`DEFAULT_PERMISSIONS` apply."""
        return self._default

    @property
    def match_timeout(self) -> float:
        """CPU seconds that deciding one name may take."""
        return self._timeout

    def slow_patterns(self) -> list[dict]:
        """Patterns that ran out of time so far: ``{"where", "pattern", "timeouts"}`` each,
        e.g. to warn the person who set the rules."""
        with self._lock:
            slow = list(self._slow.items())
        return [{"where": p.where, "pattern": p.text, "timeouts": n} for p, n in slow]

    def __repr__(self) -> str:
        return f"<Permissions groups={self.groups()}{' (default)' if self._default else ''}>"

    # -- evaluation -----------------------------------------------------------------------
    def _decide(self, name: str, user_group: str, run: _Run) -> bool | _Pattern:
        """True / False (cached), or the pattern that ran out of time (never cached)."""
        key = (name, user_group)
        cached = self._cache.get(key)  # atomic; entries never change once written
        if cached is not None:
            return cached
        root = self._groups["root"]
        own = self._groups[user_group]
        outcome: bool | _Pattern = True
        for allow, forbid in (root, own) if user_group != "root" else (root,):
            outcome = self._matches(allow, name, run)
            if outcome is True:
                hit = self._matches(forbid, name, run)
                outcome = hit if isinstance(hit, _Pattern) else not hit
            if outcome is not True:
                break
        if isinstance(outcome, _Pattern):
            if run.timed_out:
                with self._lock:
                    self._slow[outcome] = self._slow.get(outcome, 0) + 1
            return outcome
        with self._lock:
            self._cache[key] = outcome
            if len(self._cache) > _CACHE_LIMIT:
                del self._cache[next(iter(self._cache))]  # the oldest entry
        return outcome

    @staticmethod
    def _matches(matcher: _Matcher, name: str, run: _Run) -> bool | _Pattern:
        """Whether ``name`` matches the list, or the pattern that ran out of time."""
        if matcher.everything or name in matcher.names:
            return True
        for pattern in matcher.patterns:
            left = run.left()
            if left <= 0:  # the budget went to earlier patterns: undecided, not this one's fault
                return pattern
            # the GIL is held for FAST_SLICE per decision in all, not per pattern
            found = timed_search(pattern.compiled, name, left, FAST_SLICE - (run.budget - left))
            if found is None:
                run.timed_out = True
                return pattern
            if found:
                return True
        return False
