"""Tests of qmagic.core.patterns: permission regexes checked when set, timed when matched."""

from __future__ import annotations

import re
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmagic.core.patterns import (
    FAST_SLICE,
    MAX_EXPANDED_SIZE,
    MAX_PATTERN_LENGTH,
    compile_pattern,
    timed_search,
)
from qmagic.errors import PermissionsFormatError, QMagicError

#: Accepted by the checks, polynomial (not exponential), yet minutes long on a 100-letter
#: name without a time limit: lazy repetitions one after another.  Only the time limit
#: protects against it.
SLOW = "^" + "\\w*?" * 16 + "[0-9]$"
SLOW_NAME = "a" * 99 + "b"

ACCEPTED = [
    "^count$", "scan$", "^_", ".*", "^(?!_).*", "^det[3-5]$", "^unit_test.*$", ":?", "element$",
    "^[a-z]+(_[a-z]+)*$",            # each iteration starts with '_', which [a-z] cannot match
    "^(?:[a-z][a-z0-9]*_)*scan$",
    "(foo|bar)+", "(foo|fab)+", "(a+b)*", "(ab?)+", "(\\d{2})+", "^(get|set)_(x|y)$", "(?i)^Count",
    "^move_\\w+$", "^(?>a+)+$", "^(?>a|aa)+$", "^[^_]", "(?:(?:a{10}){10}){20}", "a{100}",
    "^(\\w|_)*$",                    # re turns '\w|_' into one character set: not ambiguous
    SLOW,
]

REFUSED = [
    ("^(a+)+$", "a repetition inside a repetition"),
    ("(a*)*b", "a repetition inside a repetition"),
    ("(\\w+_)+", "a repetition inside a repetition"),
    ("(.*a){12}", "a repetition inside a repetition"),
    ("(x+x+)+y", "a repetition inside a repetition"),
    ("(a+){2,}$", "a repetition inside a repetition"),
    ("([a-z]+_?)+", "a repetition inside a repetition"),
    ("(a{2,3})+", "a repetition inside a repetition"),
    ("^(([a-z])+.)+[A-Z]([a-z])+$", "a repetition inside a repetition"),
    ("(?=(a+)+b)", "a repetition inside a repetition"),   # inside a lookahead too
    ("^(a|a)+$", "alternatives inside a repetition"),
    ("^(a|aa)+$", "alternatives inside a repetition"),
    ("^(\\w+|_)+$", "alternatives inside a repetition"),
    ("(fo|fa|f)+", "alternatives inside a repetition"),   # re factors out 'f', leaving an empty one
    ("(a|)+", "alternatives inside a repetition"),
    ("(a)\\1", "backreferences"),
    ("(?P<x>a)(?P=x)", "backreferences"),
    ("(a)?(?(1)b|c)", "backreferences"),
    ("a{101}", "the repetition count 101 is larger than the longest function name"),
    ("a{2,1000}", "the repetition count 1000"),
    ("(?:(?:(?:a{100}){100}){100}){100}", "too large once its counted repetitions are expanded"),
    ("x" * (MAX_PATTERN_LENGTH + 1), f"{MAX_PATTERN_LENGTH + 1} characters long, more than {MAX_PATTERN_LENGTH}"),
    ("(?<=a+)b", "invalid regular expression (look-behind requires fixed-width pattern)"),
    ("[", "invalid regular expression (unterminated character set"),
    ("\\p{L}", "invalid regular expression (bad escape \\p"),   # not Python's re dialect
]


@pytest.mark.parametrize("body", ACCEPTED)
def test_accepted_patterns(body):
    compiled = compile_pattern(body)
    for name in ("count", "a_scan", "_x", "det4", "unit_test_1", "foo", "aab", "Count", "move_x", "aa", "abc_def"):
        assert (compiled.search(name) is not None) == (re.search(body, name) is not None), (body, name)


@pytest.mark.parametrize("body, reason", REFUSED)
def test_refused_patterns(body, reason):
    start = time.thread_time()  # (this thread's CPU: other load on the machine does not count)
    with pytest.raises(PermissionsFormatError) as info:
        compile_pattern(body)
    assert time.thread_time() - start < 1.0  # refused before anything expensive is built
    assert reason in str(info.value)
    assert isinstance(info.value, (QMagicError, ValueError))


