"""The spool's segment files under what other processes and a full disk do to them
(qmagic.store.segments, qmagic.store.spool): zero bytes added by another process, a line
cut short by the disk, and readers of a long backlog racing the task path."""

from __future__ import annotations

import itertools
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from store_helpers import fresh_warnings, task  # noqa: F401 - fresh_warnings: a fixture

from qmagic.store import records as records_module
from qmagic.store import segments as segments_module
from qmagic.store import writer as writer_module
from qmagic.store.journal import Journal
from qmagic.store.lines import match_line, salvage
from qmagic.store.segments import Segment

REPO = Path(__file__).resolve().parents[1]
ENV = "lab-1"


def run_task(journal: Journal, uid: str) -> None:
    journal.submitted(task(uid))
    journal.started(uid, time.time())
    journal.finished(task(uid, "completed"))

def kill_a_session(folder: Path, script: str) -> None:
    """Run ``script`` in a child process with a Journal ``j`` of ``folder`` (the writer
    stores nothing: QUIET_S long) and ``task`` a record; SIGKILL it once it says "ready"."""
    code = (f"import sys, time, os\nsys.path.insert(0, {str(REPO)!r})\n"
            f"from qmagic.store import writer\nwriter.QUIET_S = writer.MAX_DELAY_S = 600.0\n"
            f"from qmagic.store.journal import Journal\nj = Journal(sys.argv[1], {ENV!r})\n"
            f"task = {task('x')!r}\n" + textwrap.dedent(script))
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"  # (pytest-timeout guards a hung child)
    finally:
        proc.kill()
        proc.wait(30)
        proc.stdout.close()



@pytest.fixture
def stores_on_flush(monkeypatch):
    """The writer thread stores on flush() only (and deletes nothing by age meanwhile)."""
    monkeypatch.setattr(writer_module, "QUIET_S", 600.0)
    monkeypatch.setattr(writer_module, "MAX_DELAY_S", 600.0)


def segment_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.spool"), key=lambda p: int(p.name.split(".")[-2]))


def append_as_another_process(path: Path, data: bytes = b"", zeros: int = 0) -> None:
    """What another program does to a spool file: append ``data``, then extend the file
    by ``zeros`` zero bytes (``truncate -s +N``, or a recovery tool's padding)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        if data:
            os.write(fd, data)
        if zeros:
            os.ftruncate(fd, os.fstat(fd).st_size + zeros)
    finally:
        os.close(fd)


@pytest.mark.parametrize("garbage", [b"", b'[3,"half-a-line-of-anot'], ids=["zeros", "half-line-then-zeros"])
def test_lines_appended_after_zero_bytes_another_process_added_are_seen_and_stored(
        tmp_path, stores_on_flush, garbage):
    """Another process extends the live segment with zero bytes (``truncate -s +4096``),
    maybe after half a line: readers took the first zero byte for the end of the file, so
    the lines appended after it were invisible, never stored and deleted at close.  They
    are counted, found and stored now; the half line is never stored nor taken for damage."""
    with Journal(tmp_path, ENV) as j:
        for i in range(50):
            run_task(j, f"before-{i}")
        assert j.get("before-3")["status"] == "completed" and j.health()["pending"] == 150
        (segment,) = segment_files(tmp_path)
        append_as_another_process(segment, garbage, zeros=4096)
        for i in range(5):
            run_task(j, f"after-{i}")
        assert j.health()["pending"] == 165
        assert j.get("after-4")["status"] == "completed"
        assert {r["uid"] for r in j.records()} >= {f"after-{i}" for i in range(5)}
        assert j.flush() and j.health()["pending"] == 0
        append_as_another_process(segment, zeros=1 << 20)  # (zeros at the end, then more lines)
        for i in range(5):
            run_task(j, f"later-{i}")
        assert j.health()["pending"] == 15 and j.get("later-0")["status"] == "completed"
    with Journal(tmp_path, ENV) as j:
        found = j.statuses([f"{kind}-{i}" for kind in ("before", "after", "later") for i in range(5)])
        assert set(found.values()) == {"completed"}, {u: s for u, s in found.items() if s != "completed"}
    assert "spool-lines" not in records_module._warned  # (the half line was not taken for a line)


KILLED_AFTER_ZEROS = """
for i in range(3):
    j.submitted(dict(task, uid=f"before-{i}"))
