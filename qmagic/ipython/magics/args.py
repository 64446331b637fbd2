"""Reading a magic's line: options, a function name, Python expressions as arguments.

``%function_execute [OPTIONS] NAME [ARG ...] [KEY=VALUE ...]``: the words after NAME are
Python expressions evaluated in the namespace; quotes and brackets may contain spaces.
Bad input raises ``UsageError`` with one line saying what to write instead.

Every magic's line may end with a comment: a ``#`` that begins a word outside quotes starts
it (:func:`strip_comment`); a ``#`` inside quotes or inside a word (``--key k#1``) is text,
and so is the word right after an option that needs a value (``--lock-key #secret``: a lock
key may start with ``#``) unless it is a lone ``#`` (``--key  # note`` is a comment, and
``--key`` then says it needs a value).
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
from collections.abc import Iterator
from typing import Any, Callable

from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring
from IPython.utils.process import arg_split

from ...texts import printable

__all__ = ["split_words", "split_options", "unquote", "value_options",
           "strip_comment", "parse_line", "usage_text", "unquoted_hashes"]

_OPEN = {"(": ")", "[": "]", "{": "}"}


def split_words(line: str) -> list[tuple[str, int, int]]:
    """Split ``line`` at whitespace outside brackets and string literals.

    Returns ``(word, start, end)`` triples; quotes are kept (``"a b"`` stays one word with
    its quotes, ``[1, 2]`` stays one word).  Unbalanced brackets or quotes raise UsageError.
    """
    words: list[tuple[str, int, int]] = []
    i, n = 0, len(line)
    start: int | None = None
    stack: list[str] = []
    while i < n:
        ch = line[i]
        if ch in "'\"":
            if start is None:
                start = i
            i = _skip_string(line, i)
            continue
        if ch.isspace() and not stack:
            if start is not None:
                words.append((line[start:i], start, i))
                start = None
            i += 1
            continue
        if start is None:
            start = i
        if ch in _OPEN:
            stack.append(_OPEN[ch])
        elif ch in ")]}":
            if not stack or stack.pop() != ch:
                raise UsageError(f"Unbalanced {ch!r} at position {i + 1} in: {line.strip()}")
        i += 1
    if stack:
        raise UsageError(f"Missing {stack[-1]!r} in: {line.strip()}")
    if start is not None:
        words.append((line[start:], start, n))
    return words


def _skip_string(line: str, i: int) -> int:
    """Index just after the string literal starting with the quote at ``i``."""
    quote = line[i]
    if line.startswith(quote * 3, i):
        end = line.find(quote * 3, i + 3)
        while end != -1 and _escaped(line, end):
            end = line.find(quote * 3, end + 1)
        if end == -1:
            raise UsageError(f"Unterminated string starting at position {i + 1}: {line[i:].strip()}")
        return end + 3
    j = i + 1
    while j < len(line):
        if line[j] == "\\":
            j += 2
            continue
        if line[j] == quote:
            return j + 1
        j += 1
    raise UsageError(f"Unterminated string starting at position {i + 1}: {line[i:].strip()}")


def unquoted_hashes(text: str) -> Iterator[int]:
    """Indices of the ``#`` characters of ``text`` outside string literals (an unclosed
    quote runs to the end of the text)."""
    i, n = 0, len(text)
    while i < n:
        if text[i] in "'\"":
            try:
                i = _skip_string(text, i)
            except UsageError:
                return
            continue
        if text[i] == "#":
            yield i
        i += 1


def _word_spans(text: str) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each word of ``text``: split at whitespace outside string literals
    (an unclosed quote runs to the end of the text).  Lazy: a word is read only when asked
    for, so a quote in a comment never matters."""
    i, n = 0, len(text)
    start: int | None = None
    while i < n:
        if text[i] in "'\"":
            start = i if start is None else start
            try:
                i = _skip_string(text, i)
            except UsageError:
                i = n
            continue
        if text[i].isspace():
            if start is not None:
                yield start, i
                start = None
        elif start is None:
            start = i
        i += 1
    if start is not None:
        yield start, n


def strip_comment(line: str, options: dict[str, argparse.Action] | None = None) -> str:
    """``line`` without its trailing comment: from a word outside quotes that begins with
    ``#``.  ``#`` inside quotes or inside a word is kept, and so is the value of an option of
    ``options`` (:func:`_options`) that needs one: the word right after it, unless that word
    is a lone ``#``."""
    options = options or {}
    value_next = False  # the word after an option that needs a value
    for start, end in _word_spans(line):
        word = line[start:end]
        if word.startswith("#") and not (value_next and word != "#"):
            return line[:start].rstrip()
        value_next = _value_next(options, word)
    return line


def _value_next(options: dict[str, argparse.Action], word: str) -> bool:
    """True when ``word`` is an option of ``options`` whose value is the next word."""
    opt = _resolve(options, word)
    return opt is not None and options[opt].nargs is None and "=" not in word