def test_refusals_say_what_to_write_instead():
    messages = {}
    for body in ("^(a+)+$", "^(a|aa)+$"):
        with pytest.raises(PermissionsFormatError) as info:
            compile_pattern(body)
        messages[body] = str(info.value)
    assert "write the repetition once (':^a+$' instead of ':^(a+)+$')" in messages["^(a+)+$"]
    assert "'(?>...)'" in messages["^(a+)+$"]
    assert "atomic group ('(?>a|ab)+')" in messages["^(a|aa)+$"]
    for suggestion in ("^a+$", "^[a-z]+(_[a-z]+)*$", "^(?>a+)+$", "^(?>a|ab)+$"):
        compile_pattern(suggestion)  # every suggestion is itself accepted


def test_expanded_size_limit_is_about_compile_cost():
    # the largest accepted expansion compiles in milliseconds, not seconds
    body = f"(?:(?:[a-z_]{{10}}){{10}}){{{MAX_EXPANDED_SIZE // 110}}}"
    start = time.thread_time()
    compile_pattern(body)
    assert time.thread_time() - start < 0.5


def test_timed_search_answers_and_times_out():
    fast = compile_pattern("^func_")
    assert timed_search(fast, "func_a", 0.05) is True
    assert timed_search(fast, "a_func", 0.05) is False
    assert timed_search(fast, "func_a", 0.0) is None  # no budget: undecided, never a match
    slow = compile_pattern(SLOW)
    for budget in (FAST_SLICE / 2, 0.05):  # within the GIL-held slice, and past it
        start = time.thread_time()
        assert timed_search(slow, SLOW_NAME, budget) is None
        spent = time.thread_time() - start
        assert spent < budget + 0.05, spent  # this thread's CPU: the budget and a little more


# ---- fuzzing: the checker never crashes, and regex answers as re does ----------------------

_ATOMS = ["a", "b", "_", "1", "[a-z]", "[ab_]", "[^a]", "\\w", "\\d", ".", "\\b", "^", "$", "(?!a)", "(?=b)"]
_NAME_CHARS = "ab_1Z"


def _pattern(draw, depth=0):
    """A random pattern from a small grammar of atoms, groups, alternatives and quantifiers."""
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.integers(0, 3 if depth < 2 else 0))
        if kind == 0:
            part = draw(st.sampled_from(_ATOMS))
        elif kind == 1:
            part = "(" + _pattern(draw, depth + 1) + ")"
        elif kind == 2:
            part = "(" + _pattern(draw, depth + 1) + "|" + _pattern(draw, depth + 1) + ")"
        else:
            part = "(?>" + _pattern(draw, depth + 1) + ")"
        if part not in ("^", "$", "\\b") and not part.startswith("(?!") and not part.startswith("(?="):
            part += draw(st.sampled_from(["", "", "?", "*", "+", "*?", "+?", "{2}", "{1,3}", "++"]))
        parts.append(part)
    return "".join(parts)


@st.composite
def patterns(draw):
    return _pattern(draw)


@settings(max_examples=200, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(body=patterns(), names=st.lists(st.text(alphabet=_NAME_CHARS, min_size=1, max_size=12), max_size=6))
def test_checker_never_crashes_and_regex_agrees_with_re(body, names):
    try:
        compiled = compile_pattern(body)
    except PermissionsFormatError:
        return  # refused with a message: fine
    for name in names:
        found = timed_search(compiled, name, 1.0)
        assert found is not None  # short names: never out of time
        assert found == (re.search(body, name) is not None), (body, name)


def test_slow_search_releases_the_gil():
    """While a slow search runs past its first slice, other Python threads keep running."""
    slow = compile_pattern(SLOW)
    running = threading.Event()
    done = threading.Event()

    def search():
        running.set()
        try:
            assert timed_search(slow, SLOW_NAME, 0.3) is None
        finally:
            done.set()

    ticks = 0
    thread = threading.Thread(target=search)
    thread.start()
    assert running.wait(10)
    while not done.is_set():
        ticks += 1  # plain Python: runs only while the search does not hold the GIL
        sum(range(100))
    thread.join(10)
    # holding the GIL for the whole 0.3 s (as re does) would leave a handful of ticks at most
    assert ticks > 100, ticks