spool = sorted(p for p in os.listdir(sys.argv[1]) if p.endswith(".spool"))[0]
fd = os.open(os.path.join(sys.argv[1], spool), os.O_WRONLY | os.O_APPEND)
os.ftruncate(fd, os.fstat(fd).st_size + 4096)
for i in range(3):
    j.submitted(dict(task, uid=f"after-{i}"))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_dead_sessions_lines_after_zero_bytes_are_recovered(tmp_path):
    """The recovery of a killed kernel's spool read it up to the first zero byte too."""
    kill_a_session(tmp_path, KILLED_AFTER_ZEROS)
    with Journal(tmp_path, ENV) as j:  # (recovers the killed session)
        found = j.statuses([f"{kind}-{i}" for kind in ("before", "after") for i in range(3)])
        assert set(found.values()) == {"failed"}, found  # (queued when the kernel died: orphans)
    assert not segment_files(tmp_path)


@pytest.fixture
def file_size_limit():
    """``limit(n)``: this process's writes end at ``n`` bytes into a file (a full disk, for
    one file: the write that crosses it is cut short); ``limit(None)`` lifts it."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (else the kernel kills us)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def limit(n: int | None) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft if n is None else n, hard))

    yield limit
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


def test_a_segment_ending_in_a_line_the_disk_cut_short_is_deleted_once_stored(
        tmp_path, stores_on_flush, file_size_limit):
    """A write cut short by a full disk ends the segment in half a line; the next lines go
    to a new segment.  The old one was stored but never deleted (until the log closed):
    its reader waited for the rest of that line, which never comes."""
    with Journal(tmp_path, ENV) as j:
        for i in range(20):
            run_task(j, f"before-{i}")
        assert j.flush()
        (segment,) = segment_files(tmp_path)
        file_size_limit(segment.stat().st_size + 40)
        try:
            j.submitted(task("cut-short"))  # (40 bytes of it reach the file; the line waits in memory)
        finally:
            file_size_limit(None)
        # (in memory, or already in the next segment: the writer, woken, may have moved it)
        assert j.statuses(["cut-short"]) == {"cut-short": "queued"}
        assert not segment.read_bytes().endswith(b"\n")  # (it ends in half a line)
        run_task(j, "after")
        assert j.flush() and j.health()["pending"] == 0
        assert segment_files(tmp_path) == [j._spool.current.path] != [segment]
        assert j.statuses(["cut-short", "after", "before-19"]) == {
            "cut-short": "queued", "after": "completed", "before-19": "completed"}


def test_a_segment_a_rotation_closed_while_a_write_was_cut_short_is_deleted_once_stored(
        tmp_path, stores_on_flush, file_size_limit, monkeypatch):
    """Another thread may switch to the next segment between a write the disk cut short
    and the writer noting it (a thread switch can fall right after the C call): the old
    segment, closed for writing, then ended in half a line that its reader waited for,
    and it was never deleted (until the log closed).  Here the switch falls there."""
    with Journal(tmp_path, ENV) as j:
        run_task(j, "before")
        assert j.flush()
        spool = j._spool
        old = spool.current
        real_write, rotated = segments_module._c_write, []

        def write_then_a_rotation(fd, line, size):
            n = real_write(fd, line, size)
            if n != size and not rotated:  # (cut short: another thread rotates right now)
                file_size_limit(None)
                with spool.lock:
                    rotated.append(spool._rotate(force=True))
            return n
        monkeypatch.setattr(segments_module, "_c_write", write_then_a_rotation)
        file_size_limit(old.path.stat().st_size + 40)
        try:
            j.submitted(task("cut-short"))
        finally:
            file_size_limit(None)
        assert rotated == [True] and spool.current is not old
        assert not old.path.read_bytes().endswith(b"\n")  # (it ends in half a line)
        run_task(j, "after")
        assert j.flush() and j.flush() and j.health()["pending"] == 0
        assert j.statuses(["cut-short", "after"]) == {"cut-short": "queued", "after": "completed"}
        assert old.path not in segment_files(tmp_path)


@pytest.mark.parametrize("reader", ["get", "health", "records"])
def test_a_task_never_waits_for_a_first_read_of_the_backlog(tmp_path, stores_on_flush, monkeypatch, reader):
    """The first count or lookup of a long backlog (a database locked for hours) reads the
    whole spool (0.7 s for 100,000 tasks): it did so under the lock a task takes to switch
    to the next segment, so a task could wait that long.  Here a lookup is paused inside
    its read while tasks fill segments: they finish meanwhile."""
    monkeypatch.setattr(segments_module, "SEGMENT_BYTES", 32 << 10)
    with Journal(tmp_path, ENV) as j:
        for i in range(100):
            run_task(j, f"waiting-{i}")
        reading, go = threading.Event(), threading.Event()
        real_pread, looked = os.pread, []

        def paused_pread(fd, n, offset):
            if threading.current_thread() is lookup_thread and not reading.is_set():
                reading.set()
                go.wait(10)
            return real_pread(fd, n, offset)

        def lookup() -> None:
            read = {"get": lambda: j.get("waiting-99"), "health": lambda: j.health()["pending"],
                    "records": lambda: len(j.records(status="completed"))}[reader]
            looked.append(read())

        def tasks() -> None:
            first = len(j._spool.segments)
            for i in itertools.count():
                run_task(j, f"meanwhile-{i}")
                if len(j._spool.segments) > first + 1:  # (two switches to a new segment)
                    return

        lookup_thread = threading.Thread(target=lookup)
        task_thread = threading.Thread(target=tasks)
        monkeypatch.setattr(os, "pread", paused_pread)
        lookup_thread.start()
        try:
            assert reading.wait(10)
            task_thread.start()
            task_thread.join(5)
            assert not task_thread.is_alive(), "a task waited for a lookup's read of the spool"
        finally:
            go.set()
            lookup_thread.join(10)
            task_thread.join(10)
            monkeypatch.setattr(os, "pread", real_pread)
        if reader == "get":
            assert looked[0]["status"] == "completed"
        else:
            assert looked[0] >= (300 if reader == "health" else 100)  # (and what the tasks added)
        assert j.flush() and j.health()["pending"] == 0


def test_a_line_landing_in_an_old_segment_after_the_writer_checked_it_is_kept(
        tmp_path, stores_on_flush, monkeypatch):
    """A task thread that passed the segment's checks just before a rotation may write its
    line into the old segment after the writer found that segment stored to its end: the
    writer then deleted the segment, and the line with it.  The deletion now checks again,
    under the spool's lock (no line can land after it: the segment is closed for writing)."""
    with Journal(tmp_path, ENV) as j:
        run_task(j, "first")
        assert j.flush()
        spool = j._spool
        old = spool.current
        line = next(raw for raw in old.path.read_bytes().splitlines(keepends=True)
                    if raw.startswith(b"[") and b'"first"' in raw)
        late = line.replace(b'"first"', b'"late1"')
        with spool.lock:
            assert spool._rotate(force=True)  # (what a full segment makes a task thread do)
        checked = Segment.at_end
        landed = threading.Event()

        def at_end_then_a_late_line(seg):
            found = checked(seg)
            if found and seg is old and not landed.is_set():
                landed.set()  # the late line lands right after the writer's check
                os.write(seg.fd, late)
            return found
        monkeypatch.setattr(Segment, "at_end", at_end_then_a_late_line)
        assert j.flush()
        assert landed.is_set()
        assert j.flush()
        assert j.statuses(["late1", "first"]) == {"late1": "queued", "first": "completed"}
        assert j.flush() and j.health()["pending"] == 0
        assert old.path not in segment_files(tmp_path)  # (deleted once that line was stored)


