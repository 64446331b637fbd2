"""The filters of the experiment log's history doors: checked, as SQL, and in Python.

:class:`Filters` is what :meth:`qmagic.store.reader.LogReader.records` and
:meth:`qmagic.store.journal.Journal.records` take (``status``, ``user``, ``name``,
``notebook``, ``since``, ``until``, ``uid``, ``limit``): one rule for the database's rows and
the records not stored yet.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.registry import uid_spellings
from ..errors import one_line
from ..texts import notebook_file_name, safe_repr
from .database import uid_bounds
from .records import FINAL_STATUSES, RANKS, clean_name
from .times import parse_time

__all__ = ["FILTER_NAMES", "WILDCARDS", "Filters", "sort_time"]

#: The wildcards of the ``name`` and ``notebook`` filters: ``*`` matches any run of
#: characters, ``?`` one character; every other character matches itself, brackets
#: included (a notebook named ``scan[2].ipynb``).  A filter without them is an exact match.
WILDCARDS = frozenset("*?")

#: Longest text filter, in characters (a notebook path; SQLite refuses GLOB patterns over
#: 50,000 bytes, and a bracket takes 3 once escaped).
FILTER_CHARS = 4096


def _check_text(key: str, value: Any) -> None:
    """A text filter must be a str SQLite can store and match like Python: UTF-8 (no lone
    surrogates), no NUL (GLOB stops there: it matched everything), at most FILTER_CHARS;
    else a one-line ValueError that says so."""
    if value is None:
        return
    if isinstance(value, str) and len(value) <= FILTER_CHARS and "\0" not in value:
        try:
            value.encode("utf-8")
            return
        except UnicodeEncodeError:
            pass
    raise ValueError(f"The {key} filter must be text: up to {FILTER_CHARS:,} characters, no NUL or "
                     f"lone surrogates (got {safe_repr(value, 40)}).")


#: The filters every history door takes (:class:`Filters`).
FILTER_NAMES = ("status", "user", "name", "notebook", "since", "until", "uid", "limit")


def _statuses(status: Any) -> set[str] | None:
    """The ``status`` filter as a set of str: one status, or several (a list, tuple, set
    or other iterable of str); else a one-line ValueError."""
    if status is None:
        return None
    if isinstance(status, str):
        return {status}
    try:
        found = set(status) if not isinstance(status, (bytes, bytearray)) else None
    except TypeError:  # (not iterable, or unhashable items)
        found = None
    if found is not None and all(isinstance(s, str) for s in found):
        return found
    raise ValueError(f"The status filter must be a status or a list of them, such as \"failed\" or "
                     f"[\"failed\", \"cancelled\"] (got {safe_repr(status, 40)}).")


class Filters:
    """The filters of :meth:`LogReader.records`, checked and turned into SQL (a bad one
    raises a one-line ValueError before anything is read), and matched in Python for
    records not in the database yet.  Every door (``Journal.records``, ``Worker.history``,
    ``qmagic.history``, ``qmagic.timeline``, ``qmagic-history``) reads ``name`` and
    ``notebook`` here, by one rule: :data:`WILDCARDS`."""

    def __init__(self, *, status: str | Iterable[str] | None = None, user: str | None = None,
                 name: str | None = None, notebook: str | None = None, since: Any = None,
                 until: Any = None, uid: str | None = None, limit: int | None = None,
                 **unknown: Any) -> None:
        try:
            self._take(status, user, name, notebook, since, until, uid, limit, unknown)
        except ValueError as exc:  # (its own line in a cell, no frames of the log's code)
            raise one_line(exc) from None

    def _take(self, status: Any, user: Any, name: Any, notebook: Any, since: Any, until: Any,
              uid: Any, limit: Any, unknown: dict[str, Any]) -> None:
        if unknown:
            raise ValueError(f"Unknown history filter {', '.join(map(repr, sorted(unknown)))}: use "
                             f"{', '.join(FILTER_NAMES[:-1])} or {FILTER_NAMES[-1]}.")
        self.statuses = _statuses(status)
        if self.statuses is not None and not self.statuses <= set(RANKS):
            bad = sorted(clean_name(s, 40) for s in self.statuses - set(RANKS))
            raise ValueError(f"Unknown task status {', '.join(bad)}: use queued, running, completed, "
                             "failed or cancelled.")
        for key, value in (("user", user), ("name", name), ("notebook", notebook), ("uid", uid)):
            _check_text(key, value)
        self.user, self.name, self.notebook, self.uid = user, name, notebook, uid
        self.uids = uid_spellings(uid) if uid else ()  # (a hex uid typed in capitals: lower case too)
        self.since, self.until = parse_time(since), parse_time(until)
        if self.since is not None and self.until is not None and self.since > self.until:
            shown = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in (self.since, self.until))
            raise ValueError("since ({}) is later than until ({}): no task can match; give the earlier "
                             "time as since.".format(*shown))
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise ValueError(f"limit must be a whole number (got {limit!r}).")
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be 0 or more: the number of newest tasks to keep (got {limit}).")
        self.limit = limit

    def sql(self) -> tuple[str, list[Any]]:
        """WHERE clause and parameters."""
        terms, params = ["t.record IS NOT NULL"], []
        if self.statuses is not None:
            terms.append(f"t.status IN ({', '.join('?' * len(self.statuses))})")
            params += sorted(self.statuses)
        if self.user is not None:
            terms.append("t.user = ?")
            params.append(self.user)
        if self.name is not None:
            wild = _wild(self.name)
            terms.append("t.name GLOB ?" if wild else "t.name = ?")
            params.append(_glob(self.name) if wild else self.name)
        if self.notebook is not None:
            if _wild(self.notebook):
                terms.append("(t.notebook GLOB ? OR t.notebook_name GLOB ?)")
                params += [_glob(self.notebook)] * 2
            elif notebook_file_name(self.notebook) != self.notebook:  # (a path)
                tail = _relative_tail(self.notebook)
                if tail is None:
                    terms.append("t.notebook_name = ? AND t.notebook = ?")
                    params += [notebook_file_name(self.notebook), self.notebook]
                else:  # (also the end of a recorded path: the folders above the one named)
                    terms.append("t.notebook_name = ? AND (t.notebook = ? OR "
                                 "substr('/' || replace(t.notebook, '\\', '/'), -?) = ?)")
                    params += [notebook_file_name(self.notebook), self.notebook, len(tail), tail]
            else:
                terms.append("t.notebook_name = ?")
                params.append(self.notebook)
        if self.uids:  # (an index range per spelling)
            terms.append("(" + " OR ".join(["t.uid >= ? AND t.uid < ?"] * len(self.uids)) + ")")
            params += [bound for typed in self.uids for bound in uid_bounds(typed)]
        if self.until is not None:
            terms.append("t.sort_time <= ?")
            params.append(self.until)
        if self.since is not None:  # active at some time after `since` (three index lookups;
            # an unfinished task is active until now, as in match(): a future `since` keeps none)
            unfinished = " UNION SELECT id FROM tasks WHERE rank < 3" if self.since <= time.time() else ""
            terms.append("t.id IN (SELECT id FROM tasks WHERE sort_time >= ? UNION SELECT id FROM "
                         f"tasks WHERE finished_at >= ?{unfinished})")
            params += [self.since, self.since]
        return "WHERE " + " AND ".join(terms), params

    def uid_matches(self, uid: str) -> bool:
        """Whether ``uid`` starts with the ``uid`` filter (in one of its spellings)."""
        return not self.uids or uid.startswith(self.uids)

    def match(self, rec: Mapping[str, Any], now: float) -> bool:
        """The same filters in Python, for records not in the database yet."""
        if self.statuses is not None and rec.get("status") not in self.statuses:
            return False
        if self.user is not None and rec.get("user") != self.user:
            return False
        if self.name is not None:
            name = rec.get("name")  # (a record without a name matches none: NULL in SQL)
            if not isinstance(name, str) or not _matches(name, self.name):
                return False
        if self.notebook is not None:
            nb = (rec.get("provenance") or {}).get("notebook") if isinstance(rec.get("provenance"), dict) else None
            if not isinstance(nb, str):
                return False
            if not (_matches(nb, self.notebook) or _matches(notebook_file_name(nb), self.notebook)):
                tail = None if _wild(self.notebook) else _relative_tail(self.notebook)
                if tail is None or not ("/" + nb.replace("\\", "/")).endswith(tail):
                    return False
        if not self.uid_matches(str(rec.get("uid"))):
            return False
        begin = sort_time(rec)
        if self.until is not None and begin > self.until:
            return False
        if self.since is not None:
            end = rec.get("finished_at")
            if rec.get("status") not in FINAL_STATUSES:
                end = now
            if begin < self.since and not (isinstance(end, (int, float)) and end >= self.since):
                return False
        return True


def _wild(pattern: str) -> bool:
    """True if ``pattern`` has a wildcard (see :data:`WILDCARDS`)."""
    return not WILDCARDS.isdisjoint(pattern)


def _relative_tail(path: str) -> str | None:
    """For a relative notebook path with folders (``2026-12/scan.ipynb``, as JupyterLab shows
    it, relative to its root), the end a recorded path must have to match it:
    ``/2026-12/scan.ipynb`` (kernels record the full path); None for an absolute path."""
    path = path.replace("\\", "/")
    if path.startswith(("/", "~")) or re.match(r"[A-Za-z]:/", path):
        return None
    while path.startswith("./"):
        path = path[2:]
    return "/" + path


def _glob(pattern: str) -> str:
    """``pattern`` for SQLite's GLOB and :func:`fnmatch.fnmatchcase` alike (both read
    ``[[]`` as a literal ``[``; a lone ``]`` is literal in both)."""
    return pattern.replace("[", "[[]")


def _matches(value: str, pattern: str) -> bool:
    """``value`` matches a ``name`` or ``notebook`` filter (exact, or with wildcards)."""
    return fnmatch.fnmatchcase(value, _glob(pattern)) if _wild(pattern) else value == pattern


def sort_time(rec: Mapping[str, Any]) -> float:
    """The time a record is sorted by: submitted, else started, else finished."""
    for key in ("submitted_at", "started_at", "finished_at"):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return 0.0
