"""User-facing texts of qmagic.format that several doors share."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmagic.format import SUMMARY_KEY, call_text, printable, record_call, safe_repr
from qmagic.history_text import log_health_note


def test_a_healthy_log_says_nothing_even_with_records_waiting_for_the_writer():
    assert log_health_note({"ok": True, "pending": 3, "dropped": 0, "last_error": None}) is None


def test_a_faulty_or_lossy_log_says_so_in_one_line():
    note = log_health_note({"ok": False, "pending": 1, "dropped": 0, "last_error": "database is locked"})
    assert note == ("Note: the experiment log cannot write (1 entry waiting): database is locked. "
                    "See worker.log_health().")
    note = log_health_note({"ok": False, "pending": 30, "in_memory": 12, "dropped": 0,
                            "last_error": "disk full"})
    assert note == ("Note: the experiment log cannot write (30 entries waiting, 12 only in memory): "
                    "disk full. See worker.log_health().")
    note = log_health_note({"ok": False, "pending": 1, "dropped": 0, "last_error": "disk full",
                            "open": False})
    assert note == ("Note: the experiment log, off for new tasks but still recording earlier ones, "
                    "cannot write (1 entry waiting): disk full. See worker.log_health().")
    note = log_health_note({"ok": True, "pending": 0, "dropped": 2, "last_error": "disk full"})
    assert note == "Note: the experiment log lost 2 entries: disk full. See worker.log_health()."
    assert "\n" not in note


def test_a_note_whose_error_ends_with_a_period_ends_with_one_period():
    why = ("StateFileError: The experiment log '/x/default.journal.sqlite3' was made by a newer "
           "qmagic (schema 99); upgrade qmagic to write to it.")
    note = log_health_note({"ok": False, "pending": 60, "dropped": 0, "last_error": why})
    assert note == (f"Note: the experiment log cannot write (60 entries waiting): {why} "
                    "See worker.log_health().")
    assert ".." not in note


def test_printable_escapes_and_cuts_without_failing():
    assert printable("plain text") == "plain text" and printable(None) == "" and printable(3) == "3"
    assert printable("a\ud800b\n\x00") == "a\\ud800b\\n\\x00"
    assert printable("x" * 10**7, 10) == "xxxxxxx..." and printable("\n" * 10**6, 5) == "\\n..."

    class BadStr:
        def __str__(self):
            raise RuntimeError("no")

    assert printable(BadStr()) == "<BadStr with a failing str>"


def test_one_call_text_for_tasks_and_records():
    record = {"name": "scan\n", "args": [1, {SUMMARY_KEY: "repr", "repr": "array([1, 2])"}],
              "kwargs": {"label": "run 3"}, "kind": "function"}
    assert record_call(record) == call_text("scan\n", record["args"], record["kwargs"])
    assert record_call(record) == "scan\\n(1, array([1, 2]), label='run 3')"
    assert record_call({"name": None, "args": "abc", "kwargs": [1]}) == "?()"
    assert record_call({"name": "s.py", "kind": "script"}) == "s.py (script)"
    huge = call_text("f", range(10**7), width=30)  # (stops early: no ten million reprs)
    assert huge == "f(0, 1, 2, 3, 4, 5, 6, 7, ...)" and len(huge) <= 30
    taken = []  # (and reads no more arguments than it shows: it listed them all first, 3 s)
    assert call_text("f", (taken.append(i) or i for i in range(10**5)), width=30).endswith("...)")
    assert len(taken) < 20, len(taken)


def test_a_duration_is_shown_only_when_it_can_be_true():
    from qmagic.history_text import record_duration

    assert record_duration({"started_at": 10.0, "finished_at": 12.5}) == 2.5
    for rec in ({"started_at": 10.0}, {"started_at": 10.0, "finished_at": float("inf")},
                {"started_at": 10.0, "finished_at": 9.0},  # the clock was set back meanwhile
                {"started_at": True, "finished_at": 12.0}, {"started_at": "10", "finished_at": 12.0}):
        assert record_duration(rec) is None, rec


def test_a_lock_holders_text_cannot_add_lines_or_terminal_codes():
    """A remote client's lock user and note (and a task's user) are anyone's text: every view
    shows them escaped, so a newline or an escape code cannot fake a line or a colour."""
    from qmagic.errors import LockRefused
    from qmagic.format import lock_text, refusal_line, task_table
    from qmagic.history_text import history_table
    from qmagic.store.lockfile import LockState

    user = "robot\nEnvironment is locked: False\n\x1b[31mall clear\x1b[0m"
    note = "n\x1b]0;pwned\x07\nline2"
    state = LockState("uid", environment=True, user=user, time=1.0, note=note)
    exc = LockRefused("Error: Invalid lock key")
    exc.state = state
    line = refusal_line(exc, "give the key with --lock-key")
    assert "\n" not in line and "\x1b" not in line and "\x07" not in line
    assert line.startswith("The environment is locked by robot\\nEnvironment is locked: False\\n"
                           "\\x1b[31mall clear\\x1b[0m (since ")
    assert "; note: n\\x1b]0;pwned\\x07\\nline2): give the key with --lock-key" in line
    text = lock_text(state.to_lock_info())
    assert text == ("Locked by robot\\nEnvironment is locked: False\\n\\x1b[31mall clear\\x1b[0m: "
                    "environment\nNote: n\\x1b]0;pwned\\x07\\nline2")
    # queueserver's own multi-line refusal (no lock state known): still one printable line
    line = refusal_line(f"Error: Invalid lock key: \nRE Manager is locked by {user}\n", "x")
    assert "\n" not in line and "\x1b" not in line and "\\x1b[31mall clear" in line
    record = {"name": "add", "args": [1], "kwargs": {}, "user": user, "status": "completed",
              "uid": "u1", "origin": "remote", "background": True}
    for table in (task_table([record]), history_table([record])):
        assert "\x1b" not in table and len(table.splitlines()) == 2, table


def test_safe_repr_is_one_printable_line_of_at_most_limit_characters_and_never_fails():
    class Raising:
        def __repr__(self):
            raise RuntimeError("no repr")

    class NotText:
        def __repr__(self):
            return 42

    class Odd:
        def __repr__(self):
            return "a\nb\x1b[31m\udcff\u2028c"

    assert safe_repr(Raising()) == "<Raising with a failing repr>"
    # an int longer than Python writes in decimal (4,300 digits) said its repr "failed"
    assert safe_repr(10**5000) == printable(-(10**5000)) == "<int of about 5,001 digits>"
    assert safe_repr(True) == "True" and safe_repr(10**4000, 50) == "1" + "0" * 46 + "..."
    assert safe_repr(NotText(), 10) == "<NotTex..."
    assert safe_repr(Odd()) == "a\\nb\\x1b[31m\\udcff\\u2028c"
    assert safe_repr("x\udcff") == "'x\\udcff'"
    assert safe_repr("a" * 50, 10) == "'aaaaaa..." and safe_repr("a" * 8, 10) == "'aaaaaaaa'"
    assert safe_repr("a" * 10_000_000, 10) == "'aaaaaa..."  # (not the repr of all of it)
    assert safe_repr(list(range(100)), 12) == "[0, 1, 2,..."
    assert safe_repr(Odd(), lines=True) == "a\nb\\x1b[31m\\udcff\\u2028c"  # (a block keeps its lines)
    assert printable("col\tcol\r\nrow\rx", lines=True) == "col\tcol\nrow\\rx"  # (tabs too; CRLF a line)
    # a right-to-left override would reorder the line, a zero-width space hides; emoji joiners stay
    assert printable("a\u202eb\u200bc\U0001f469\u200d\U0001f52c") == "a\\u202eb\\u200bc\U0001f469\u200d\U0001f52c"
    for value in (Raising(), NotText(), Odd(), "\n" * 100, b"\x00" * 100):
        text = safe_repr(value, 20)
        assert len(text) <= 20 and text.isprintable() and len(text.splitlines()) == 1


# (texts whose quotes may come late: repr takes double quotes for a text with a ' and no ")
_TEXTS = st.builds(str.__add__, st.text(alphabet="ab\\\né\udcff", max_size=30),
                   st.sampled_from(["", "'", '"', "'\"", "\"'", "a'b'"]))
_VALUES = st.recursive(
    st.one_of(_TEXTS, st.integers(), st.floats(), st.booleans(), st.none()),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.lists(inner, max_size=3).map(tuple),
                            st.dictionaries(st.one_of(_TEXTS, st.integers()), inner, max_size=4),
                            st.sets(st.one_of(_TEXTS, st.integers()), max_size=5),
                            st.frozensets(st.one_of(_TEXTS, st.floats()), max_size=4)),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_VALUES, _TEXTS, st.integers(5, 40))
def test_safe_repr_of_a_container_reads_as_its_repr_cut(value, text, limit):
    # safe_repr writes a list, tuple or dict an item at a time (the repr of 5 million floats
    # held the GIL ~1.3 s); a text in it longer than the limit was written as the repr of its
    # start, whose quotes differ when only the rest has a ' ("ab...'" read 'ab...)
    for shown in (value, text, [text, value], {text: value, 1: text}, (value,)):
        assert safe_repr(shown, limit) == printable(repr(shown), limit)


def test_safe_repr_of_a_large_set_writes_only_its_start():
    # the repr of a set of 5 million floats, one C call, held the GIL ~1 s (as a list's did
    # before cec8450): a task's result event held up the info socket and the control channel
    written = []

    class Item:
        def __repr__(self):
            written.append(1)
            return "Item()"

    for cls in (set, frozenset):
        value = cls(Item() for _ in range(10_000))
        assert safe_repr(value, 50) == printable(repr(value), 50)
        written.clear()
        safe_repr(value, 50)
        assert len(written) < 20, len(written)


def test_safe_repr_of_a_dict_changed_while_it_is_written_shows_its_items():
    # written an item at a time (cec8450), a dict changed meanwhile -- by a task's thread, or
    # by an item's own repr -- read "<dict with a failing repr>" (repr itself never fails so)
    class Grows:
        def __repr__(self):
            value[len(value)] = 0
            return "Grows()"

    value = {"a": Grows(), "b": "x" * 300}
    assert safe_repr(value, 40) == "{'a': Grows(), 'b': '" + "x" * 16 + "..."


def test_progress_numbers_never_fail_to_format():
    from qmagic.format import format_number, progress_text

    class BadNumber:
        def __str__(self):
            raise RuntimeError("no str")

        def __float__(self):
            raise RuntimeError("no float")

    assert format_number(10**400) == "1e+400" and format_number(-3 * 10**5000) == "-3e+5000"
    assert format_number(BadNumber()) == "<BadNumber with a failing str>"
    assert format_number("x") == "x" and format_number(2.5) == "2.5" and format_number(4.0) == "4"
    assert progress_text({"value": 10**400, "total": BadNumber(), "message": "m"}) == (
        "1e+400/<BadNumber with a failing str> m")
    # as the experiment log keeps a NaN, an infinity or a numpy number: a summary, shown by
    # its repr (%tasks, a record's detail showed "{'__qmagic_summary__': 'repr', 'type'...")
    from qmagic.store.records import RecordEncoder

    logged = RecordEncoder().value({"value": float("nan"), "total": float("inf"), "message": "m"})
    assert progress_text(logged) == "nan/inf m"

    class Odd(dict):  # (a live value: its own __contains__ is not asked whether it is a summary)
        def __contains__(self, key):
            raise RuntimeError("no contains")

    assert format_number(Odd(a=1)) == "{'a': 1}"


def test_a_traceback_made_while_the_file_labels_change_is_not_kept_for_the_new_labels():
    """Traceback texts are kept by what they show (thousands of tasks cancelled at one place
    format one).  A text being made while the kernel installed other file labels was stored
    after the change emptied the memo, and shown from then on with the old labels."""
    from qmagic import tracebacks

    def fails():
        raise ValueError("out of range")

    try:
        fails()
    except ValueError as caught:
        exc = caught

    def new_labels(filename: str) -> str | None:
        return "Cell In[2]" if filename == __file__ else None

    def old_labels(filename: str) -> str | None:
        tracebacks.set_filename_labeler(new_labels)  # (the labels change meanwhile)
        return "Cell In[1]" if filename == __file__ else None

    tracebacks.set_filename_labeler(old_labels)
    try:
        assert "Cell In[1]" in tracebacks.traceback_text(exc)
        again = tracebacks.traceback_text(exc)
        assert "Cell In[2]" in again and "Cell In[1]" not in again, again
    finally:
        tracebacks.set_filename_labeler(None)


def test_a_memo_shared_by_threads_stays_bounded_and_whole():
    import threading

    from qmagic.core.memo import Memo

    memo: Memo[int] = Memo(64)
    start = threading.Barrier(4)

    def fill(base: int) -> None:
        start.wait(10)
        for i in range(20_000):
            memo.put((base, i), i)
            got = memo.get((base, i))
            assert got in (i, None)  # (another thread may have emptied it since)
            if i % 5000 == 0:
                memo.clear()

    threads = [threading.Thread(target=fill, args=(b,)) for b in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert 0 < len(memo) <= 64
    memo.put("x", 1)
    assert memo.get("x") == 1 and memo.get("y", 2) == 2