def test_more_bytes_without_a_newline_than_any_line_are_skipped_not_read_forever(
        tmp_path, stores_on_flush, fresh_warnings):
    """Another program wrote more bytes without a newline into a segment than a whole
    transaction reads (2 MiB): the writer read them again and again, looking for the end of
    a line that no line of the log can be that long, spinning on a CPU with the lines after
    them never stored (found by a helper).  Bytes past the longest line are skipped (a bad
    line at worst, counted as one), and the lines after them are stored."""
    with Journal(tmp_path, ENV) as j:
        run_task(j, "before")
        assert j.flush()
        append_as_another_process(j._spool.current.path, b"x" * (3 << 20) + b"\n")
        run_task(j, "after")
        with pytest.warns(records_module.JournalWarning, match="skipped 1 damaged spool line"):
            assert j.flush(timeout=10)
        assert j.statuses(["before", "after"]) == {"before": "completed", "after": "completed"}
        assert j.health()["pending"] == 0


@pytest.mark.parametrize("reader", ["health", "get"])
def test_a_count_or_lookup_reads_what_another_process_added_in_bounded_pieces(
        tmp_path, stores_on_flush, monkeypatch, reader):
    """Another process extends the live segment by 64 MiB of zero bytes (``truncate -s
    +64M``; +1G the same): the first count or lookup read all of it in one ``pread``, a
    buffer as large in the kernel's memory (1 GiB: the OOM killer).  It reads in pieces of
    at most 2 MiB now, with the same result."""
    with Journal(tmp_path, ENV) as j:
        for i in range(20):
            run_task(j, f"before-{i}")
        append_as_another_process(j._spool.current.path, zeros=64 << 20)
        for i in range(5):
            run_task(j, f"after-{i}")
        real_pread, asked, me = os.pread, [], threading.current_thread()

        def measured_pread(fd, n, offset):
            if threading.current_thread() is me:
                asked.append(n)
            return real_pread(fd, n, offset)
        monkeypatch.setattr(os, "pread", measured_pread)
        try:
            found = j.health()["pending"] if reader == "health" else j.get("after-4")["status"]
        finally:
            monkeypatch.setattr(os, "pread", real_pread)
        assert found == (75 if reader == "health" else "completed")
        assert asked and max(asked) <= 2 << 20, f"one read of {max(asked) >> 20} MiB"
        assert j.flush() and j.health()["pending"] == 0