def parse_line(magic: Any, line: str) -> Any:
    """The options and arguments of ``magic``'s line (IPython's ``magic_arguments``), its
    trailing comment ignored (:func:`strip_comment`); an option given without its value
    raises one UsageError line saying so, and any other error of argparse one line in our
    words (:func:`_argparse_line`)."""
    options = _options(magic.parser)
    line = strip_comment(line, options)
    words = arg_split(line, strict=False)  # (as IPython splits it)
    for i in range(len(words)):
        _check_value(options, words, i)
    try:
        return parse_argstring(magic, line)
    except UsageError as exc:  # (argparse's own words: said again as one line of ours)
        raise UsageError(_argparse_line(magic, str(exc), any("key" in a.dest for a in options.values()),
                                        _mistyped_option(options, words))) from None


#: A word that can only be meant as an option (``--timout``): letters, digits and hyphens.
_OPTION_WORD = re.compile(r"--[A-Za-z][A-Za-z0-9-]*")


def _mistyped_option(options: dict[str, argparse.Action], words: list[str]) -> tuple[str, str] | None:
    """``(word, option)`` for the first of ``words`` written as an option that is none of
    ``options`` but close to one (``--timout``: ``--timeout``), else None.  Such a word is a
    typo of the option, never a key, so a message may name it; the value of an option (the
    word after ``--key``, which may look like an option: ``"--force ab"``) is never looked at."""
    long_options = [opt for opt in options if opt.startswith("--")]
    value_next = False
    for word in words:
        if value_next:
            value_next = False
            continue
        typed = word.split("=", 1)[0]
        if _resolve(options, typed) is not None:
            value_next = _value_next(options, word)
        elif _OPTION_WORD.fullmatch(typed):
            close = difflib.get_close_matches(typed, long_options, n=1, cutoff=0.7)
            if close:
                return typed, close[0]
    return None


#: argparse's error texts that :func:`_argparse_line` says again in its own words.
_INVALID_VALUE = re.compile(r"argument (\S+?)(?:/\S+)?: invalid (\w+)(?: value)?: (.*?)(?: \(choose from .*)?\Z",
                            re.DOTALL)
_NO_VALUE = re.compile(r"argument (\S+?)(?:/\S+)?: ignored explicit argument", re.DOTALL)
_KINDS = {"int": "a whole number", "float": "a number"}


def _argparse_line(magic: Any, text: str, takes_key: bool, typo: tuple[str, str] | None = None) -> str:
    """argparse's error ``text`` for ``magic``'s line as one line: what was wrong and how to
    write it, without argparse's words.  In a magic that takes a key, no word of the line is
    repeated (it may be the key, or part of it), but for ``typo`` (:func:`_mistyped_option`)."""
    name = f"%{magic.__name__}"
    usage = usage_text(magic.parser, name)
    if text.startswith("unrecognized arguments"):
        if typo is not None:
            typed, option = typo
            if takes_key:
                return (f"Unexpected words after {name}: there is no option {typed} (did you mean "
                        f"{option}?); write {usage} (a key with spaces goes in quotes).")
            return f"{name} has no option {typed} (did you mean {option}?): write {usage}."
        if takes_key:
            return (f"Unexpected words after {name} (not repeated here: they may hold a key); "
                    f"write {usage} (a key with spaces goes in quotes).")
        words = text.partition(":")[2].strip()
        return f"{name} does not take {printable(words, 100)!r}: write {usage}."
    invalid = _INVALID_VALUE.match(text)
    if invalid:
        opt, kind, value = invalid.groups()
        action = _action(magic.parser, opt)
        if action is not None and action.choices:
            *most, last = map(str, action.choices)
            what, need = name, f"{', '.join(most)} or {last}" if most else last
        else:
            what, need = opt, _KINDS.get(kind, f"a {kind} value")
        given = "" if takes_key else f", not {printable(value.strip(), 100)}"
        return f"{what} takes {need}{given}: write {usage}."
    no_value = _NO_VALUE.match(text)
    if no_value:
        return f"{no_value.group(1)} takes no value: write {usage}."
    return f"{name} cannot read its options: write {usage} (see {name}? for help)."


def _action(parser: argparse.ArgumentParser, name: str) -> argparse.Action | None:
    """The action of option or positional ``name`` (as argparse names it in its errors)."""
    for action in parser._actions:  # noqa: SLF001 - argparse has no public view
        if name in action.option_strings or name in (action.dest, action.metavar):
            return action
    return None


def usage_text(parser: argparse.ArgumentParser, name: str) -> str:
    """How ``name`` (``%magic``) is written, in words a scientist reads: ``[--history N]``,
    ``[start|stop|status]`` (not argparse's ``[--history [N]]`` or ``[{start,stop,status}]``);
    the first line of every ``%magic?`` too."""
    parts = [name]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]  # noqa: SLF001
    for action in sorted(actions, key=lambda a: not a.option_strings):  # (options first, as argparse)
        if action.option_strings:
            value = "" if action.nargs == 0 else f" {action.metavar or action.dest.upper()}"
            parts.append(f"[{action.option_strings[0]}{value}]")
            continue
        word = "|".join(map(str, action.choices)) if action.choices else (action.metavar or action.dest.upper())
        if action.nargs == "*":
            parts.append(f"[{word} ...]")
        elif action.nargs == "?":
            parts.append(f"[{word}]")
        else:
            parts.append(word)
    return " ".join(parts)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """{option string: its action} for every option of ``parser``."""
    return {
        opt: action
        for action in parser._actions  # noqa: SLF001 - argparse has no public view
        for opt in action.option_strings
    }


