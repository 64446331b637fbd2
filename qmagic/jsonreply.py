"""Replies as JSON bytes, with parts encoded once and sent many times.

:func:`reply_bytes` encodes a reply dict for the wire.  A value in it that is
:class:`Encoded` (a copy of a large task result that carries its own JSON, see
:mod:`qmagic.result_copies`) is not encoded again: its bytes are put in place as they are.
Lone surrogates, which no UTF-8 reader takes, are read as U+FFFD.

No IPython, widgets or zmq here.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from .texts import valid_unicode

__all__ = ["LARGE_BYTES", "Encoded", "EncodedDict", "EncodedList", "encoded", "reply_bytes"]

#: JSON larger than this (bytes) is *large*: a request, a reply, or a task result's copy.
#: The control channel rations the time it spends on large work while others wait
#: (:mod:`qmagic.remote.large_work`), and a large result's copy is kept with its JSON
#: (:mod:`qmagic.result_copies`); anything smaller is cheap to make again.
LARGE_BYTES = 64 * 1024

_SWAP_DEPTH = 4  # how deep in a reply's dicts an Encoded value is looked for


class Encoded:
    """A copy of plain JSON data that carries its own encoding (``json``: bytes), and the
    last reply made with it (``reply``: (the rest's text, the reply's bytes)): the same
    reply again is the same bytes object, so replies queued for clients that do not read
    share one buffer (each was a copy: 200 clients asking for a 10 MB result and never
    reading made the kernel hold 1.3 GB; found by a hostile test)."""

    json: bytes = b""
    token: str = ""
    reply: tuple[str, bytes] | None = None


class EncodedList(list, Encoded):
    """A list of plain JSON data with its encoding (see :class:`Encoded`)."""


class EncodedDict(dict, Encoded):
    """A dict of plain JSON data with its encoding (see :class:`Encoded`)."""


def _text(value: Any) -> str:
    body = json.dumps(value)
    if "\\ud" in body:  # (rare) perhaps a lone surrogate, which no UTF-8 reader takes
        body = valid_unicode(json.dumps(value, ensure_ascii=False))
    return body


def encoded(copy: Any) -> Any:
    """``copy`` (a list or dict of plain JSON data that nothing else changes) as an
    :class:`Encoded` copy with its JSON; any other value as it is.  Raises what
    ``json.dumps`` raises."""
    cls = EncodedList if type(copy) is list else EncodedDict if type(copy) is dict else None
    if cls is None:
        return copy
    kept = cls(copy)
    kept.json = _text(copy).encode("utf-8")
    kept.token = f"qmagic-encoded-{secrets.token_hex(16)}"  # (no client can guess it)
    return kept


def _swapped(value: Any, pieces: dict[str, Encoded], depth: int = 0) -> Any:
    """``value`` with every :class:`Encoded` value of its dicts replaced by its token (in
    ``pieces``); the dicts on the way are copied, nothing else."""
    if type(value) is not dict or depth > _SWAP_DEPTH:
        return value
    out = {}
    for key, item in value.items():
        if isinstance(item, Encoded):
            pieces[json.dumps(item.token)] = item
            out[key] = item.token
        else:
            out[key] = _swapped(item, pieces, depth + 1)
    return out


def reply_bytes(reply: dict) -> bytes:
    """``reply`` as UTF-8 JSON bytes, :class:`Encoded` values spliced in as they are.
    Raises what ``json.dumps`` raises."""
    pieces: dict[str, Encoded] = {}
    text = _text(_swapped(reply, pieces))
    if len(pieces) == 1:
        (piece,) = pieces.values()
        last = piece.reply
        if last is not None and last[0] == text:
            return last[1]
    data = text.encode("utf-8")
    for token, piece in pieces.items():
        data = data.replace(token.encode("ascii"), piece.json, 1)
    if len(pieces) == 1:
        piece.reply = (text, data)
    return data
