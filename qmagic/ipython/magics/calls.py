"""``%function_execute``'s call: ``NAME ARG ... KEY=VALUE ...`` or ``NAME(ARG, ..., KEY=VALUE)``.

The arguments are Python expressions evaluated in the namespace, one at a time; an
expression that fails is one ``UsageError`` line naming it, and ■ while one is evaluated
stops the magic with one line saying that no task was started.  The call form is read by
Python's own parser (``*items`` and ``**options`` unpack as in a call); nothing of it runs
but the arguments' expressions.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from typing import Any

from IPython.core.error import UsageError

from ...core.task import exception_text
from ...errors import one_line
from ...texts import printable
from .args import unquoted_hashes

__all__ = ["call_arguments", "function_call", "called_name"]

_KWARG = re.compile(r"([^\W\d]\w*)=(?!=)(.*)\Z", re.DOTALL)  # (any identifier, énergie=3 too)


def called_name(word: str) -> str:
    """The function's name of a NAME word: ``scan`` for ``scan`` and for ``scan(1, 2)``."""
    head, paren, _ = word.partition("(")
    return head if paren and word.endswith(")") and head.isidentifier() else word


def function_call(shell: Any, word: str, words: list[str],
                  defined: Callable[[str], bool] = lambda name: True) -> tuple[str, list[Any], dict[str, Any]]:
    """``(name, args, kwargs)`` of the NAME word and the ARG words after it: ``scan 1 2
    step=0.1`` and ``scan(1, 2, step=0.1)`` alike.  As in Python, a name that is not
    ``defined`` has no arguments evaluated (the task then fails, saying so)."""
    name = called_name(word)
    if not defined(name):
        return name, [], {}
    if name == word:
        return name, *call_arguments(shell, words, name)
    if words:
        raise UsageError(f"Write the call {printable(word, 60)} alone, or the name and its arguments "
                         f"apart ({name} ARG ...), not both: {printable(words[0], 40)!r} follows it.")
    _no_comment(word)
    try:
        call = ast.parse(word, mode="eval").body
    except SyntaxError as exc:
        raise UsageError(f"Cannot read the call {printable(word, 100)}: {exc.msg}.") from None
    except (ValueError, RecursionError, MemoryError):  # (a NUL character; nested past the parser's depth)
        raise UsageError(f"Cannot read the call {printable(word, 60)}: it is too long or too deeply nested; "
                         "put its arguments in variables first.") from None
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == name):
        return word, [], {}  # (not one call: the name check says what to write)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for node in call.args:
        if isinstance(node, ast.Starred):
            args.extend(_unpacked(_eval_node(shell, word, node.value, name), word, node, list))
        else:
            args.append(_eval_node(shell, word, node, name))
    for node in call.keywords:
        value = _eval_node(shell, word, node.value, name)
        items = _unpacked(value, word, node, dict) if node.arg is None else {node.arg: value}
        for key, item in items.items():
            if not isinstance(key, str):
                raise UsageError(f"Keywords must be text: {printable(_source(word, node), 60)} gives "
                                 f"{printable(repr(key), 40)}.")
            if key in kwargs:
                raise UsageError(f"Keyword argument {key} is given twice.")
            kwargs[key] = item
    return name, args, kwargs


def _unpacked(value: Any, word: str, node: ast.AST, kind: type) -> Any:
    """``*value`` as a list or ``**value`` as a dict (one line if it cannot be unpacked)."""
    try:
        if kind is dict:
            if not isinstance(value, Mapping):
                raise TypeError(f"a mapping is needed, not {type(value).__name__}")
            return dict(value)
        return list(value)
    except KeyboardInterrupt:
        raise one_line(KeyboardInterrupt(f"stopped unpacking {printable(_source(word, node), 60)}; no "
                                         "task was started.")) from None
    except Exception as exc:  # noqa: BLE001 - reported as a usage error
        raise UsageError(f"Cannot unpack {printable(_source(word, node), 60)}: "
                         f"{printable(exception_text(exc), 200)}.") from None


def _source(word: str, node: ast.AST) -> str:
    return ast.get_source_segment(word, node) or ""


def _no_comment(word: str) -> None:
    if next(unquoted_hashes(word), None) is not None:  # (Python would drop the rest)
        raise UsageError(
            f"'#' inside the argument {printable(word, 100)!r} would start a Python comment: put a "
            "space before a comment (# ...), or write the text in quotes."
        )


def call_arguments(shell: Any, words: list[str], name: str) -> tuple[list[Any], dict[str, Any]]:
    """Evaluate the ARG and KEY=VALUE words of a call of ``name`` in the shell's namespace
    (■ meanwhile: one line saying that no task was started)."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for word in words:
        _no_comment(word)
        match = _KWARG.match(word)
        if match and match.group(1).isidentifier():
            key, expr = match.groups()
            if not expr:
                raise UsageError(f"Missing value after {key}= (write {key}=VALUE without spaces).")
            if key in kwargs:
                raise UsageError(f"Keyword argument {key} is given twice.")
            kwargs[key] = _eval(shell, expr, name, word)
        else:
            if kwargs:
                raise UsageError(
                    f"Positional argument {word!r} follows a keyword argument; put ARGs before "
                    "KEY=VALUE pairs."
                )
            args.append(_eval(shell, word, name))
    return args, kwargs


def _eval_node(shell: Any, word: str, node: ast.expr, name: str) -> Any:
    """The argument ``node`` of the call ``word`` evaluated in the namespace (compiled from
    the node itself: its source alone may need the call's brackets, as ``y := 3`` does)."""
    return _eval(shell, _source(word, node), name, code=ast.Expression(node))


def _eval(shell: Any, expr: str, name: str, word: str | None = None, code: ast.Expression | None = None) -> Any:
    """``expr`` evaluated in the namespace (``word``: the argument as written, if longer;
    ``code``: its parsed form, if read already)."""
    word = expr if word is None else word
    try:
        source: Any = expr if code is None else compile(code, "<string>", "eval")
        return eval(source, shell.user_global_ns, shell.user_ns)  # noqa: S307 - the magic's purpose
    except KeyboardInterrupt:
        raise one_line(KeyboardInterrupt(f"stopped evaluating the argument {printable(word, 100)} of "
                                         f"{name}; no task was started.")) from None
    except Exception as exc:  # noqa: BLE001 - reported as a usage error
        kind = type(exc).__name__
        text = exception_text(exc)  # (never raises: a broken __str__ reads as the class name)
        what = kind if text == kind else f"{kind}: {printable(text, 300)}"
        raise UsageError(
            f"Cannot evaluate argument {expr!r}: {what}. Arguments are Python "
            "expressions (write strings in quotes; put expressions with spaces in brackets)."
        ) from None