def test_the_history_shows_lines_behind_more_zero_bytes_than_a_segment_holds(tmp_path, stores_on_flush):
    """records() (the history's view of lines not in SQLite yet) read a segment up to its
    nominal size (4 MiB): lines another process's zero bytes pushed beyond it were shown
    only once the writer had stored them.  They show at once now."""
    with Journal(tmp_path, ENV) as j:
        run_task(j, "before")
        append_as_another_process(j._spool.current.path, zeros=5 << 20)
        run_task(j, "after")
        assert {r["uid"]: r["status"] for r in j.records()} == {"before": "completed", "after": "completed"}
        assert j.flush() and j.health()["pending"] == 0
        assert {r["uid"] for r in j.records()} == {"before", "after"}


FOREIGN = {"text": b"a note without a newline ", "half-line": b'[3,"half-a-line-of-anot',
           "half-record": b'[1,"abc",{"x', "2 MiB": b"n" * 2_097_092,
           # (half a line of ours that loses to the task's later line: a truncate cut it)
           "half of ours": b'[1,"before",{"uid":"bef', "half a start line": b'[2,"before",17'}


@pytest.mark.parametrize("foreign", FOREIGN.values(), ids=FOREIGN.keys())
def test_our_line_glued_to_bytes_another_program_appended_is_kept(
        tmp_path, stores_on_flush, fresh_warnings, foreign):
    """Another program appends bytes without a newline to the live segment: our next line
    is glued to them.  That line was damaged as a whole and lost (the task's record never
    reached SQLite); our line at its end is kept now, the foreign bytes are one damaged
    line.  (Of 2 MiB without a newline, our line's start was read with a piece that used
    them up: it was lost still.  After bytes that start like a line of ours, a lookup did not
    find it, nor, when they lost to another line of their task, the writer.)"""
    with Journal(tmp_path, ENV) as j:
        run_task(j, "before")
        append_as_another_process(j._spool.current.path, foreign)
        j.submitted(task("glued"))
        run_task(j, "after")
        assert j.health()["pending"] == 7
        assert j.get("glued")["status"] == "queued"  # (a lookup: the index)
        assert j.records(status="queued")[0]["uid"] == "glued"  # (the history)
        with pytest.warns(records_module.JournalWarning, match="skipped 1 damaged spool line"):
            assert j.flush()
        assert j.health()["pending"] == 0
        assert j.statuses(["before", "glued", "after"]) == {
            "before": "completed", "glued": "queued", "after": "completed"}


