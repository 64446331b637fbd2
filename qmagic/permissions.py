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
- ``":regex"``: ``re.search`` (unanchored: write ``^...$`` for a whole name).  One optional
  ``+``, ``-`` or ``?`` after the colon is ignored, like queueserver does for functions; the
  expression itself may not contain ``:``.  Spaces in items are removed, as queueserver does.
- A missing ``allowed_functions`` allows nothing; a missing ``forbidden_functions`` forbids
  nothing.  ``allowed_plans`` / ``forbidden_plans`` / ``allowed_devices`` /
  ``forbidden_devices`` are accepted (lists of strings or nulls) and ignored.  Any other key
  is refused (queueserver's schema does the same: it catches typos).

The rules are validated and compiled once; results are cached per (name, group).  This
module does not import IPython.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any, Iterable

import yaml

from .errors import PermissionRefused, PermissionsFormatError

__all__ = ["DEFAULT_PERMISSIONS", "Permissions"]

DEFAULT_PERMISSIONS: dict = {
    "user_groups": {
        "root": {"allowed_functions": [None], "forbidden_functions": [":^_"]},
        "primary": {"allowed_functions": [None], "forbidden_functions": [":^_"]},
    }
}
"""The rules used when none are configured: every group may call any function whose name
does not start with ``_``.  In this default mode *any* non-empty group name is accepted
(there is no "Unknown user group" refusal); an explicit copy of this dict, passed to
``Permissions``, accepts only ``root`` and ``primary``."""

_GROUP_KEYS = (
    "allowed_functions",
    "forbidden_functions",
    "allowed_plans",
    "forbidden_plans",
    "allowed_devices",
    "forbidden_devices",
)
_NAME = re.compile(r"[_a-zA-Z][_a-zA-Z0-9]*")
_CACHE_LIMIT = 4096  # check results kept; cleared when full (names may come from remote clients)


def _error(where: str, what: str) -> PermissionsFormatError:
    return PermissionsFormatError(f"{where}: {what}" if where else what)


class _Matcher:
    """One compiled list: exact names, regular expressions, or everything."""

    __slots__ = ("everything", "names", "patterns")

    def __init__(
        self, everything: bool = False, names: Iterable[str] = (), patterns: Iterable[re.Pattern] = ()
    ) -> None:
        self.everything = everything
        self.names = frozenset(names)
        self.patterns = tuple(patterns)

    def matches(self, name: str) -> bool:
        return self.everything or name in self.names or any(p.search(name) for p in self.patterns)


def _compile_item(item: str, where: str) -> tuple[str | None, re.Pattern | None]:
    """Return (exact name, None) or (None, compiled regex) for one function-list item."""
    text = item.replace(" ", "")
    hint = "write a regular expression with a leading ':' (e.g. ':^count$')"
    if text.startswith(":"):
        body = text[1:]
        if body[:1] in ("+", "-", "?"):
            body = body[1:]
        if not body:
            raise _error(where, f"empty regular expression {item!r}")
        if ":" in body:
            raise _error(where, f"{item!r}: a function pattern is one ':' followed by a regular expression "
                                "without ':' (device-style ':a:b' patterns do not apply to functions)")
        try:
            return None, re.compile(body)
        except re.error as exc:
            raise _error(where, f"invalid regular expression {item!r} ({exc})") from None
    if ":" in text:
        raise _error(where, f"{item!r}: a regular expression must start with ':'; {hint}")
    if not _NAME.fullmatch(text):
        raise _error(where, f"{item!r} is not a valid function name; to match several names, {hint}")
    return text, None


def _compile_list(items: Any, where: str, key: str) -> _Matcher:
    """Validate one list of the rules; compile it if it is a function list."""
    if not isinstance(items, list):
        raise _error(where, f"must be a list (of names, ':regex' items, or null first), not "
                            f"{type(items).__name__}; an empty value is not a list: write [] or '- null'")
    names, patterns = [], []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if item is None:
            if i:
                raise _error(at, "null is only allowed as the first item (null first means "
                                 "'everything' in allowed lists and 'nothing' in forbidden lists)")
        elif not isinstance(item, str):
            raise _error(at, f"{item!r} must be a string or null, not {type(item).__name__}")
        elif key.endswith("_functions"):
            name, pattern = _compile_item(item, at)
            if pattern is None:
                names.append(name)
            else:
                patterns.append(pattern)
    if items and items[0] is None:  # queueserver ignores the rest of the list
        return _Matcher(everything=key.startswith("allowed"))
    return _Matcher(False, names, patterns)


def _compile_rules(rules: Any) -> dict[str, tuple[_Matcher, _Matcher]]:
    """Validate the whole rule dict; return {group: (allowed, forbidden)} for functions."""
    if not isinstance(rules, dict):
        raise _error("", f"user group permissions must be a mapping with the key 'user_groups', "
                         f"not {type(rules).__name__}")
    for key in rules:
        if key != "user_groups":
            raise _error("", f"unsupported top-level key {key!r}: the only top-level key is 'user_groups'")
    if "user_groups" not in rules:
        raise _error("", "missing the required top-level key 'user_groups'")
    groups = rules["user_groups"]
    if not isinstance(groups, dict):
        raise _error("user_groups", f"must be a mapping of group name to rules, not {type(groups).__name__}")
    if "root" not in groups:
        raise _error("user_groups", "missing required user group 'root' (its lists filter the names "
                                    "for every group; use allowed_functions: [null] to allow all)")
    compiled = {}
    for group, spec in groups.items():
        where = f"user_groups.{group}"
        if not isinstance(group, str) or not group:
            raise _error("user_groups", f"group name {group!r} must be a non-empty string")
        if not isinstance(spec, dict):
            raise _error(where, f"must be a mapping with 'allowed_functions' / 'forbidden_functions' "
                                f"lists, not {type(spec).__name__}")
        for key in spec:
            if key not in _GROUP_KEYS:
                raise _error(where, f"unsupported key {key!r}; supported keys: {', '.join(_GROUP_KEYS)}")
        lists = {key: _compile_list(spec[key], f"{where}.{key}", key) for key in spec}
        empty = _Matcher()
        compiled[group] = (lists.get("allowed_functions", empty), lists.get("forbidden_functions", empty))
    return compiled


class Permissions:
    """Immutable, validated permission rules (queueserver's ``user_group_permissions``).

    ``Permissions()`` (or ``None``) gives the default rules, :data:`DEFAULT_PERMISSIONS`,
    which accept any non-empty group name.  Malformed rules raise
    :class:`~qmagic.errors.PermissionsFormatError` naming the faulty entry.
    """

    __slots__ = ("_rules", "_groups", "_default", "_cache")

    def __init__(self, user_group_permissions: dict | None = None) -> None:
        self._default = user_group_permissions is None
        rules = DEFAULT_PERMISSIONS if self._default else user_group_permissions
        self._groups = _compile_rules(rules)
        self._rules = copy.deepcopy(rules)  # after validation: only dicts, lists, str, None
        self._cache: dict[tuple[str, str], bool] = {}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Permissions":
        """Load rules from a YAML file (queueserver's ``user_group_permissions.yaml`` format)."""
        path = os.fspath(path)
        what = f"User group permissions file '{path}'"
        try:
            with open(path, encoding="utf-8") as stream:
                data = yaml.safe_load(stream)
        except FileNotFoundError:
            raise PermissionsFormatError(f"{what} does not exist: check the path.") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PermissionsFormatError(f"{what} cannot be read: {exc}") from exc
        except yaml.YAMLError as exc:
            raise PermissionsFormatError(f"{what} is not valid YAML: {exc}") from None
        if data is None:
            raise PermissionsFormatError(f"{what} is empty: it must contain a 'user_groups' mapping.")
        try:
            return cls(data)
        except PermissionsFormatError as exc:
            raise PermissionsFormatError(f"{what}: {exc}") from None

    def check(self, name: str, user: str | None, user_group: str | None) -> None:
        """Raise :class:`~qmagic.errors.PermissionRefused` (with the queueserver protocol's
        message) unless ``user`` of ``user_group`` may call function ``name``."""
        if not isinstance(user_group, str) or not user_group:  # queueserver checks the group first
            raise PermissionRefused("Error: Incorrect request format: user group is not specified")
        if not isinstance(user, str) or not user:
            raise PermissionRefused("Error: Incorrect request format: user name is not specified")
        if not self._knows(user_group):
            raise PermissionRefused(f"Error: Unknown user group: '{user_group}'")
        if not self.is_allowed(name, user_group):
            raise PermissionRefused(
                f"Error: Function {name!r} is not allowed for users from {user_group!r} group."
            )

    def is_allowed(self, name: str, user_group: str) -> bool:
        """Whether ``user_group`` may call ``name`` (False for an unknown group or a non-str name)."""
        if not isinstance(name, str) or not isinstance(user_group, str):
            return False
        key = (name, user_group)
        result = self._cache.get(key)
        if result is None:
            result = self._evaluate(name, user_group)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = result
        return result

    def groups(self) -> list[str]:
        """The group names defined by the rules (in default mode any other name works too)."""
        return list(self._groups)

    def allowed_names(self, names: Iterable[str], user_group: str) -> list[str]:
        """The items of ``names`` that ``user_group`` may call, in their order ([] for an unknown group)."""
        return [name for name in names if self.is_allowed(name, user_group)]

    def to_dict(self) -> dict:
        """A deep copy of the rules, JSON-able (for ``permissions_get`` replies)."""
        return copy.deepcopy(self._rules)

    def is_default(self) -> bool:
        """True when no rules were given and :data:`DEFAULT_PERMISSIONS` apply to any group."""
        return self._default

    def __repr__(self) -> str:
        return f"<Permissions groups={self.groups()}{' (default)' if self._default else ''}>"

    def _knows(self, user_group: str) -> bool:
        return user_group in self._groups or (self._default and bool(user_group))

    def _evaluate(self, name: str, user_group: str) -> bool:
        if not self._knows(user_group):
            return False
        root = self._groups["root"]
        own = self._groups.get(user_group, root)  # default mode: an unnamed group follows root
        return all(allow.matches(name) and not forbid.matches(name) for allow, forbid in (root, own))
