"""Replies as JSON bytes, with parts encoded once and sent many times.

:func:`reply_bytes` encodes a reply dict for the wire.  A value in it that is
:class:`Encoded` (a copy of a large task result that carries its own JSON, see
:mod:`qmagic.result_copies`) is not encoded again: its bytes are put in place as they are.
Lone surrogates, which no UTF-8 reader takes, are read as U+FFFD.  The JSON is strict:
NaN and infinities, which JSON has no words for (bluesky-httpserver answered 500 to a
reply holding one), are sent as null, and the reply's ``msg`` says so (:data:`NONFINITE_NOTE`).

No IPython, widgets or zmq here.
"""

from __future__ import annotations

import json
import re
import secrets
from itertools import islice
from typing import Any, Callable

from .texts import valid_unicode

__all__ = ["LARGE_BYTES", "NONFINITE_NOTE", "Encoded", "EncodedDict", "EncodedList", "check_json", "encoded",
           "json_text", "reply_bytes"]

#: JSON larger than this (bytes) is *large*: a request, a reply, or a task result's copy.
#: The control channel rations the time it spends on large work while others wait
#: (:mod:`qmagic.remote.large_work`), and a large result's copy is kept with its JSON
#: (:mod:`qmagic.result_copies`); anything smaller is cheap to make again.
LARGE_BYTES = 64 * 1024

_SWAP_DEPTH = 4  # how deep in a reply's dicts an Encoded value is looked for

#: Said in a reply's ``msg`` when a value in it held NaN or an infinity.
NONFINITE_NOTE = ("The reply holds NaN or infinity, which JSON cannot carry: each is sent as "
                  "null (the kernel keeps the exact value).")


class Encoded:
    """A copy of plain JSON data that carries its own encoding (``json``: bytes), and the
    last reply made with it (``reply``: (the rest's text, the reply's bytes)): the same
    reply again is the same bytes object, so replies queued for clients that do not read
    share one buffer (each was a copy: 200 clients asking for a 10 MB result and never
    reading made the kernel hold 1.3 GB; found by a hostile test)."""

    json: bytes = b""
    token: str = ""
    reply: tuple[str, bytes] | None = None
    nonfinite: bool = False  # NaN or an infinity was sent as null


class EncodedList(list, Encoded):
    """A list of plain JSON data with its encoding (see :class:`Encoded`)."""


class EncodedDict(dict, Encoded):
    """A dict of plain JSON data with its encoding (see :class:`Encoded`)."""


#: A JSON string (skipped as it is), or a bare NaN or infinity of ``json.dumps``'s output.
_NONFINITE = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|-?Infinity|NaN')


def _null(match: re.Match[str]) -> str:
    word = match.group()
    return word if word[0] == '"' else "null"


def json_text(value: Any, default: Callable[[Any], Any] | None = None, *,
              unescaped: bool = False) -> tuple[str, bool]:
    """``value`` as strict JSON text that any UTF-8 JSON reader takes, and whether NaN or
    an infinity was written as null (keys stay as ``json`` writes them: ``"NaN"``); lone
    surrogates read as U+FFFD.  ``default``: as ``json.dumps``'s.  Raises what
    ``json.dumps`` raises.  ``unescaped``: non-ASCII text written as it is, as it is
    anyway when the value holds a lone surrogate or a character past U+FFFF."""
    body = "" if unescaped else json.dumps(value, default=default)
    if unescaped or "\\ud" in body:  # (rare) perhaps a lone surrogate, which no UTF-8 reader takes
        body = valid_unicode(json.dumps(value, ensure_ascii=False, default=default))
    nonfinite = False
    if "NaN" in body or "Infinity" in body:  # (one pass over the text, strings skipped)
        strict = _NONFINITE.sub(_null, body)
        nonfinite, body = strict != body, strict
    return body, nonfinite


def encoded(copy: Any) -> Any:
    """``copy`` (a list or dict of plain JSON data that nothing else changes) as an
    :class:`Encoded` copy with its JSON; any other value as it is.  Raises what
    ``json.dumps`` raises."""
    cls = EncodedList if type(copy) is list else EncodedDict if type(copy) is dict else None
    if cls is None:
        return copy
    kept = cls(copy)
    pieces: list[bytes] = []
    kept.nonfinite = _pieces(copy, pieces, 0)
    kept.json = b"".join(pieces)
    if b"\\ud" in kept.json or not kept.json.isascii():  # (a piece was written unescaped:
        pieces = _Unescaped()                             # json_text writes all of it so)
        _pieces(copy, pieces, 0)
        kept.json = b"".join(pieces)
    kept.token = f"qmagic-encoded-{secrets.token_hex(16)}"  # (no client can guess it)
    return kept


#: Most values one ``json.dumps`` call writes when a large copy is encoded (a few ms): the
#: GIL is held through each call, so between calls the control channel, the info socket and
#: the cells run.  One call for a result of 10 million floats held it ~4-8 s, and every
#: client timed out (found by a hostile test).
_BATCH = 8192
_SCALARS = frozenset({str, int, float, bool, type(None)})
_ALWAYS = frozenset({str, float, bool, type(None)})  # json.dumps never refuses these (ints: huge ones)
#: Deeper than this a value is written by one call (large results are shallow; each level
#: walked here is a frame more under json's own, which a value nested ~900 deep needs).
_DEPTH = 8


def check_json(value: Any) -> None:
    """Raise what ``json.dumps(value)`` raises, if anything: the same check, made in batches
    for plain data (exact lists, tuples and dicts), so that a large value never holds the
    GIL for long (one call took ~1 s for 3 million floats at a remote task's end)."""
    try:
        _pieces(value, _Sink(), 0)
    except RecursionError:
        raise
    except RuntimeError:  # (a dict changed size between two batches -- a live value, which a
        json.dumps(value)  # thread may change: read at once, as json reads a dict's items)