KILLED_AFTER_FOREIGN_BYTES = """
j.submitted(dict(task, uid="before"))
spool = sorted(p for p in os.listdir(sys.argv[1]) if p.endswith(".spool"))[0]
fd = os.open(os.path.join(sys.argv[1], spool), os.O_WRONLY | os.O_APPEND)
os.write(fd, b'[3,"half-a-line-of-anot')
j.submitted(dict(task, uid="glued"))
print("ready", flush=True)
time.sleep(600)
"""


def test_a_dead_sessions_line_glued_to_foreign_bytes_is_recovered(tmp_path, fresh_warnings):
    """The recovery of a killed kernel's spool lost such a line too."""
    kill_a_session(tmp_path, KILLED_AFTER_FOREIGN_BYTES)
    with pytest.warns(records_module.JournalWarning, match="skipped 1 damaged line"):
        with Journal(tmp_path, ENV) as j:  # (recovers the killed session)
            assert j.statuses(["before", "glued"]) == {"before": "failed", "glued": "failed"}
    assert not segment_files(tmp_path)


def test_a_dead_sessions_padded_segment_is_recovered_in_bounded_pieces(tmp_path, monkeypatch):
    """Another process padded a killed kernel's segment with 64 MiB of zero bytes (+1G the
    same): the recovery, which every kernel opening the log runs, read it whole (16 MiB
    reads into one buffer as large).  It reads in pieces of at most 2 MiB now."""
    kill_a_session(tmp_path, "j.submitted(dict(task, uid='before'))\nprint('ready', flush=True)\ntime.sleep(600)\n")
    (segment,) = segment_files(tmp_path)
    append_as_another_process(segment, zeros=64 << 20)
    append_as_another_process(segment, orjson.dumps([1, "after", task("after")]) + b"\n")
    asked, real_read, real_pread = [], os.read, os.pread
    monkeypatch.setattr(os, "read", lambda fd, n: asked.append(n) or real_read(fd, n))
    monkeypatch.setattr(os, "pread", lambda fd, n, at: asked.append(n) or real_pread(fd, n, at))
    with Journal(tmp_path, ENV) as j:  # (recovers the killed session)
        assert j.statuses(["before", "after"]) == {"before": "failed", "after": "failed"}
    monkeypatch.undo()
    assert max(asked) <= 2 << 20, f"one read of {max(asked) >> 20} MiB"
    assert not segment_files(tmp_path)


@pytest.fixture
def tmp_fd(tmp_path):
    fd = os.open(tmp_path / "segment", os.O_RDWR | os.O_CREAT, 0o600)
    yield fd
    os.close(fd)


