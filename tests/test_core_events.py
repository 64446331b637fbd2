"""Events (order, errors, subscriptions), in-task helpers and output/log capture."""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
import threading

import pytest

import qmagic
from qmagic import TaskCancelled, TaskStatus

from engine_helpers import TIMEOUT, make_worker  # noqa: F401 - fixture
from polling import eventually

#: These tests are about the engine alone (its rules, races and timings): the experiment log
#: stays off here (make_worker reads this); it is tested in test_worker_journal.py and
#: test_kernel_journal.py, and on in every other worker and kernel test.
ENGINE_ALONE = True


def _kinds(events, uid):
    out = []
    for e in events:
        if e["task_uid"] != uid:
            continue
        key = next(k for k in ("status", "progress", "result", "error") if k in e)
        out.append(e[key] if key == "status" else key)
    return out


def test_event_order_per_task(make_worker):
    def scan(n):
        for i in range(n):
            qmagic.report_progress(i + 1, n, f"point {i + 1}")
        return "done"

    w = make_worker({"scan": scan, "bad": lambda: 1 / 0})
    events = []
    w.subscribe(lambda **kw: events.append(kw))
    ok = [w.submit("scan", (5,)) for _ in range(10)]
    bad = w.submit("bad")
    for t in ok + [bad]:
        t.wait(TIMEOUT)
    assert w.engine.bus.flush(TIMEOUT)
    for t in ok:  # (progress the callbacks did not take yet merges: 1 to 5 of them)
        kinds = _kinds(events, t.uid)
        assert kinds[:2] == ["queued", "running"] and kinds[-2:] == ["result", "completed"], kinds
        assert 1 <= kinds.count("progress") <= 5 and set(kinds[2:-2]) == {"progress"}, kinds
    assert _kinds(events, bad.uid) == ["queued", "running", "error", "failed"]
    last_progress = [e["progress"] for e in events if e["task_uid"] == ok[0].uid and "progress" in e][-1]
    assert last_progress == qmagic.Progress(5, 5, "point 5") and last_progress.fraction == 1.0
    result = [e["result"] for e in events if e["task_uid"] == ok[0].uid and "result" in e]
    assert result == ["done"]


def test_a_progress_flood_merges_and_never_piles_up(make_worker):
    """A tight report_progress loop against a slow subscriber: at most one progress waits
    per task, the order of the other events holds, the last progress is delivered (found by
    a hostile test: two such tasks queued millions of events, hundreds of MB)."""
    started, release = threading.Event(), threading.Event()

    def flood(n):
        for i in range(n):
            qmagic.report_progress(i + 1, n)
        return "done"

    w = make_worker({"flood": flood})
    events, depths = [], []

    def slow(**kw):
        started.set()
        release.wait(TIMEOUT)  # the first delivery blocks while the task floods
        depths.append(w.engine.bus._queue.qsize())
        events.append(kw)

    w.subscribe(slow)
    t = w.submit("flood", (200_000,))
    assert started.wait(TIMEOUT) and t.wait(TIMEOUT)
    release.set()
    assert w.engine.bus.flush(TIMEOUT)
    kinds = _kinds(events, t.uid)
    assert kinds[:2] == ["queued", "running"] and kinds[-2:] == ["result", "completed"], kinds
    assert kinds.count("progress") <= 2 and max(depths) <= 8, (kinds, depths)  # not 200,000
    assert [e["progress"] for e in events if "progress" in e][-1] == qmagic.Progress(200_000, 200_000, None)


def test_cancelled_queued_task_events(make_worker):
    gate = threading.Event()
    w = make_worker({"wait": lambda: gate.wait(TIMEOUT), "f": lambda: 1}, max_background_tasks=1)
    events = []
    w.subscribe(lambda **kw: events.append(kw))
    w.submit("wait")
    queued = w.submit("f")
    queued.cancel()
    gate.set()
    assert w.engine.bus.flush(TIMEOUT)
    assert _kinds(events, queued.uid) == ["queued", "error", "cancelled"]
    assert isinstance(next(e["error"] for e in events if "error" in e), TaskCancelled)


