"""The spool's readers and its writer thread at the worst moments: a lookup while the
writer takes lines off the in-memory queue, a spool cut by another process while the
writer stores it.  Each pauses the writer thread at one line (a trace hook set before the
Journal starts it).  (A file of its own, run before test_store_journal.py: after that
file's storm of asynchronous exceptions, a thread started with a trace hook never ran.)"""

from __future__ import annotations

import inspect
import os
import sys
import threading

from polling import eventually
from store_helpers import refuse_new_segments, task

from qmagic.store import segments as segments_module
from qmagic.store import spool as spool_module
from qmagic.store import writer as writer_module
from qmagic.store.journal import Journal

ENV = "lab-1"


def run_task(journal: Journal, uid: str) -> None:
    journal.submitted(task(uid))
    journal.started(uid, 1000.0)
    journal.finished(task(uid, "completed"))


def journal_with_writer_traced(folder, function, tracer) -> Journal:
    """A Journal of ``folder`` whose writer thread (started now) runs ``tracer`` as the
    line tracer of ``function``'s frames (a pause at a chosen line)."""
    threading.settrace(lambda frame, event, arg: tracer if frame.f_code is function.__code__ else None)
    try:
        return Journal(folder, ENV)
    finally:
        threading.settrace(None)


def test_a_lookup_while_the_writer_stores_the_lines_waiting_in_memory(tmp_path, monkeypatch):
    """No segment can be made (disk full): lines wait in memory, and the writer stores them
    and takes them off that queue while a lookup reads it.  The lookup went through the
    queue line by line and raised "deque mutated during iteration"; it reads a copy."""
    monkeypatch.setattr(writer_module, "QUIET_S", 600.0)  # the writer stores on flush() only
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)
    monkeypatch.setattr(segments_module, "SEGMENT_BYTES", 32 * 1024)
    refuse = refuse_new_segments(monkeypatch)
    source, first = inspect.getsourcelines(writer_module.Writer._commit)
    pop = first + next(i for i, text in enumerate(source) if "range(batch.held)" in text)
    after = first + next(i for i, text in enumerate(source) if "in batch.reads" in text)
    at_pop, go_pop, popped = threading.Event(), threading.Event(), threading.Event()

    def writer_lines(frame, event, arg):
        if event == "line" and frame.f_lineno == pop and not at_pop.is_set():
            at_pop.set()
            go_pop.wait(10)
        elif event == "line" and frame.f_lineno == after and at_pop.is_set():
            popped.set()
        return writer_lines

    j = journal_with_writer_traced(tmp_path, writer_module.Writer._commit, writer_lines)
    in_lookup, go_lookup, outcome = threading.Event(), threading.Event(), []
    source, first = inspect.getsourcelines(spool_module.Spool.lines_of)
    held = first + next(i for i, text in enumerate(source) if "for line in held" in text)

    def lookup_lines(frame, event, arg):  # (paused in the middle of reading what waits in memory)
        if event == "line" and not in_lookup.is_set() and frame.f_code.co_firstlineno == held:
            lookup_lines.seen += 1
            if lookup_lines.seen == 2:
                in_lookup.set()
                go_lookup.wait(10)
        return lookup_lines
    lookup_lines.seen = 0

    def lookup() -> None:
        sys.settrace(lambda frame, event, arg: lookup_lines if frame.f_code.co_name == "<listcomp>" else None)
        try:
            outcome.append(j.get("t-199"))
        except Exception as exc:  # noqa: BLE001 - the test reports it
            outcome.append(exc)
        finally:
            sys.settrace(None)

    with j:
        refuse.set()
        for i in range(200):
            run_task(j, f"t-{i}")
        assert j.health()["in_memory"] >= 3
        flusher = threading.Thread(target=j.flush, args=(10,))
        reader = threading.Thread(target=lookup)
        flusher.start()
        try:
            assert at_pop.wait(10)  # (the writer stored what waits in memory)
            reader.start()  # (a lookup that copies the queue first never pauses in it)
            eventually(lambda: in_lookup.is_set() or not reader.is_alive(), what="the lookup")
            go_pop.set()
            assert popped.wait(10)  # (and took it off the queue)
        finally:
            go_pop.set()
            go_lookup.set()
            flusher.join(10)
            reader.join(10)
        assert isinstance(outcome[0], dict) and outcome[0]["status"] == "completed", outcome
        refuse.clear()
        assert j.flush() and j.get("t-199")["status"] == "completed"