#: Sizes where a piece ends or a line stops being one of ours (64 KiB, 1 MiB, 2 MiB pieces).
_EDGES = [1, 2, 65_535, 65_536, 65_537, records_module.MAX_LINE - 1, records_module.MAX_LINE,
          records_module.MAX_LINE + 1, records_module.MAX_LINE + 2, (2 << 20) - 1, 2 << 20, (2 << 20) + 1,
          2_500_000]
_OURS = b'[3,"ab",{"uid":"ab","status":"failed"}]\n'
_PART = st.one_of(
    st.binary(min_size=0, max_size=300).map(lambda b: b.replace(b"\n", b"").replace(b"\0", b"") + b"\n"),
    st.sampled_from(_EDGES).map(lambda n: b"\0" * n),  # another program's padding
    st.sampled_from(_EDGES).map(lambda n: b"x" * n),  # bytes without a newline: a line, or past any
    st.sampled_from(_EDGES).map(lambda n: b"y" * n + b"\n"),
    st.sampled_from([b"\n", b"half a line", b'[2,"ab",1.5]\n', _OURS]),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(parts=st.lists(_PART, max_size=10), torn=st.booleans(), start=st.integers(0, 100))
@example(parts=[b"x" * ((2 << 20) + 1)], torn=False, start=0)  # a tail too long for a line, carried
@example(parts=[b"x" * ((1 << 20) - 1), b"x" * (1 << 20), b"\x01\n"], torn=False, start=0)
@example(parts=[b"a\n", b"x" * 2_500_000, b'[3,"ab",{"uid":"ab","status":"failed"}]\n'], torn=True, start=0)
@example(parts=[b"a\n", b"\0" * 65_535, b"b\n", b"\0" * ((2 << 20) + 1), b"half a line"], torn=False, start=1)
# Our line glued after about 2 MiB of bytes without a newline, its start before a piece's
# edge: its first part was used up with them (only the piece's last byte was read again).
@example(parts=[b"x" * ((2 << 20) - 2), _OURS], torn=False, start=0)
@example(parts=[b"x" * ((2 << 20) - 20), _OURS], torn=False, start=0)
@example(parts=[b"x" * ((2 << 20) - len(_OURS) + 1), _OURS], torn=True, start=0)
@example(parts=[b"x" * (2 << 20), _OURS], torn=False, start=5)
@example(parts=[b"a\n", b"x" * ((3 << 20) - 7), _OURS, b"b\n"], torn=False, start=0)
def test_reading_in_pieces_finds_the_lines_of_one_read(tmp_fd, parts, torn, start):
    """segments.read_lines (every reader: counts, lookups, the writer, recovery) reads a file
    in bounded pieces and finds what one read of it all finds (complete_lines): as many
    lines, every line of ours at the same offset, and the same end of what is used up —
    whatever zero runs and newline-less bytes another program put where a piece ends.  (Of
    a damaged line longer than any of ours, a reader in pieces may see only its end: damage
    either way, or the same line of ours at its end.)"""
    data = b"".join(parts)
    os.ftruncate(tmp_fd, 0)
    os.pwrite(tmp_fd, data, 0)
    begin = min(start, len(data))

    def lines_at(blocks):
        found = []
        for at, chunk in blocks:
            for line in chunk.split(b"\n")[:-1]:
                found.append((at, line))
                at += len(line) + 1
        return found

    whole, used = segments_module.complete_lines(data[begin:], torn)
    expected = [(begin + at, line) for at, line in lines_at(whole)]
    got, end = [], begin
    for blocks, end in segments_module.read_lines(tmp_fd, begin, len(data), torn):
        got += lines_at(blocks)
    assert len(got) == len(expected)
    assert ours(got) == ours(expected)
    assert end == begin + used


def ours(lines: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The lines of ours among ``lines`` (offset, line), as every reader takes them: whole,
    or at the end of another program's bytes (store.lines.salvage)."""
    found = []
    for at, line in lines:
        start = 0 if match_line(line) else salvage(line)
        if start >= 0:
            found.append((at + start, line[start:]))
    return found