def test_callback_errors_are_logged_and_isolated(make_worker, caplog):
    w = make_worker({"f": lambda: 1})
    good = []

    def broken(**kw):
        raise RuntimeError("callback bug")

    w.subscribe(broken)
    w.subscribe(lambda **kw: good.append(kw))
    t = w.submit("f")
    assert t.result(TIMEOUT) == 1
    assert w.engine.bus.flush(TIMEOUT)
    assert _kinds(good, t.uid) == ["queued", "running", "result", "completed"]
    assert "callback bug" in caplog.text


def test_callback_without_kwargs_is_refused(make_worker):
    w = make_worker()
    with pytest.raises(ValueError, match=r"must accept \*\*kwargs"):
        w.subscribe(lambda task_uid, status: None)
    t = w.submit(lambda: 1)
    with pytest.raises(ValueError, match="kwargs"):
        t.subscribe(lambda x: None)


def test_unsubscribe_and_with_block_and_dropping(make_worker):
    w = make_worker({"f": lambda: 1})
    got = []
    with w.subscribe(lambda **kw: got.append(kw)) as sub:
        w.submit("f").wait(TIMEOUT)
        assert w.engine.bus.flush(TIMEOUT)
    assert not sub.active
    n = len(got)
    w.submit("f").wait(TIMEOUT)
    assert w.engine.bus.flush(TIMEOUT)
    assert len(got) == n
    # Dropping the Subscription object does not end it.
    dropped = []
    w.subscribe(lambda **kw: dropped.append(kw))
    gc.collect()
    w.submit("f").wait(TIMEOUT)
    assert w.engine.bus.flush(TIMEOUT)
    assert len(dropped) == 4


def test_task_subscribe_replays_current_state(make_worker):
    w = make_worker({"f": lambda: "r"})
    t = w.submit("f")
    t.wait(TIMEOUT)
    got = []
    sub = t.subscribe(lambda **kw: got.append(kw))
    assert w.engine.bus.flush(TIMEOUT)
    assert got == [{"task_uid": t.uid, "result": "r"}, {"task_uid": t.uid, "status": "completed"}]
    sub.unsubscribe()


def test_helpers_are_noops_outside_a_task():
    assert qmagic.current_task() is None
    qmagic.report_progress(1, 2, "x")
    qmagic.raise_if_cancelled()
    qmagic.cancellable_sleep(0)


def test_a_progress_message_is_kept_as_an_exact_str(make_worker):
    """A str subclass whose __str__ returns itself stayed what it was: its own methods
    (__len__, __getitem__ ...) then ran wherever the message was shown, on threads that must
    never be held up (the panels', the info socket's; a reviewer's finding)."""
    class Label(str):
        def __str__(self):
            return self

        def __len__(self):
            raise AssertionError("the message's own __len__ ran")

    w = make_worker()
    t = w.submit(lambda: qmagic.report_progress(1, 2, Label("point 1")))
    t.result(TIMEOUT)
    assert type(t.progress.message) is str and t.progress.message == "point 1"


def test_current_task_inside(make_worker):
    w = make_worker()
    t = w.submit(lambda: qmagic.current_task())
    assert t.result(TIMEOUT) is t


def test_output_and_logs_are_captured_and_still_printed(make_worker, capsys):
    log = logging.getLogger("beamline.motor")

    def scan():
        print("moving to 1.0")
        sys.stderr.write("careful\n")
        log.warning("limit switch close")
        return 1

    w = make_worker({"scan": scan})
    outside_before = "printed outside any task"
    print(outside_before)
    t = w.submit("scan")
    t.result(TIMEOUT)
    assert t.output == "moving to 1.0\ncareful\n"
    assert [(r["level"], r["logger"], r["message"]) for r in t.log] == [
        ("WARNING", "beamline.motor", "limit switch close")
    ]
    assert "limit switch close" in t.log_text
    captured = capsys.readouterr()
    assert "moving to 1.0" in captured.out and "careful" in captured.err
    assert outside_before not in t.output


def test_output_limit_keeps_newest_with_marker(make_worker):
    def chatty():
        for i in range(100):
            print(f"line {i:03d}")

    w = make_worker({"chatty": chatty}, task_output_limit=100)
    t = w.submit("chatty")
    t.result(TIMEOUT)
    text = t.output
    assert text.startswith("[... ") and "earlier characters dropped" in text
    assert text.endswith("line 099\n")
    assert len(text.split("\n", 1)[1]) == 100


