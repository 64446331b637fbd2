"""Helpers of the experiment-log tests (tests/test_store_*.py): task records and a fresh
warning state per test."""

from __future__ import annotations

import threading
import time

import pytest

from qmagic.store import records as records_module


def task(uid: str, status: str = "queued", **fields) -> dict:
    """A task record as the worker logs it (PLAN.md's task record); ``fields`` override."""
    now = time.time()
    rec = {"uid": uid, "name": "measure", "kind": "function", "args": [1], "kwargs": {"n": 2},
           "user": "alice", "user_group": "primary", "background": True, "origin": "magic",
           "status": status, "submitted_at": now, "started_at": None, "finished_at": None,
           "progress": None, "result": None, "error": None, "error_type": None, "traceback": None,
           "timeout": None, "namespace_changes": None,
           "provenance": {"notebook": "/home/alice/01-getting-started.ipynb", "cell_id": "c-1",
                          "execution_count": 12, "cell_hash": "5d41402a"}}
    if status in ("running", "completed", "failed", "cancelled"):
        rec["started_at"] = now
    if status in ("completed", "failed", "cancelled"):
        rec["finished_at"] = now + 0.001
    rec.update(fields)
    return rec


def refuse_new_segments(monkeypatch) -> threading.Event:
    """While the event returned is set, no spool segment can be made ("No space left on
    device": a full disk)."""
    from qmagic.store import segments as segments_module

    real_new_segment = segments_module.SessionFiles.new_segment
    refuse = threading.Event()

    def new_segment(files):
        if refuse.is_set():
            raise OSError(28, "No space left on device")
        return real_new_segment(files)

    monkeypatch.setattr(segments_module.SessionFiles, "new_segment", new_segment)
    return refuse


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Warnings are once per process and kind: each test starts afresh."""
    records_module._warned.clear()
    yield
    records_module._warned.clear()