def _piece(value: Any, out: list[bytes], prefix: str = "") -> bool:
    """``prefix`` and ``value``'s strict JSON (:func:`json_text`) appended to ``out``; True if
    NaN or an infinity was written as null."""
    text, nonfinite = json_text(value, unescaped=type(out) is _Unescaped)
    out.append((prefix + text).encode("utf-8"))
    return nonfinite


def _pieces(value: Any, out: list[bytes], depth: int) -> bool:
    """``json_text(value)``'s text, appended to ``out`` as UTF-8 pieces;
    exact lists, tuples and dicts (keys: str, int, float, bool or None, which json writes as
    texts) are written in pieces, each by one
    ``json.dumps`` call of at most about :data:`_BATCH` values (x16 in small containers),
    anything else by one call.  True if NaN or an infinity was written as null."""
    cls = type(value)
    if cls is tuple:
        cls = list
    elif cls is not list and (cls is not dict or not set(map(type, value)) <= _SCALARS):
        return _piece(value, out)
    if depth > _DEPTH or (len(value) <= _BATCH and _light([value])):
        return _piece(value, out)
    nonfinite, sep = False, ""
    out.append(b"[" if cls is list else b"{")
    if cls is list:
        for start in range(0, len(value), _BATCH):
            part = value[start:start + _BATCH]
            if _light(part):
                nonfinite |= _part(part, out, sep)
                sep = ", "
                continue
            for item in part:
                out.append(sep.encode())
                sep = ", "
                nonfinite |= _pieces(item, out, depth + 1)
    else:
        items = iter(value.items())
        while batch := dict(islice(items, _BATCH)):
            if _light(batch.values()):
                nonfinite |= _part(batch, out, sep)
                sep = ", "
                continue
            for key, item in batch.items():
                _key(key, out, sep)
                out.append(b": ")
                sep = ", "
                nonfinite |= _pieces(item, out, depth + 1)
    out.append(b"]" if cls is list else b"}")
    return nonfinite


def _key(key: Any, out: list[bytes], sep: str) -> None:
    """``sep`` and a dict's key as ``json.dumps`` writes it: a text, also for a number, True,
    False or None (``"1"``, ``"true"``); a huge int raises as it does."""
    text = json_text({key: 0}, unescaped=type(out) is _Unescaped)[0] if type(key) is not str else (
        json_text(key, unescaped=type(out) is _Unescaped)[0])
    out.append((sep + (text[1:text.rindex(":")] if type(key) is not str else text)).encode("utf-8"))


class _Unescaped(list):
    """Pieces written with their non-ASCII text as it is (``json_text(unescaped=True)``)."""


class _Sink(list):
    """Where the pieces of a value only checked (:func:`check_json`) go: nowhere."""

    def append(self, piece: Any) -> None:
        pass


def _light(items: Any) -> bool:
    """True if ``items`` are scalars and lists or dicts (a few levels deep) of scalars,
    :data:`_BATCH` x 16 values in all at most: one ``json.dumps`` call writes them in a few
    ms.  (Records such as ``{"pos": [x, y]}`` count: written one by one, a million of them
    took ~10x one ``json.dumps`` call.)"""
    return _budget_left(items, _BATCH * 16, 0) >= 0


def _budget_left(items: Any, budget: int, depth: int) -> int:
    """``budget`` less the values in ``items``' containers; -1 if that goes below 0, or
    if one of them is neither a scalar nor an exact list, tuple or dict of light ones."""
    for item in items:
        cls = type(item)
        if cls in _SCALARS:
            continue
        if cls is not list and cls is not tuple and cls is not dict:
            return -1
        budget -= len(item)
        if budget < 0:
            return -1
        values = item.values() if cls is dict else item
        kinds = set(map(type, values))
        if kinds <= _SCALARS:
            continue
        if depth >= _LIGHT_DEPTH or not kinds <= _NESTED:
            return -1
        budget = _budget_left(values, budget, depth + 1)
        if budget < 0:
            return -1
    return budget


_LIGHT_DEPTH = 3  # (how deep a light batch's containers go)
_NESTED = _SCALARS | {list, tuple, dict}


def _part(part: Any, out: list[bytes], sep: str) -> bool:
    """A batch of a list's items (a list) or of a dict's (a dict) as JSON text without its
    brackets, after ``sep``; True if NaN or an infinity was written as null."""
    if type(out) is _Sink and set(map(type, part.values() if type(part) is dict else part)) <= _ALWAYS and (
            type(part) is not dict or set(map(type, part)) <= _ALWAYS):
        return False  # (only checked: these always pass)
    text, nonfinite = json_text(part, unescaped=type(out) is _Unescaped)
    out.append((sep + text[1:-1]).encode("utf-8"))
    return nonfinite


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
    """``reply`` as UTF-8 JSON bytes, :class:`Encoded` values spliced in as they are; NaN
    and infinities as null, said in its ``msg``.  Raises what ``json.dumps`` raises."""
    pieces: dict[str, Encoded] = {}
    swapped = _swapped(reply, pieces)
    text, nonfinite = json_text(swapped)
    if nonfinite or any(piece.nonfinite for piece in pieces.values()):
        msg = swapped.get("msg")
        if msg is None or isinstance(msg, str):
            joint = " " if not msg or msg.endswith((".", "!", "?")) else ". "  # (two sentences)
            swapped = {**swapped, "msg": f"{msg}{joint}{NONFINITE_NOTE}" if msg else NONFINITE_NOTE}
            text, _ = json_text(swapped)
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