def test_output_of_parallel_tasks_is_not_mixed(make_worker):
    barrier = threading.Barrier(4)

    def talk(k):
        barrier.wait(TIMEOUT)
        for i in range(50):
            print(f"task {k} line {i}")

    w = make_worker({"talk": talk})
    tasks = [w.submit("talk", (k,)) for k in range(4)]
    for k, t in enumerate(tasks):
        t.result(TIMEOUT)
        lines = t.output.splitlines()
        assert len(lines) == 50 and all(line.startswith(f"task {k} ") for line in lines)


def test_force_cancel_status_recorded(make_worker):
    started = threading.Event()

    def spin():
        started.set()
        while True:
            pass

    w = make_worker({"spin": spin}, cancel_grace_s=0.1)
    t = w.submit("spin")
    assert started.wait(TIMEOUT)
    w.cancel(t.uid, force=True)
    assert t.wait(TIMEOUT) and t.status is TaskStatus.CANCELLED


def test_a_print_made_while_output_is_being_kept_does_not_freeze_the_task(make_worker, capsys):
    """Keeping a task's output takes the task's lock (and the info socket's); code that runs
    in the same thread meanwhile -- a finalizer the garbage collector runs, a signal
    handler -- and prints or logs wanted that lock again: the lock is not re-entrant, and
    the task's thread froze, with every thread that asked about the task (found with a
    hostile stress: cyclic garbage whose __del__ printed, collected during a print, froze a
    task and the main thread waiting for it).  Such a write is now kept just after the one
    in progress.  Here the code that runs meanwhile is the written text's own __len__
    (deterministic; the collector's moment is not).  The notebook shows both in the same
    order as the task's record (the write made meanwhile reached the stream first)."""
    class Loud(str):
        said = False

        def __len__(self):
            if not Loud.said:  # (first asked while the task's output keeps the text)
                Loud.said = True
                print("said meanwhile")
            return str.__len__(self)

    def task():
        sys.stdout.write(Loud("loud text\n"))
        return "done"

    worker = make_worker({"task": task})
    submitted = worker.submit("task")
    waiter = threading.Thread(target=submitted.wait, args=(TIMEOUT,), daemon=True)
    waiter.start()
    waiter.join(TIMEOUT)
    assert not waiter.is_alive() and submitted.done(), "the task froze"
    assert submitted.result() == "done"
    assert submitted.output == "loud text\nsaid meanwhile\n"  # (kept just after the write)
    assert capsys.readouterr().out == "loud text\nsaid meanwhile\n"  # (and shown so)


def test_a_print_made_while_a_write_fails_is_still_kept_and_shown(make_worker, capsys):
    """A write made meanwhile (see above) waits for the one in progress; when that one
    raised, the waiting ones were dropped from the task's record.  Now they are kept and
    shown all the same, and the failure reaches the code that wrote; a waiting write that
    fails (its writer has returned) drops no other."""
    class Broken(str):
        def __len__(self):  # (asked while the task's output keeps the text)
            if str.__eq__(self, "broken text\n"):
                print("said meanwhile")
                with contextlib.suppress(RuntimeError):  # (write() returns its length)
                    sys.stdout.write(Broken("broken too\n"))
                print("and after")
            raise RuntimeError("no length")

    def task():
        sys.stdout.write(Broken("broken text\n"))

    worker = make_worker({"task": task})
    failed = worker.submit("task")
    assert failed.wait(TIMEOUT) and failed.status is TaskStatus.FAILED
    assert "RuntimeError: no length" in failed.traceback
    assert failed.output == "said meanwhile\nand after\n"
    assert capsys.readouterr().out == "said meanwhile\nand after\n"