def _resolve(options: dict[str, Any], word: str) -> str | None:
    """The option ``word`` names (``--opt`` or ``--opt=VALUE``; a unique prefix of a long
    option, as argparse takes it), else None."""
    opt = word.split("=", 1)[0]
    if opt in options:
        return opt
    if len(opt) <= 2 or not opt.startswith("--"):
        return None
    matches = [o for o in options if o.startswith(opt)]
    return matches[0] if len(matches) == 1 else None


def _check_value(options: dict[str, argparse.Action], words: list[str], i: int, after: str = "") -> None:
    """UsageError if ``words[i]`` is an option that takes one value and has none: at the end,
    before another option, or ``--opt=``.  ``after``: the function name it was written after."""
    opt = _resolve(options, words[i])
    if opt is None or options[opt].nargs is not None:  # (no value, or an optional one)
        return
    if "=" in words[i]:
        missing = not words[i].split("=", 1)[1]
    else:
        missing = i + 1 >= len(words) or _resolve(options, words[i + 1]) is not None
    if missing:
        usage = _usage(options, opt)
        if after:
            raise UsageError(f"{opt} needs a value: write it before the function name, "
                             f"%function_execute {usage} {after} ...")
        raise UsageError(f"{opt} needs a value: write {usage}.")


def _usage(options: dict[str, argparse.Action], opt: str) -> str:
    """How option ``opt`` is written: with the name of its value if it takes one (never a
    value typed on the line: it may be a lock key)."""
    action = options[opt]
    return opt if action.nargs == 0 else f"{opt} {action.metavar or action.dest.upper()}"


def _escaped(line: str, index: int) -> bool:
    backslashes = 0
    while index > 0 and line[index - 1] == "\\":
        backslashes += 1
        index -= 1
    return backslashes % 2 == 1


def unquote(value: str | None) -> str | None:
    """Option values keep their quotes in IPython's splitting: ``"a b"`` -> ``a b``."""
    if value is None or len(value) < 2 or value[0] != value[-1] or value[0] not in "'\"":
        return value
    try:
        result = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value
    return result if isinstance(result, str) else value


def value_options(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """{option string: takes a value} for every option of ``parser``."""
    return {opt: action.nargs != 0 for opt, action in _options(parser).items()}


def split_options(parser: argparse.ArgumentParser, line: str,
                  known: Callable[[str], bool] | None = None) -> tuple[str, str | None, list[str]]:
    """Split ``[OPTIONS] NAME [ARG ...]`` into (the options' text, NAME, ARG words).

    NAME may be a whole call (``scan(5, -5)``): it is not part of the options' text, so
    that a word of the call that looks like an option (``-5)``) is never read as one.

    A trailing comment is dropped first, then a trailing ``;``.  An option written after NAME raises UsageError
    saying that options come first; one without its value, that it needs one.  ``known``
    (is this a function's name?): a NAME right after a key that is not one is most likely
    the rest of an unquoted key with spaces, so it is refused without repeating it.
    """
    options = _options(parser)
    line = strip_comment(line, options).rstrip()
    if line.endswith(";") and not line.endswith(";;"):  # ``scan(3);`` (a notebook habit): the
        line = line[:-1]  # statement's end, as in Python
    words = split_words(line)
    texts = [w for w, _, _ in words]
    i = 0
    key_before = ""  # the key option whose value the word at i follows
    while i < len(words):
        word = texts[i]
        if word == "--":
            i += 1
            break
        if not word.startswith("-") or len(word) == 1 or word[1].isdigit() or word[1] == ".":
            break
        _check_value(options, texts, i)
        opt = _resolve(options, word)
        key_before = opt if opt is not None and "key" in options[opt].dest else ""
        if opt is not None and options[opt].nargs != 0 and "=" not in word:
            i += 1  # the option's value
        i += 1
    if i >= len(words):
        return line, None, []
    name, start, _ = words[i]
    if key_before and known is not None and not known(name):
        usage = _usage(options, key_before)
        raise UsageError(f"No function of the namespace follows {key_before}'s value (not repeated here: "
                         f"the words may hold the key); write %function_execute {usage} NAME ..., "
                         f"a key with spaces in quotes.")
    rest = texts[i + 1:]
    for j, word in enumerate(rest):
        opt = _resolve(options, word)  # (a unique prefix too, as before the name: ``--lock``
        if opt is not None:  # read as an argument would evaluate a lock key as Python)
            _check_value(options, rest, j, after=name)
            raise UsageError(
                f"Options go before the function name: %function_execute {_usage(options, opt)} "
                f"{name} ... ({word.split('=', 1)[0]!r} came after {name!r})."
            )
    return line[:start], name, rest