def test_a_spool_cut_while_the_writer_stores_it_loses_no_line_written_after(tmp_path, monkeypatch):
    """Another process cuts the spool while the writer stores what it read from it, and
    lines written after the cut reach past where that store ended before the writer looks
    again: it went on from there, and the lines before that point were never stored."""
    monkeypatch.setattr(writer_module, "QUIET_S", 600.0)  # the writer stores on flush() only
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)
    source, first = inspect.getsourcelines(writer_module.Writer._commit)
    line = first + next(i for i, text in enumerate(source) if "in batch.reads" in text)
    armed, paused, go = threading.Event(), threading.Event(), threading.Event()

    def local(frame, event, arg):
        if event == "line" and frame.f_lineno == line and armed.is_set():
            armed.clear()
            paused.set()  # (stored, not yet advanced)
            go.wait(10)
        return local

    threading.settrace(lambda frame, event, arg: local if frame.f_code is writer_module.Writer._commit.__code__
                       else None)
    try:
        j = Journal(tmp_path, ENV)
    finally:
        threading.settrace(None)
    with j:
        for i in range(100):
            run_task(j, f"before-{i}")
        armed.set()
        flusher = threading.Thread(target=j.flush, args=(10,))
        flusher.start()
        try:
            assert paused.wait(10)
            (segment,) = tmp_path.glob("*.spool")
            size = segment.stat().st_size
            os.truncate(segment, 0)
            for i in range(150):
                run_task(j, f"after-{i}")
            assert segment.stat().st_size > size
        finally:
            go.set()
            flusher.join(10)
        assert j.flush()
        pending = j.health()["pending"]
    with Journal(tmp_path, ENV) as j:
        found = j.statuses([f"after-{i}" for i in range(150)])
        assert set(found.values()) == {"completed"}, sorted(u for u, s in found.items() if s != "completed")
        assert pending == 0


def test_a_count_while_the_writer_moves_lines_waiting_in_memory_into_the_spool(tmp_path, monkeypatch):
    """No segment could be made (disk full): lines waited in memory.  Once one can, the
    writer installs it and moves those lines into it; a count (the pending figure of
    ``%tasks``' footer, of the remote status) that copied the queue before the move and read
    the new segment after it counted each moved line twice.  Here the writer pauses between
    installing the segment and moving the lines, and the count between copying the queue
    and reading the segments: the count is exact."""
    monkeypatch.setattr(writer_module, "QUIET_S", 600.0)  # the writer stores on flush() only
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)
    monkeypatch.setattr(segments_module, "SEGMENT_BYTES", 32 * 1024)
    refuse = refuse_new_segments(monkeypatch)
    source, first = inspect.getsourcelines(spool_module.Spool.prepare)
    move = first + next(i for i, text in enumerate(source) if "while self.held:" in text)
    armed, paused, go = threading.Event(), threading.Event(), threading.Event()

    def writer_lines(frame, event, arg):
        if event == "line" and frame.f_lineno == move and armed.is_set() and frame.f_locals["self"].held:
            armed.clear()
            paused.set()  # (a new segment installed, the lines not moved yet)
            go.wait(10)
        return writer_lines

    j = journal_with_writer_traced(tmp_path, spool_module.Spool.prepare, writer_lines)
    counting, go_count, counted = threading.Event(), threading.Event(), []
    real_pread = os.pread

    def paused_pread(fd, n, offset):
        if threading.current_thread() is counter and not counting.is_set():
            counting.set()  # (the queue copied, the segments not read yet)
            go_count.wait(10)
        return real_pread(fd, n, offset)
    counter = threading.Thread(target=lambda: counted.append(j.health()["pending"]))
    with j:
        refuse.set()
        tasks = 0
        while len(j._spool.held) < 30:
            run_task(j, f"t-{tasks}")
            tasks += 1
        armed.set()
        refuse.clear()  # (the writer's next retry makes a segment)
        try:
            assert paused.wait(10)
            monkeypatch.setattr(os, "pread", paused_pread)
            counter.start()
            assert counting.wait(10)
            go.set()
            eventually(lambda: not j._spool.held, what="the lines moved into the spool")
        finally:
            go.set()
            go_count.set()
            if counter.ident is not None:
                counter.join(10)
            monkeypatch.setattr(os, "pread", real_pread)
        assert counted == [3 * tasks]
        assert j.flush() and j.health()["pending"] == 0