def test_an_interrupt_as_a_write_ends_never_silences_the_thread(make_worker, capsys):
    """■ lands where CPython checks for it: a function's start, before its first line, is
    one such place.  Landing as a write ended, at the start of the function that runs the
    writes waiting for it, it left the thread marked "keeping text" for good: every later
    print of that thread waited for ever, unseen (found by a full run: a cell's prints
    vanished after a storm of ■ over short tasks).  The interrupt goes on; the thread's
    next print is shown and kept."""
    from qmagic.core import capture

    fired: list[int] = []

    def at_start(frame, event, arg):  # (raises as the interpreter would at that point)
        if event == "call" and frame.f_code is capture._run_waiting.__code__ and not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return None

    def task():
        sys.settrace(at_start)
        try:
            print("first")
        except KeyboardInterrupt:
            pass
        finally:
            sys.settrace(None)
        print("after")
        return "done"

    worker = make_worker({"task": task})
    submitted = worker.submit("task")
    assert submitted.result(TIMEOUT) == "done" and fired
    # (■ cut the first print short, after its text and before its newline)
    assert submitted.output == "firstafter\n"  # (before: "first", the rest never written)
    assert capsys.readouterr().out == "firstafter\n"


def test_a_thread_start_wrapped_by_another_library_survives_unload_and_load():
    """A library that wraps ``threading.Thread.start`` while qmagic is installed (sentry-sdk's
    ThreadingIntegration, opentelemetry, ddtrace do) keeps qmagic's function inside its
    wrapper; uninstall cannot take it out then.  Installing again (%reload_ext qmagic) took
    that wrapper as "the original", and every Thread.start of the kernel recursed for good."""
    from qmagic.core import capture

    original = threading.Thread.start
    capture.install()
    try:
        inner = threading.Thread.start

        def library_start(self):
            return inner(self)

        threading.Thread.start = library_start
        capture.uninstall()
        capture.install()
        ran = threading.Event()
        thread = threading.Thread(target=ran.set)
        thread.start()
        thread.join(TIMEOUT)
        assert ran.is_set()
    finally:
        capture.uninstall()
        threading.Thread.start = original


def test_a_pool_thread_a_finished_task_started_is_not_that_tasks_work(make_worker):
    """A pool created outside tasks whose thread happens to start inside a task (its first
    submit) lives on; what the notebook later runs in it, outside any task, is not the
    task's work (the info socket publishes a task's work to remote operators)."""
    from concurrent.futures import ThreadPoolExecutor

    from qmagic.core import capture

    pool = ThreadPoolExecutor(1)
    try:
        worker = make_worker({"uses_pool": lambda: pool.submit(lambda: 1).result(TIMEOUT)})
        task = worker.submit("uses_pool")
        assert task.result(TIMEOUT) == 1
        assert pool.submit(capture.work_of).result(TIMEOUT) is None
    finally:
        pool.shutdown()


def test_what_threads_a_task_starts_print_and_log_is_kept_on_the_task(make_worker, capsys):
    """A scan that reads its detectors in a thread pool (or a thread of its own): their prints
    and log records reached the cell and remote clients, but not the task -- %task_result and
    ``task.output`` showed the task's own thread only.  They are kept on it now, while it
    runs; a thread it started that prints after it ended changes nothing."""
    from concurrent.futures import ThreadPoolExecutor

    later, printed_late = threading.Event(), threading.Event()
    log = logging.getLogger("qmagic-test-detectors")

    def read(name):
        print(f"read {name}")
        log.warning("%s saturated", name)
        return name

    def late():
        later.wait(TIMEOUT)
        print("after the end")
        printed_late.set()

    def scan():
        with ThreadPoolExecutor(2) as pool:
            names = list(pool.map(read, ["det1", "det2"]))
        thread = threading.Thread(target=read, args=("det3",))
        thread.start()
        thread.join(TIMEOUT)
        threading.Thread(target=late, daemon=True).start()
        return names

    task = make_worker({"scan": scan}).submit("scan")
    assert task.result(TIMEOUT) == ["det1", "det2"]
    kept = task.output
    assert sorted(kept.splitlines()) == ["read det1", "read det2", "read det3"], kept
    assert sorted(record["message"] for record in task.log) == [
        "det1 saturated", "det2 saturated", "det3 saturated"]
    later.set()
    assert printed_late.wait(TIMEOUT)
    assert task.output == kept  # (a finished task's output never changes)
    assert "after the end" in capsys.readouterr().out  # (it still reaches its destination)


