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

from .records import RANKS

__all__ = ["match_line", "salvage"]

#: Where a line of ours may start: ``[1,"``, ``[2,"`` or ``[3,"``, a uid, ``",`` and more.
_START = re.compile(rb'\[[123],"[^"]+",(?=.)', re.DOTALL)


#: ``match_line(line)``: a match if ``line`` starts like a line of ours (the readers' quick
#: check, no parsing), ending after the uid's ``",``; else None.
match_line = _START.match


def salvage(line: bytes) -> int:
    """Where our complete line starts at the end of the damaged ``line`` (another program's
    bytes before it), or -1 if it ends in none."""
    for start in reversed([m.start() for m in _START.finditer(line, 1)]):  # (ours is the last)
        if _is_ours(line[start:]):
            return start
    return -1


def _is_ours(line: bytes) -> bool:
    try:
        rank, uid, body = orjson.loads(line)
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return False
    if uid.__class__ is not str:
        return False
    name = uid.encode()  # (its bytes in the line: a uid of non-ASCII characters is longer there)
    if line[4:5 + len(name)] != name + b'"':
        return False
    if body.__class__ is dict:
        status = body.get("status")
        return status.__class__ is str and RANKS.get(status) == rank and body.get("uid") == uid
    return rank == 2 and body.__class__ in (int, float)
