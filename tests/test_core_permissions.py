"""Tests of qmagic.core.permissions: queueserver's user_group_permissions rules for functions."""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmagic.core.permissions import (
    DEFAULT_PERMISSIONS,
    MAX_NAME_LENGTH,
    Permissions,
    function_name_error,
)
from qmagic.errors import (
    PermissionRefused,
    PermissionsFormatError,
    QMagicError,
    RequestRefused,
)

# The function part of queueserver's profile_collection_sim/user_group_permissions.yaml.
QS_YAML = """
user_groups:
  root:
    allowed_plans: [null]
    forbidden_plans: [":^_"]
    allowed_devices: [null]
    forbidden_devices: [":^_:?.*"]
    allowed_functions:
      - null  # Allow all
    forbidden_functions:
      - ":^_"
  primary:
    allowed_plans: [":.*"]
    forbidden_plans: [null]
    allowed_devices: [":?.*:depth=5"]
    forbidden_devices: [null]
    allowed_functions:
      - "function_sleep"
      - ":^func_for_test"
  test_user:
    allowed_functions:
      - ":element$"
      - "function_sleep"
      - ":^unit_test.*$"
    forbidden_functions:
      - ":^_"
"""

#: Accepted when set (polynomial, not exponential), minutes long on SLOW_NAME without a limit.
SLOW = ":^" + "\\w*?" * 16 + "[0-9]$"
SLOW_NAME = "a" * 99 + "b"


def rules(root=None, **groups):
    """Build a rules dict: root allows everything unless given."""
    all_groups = {"root": root if root is not None else {"allowed_functions": [None]}}
    all_groups.update(groups)
    return {"user_groups": all_groups}


@pytest.fixture
def qs(tmp_path):
    path = tmp_path / "user_group_permissions.yaml"
    path.write_text(QS_YAML)
    return Permissions.from_file(path)


# ---- messages of check() -----------------------------------------------------------------

def test_check_messages(qs):
    qs.check("function_sleep", "alice", "primary")  # allowed: no exception
    cases = [
        (("function_sleep", None, "primary"), "Error: Incorrect request format: user name is not specified"),
        (("function_sleep", "", "primary"), "Error: Incorrect request format: user name is not specified"),
        (("function_sleep", 7, "primary"), "Error: Incorrect request format: user name is not specified"),
        (("function_sleep", "alice", None), "Error: Incorrect request format: user group is not specified"),
        (("function_sleep", "alice", ""), "Error: Incorrect request format: user group is not specified"),
        (("function_sleep", None, None), "Error: Incorrect request format: user group is not specified"),
        (("function_sleep", "alice", "admins"), "Error: Unknown user group: 'admins'"),
        (("count", "alice", "primary"), "Error: Function 'count' is not allowed for users from 'primary' group."),
    ]
    for args, message in cases:
        with pytest.raises(PermissionRefused) as info:
            qs.check(*args)
        assert str(info.value) == message
        assert isinstance(info.value, (RequestRefused, PermissionError))


# ---- names are checked before any matching -----------------------------------------------

NAME_TAIL = f": a function name is a Python identifier of at most {MAX_NAME_LENGTH} characters."


@pytest.mark.parametrize("name, shown", [
    ("a" * 101, "'" + "a" * 60 + "'... (101 characters)"),
    ("f\ud800", "'f\\ud800'"),            # a lone surrogate
    ("mod.func", "'mod.func'"),
    ("", "''"),
    ("for", "'for'"),                      # a keyword
    ("1abc", "'1abc'"),
    ("a b", "'a b'"),
    (["f"], "of type list"),
    (None, "of type NoneType"),
    (b"f", "of type bytes"),
])
def test_invalid_names_are_refused_before_matching(qs, name, shown):
    message = f"Error: Invalid function name {shown}{NAME_TAIL}"
    assert function_name_error(name) == message
    with pytest.raises(PermissionRefused) as info:
        qs.check(name, "alice", "root")
    assert str(info.value) == message
    json.dumps(str(info.value)).encode("utf-8")  # the message travels as JSON in a reply
    assert not qs.is_allowed(name, "root")
    assert qs.allowed_names([name, "function_sleep"], "primary") == ["function_sleep"]


