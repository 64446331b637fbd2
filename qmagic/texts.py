"""Any value as text fit to print (:func:`printable`, :func:`safe_repr`), and the wordings
that modules of different layers tell the same thing with.

The one place that escapes and cuts a value for a message, a table or a panel, with one cut
marker (``...``).  Only the standard library here, so every layer may use it (core/ and
store/ too); :mod:`qmagic.format` re-exports both.  A refusal told by both the control
channel's transport and the protocol it carries (:func:`large_request_refused`,
:data:`LARGE_RESULT_NOT_SENT`) is worded here once, as every door's modules may import it.
"""

from __future__ import annotations

import re
import sys
from itertools import islice
from typing import Any

__all__ = ["BUSY_WITH_LARGE_REQUESTS", "json_decode_error", "LARGE_RESULT_NOT_SENT", "SUMMARY_KEY",
           "carriage_returns", "large_request_refused", "notebook_file_name", "printable", "safe_repr", "valid_unicode"]

#: Key that marks a value the experiment log replaced by a summary (see qmagic.store).
SUMMARY_KEY = "__qmagic_summary__"
# Escaped: control characters, line separators, and the invisible format characters that
# hide or reorder text (zero-width space, direction marks and overrides, word joiners, BOM);
# not the joiners that emoji and scripts need (U+200C, U+200D).
_FORMAT = r"\u2028\u2029\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"
_CONTROL = re.compile(rf"[\x00-\x1f\x7f-\x9f{_FORMAT}]")
_CONTROL_BUT_LINES = re.compile(rf"[\x00-\x08\x0b-\x1f\x7f-\x9f{_FORMAT}]")  # (tabs, newlines stay)
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """``text`` with every lone surrogate -- Python's stand-in for a byte it could not
    decode, e.g. of a file name that is not UTF-8 (os.listdir: surrogateescape) -- read as
    U+FFFD, as a terminal shows it: for text handed to other programs as it is (console
    output, the control channel's replies), which must encode it as UTF-8."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def carriage_returns(text: str) -> str:
    """``text`` with each line as a terminal leaves it after its carriage returns: a line
    redrawn in place (a progress bar printed with ``end="\\r"``) reads as the last text
    written on it, not as every step (``\\r\\n`` is a newline)."""
    if "\r" not in text:
        return text
    lines = text.replace("\r\n", "\n").split("\n")
    return "\n".join(next((p for p in reversed(line.split("\r")) if p), "") for line in lines)


def _failing(value: Any, what: str) -> str:
    """What a value whose ``str`` or ``repr`` raised reads: ``<Device with a failing repr>``;
    an int too long for Python to write in decimal (``sys.set_int_max_str_digits``) reads
    ``<int of about 5,000 digits>``."""
    if isinstance(value, int) and getattr(type(value), f"__{what}__") is getattr(int, f"__{what}__"):
        digits = int(abs(int.__index__(value)).bit_length() * 0.30103) + 1
        return f"<{type(value).__name__} of about {digits:,} digits>"
    return f"<{type(value).__name__} with a failing {what}>"


def printable(value: Any, limit: int | None = None, *, lines: bool = False) -> str:
    """``value`` as text fit to print anywhere: lone surrogates and control characters
    escaped (``\\udcff``, ``\\n``), cut to ``limit`` characters (ending in ``...``).
    With ``lines``, newlines and tabs stay (a block of text, e.g. a multi-line repr in a
    panel; ``\\r\\n`` reads as a newline).

    None reads ``""``, anything else but a str its ``str()``; never raises."""
    if isinstance(value, str):
        text = value
    elif value is None:
        text = ""
    else:
        try:
            text = str(value)
        except Exception:  # noqa: BLE001
            text = _failing(value, "str")
    cut = limit is not None and len(text) > limit
    if cut:  # (escaping only lengthens: a huge text is cut first)
        text = text[:limit]
    if not text.isprintable():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
        if lines:
            text = text.replace("\r\n", "\n")
        control = _CONTROL_BUT_LINES if lines else _CONTROL
        text = control.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
    if limit is not None and (cut or len(text) > limit):
        text = text[: max(0, limit - 3)] + "..."
    return text


def safe_repr(value: Any, limit: int = 2000, *, lines: bool = False) -> str:
    """``repr(value)`` as one printable line (:func:`printable`; with ``lines``, newlines
    stay) of at most ``limit`` characters, cut ending in ``...``.  Never raises: a
    ``__repr__`` that raises or returns no str shows as ``<Type with a failing repr>``.
    Summaries from the log show their kept repr.  The one helper for a value in a message:
    each message passes its own ``limit``."""
    try:
        if isinstance(value, dict) and SUMMARY_KEY in value:
            text = value.get("repr") or f"<{value.get('type', 'value')}>"
        elif type(value) is str and len(value) > limit:  # (a huge text is cut before its repr)
            text = _str_head(value, limit)
        else:
            text = _repr_head(value, limit, set()) if limit is not None else repr(value)
    except Exception:  # noqa: BLE001
        text = _failing(value, "repr")
    return printable(str.__str__(text) if isinstance(text, str) else text, limit, lines=lines)


def _str_head(value: str, size: int) -> str:
    """``repr(value[:size])`` in the quotes that ``repr(value)`` uses: a text that starts
    as ``repr(value)`` does, for as long as its first ``size`` characters' repr (repr takes
    double quotes for a text with a ' and no ", and its start may have neither)."""
    head = repr(value[:size])
    quote = '"' if "'" in value and '"' not in value else "'"
    if head[0] == quote:
        return head
    body = head[1:-1]  # (in double quotes: its ' are not escaped; in single ones: it has none)
    return quote + (body.replace("'", "\\'") if quote == "'" else body) + quote


