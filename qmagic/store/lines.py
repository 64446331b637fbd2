"""Our lines in the spool, and our line at the end of damage another program glued to it.

A line of ours is ``[rank,"uid",{record}]`` (rank 1-3, see
:meth:`~qmagic.store.records.RecordEncoder.encode`) or a start line ``[2,"uid",time]``.
Bytes another program appended to a live segment without a newline glue themselves to the
next line this process appends: that line was damaged as a whole and lost (its task's
record never reached SQLite, nor, after a SIGKILL, the recovery).  :func:`salvage` finds
our complete line at the end of such a line; the bytes before it stay damage.  The one
rule of every reader: the writer, lookups and the history, recovery.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import re

import orjson

from .records import MAX_LINE, RANKS

__all__ = ["glued", "match_line", "our_line", "salvage"]

#: Where a line of ours may start: ``[1,"``, ``[2,"`` or ``[3,"``, a uid, ``",`` and more.
_START = re.compile(rb'\[[123],"[^"]+",(?=.)', re.DOTALL)


#: ``match_line(line)``: a match if ``line`` starts like a line of ours (the readers' quick
#: check, no parsing), ending after the uid's ``",``; else None.
match_line = _START.match

#: Read backwards (bytes reversed): a JSON string (its quotes not escaped: an even number of
#: backslashes before them), a closing bracket (group 1) or an opening one (group 2).
_BACKWARDS = re.compile(rb'"[^"]*(?:"(?=(?:\\\\)*\\(?!\\))[^"]*)*"|([\]}])|([\[{])')


def salvage(line: bytes) -> int:
    """Where our complete line starts at the end of the damaged ``line`` (another program's
    bytes before it), or -1 if it ends in none.

    Our line at the end starts at the bracket that closes with the line's last ``]``: read
    backwards from there (the only start that can be ours, parsed once: trying every start
    of a look-alike from the right, 0.98 MB with 140,000 of them took 14.5 s; arguments
    like ``[[1,"a",0.5], ...]`` of a line of ours cut short by a full disk get there).  Only
    a line ending as ours do, and within its last ``MAX_LINE`` bytes.  Never in a complete
    line of ours (whatever its strings hold): read backwards, its brackets close at its own
    first byte."""
    if line[-1:] != b"]":
        return -1
    first = max(1, len(line) - MAX_LINE)  # (a line of ours is shorter: see records.MAX_LINE)
    depth = 0
    for token in _BACKWARDS.finditer(line[:first - 1:-1]):
        if token.lastindex == 1:
            depth += 1
        elif token.lastindex == 2:
            depth -= 1
            if depth <= 0:
                start = len(line) - 1 - token.start()
                return start if depth == 0 and match_line(line, start) and _is_ours(line, start) else -1
    return -1


def glued(line: bytes) -> int:
    """Where our complete line starts after the start of ``line``, a line that starts like
    one of ours but is not parsed (it lost to another line of its uid): the end of half a
    line of ours (a ``truncate`` cut it) that our next line was glued to; -1 if none.  A
    search for another start first (most lines hold none)."""
    if line.find(b"[", 1) < 0 or _START.search(line, 1) is None:
        return -1
    return salvage(line)


def our_line(line: bytes) -> int:
    """Where the line of ours in the spool line ``line`` starts: 0 if it starts like one,
    later if it comes after another program's bytes or half a line of ours, -1 if there is
    none.  The rule of a reader that does not parse (lookups' index): rows_from_lines parses
    the lines it takes, the same rule."""
    if match_line(line) is None or len(line) >= MAX_LINE:  # (longer than any of ours)
        return salvage(line)
    at = glued(line)
    return 0 if at < 0 else at


def _is_ours(line: bytes, start: int) -> bool:
    """True if ``line`` from ``start`` is a line of ours (parsed without a copy of it)."""
    try:
        rank, uid, body = orjson.loads(memoryview(line)[start:])
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return False
    if uid.__class__ is not str:
        return False
    name = uid.encode()  # (its bytes in the line: a uid of non-ASCII characters is longer there)
    if line[start + 4:start + 5 + len(name)] != name + b'"':
        return False
    if body.__class__ is dict:
        status = body.get("status")
        return status.__class__ is str and RANKS.get(status) == rank and body.get("uid") == uid
    return rank == 2 and body.__class__ in (int, float)