def test_valid_names():
    for name in ("f", "_private", "a" * MAX_NAME_LENGTH, "mesure_été", "match", "x1"):
        assert function_name_error(name) is None
    p = Permissions(rules())
    assert p.is_allowed("a" * MAX_NAME_LENGTH, "root") and p.is_allowed("mesure_été", "root")


# ---- semantics ---------------------------------------------------------------------------

def test_queueserver_sample_file(qs):
    assert qs.groups() == ["root", "primary", "test_user"]
    assert not qs.is_default()
    assert qs.is_allowed("function_sleep", "primary")
    assert qs.is_allowed("func_for_test_2", "primary")  # regex, unanchored end
    assert not qs.is_allowed("a_func_for_test", "primary")  # '^' anchors the start
    assert not qs.is_allowed("_func_for_test", "primary")
    assert qs.is_allowed("func_for_test", "root") and qs.is_allowed("anything", "root")
    assert not qs.is_allowed("_private", "root")  # root's forbidden list
    assert qs.is_allowed("some_element", "test_user") and not qs.is_allowed("element_x", "test_user")
    assert not qs.is_allowed("function_sleep", "nobody")  # unknown group: False, no exception


NAME_PARTS = st.sampled_from(["func_for_test", "function_sleep", "unit_test", "element", "elements",
                              "_", "a", "x", "sleep", "func", "2", "count"])
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_"
NAMES = st.one_of(  # built from sampled pieces: no st.text / st.from_regex, whose caches write files
    st.tuples(st.sampled_from(_LETTERS), st.lists(st.sampled_from(_LETTERS + "0123456789"), max_size=20))
    .map(lambda t: t[0] + "".join(t[1])),
    st.lists(NAME_PARTS, min_size=1, max_size=4).map("".join).filter(str.isidentifier),
)


QS_DATA = yaml.safe_load(QS_YAML)
QS_PERMISSIONS = Permissions(QS_DATA)