_NUMBERS = frozenset({int, float, bool, type(None)})
_BRACKETS = {list: ("[", "]"), tuple: ("(", ")"), dict: ("{", "}"), set: ("{", "}"),
             frozenset: ("frozenset({", "})")}  # (an empty set: repr, "set()")


def _repr_head(value: Any, limit: int, active: set[int], depth: int = 0) -> str:
    """``repr(value)``, or for an exact list, tuple, dict, set or frozenset a text that starts with its first
    ``limit`` characters (what :func:`safe_repr` keeps), made an item at a time: the repr of
    a list of 5 million floats, one C call, held the GIL 1.3 s (the info socket wrote it for
    a task's result event: no remote client had a reply meanwhile; found by a hostile test).
    ``active``: the containers being written (one met again reads ``[...]``, as in repr)."""
    cls = type(value)
    if cls is str:
        return _str_head(value, limit + 1) if len(value) > limit else repr(value)
    brackets = _BRACKETS.get(cls)
    if brackets is None or depth > 20 or (len(value) <= 256 and set(
            map(type, value.values() if cls is dict else value)) <= _NUMBERS):
        return repr(value)
    if id(value) in active:
        return f"{brackets[0]}...{brackets[1]}"
    active.add(id(value))
    try:
        parts, size = [], 1
        # (its first items at once, in one C call: a dict or set changed meanwhile, by a
        # thread or an item's repr, made the walk raise; each item writes 2 characters or more)
        for item in list(islice(value.items() if cls is dict else value, limit // 2 + 2)):
            if cls is dict:
                text = (f"{_repr_head(item[0], limit, active, depth + 1)}: "
                        f"{_repr_head(item[1], limit, active, depth + 1)}")
            else:
                text = _repr_head(item, limit, active, depth + 1)
            parts.append(text)
            size += len(text) + 2
            if size > limit + 2:  # (longer than limit: the rest is cut anyway)
                return brackets[0] + ", ".join(parts)
        if cls is tuple and len(parts) == 1:
            return f"({parts[0]},)"
        return brackets[0] + ", ".join(parts) + brackets[1]
    finally:
        active.discard(id(value))


#: Why the control channel did not do a request's large work this time: large work had
#: used its share of the channel's time while others waited (qmagic.remote.large_work);
#: whose large work it was is not said (it may be the asker's own).
BUSY_WITH_LARGE_REQUESTS = "large requests have used their share of the kernel's time while other clients wait"
#: How task_result tells a large result not sent for that reason (after "The result ").
LARGE_RESULT_NOT_SENT = f"was not sent ({BUSY_WITH_LARGE_REQUESTS}): ask again in a second"


def large_request_refused(size: int) -> str:
    """The message of a large request (``size`` bytes) refused unread for that reason."""
    return (f"Error: This request ({size} bytes) was not processed: {BUSY_WITH_LARGE_REQUESTS}. "
            "Ask again in a second, or ask about fewer items per request.")


def json_decode_error(exc: BaseException) -> str:
    """Why a request's JSON could not be read, for the client that sent it: Python's own words,
    except where they name a remedy inside the kernel (``sys.set_int_max_str_digits()``, the
    recursion limit) that a remote client cannot apply."""
    if isinstance(exc, RecursionError):
        return "its lists or objects nest too deeply for the kernel to read: send them less deeply nested."
    text = str(exc)
    if "integer string conversion" in text:
        return ("an integer in it has more digits than the kernel reads (Python reads at most "
                f"{sys.get_int_max_str_digits()}): send such a number as a string.")
    return text


def notebook_file_name(path: str) -> str:
    """The file name of a notebook's path (``scan.ipynb`` of ``/home/a/scan.ipynb``, also of a
    Windows path): the one rule of the log's notebook column, its ``notebook=`` filter and the
    cell labels of every view."""
    return path.replace("\\", "/").rsplit("/", 1)[-1]
