"""User-facing texts of qmagic.format that several doors share."""

from __future__ import annotations

from qmagic.format import log_health_note


def test_a_healthy_log_says_nothing_even_with_records_waiting_for_the_writer():
    assert log_health_note({"ok": True, "pending": 3, "dropped": 0, "last_error": None}) is None


def test_a_faulty_or_lossy_log_says_so_in_one_line():
    note = log_health_note({"ok": False, "pending": 1, "dropped": 0, "last_error": "database is locked"})
    assert note == ("Note: the experiment log cannot write (1 entry waiting): database is locked. "
                    "See worker.log_health().")
    note = log_health_note({"ok": True, "pending": 0, "dropped": 2, "last_error": "disk full"})
    assert note == "Note: the experiment log lost 2 entries: disk full. See worker.log_health()."
    assert "\n" not in note
