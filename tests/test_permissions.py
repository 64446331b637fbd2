"""Tests of qmagic.permissions: queueserver's user_group_permissions rules for functions."""

from __future__ import annotations

import copy
import json

import pytest

from qmagic.errors import PermissionRefused, PermissionsFormatError, QMagicError, RequestRefused
from qmagic.permissions import DEFAULT_PERMISSIONS, Permissions

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
    assert p.is_allowed("my_scan_2", "g")  # re.search: anywhere
    assert p.is_allowed("count", "g") and not p.is_allowed("counts", "g")  # spaces removed
    assert p.is_allowed("plus_1", "g") and p.is_allowed("minus_1", "g") and p.is_allowed("query_1", "g")
    assert not p.is_allowed("bad_12_scan", "g") and p.is_allowed("bad_scan", "g")
    assert not p.is_allowed(["scan"], "g") and not p.is_allowed("scan", None)  # non-str: never


def test_allowed_names_filters_in_order(qs):
    names = ["func_for_test_b", "count", "function_sleep", "_hidden", "func_for_test_a"]
    assert qs.allowed_names(names, "primary") == ["func_for_test_b", "function_sleep", "func_for_test_a"]
    assert qs.allowed_names(iter(names), "root") == ["func_for_test_b", "count", "function_sleep", "func_for_test_a"]
    assert qs.allowed_names(names, "nobody") == []


def test_cache_keeps_results_correct(qs):
    for _ in range(3):  # repeated answers, interleaved groups, come from the cache and stay right
        assert qs.is_allowed("function_sleep", "primary") is True
        assert qs.is_allowed("function_sleep", "nobody") is False
        assert qs.is_allowed("count", "primary") is False
        assert qs.is_allowed("count", "root") is True
    for i in range(10_000):  # more names than the cache holds: it is cleared, answers stay right
        assert qs.is_allowed(f"func_for_test_{i}", "primary") is True
        assert qs.is_allowed(f"other_{i}", "primary") is False
    assert 0 < len(qs._cache) <= 4096


# ---- default mode ------------------------------------------------------------------------

def test_default_mode_accepts_any_group():
    p = Permissions()
    assert p.is_default() and Permissions(None).is_default()
    for group in ("primary", "root", "some_lab_group"):
        p.check("measure", "alice", group)
        assert p.is_allowed("measure", group)
        with pytest.raises(PermissionRefused) as info:
            p.check("_secret", "alice", group)
        assert str(info.value) == f"Error: Function '_secret' is not allowed for users from '{group}' group."
    with pytest.raises(PermissionRefused, match="user group is not specified"):
        p.check("measure", "alice", "")
    assert not p.is_allowed("measure", "") and p.allowed_names(["measure"], "") == []
    assert p.to_dict() == DEFAULT_PERMISSIONS


def test_explicit_default_dict_knows_only_its_groups():
    p = Permissions(copy.deepcopy(DEFAULT_PERMISSIONS))
    assert not p.is_default() and p.groups() == ["root", "primary"]
    assert p.is_allowed("measure", "primary") and not p.is_allowed("_m", "primary")
    with pytest.raises(PermissionRefused, match=r"^Error: Unknown user group: 'lab'$"):
        p.check("measure", "alice", "lab")


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
    ({}, "missing the required top-level key 'user_groups'"),
    ({"user_groups": {}, "extra": 1}, "unsupported top-level key 'extra'"),
    ({"user_groups": []}, "user_groups: must be a mapping of group name to rules, not list"),
    ({"user_groups": {"primary": {}}}, "user_groups: missing required user group 'root'"),
    (rules(g=None), "user_groups.g: must be a mapping with 'allowed_functions'"),
    (rules(**{"": {}}), "user_groups: group name '' must be a non-empty string"),
    ({"user_groups": {"root": {}, 5: {}}}, "user_groups: group name 5 must be a non-empty string"),
    (rules(g={"alowed_functions": []}), "user_groups.g: unsupported key 'alowed_functions'; supported keys:"),
    (rules(g={"allowed_functions": None}), "user_groups.g.allowed_functions: must be a list"),
    (rules(g={"forbidden_functions": ":^_"}), "user_groups.g.forbidden_functions: must be a list"),
    (rules(g={"allowed_plans": "all"}), "user_groups.g.allowed_plans: must be a list"),
    (rules(g={"allowed_devices": [3]}), "user_groups.g.allowed_devices[0]: 3 must be a string or null"),
    (rules(g={"allowed_functions": ["a", None]}), "g.allowed_functions[1]: null is only allowed as the first"),
    (rules(g={"forbidden_functions": [":a", None]}), "user_groups.g.forbidden_functions[1]: null is only allowed"),
    (rules(g={"allowed_functions": ["ok", 1.5]}), "user_groups.g.allowed_functions[1]: 1.5 must be a string or null"),
    (rules(g={"allowed_functions": ["a", "b", ":["]}),
     "user_groups.g.allowed_functions[2]: invalid regular expression ':[' (unterminated character set"),
    (rules(root={"allowed_functions": [":"]}), "user_groups.root.allowed_functions[0]: empty regular expression ':'"),
    (rules(g={"allowed_functions": [":^det:val"]}), "allowed_functions[0]: ':^det:val': a function pattern is one ':'"),
    (rules(g={"allowed_functions": ["__READABLE__:^x"]}), "allowed_functions[0]: '__READABLE__:^x': a regular "
                                                           "expression must start with ':'"),
    (rules(g={"allowed_functions": ["^count$"]}), "allowed_functions[0]: '^count$' is not a valid function name; "
                                                   "to match several names, write a regular expression with a "
                                                   "leading ':'"),
    (rules(g={"forbidden_functions": ["mod.func"]}), "forbidden_functions[0]: 'mod.func' is not a valid function name"),
    (rules(g={"forbidden_functions": [""]}), "forbidden_functions[0]: '' is not a valid function name"),
])
def test_format_errors(data, message):
    with pytest.raises(PermissionsFormatError) as info:
        Permissions(data)
    assert message in str(info.value)
    assert isinstance(info.value, (QMagicError, ValueError))


def test_plan_and_device_lists_are_not_interpreted():
    p = Permissions(rules(g={"allowed_functions": ["f"], "allowed_devices": [":?.*:depth=5", "det1.val"],
                             "forbidden_plans": [None, "x"]}))
    assert p.is_allowed("f", "g") and not p.is_allowed("det1", "g")


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
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(PermissionsFormatError, match="is empty: it must contain a 'user_groups' mapping"):
        Permissions.from_file(empty)
    bad = tmp_path / "bad.yaml"
    bad.write_text("user_groups:\n  root:\n    allowed_functions:\n      - ':('\n")
    with pytest.raises(PermissionsFormatError) as info:
        Permissions.from_file(bad)
    assert str(info.value).startswith(
        f"User group permissions file '{bad}': user_groups.root.allowed_functions[0]: invalid regular expression ':('"
    )
    with pytest.raises(PermissionsFormatError, match="cannot be read"):
        Permissions.from_file(tmp_path)  # a directory