def test_progress_and_cancel_checks_in_threads_a_task_starts_act_for_the_task(make_worker):
    """A scan whose detectors are read in a thread pool calls ``report_progress`` and
    ``raise_if_cancelled`` there: both did nothing (no task in that thread), so the panel's
    bar never moved and a cancel never reached the readings.  While the task runs they act
    for it; once it has ended, the pool's thread (which lives on) is nobody's."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    step, go_on = threading.Event(), threading.Event()

    def read(i):
        qmagic.report_progress(i, 2, f"detector {i}")
        step.set()
        go_on.wait(TIMEOUT)
        qmagic.raise_if_cancelled()
        return i

    def scan():
        return pool.submit(read, 1).result()

    w = make_worker({"scan": scan})
    try:
        task = w.submit("scan")
        assert step.wait(TIMEOUT)
        assert (task.progress.value, task.progress.total, task.progress.message) == (1, 2, "detector 1")
        task.cancel()
        go_on.set()
        assert task.wait(TIMEOUT)  # (the reading stopped: else it returned 1 and completed)
        assert task.status == TaskStatus.CANCELLED and task.traceback and "raise_if_cancelled" in task.traceback
        # the task has ended: the same pool thread, now working for nobody
        assert pool.submit(lambda: (qmagic.report_progress(2, 2), qmagic.raise_if_cancelled(), "done")[2]
                           ).result(TIMEOUT) == "done"
        assert task.progress.value == 1
    finally:
        go_on.set()
        pool.shutdown(wait=True)


def test_a_pool_thread_runs_the_work_of_whoever_submitted_to_it(make_worker):
    """A pool that tasks share (asyncio's default executor serves every coroutine task of its
    loop; a module's pool made on first use): its thread, started by the first task's work,
    ran every later submission as that task's work while it ran -- another task's prints
    kept on the first task (and written to its cell), none on their own; the notebook's
    too.  A pool's thread now runs each submission as the work of whoever submitted it."""
    from concurrent.futures import ThreadPoolExecutor

    from qmagic.core import capture

    pools, used, release = [], threading.Event(), threading.Event()

    def first():
        pools.append(ThreadPoolExecutor(1))  # (its one thread starts in this task's work)
        pools[0].submit(print, "first's").result(TIMEOUT)
        used.set()
        release.wait(TIMEOUT)
        return "first"

    def second():
        pools[0].submit(qmagic.report_progress, 1, 2, "second's reading").result(TIMEOUT)
        return pools[0].submit(print, "second's").result(TIMEOUT)

    worker = make_worker({"first": first, "second": second})
    a = worker.submit("first", background=True)
    try:
        assert used.wait(TIMEOUT)
        b = worker.submit("second", background=True)
        b.result(TIMEOUT)
        assert b.output == "second's\n"
        assert b.progress.message == "second's reading" and a.progress is None  # (task_here too)
        assert pools[0].submit(capture.work_of).result(TIMEOUT) is None  # (the notebook's)
    finally:
        release.set()
        a.result(TIMEOUT)
        pools[0].shutdown()
    assert a.output == "first's\n"


def test_qmagic_s_own_threads_are_no_task_s_work(make_worker):
    """qmagic starts some of its threads on first use: its event loop's on the first coroutine
    task, which a task's work may submit (a macro starting an async scan).  That thread was
    noted as the macro's work: what ran on the loop outside a coroutine task (a callback
    another thread scheduled) counted as the macro's -- kept on it, written to its cell."""
    import asyncio

    from qmagic.core import capture

    release, seen = threading.Event(), {}

    async def tick():
        return 1

    def macro():
        worker.submit("tick").result(TIMEOUT)  # (qmagic's event loop starts here)
        seen["loop"] = worker.engine.loops.own_loop()
        release.wait(TIMEOUT)

    async def work_of():
        return capture.work_of()

    worker = make_worker({"macro": macro, "tick": tick})
    task = worker.submit("macro", background=True)
    try:
        eventually(lambda: "loop" in seen, TIMEOUT, "the loop started")
        assert asyncio.run_coroutine_threadsafe(work_of(), seen["loop"]).result(TIMEOUT) is None
    finally:
        release.set()
        task.result(TIMEOUT)
