"""The JSON of large task results, written in batches (qmagic.jsonreply): the same data and
the same errors as one json.dumps call, never one long call, and not many more calls."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from qmagic import jsonreply
from qmagic.jsonreply import check_json, encoded, json_text

_SCALARS = st.one_of(st.text(max_size=6), st.integers(), st.floats(), st.booleans(), st.none(),
                     st.builds(pow, st.just(10), st.just(5000)), st.sampled_from([-0.0, "\udcff", "NaN", "\U0001f600", "é"]))
_KEYS = st.one_of(st.text(max_size=4), st.integers(-2, 2), st.floats(), st.booleans(), st.none())
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.lists(inner, max_size=3).map(tuple),
    st.dictionaries(st.text(max_size=4), inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=3),
    st.sets(st.integers(), max_size=2)), max_leaves=25)


def _error(write, value):
    try:
        write(value)
    except (TypeError, ValueError, OverflowError) as exc:
        return type(exc), str(exc)
    return None


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
@given(_VALUES, _VALUES, st.sampled_from([1, 1, 1, 1, 8192 + 1, 8192 * 2 + 5]))
@example({"é": "é"}, ["\U0001f600"], 8192 + 1)
def test_batched_json_reads_as_one_json_dumps_and_fails_as_it_does(value, last, copies):
    # (the same bytes: a batch holding an emoji was written unescaped, as json_text writes
    # all of a value that holds one, but the others were not: "\u00e9" in one, "é" in another)
    value = [value] * copies + [last] if copies > 1 else value
    error = _error(json.dumps, value)
    assert _error(check_json, value) == error
    if type(value) in (list, dict):
        assert _error(encoded, value) == error
    if error is None and type(value) in (list, dict):
        text, nonfinite = json_text(value)
        kept = encoded(value)
        assert kept.json == text.encode() and kept.nonfinite == nonfinite


def test_records_holding_lists_are_written_a_batch_at_a_time(monkeypatch):
    # A result of records such as {"pos": [x, y]} was written one json.dumps call per record
    # (a million of them took ~7-16x one json.dumps call of it all, at the task's end and
    # again for its copy's JSON), not a batch of 8192 records per call
    calls, dumps = [], json.dumps

    def counted(*args, **kwargs):
        calls.append(1)
        return dumps(*args, **kwargs)

    records = [{"pos": [i, 0.5], "t": 1.5, "tags": {"ok": True}} for i in range(50_000)]
    text, _ = json_text(records)
    monkeypatch.setattr(jsonreply.json, "dumps", counted)
    assert encoded(records).json == text.encode()
    assert len(calls) <= 20, len(calls)
    calls.clear()
    check_json(records)
    assert len(calls) <= 10, len(calls)


def test_a_dict_changed_while_it_is_checked_is_checked_as_json_reads_it():
    # checked in batches (71da7e1), a large dict that changed between two batches -- a task's
    # result another thread still updates, or here the code of a value in it -- made the
    # rule for remote results raise "dictionary changed size during iteration": the task
    # failed, though json.dumps (which reads a dict's items at once) takes it
    from qmagic.worker import json_error

    class Changes(dict):
        def items(self):
            value["added"] = 1
            return super().items()

    value = {"first": Changes(a=1), **{str(i): [i, "x"] for i in range(20_000)}}
    assert json_error(value) is None
    refused = {"first": Changes(a=1), "set": {1}, **{str(i): [i] for i in range(20_000)}}
    assert str(json_error(refused)) == "Object of type set is not JSON serializable"


def test_a_large_dict_with_number_keys_is_checked_a_batch_at_a_time(monkeypatch):
    # only dicts whose keys were all str were read in batches: {i: x for i in range(3M)}, a
    # usual result, was checked at its task's end by one json.dumps call (3.6 s holding the
    # GIL), so no remote client had a reply meanwhile
    sizes, dumps = [], json.dumps

    def measured(value, *args, **kwargs):
        sizes.append(len(value) if type(value) in (list, dict) else 1)
        return dumps(value, *args, **kwargs)

    value = {**{i: [i, 0.5] for i in range(30_000)}, 1.5: float("nan"), True: "x", None: [None]}
    refused = {**{i: [i] for i in range(30_000)}, 10**5000: [1]}
    text, _ = json_text(value)
    error = str(_error(json.dumps, refused)[1])
    monkeypatch.setattr(jsonreply.json, "dumps", measured)
    check_json(value)
    assert max(sizes) <= 8192, max(sizes)
    assert _error(check_json, refused) == (ValueError, error)
    out = []
    jsonreply._pieces(value, out, 0)  # (a copy's JSON: the same text as json_text's)
    assert b"".join(out) == text.encode()