@settings(max_examples=300, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(name=NAMES, group=st.sampled_from(["root", "primary", "test_user"]))
def test_same_answers_as_queueserver(name, group):
    """Property: every decision equals bluesky-queueserver's own check_if_function_allowed."""
    from bluesky_queueserver.manager.profile_ops import check_if_function_allowed

    expected = check_if_function_allowed(name, group_name=group, user_group_permissions=QS_DATA)
    assert QS_PERMISSIONS.is_allowed(name, group) == expected


def test_root_and_group_both_apply():
    p = Permissions(rules(
        root={"allowed_functions": [":^lab_", "calibrate"], "forbidden_functions": ["lab_reset"]},
        staff={"allowed_functions": [None]},
        students={"allowed_functions": [":_move$", "calibrate", "lab_reset"], "forbidden_functions": ["lab_x_move"]},
    ))
    assert p.is_allowed("lab_scan", "staff") and p.is_allowed("calibrate", "staff")
    assert not p.is_allowed("shutdown", "staff")  # group allows all, root does not
    assert not p.is_allowed("lab_reset", "staff")  # root forbids
    assert not p.is_allowed("lab_reset", "students")  # group allows, root forbids
    assert p.is_allowed("lab_y_move", "students") and not p.is_allowed("lab_x_move", "students")
    assert not p.is_allowed("lab_scan", "students")  # root allows, group does not


def test_null_semantics():
    # null first in allowed: everything, the rest is ignored
    p = Permissions(rules(g={"allowed_functions": [None, "only_this"]}))
    assert p.is_allowed("whatever", "g")
    # null first in forbidden: nothing is forbidden, the rest is ignored (as in queueserver)
    p = Permissions(rules(g={"allowed_functions": [None], "forbidden_functions": [None, ":.*"]}))
    assert p.is_allowed("whatever", "g")
    # a missing allowed list or an empty one allows nothing; a missing forbidden list forbids nothing
    assert not Permissions(rules(g={})).is_allowed("f", "g")
    assert not Permissions(rules(g={"allowed_functions": []})).is_allowed("f", "g")
    assert not Permissions(rules(root={}, g={"allowed_functions": [None]})).is_allowed("f", "g")
    assert Permissions(rules(g={"allowed_functions": [None], "forbidden_functions": []})).is_allowed("f", "g")


def test_regex_and_exact_items():
    p = Permissions(rules(g={
        "allowed_functions": ["move", ":scan", ": ^ count $", ":+^plus_", ":-^minus_", ":?^query_"],
        "forbidden_functions": [":^(?!x)bad_\\d+"],
    }))
    assert p.is_allowed("move", "g")
    assert not p.is_allowed("move2", "g") and not p.is_allowed("remove", "g")  # exact, not a prefix
    assert p.is_allowed("my_scan_2", "g")  # a search: anywhere
    assert p.is_allowed("count", "g") and not p.is_allowed("counts", "g")  # spaces removed
    assert p.is_allowed("plus_1", "g") and p.is_allowed("minus_1", "g") and p.is_allowed("query_1", "g")
    assert not p.is_allowed("bad_12_scan", "g") and p.is_allowed("bad_scan", "g")
    assert not p.is_allowed(["scan"], "g") and not p.is_allowed("scan", None)  # non-str: never


def test_allowed_names_filters_in_order(qs):
    names = ["func_for_test_b", "count", "function_sleep", "_hidden", "func_for_test_a"]
    assert qs.allowed_names(names, "primary") == ["func_for_test_b", "function_sleep", "func_for_test_a"]
    assert qs.allowed_names(iter(names), "root") == ["func_for_test_b", "count", "function_sleep", "func_for_test_a"]
    assert qs.allowed_names(names, "nobody") == []


def test_cache_keeps_results_correct_and_bounded(qs):
    for _ in range(3):  # repeated answers, interleaved groups, come from the cache and stay right
        assert qs.is_allowed("function_sleep", "primary") is True
        assert qs.is_allowed("function_sleep", "nobody") is False
        assert qs.is_allowed("count", "primary") is False
        assert qs.is_allowed("count", "root") is True
    for i in range(10_000):  # more names than the cache holds: old entries go, answers stay right
        assert qs.is_allowed(f"func_for_test_{i}", "primary") is True
        assert qs.is_allowed(f"other_{i}", "primary") is False
        qs.is_allowed(f"x{i}", "nobody")  # unknown groups are not cached at all
    assert 0 < len(qs._cache) <= 4096
    assert all(group != "nobody" for _, group in qs._cache)


def test_concurrent_checks_agree():
    p = Permissions(rules(root={"allowed_functions": [":^lab_", ":_scan$"], "forbidden_functions": [":^lab_x"]}))
    names = [f"lab_{i}" for i in range(300)] + [f"lab_x{i}" for i in range(300)] + [f"a{i}_scan" for i in range(300)]
    expected = {n: (n.startswith("lab_") and not n.startswith("lab_x")) or n.endswith("_scan") for n in names}
    errors = []
    start = threading.Barrier(8)

    def worker(k):
        start.wait(10)
        for n in names[k::3] + names:
            if p.is_allowed(n, "root") != expected[n]:
                errors.append(n)

    threads = [threading.Thread(target=worker, args=(k % 3,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


# ---- matching time is bounded ------------------------------------------------------------

def test_catastrophic_pattern_is_refused_when_set():
    """Issue 14, item 2: ':^(a+)+$' froze the kernel for 5 s on a 27-letter name."""
    data = rules(students={"allowed_functions": ["f", ":^(a+)+$"]})
    start = time.thread_time()  # (this thread's CPU: other load on the machine does not count)
    with pytest.raises(PermissionsFormatError) as info:
        Permissions(data)
    assert time.thread_time() - start < 1.0
    assert str(info.value).startswith(
        "user_groups.students.allowed_functions[1]: ':^(a+)+$': a repetition inside a repetition"
    )
    assert "':^a+$' instead of ':^(a+)+$'" in str(info.value)


def test_slow_match_is_refused_never_allowed():
    p = Permissions(rules(root={"allowed_functions": [None], "forbidden_functions": [":^_", SLOW]},
                          g={"allowed_functions": [None]}))
    for _ in range(2):  # a timeout is not cached: the second check is bounded too
        start = time.thread_time()
        with pytest.raises(PermissionRefused) as info:
            p.check(SLOW_NAME, "alice", "g")
        assert time.thread_time() - start < p.match_timeout + 0.1
    assert str(info.value) == (
        f"Error: Function {SLOW_NAME!r} is not allowed for users from 'g' group: matching the "
        f"permission pattern {SLOW!r} (user_groups.root.forbidden_functions[1]) took longer than "
        "the 50 ms allowed; simplify that pattern."
    )
    assert not p.is_allowed(SLOW_NAME, "g")
    # the same pattern decides short names at once ("scan": 0.3 ms; a 7-letter name already
    # takes 10 ms of CPU, a fifth of the limit, and less than that when other threads are busy)
    assert p.is_allowed("scan", "g")
    assert p.slow_patterns() == [{"where": "user_groups.root.forbidden_functions[1]", "pattern": SLOW,
                                  "timeouts": 3}]
    # an allowed list that cannot be decided refuses too
    p = Permissions(rules(g={"allowed_functions": [SLOW]}), match_timeout=0.01)
    with pytest.raises(PermissionRefused, match=r"took longer than the 10 ms allowed"):
        p.check(SLOW_NAME, "alice", "g")


def test_listing_has_a_total_budget():
    p = Permissions(rules(root={"allowed_functions": [None], "forbidden_functions": [SLOW]}), match_timeout=0.02)
    slow_names = [f"n{i}_" + "a" * 60 for i in range(100)]  # each one alone would take its 20 ms
    start = time.thread_time()
    listed = p.allowed_names(["scan", "move"] + slow_names + ["late"], "root")  # (short: decided at once)
    spent = time.thread_time() - start
    assert listed[:2] == ["scan", "move"] and not set(slow_names) & set(listed)
    assert spent < 10 * 0.02 + 0.2, spent  # not 100 x 20 ms


def test_match_timeout_argument():
    assert Permissions().match_timeout == 0.05
    assert Permissions(match_timeout=1).match_timeout == 1.0
    for bad in (0, -1, 11, "1", None):
        with pytest.raises(ValueError):
            Permissions(match_timeout=bad)


# ---- default rules -----------------------------------------------------------------------

def test_default_rules_know_root_and_primary_only():
    p = Permissions()
    assert p.is_default() and Permissions(None).is_default()
    assert p.groups() == ["root", "primary"]
    for group in ("primary", "root"):
        p.check("measure", "alice", group)
        assert p.is_allowed("measure", group)
        with pytest.raises(PermissionRefused) as info:
            p.check("_secret", "alice", group)
        assert str(info.value) == f"Error: Function '_secret' is not allowed for users from '{group}' group."
    for group in ("admin", "some_lab_group", "test_user"):
        with pytest.raises(PermissionRefused) as info:
            p.check("measure", "alice", group)
        assert str(info.value) == f"Error: Unknown user group: '{group}'"
        assert not p.is_allowed("measure", group) and p.allowed_names(["measure"], group) == []
    with pytest.raises(PermissionRefused, match="user group is not specified"):
        p.check("measure", "alice", "")
    assert p.to_dict() == DEFAULT_PERMISSIONS


def test_explicit_default_dict_behaves_the_same():
    p = Permissions(copy.deepcopy(DEFAULT_PERMISSIONS))
    assert not p.is_default() and p.groups() == ["root", "primary"]
    assert p.is_allowed("measure", "primary") and not p.is_allowed("_m", "primary")
    with pytest.raises(PermissionRefused, match=r"^Error: Unknown user group: 'lab'$"):
        p.check("measure", "alice", "lab")


def test_unknown_group_message_is_bounded_and_printable():
    p = Permissions()
    for group, shown in [("g" * 500, "g" * 100 + "..."), ("a\ud800b", "a\\ud800b"), ("a\nb", "a\\nb")]:
        with pytest.raises(PermissionRefused) as info:
            p.check("f", "alice", group)
        assert str(info.value) == f"Error: Unknown user group: '{shown}'"


# ---- to_dict -----------------------------------------------------------------------------

def test_to_dict_round_trip_and_isolation(qs):
    d = qs.to_dict()
    assert json.loads(json.dumps(d)) == d  # JSON-able, nulls included
    assert d["user_groups"]["primary"]["allowed_devices"] == [":?.*:depth=5"]  # ignored keys kept
    again = Permissions(d)
    names = ["function_sleep", "func_for_test", "count", "_x", "some_element", "unit_test_1"]
    for group in ("root", "primary", "test_user", "nobody"):
        assert again.allowed_names(names, group) == qs.allowed_names(names, group)
    d["user_groups"]["primary"]["allowed_functions"].append("count")  # mutating a copy changes nothing
    assert not qs.is_allowed("count", "primary") and "count" not in again.to_dict()["user_groups"]["primary"]
    source = rules(g={"allowed_functions": ["f"]})
    p = Permissions(source)
    source["user_groups"]["g"]["allowed_functions"].append("h")  # nor does mutating the input
    assert not p.is_allowed("h", "g") and p.to_dict() != source
    default = Permissions()
    assert Permissions(default.to_dict()).allowed_names(names, "primary") == default.allowed_names(names, "primary")


# ---- format validation -------------------------------------------------------------------

@pytest.mark.parametrize("data, message", [
    ([], "must be a mapping with the key 'user_groups', not list"),
    ({}, "'user_groups' is a required property"),
    ({"user_groups": {}, "extra": 1}, "unsupported top-level key 'extra'"),
    ({"user_groups": []}, "user_groups: must be a mapping of group name to rules, not list"),
    ({"user_groups": {"primary": {}}}, "user_groups: Missing required user group: 'root'"),
    (rules(g=None), "user_groups.g: must be a mapping with 'allowed_functions'"),
    (rules(**{"": {}}), "user_groups: group name '' must be a non-empty string"),
    ({"user_groups": {"root": {}, 5: {}}}, "user_groups: group name 5 must be a non-empty string"),
    (rules(**{"g" * 101: {}}), "must be a non-empty string of at most 100 printable characters"),
    (rules(**{"a\nb": {}}), "user_groups: group name 'a\\nb' must be"),
    (rules(g={"alowed_functions": []}), "user_groups.g: unsupported key 'alowed_functions'; supported keys:"),
    (rules(g={"allowed_functions": None}), "user_groups.g.allowed_functions: must be a list"),
    (rules(g={"forbidden_functions": ":^_"}), "user_groups.g.forbidden_functions: must be a list"),
    (rules(g={"allowed_plans": "all"}), "user_groups.g.allowed_plans: must be a list"),
    (rules(g={"allowed_devices": [3]}), "user_groups.g.allowed_devices[0]: 3 must be a string or null"),
    (rules(g={"allowed_functions": ["a", None]}), "g.allowed_functions[1]: null is only allowed as the first"),
    (rules(g={"forbidden_functions": [":a", None]}), "user_groups.g.forbidden_functions[1]: null is only allowed"),
    (rules(g={"allowed_functions": ["ok", 1.5]}), "user_groups.g.allowed_functions[1]: 1.5 must be a string or null"),
    (rules(g={"allowed_functions": ["a", "b", ":["]}),
     "user_groups.g.allowed_functions[2]: ':[': invalid regular expression (unterminated character set"),
    (rules(root={"allowed_functions": [":"]}), "user_groups.root.allowed_functions[0]: empty regular expression ':'"),
    (rules(g={"allowed_functions": [":^det:val"]}), "allowed_functions[0]: ':^det:val': a function pattern is one ':'"),
    (rules(g={"allowed_functions": ["__READABLE__:^x"]}),
     "allowed_functions[0]: '__READABLE__:^x': a regular expression must start with ':'"),
    (rules(g={"allowed_functions": ["^count$"]}),
     ("allowed_functions[0]: '^count$' is not a valid function name; to match several names, write a "
      "regular expression with a leading ':'")),
    (rules(g={"forbidden_functions": ["mod.func"]}), "forbidden_functions[0]: 'mod.func' is not a valid function name"),
    (rules(g={"forbidden_functions": [""]}), "forbidden_functions[0]: '' is not a valid function name"),
    (rules(g={"allowed_functions": [":(a|aa)+"]}),
     "user_groups.g.allowed_functions[0]: ':(a|aa)+': alternatives inside a repetition"),
    (rules(g={"allowed_functions": [":(a)\\1"]}), "allowed_functions[0]: ':(a)\\\\1': backreferences"),
    (rules(g={"allowed_plans": ["x" * 1001]}), "allowed_plans[0]: the item is 1001 characters long, more than 1000"),
    (rules(**{f"g{i}": {} for i in range(1000)}), "user_groups: 1001 groups, more than 1000"),
    (rules(g={"allowed_plans": ["p"] * 10_001}), "user_groups.g.allowed_plans: the lists hold more than 10000 items"),
    (rules(g={"allowed_functions": [f":^f{i}" for i in range(1001)]}),
     "allowed_functions[1000]: more than 1000 regular expressions in the function lists"),
])
def test_format_errors(data, message):
    with pytest.raises(PermissionsFormatError) as info:
        Permissions(data)
    assert message in str(info.value)
    assert isinstance(info.value, (QMagicError, ValueError))


def test_plan_and_device_lists_are_not_interpreted():
    p = Permissions(rules(g={"allowed_functions": ["f"], "allowed_devices": [":?.*:depth=5", "det1.val"],
                             "forbidden_plans": [None, "x"], "allowed_plans": [":(a+)+"]}))
    assert p.is_allowed("f", "g") and not p.is_allowed("det1", "g")


def test_largest_rules_compile_in_bounded_time():
    many = [f":^([a-z][a-z0-9]*_)*f{i}(_[a-z]+)*$" for i in range(1000)]  # ':' only in front
    start = time.thread_time()
    p = Permissions(rules(root={"allowed_functions": many}))
    assert time.thread_time() - start < 5.0
    assert p.is_allowed("ab_f999_x", "root") and not p.is_allowed("f1000x", "root")


# ---- files -------------------------------------------------------------------------------

def test_from_file_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PermissionsFormatError, match=r"'.*nope\.yaml' does not exist: check the path"):
        Permissions.from_file(missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("user_groups:\n  root:\n    allowed_functions: [null\n  primary: {}\n")
    with pytest.raises(PermissionsFormatError) as info:
        Permissions.from_file(str(broken))
    assert f"'{broken}' is not valid YAML" in str(info.value) and "line " in str(info.value)
    # one line, the place as a person counts it (YAML's own text: three lines, "<unicode string>")
    # (libyaml and PyYAML word the problem apart)
    assert re.fullmatch(rf"User group permissions file '{re.escape(str(broken))}' is not valid YAML: "
                        r"[^\n]+ at line 4, column \d+ \(while parsing a flow sequence\)", str(info.value)), info.value
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(PermissionsFormatError, match="is empty: it must contain a 'user_groups' mapping"):
        Permissions.from_file(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("user_groups:\n  root:\n    allowed_functions:\n      - ':('\n")
    with pytest.raises(PermissionsFormatError) as info:
        Permissions.from_file(bad)
    assert str(info.value).startswith(
        f"User group permissions file '{bad}': user_groups.root.allowed_functions[0]: ':(': invalid regular expression"
    )
    with pytest.raises(PermissionsFormatError, match="cannot be read: it is not a regular file"):
        Permissions.from_file(tmp_path)  # a folder
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"user_groups:\n  root: {}\n# caf\xe9\n")
    with pytest.raises(PermissionsFormatError, match="is not UTF-8 text"):
        Permissions.from_file(latin)
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (1 << 20) + b"\n")
    with pytest.raises(PermissionsFormatError, match="is larger than 1 MiB"):
        Permissions.from_file(huge)


def test_from_file_never_blocks_on_a_fifo(tmp_path):
    fifo = tmp_path / "user_group_permissions.yaml"
    os.mkfifo(fifo)
    outcome = {}

    def load():
        try:
            Permissions.from_file(fifo)
        except PermissionsFormatError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # unblock the thread before failing
        with open(fifo, "w"):
            pass
        pytest.fail("from_file blocked on a FIFO")
    assert "cannot be read: it is not a regular file" in outcome["error"]


def test_from_file_follows_a_symlinked_config_and_passes_the_timeout(tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text(QS_YAML)
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    p = Permissions.from_file(link, match_timeout=0.2)
    assert p.groups() == ["root", "primary", "test_user"] and p.match_timeout == 0.2
