"""The worker's Python API: rules (permissions, locks, names), scripts, lookups, Futures."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import logging
import sys
import threading
import time

import pytest

import qmagic
from qmagic.core.foreground import frame_of  # (not sys._current_frames(): it can deadlock 3.11)
from qmagic import LockRefused, PermissionRefused, RequestRefused, TaskNotFound, TaskStatus

from engine_helpers import TIMEOUT, Gate, make_worker  # noqa: F401 - fixture
from polling import eventually


def test_task_is_a_real_future(make_worker):
    w = make_worker({"add": lambda a, b: a + b, "boom": lambda: 1 / 0})
    tasks = [w.submit("add", (i, i)) for i in range(20)] + [w.submit("boom")]
    assert all(isinstance(t, cf.Future) for t in tasks)
    done, not_done = cf.wait(tasks, timeout=TIMEOUT)
    assert not not_done and len(done) == 21
    assert sorted(t.result() for t in cf.as_completed(tasks[:20], timeout=TIMEOUT)) == [2 * i for i in range(20)]
    first = cf.wait([w.submit("boom"), w.submit("add", (1, 2))], timeout=TIMEOUT,
                    return_when=cf.FIRST_EXCEPTION)
    assert first.done

    async def main():
        wrapped = await asyncio.wrap_future(w.submit("add", (2, 3)))
        awaited = await w.submit("add", (4, 5))
        with pytest.raises(ZeroDivisionError):
            await w.submit("boom")
        return wrapped, awaited

    assert asyncio.run(main()) == (5, 9)


def test_futures_wait_returns_when_some_tasks_already_finished(make_worker):
    """concurrent.futures.wait asks finished futures cancelled() and exception() while it
    holds every future's lock: a task must answer without taking its lock again (it once
    hung for good when a task had failed before wait() was called)."""
    gate = Gate()
    w = make_worker({"boom": lambda: 1 / 0, "gate": gate, "add": lambda a, b: a + b,
                     "nap": lambda: qmagic.cancellable_sleep(TIMEOUT)})
    failed, completed, cancelled = w.submit("boom"), w.submit("add", (1, 2)), w.submit("nap")
    running = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    cancelled.cancel()
    for task in (failed, completed, cancelled):
        assert task.wait(TIMEOUT)
    outcomes: dict[str, object] = {}

    def waits() -> None:
        outcomes["exception"] = cf.wait([cancelled, completed, failed, running],
                                        return_when=cf.FIRST_EXCEPTION)
        outcomes["completed"] = cf.wait([completed, running], return_when=cf.FIRST_COMPLETED)
        outcomes["answers"] = [(t.done(), t.cancelled(), t.running())
                               for t in (failed, cancelled, running)]

    waiter = threading.Thread(target=waits, daemon=True)
    waiter.start()
    waiter.join(TIMEOUT)
    try:
        assert not waiter.is_alive(), "concurrent.futures.wait never returned"
        assert outcomes["exception"].done == {cancelled, completed, failed}
        assert outcomes["completed"].not_done == {running}
        assert outcomes["answers"] == [(True, False, False), (True, True, False), (False, False, True)]
    finally:
        gate.release.set()
    assert running.result(TIMEOUT) is None and not running.cancelled()


def test_await_does_not_block_the_loop_and_cancelling_the_waiter_spares_the_task(make_worker):
    gate = Gate()
    w = make_worker({"gate": gate})

    async def main():
        task = w.submit("gate", ("v",))
        ticks = 0
        waiter = asyncio.ensure_future(_await(task))
        while not gate.started.is_set() or ticks < 3:  # the loop runs while it awaits
            ticks += 1
            await asyncio.sleep(0.001)
            assert not waiter.done()
        waiter.cancel()  # stop waiting only
        with pytest.raises(asyncio.CancelledError, match=r"stopped waiting; the task gate\('v'\) keeps running"):
            await waiter
        assert not task.done() and not task.cancel_requested
        gate.release.set()
        return ticks, await task

    async def _await(task):
        return await task

    ticks, value = asyncio.run(main())
    assert value == "v" and ticks >= 3


def test_cancelling_the_waiter_after_the_task_ended_says_it_ended(make_worker):
    """The task ends and, before the waiting coroutine wakes, ■ cancels it: the line says the
    task had already ended (not that it keeps running)."""
    gate = Gate()
    w = make_worker({"gate": gate})

    async def main():
        task = w.submit("gate", ("v",))
        waiter = asyncio.ensure_future(_await(task))
        await asyncio.sleep(0)  # (the waiter's first step runs: it awaits the task)
        assert gate.started.wait(TIMEOUT) and not waiter.done()
        gate.release.set()
        assert task.wait(TIMEOUT)  # (blocks the loop: the waiter's wake-up waits behind it)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError) as info:
            await waiter
        return task, str(info.value)

    async def _await(task):
        return await task

    task, said = asyncio.run(main())
    assert said == (f"stopped waiting; the task gate('v') had already ended (completed): see "
                    f"task.result(), or %task_result {task.uid[:8]}.")
    assert task.result(0) == "v"


def test_a_slow_argument_repr_is_made_once_per_width(make_worker):
    """A device whose repr takes long: it was called 8 times for one foreground call (the
    cell held 2.5 s for a task of no time; found by a hostile test)."""
    class Device:
        reprs = 0

        def __repr__(self) -> str:
            Device.reprs += 1
            return "<Device x>"

    w = make_worker({"move": lambda device: None})
    task = w.submit("move", (Device(),), background=False)
    assert task.result(TIMEOUT) is None
    task.call_text(30), task.call_text()
    made = Device.reprs
    for _ in range(5):  # (each width's text was made: no more repr)
        assert task.call_text() == "move(<Device x>)" and repr(task).startswith("<Task move(<Device x>)")
        task.call_text(30)
    assert Device.reprs == made <= 4, made


def test_cancel_reason_is_none_unless_a_cancel_was_asked_for(make_worker):
    gate = Gate()
    w = make_worker({"gate": gate, "sleepy": lambda: qmagic.cancellable_sleep(60)})
    running = w.submit("gate")
    assert gate.started.wait(TIMEOUT) and running.cancel_reason is None
    gate.release.set()
    assert running.result(TIMEOUT) is None and running.cancel_reason is None
    sleepy = w.submit("sleepy")
    w.cancel(sleepy)
    assert sleepy.cancel_reason == "Task was cancelled from Python"  # (at once, while it stops)
    assert sleepy.wait(TIMEOUT) and sleepy.cancel_reason == "Task was cancelled from Python"


def _code_names(thread) -> set[str]:
    """Names of the functions ``thread`` is in now."""
    frame, names = frame_of(thread.ident), set()
    while frame is not None:
        names.add(frame.f_code.co_name)
        frame = frame.f_back
    return names


def test_a_press_while_the_main_thread_waits_for_a_task_says_the_task_goes_on(make_worker, sigint_as_in_a_cell):
    """■ during ``task.result()`` / ``task.wait()`` in a cell: one line that says the waiting
    stopped and how to stop the task, not frames of qmagic and threading (found by the
    notebook tester)."""
    import signal
    import threading

    gate = Gate()
    w = make_worker({"gate": gate})
    task = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    main = threading.main_thread()

    def press_once_it_waits() -> None:  # (a press on a timer could land before the wait began)
        eventually(lambda: "_wait_until" in _code_names(main), timeout=TIMEOUT, interval=0.005,
                   what="the main thread to wait for the task")
        signal.pthread_kill(main.ident, signal.SIGINT)

    press = threading.Thread(target=press_once_it_waits)
    press.start()
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            task.result()
    finally:
        press.join()
        gate.release.set()
    assert info.value._render_traceback_() == [
        f"KeyboardInterrupt: stopped waiting; the task gate() keeps running (stop it with "
        f"task.cancel(), or %task_cancel {task.uid[:8]})."]
    assert task.result(TIMEOUT) is None  # (it went on)


def test_a_lone_value_for_args_is_refused_in_one_line(make_worker):
    """``w.submit("scan", 3)`` raised "TypeError: 'int' object is not iterable" from qmagic's
    own frame, and ``w.submit("label", "Si111")`` ran label('S', 'i', '1', '1', '1'): a lone
    value (a number, a text, a dict) in the place of the argument tuple is refused in one line
    saying how to write it, and starts nothing; a bad ``status`` of ``tasks()`` is one line too."""
    w = make_worker({"scan": lambda n: n, "home": lambda: "home"})
    for args in (3, "Si111", b"x", {"n": 1}, {3, 1}):  # (a set: its order is no order of arguments)
        with pytest.raises(TypeError) as info:
            w.submit("scan", args)
        assert info.value._render_traceback_() == [
            f"TypeError: args must be a tuple or list of the function's arguments, such as submit(\"scan\", "
            f"(3,)) for scan(3), not {type(args).__name__}; keyword arguments go in kwargs."]
    assert w.tasks() == []
    assert w.submit("scan", [3]).result(TIMEOUT) == 3
    assert w.submit("scan", (n for n in (4,))).result(TIMEOUT) == 4
    assert w.submit("home", None).result(TIMEOUT) == "home"  # (no arguments, as kwargs=None)
    for status in ("runing", 5, ["completed", "bogus"], b"failed"):  # (the history's rule and words)
        with pytest.raises(ValueError) as info:
            w.tasks(status=status)
        with pytest.raises(ValueError) as in_history:
            w.history(status=status)
        assert len(info.value._render_traceback_()) == 1 and str(info.value) == str(in_history.value)
    assert "Unknown task status runing: use queued, running" in str(pytest.raises(ValueError, w.tasks,
                                                                                  status="runing").value)


def test_a_text_for_background_is_refused_in_one_line(make_worker):
    """``w.submit("scan", background="no")`` ran scan in the background: every text but ""
    reads as true.  A text is refused in one line by every kind of task the Python API
    starts, and starts nothing; what Python reads as true or false is taken as before."""
    w = make_worker({"scan": lambda: "done"})
    starts = (lambda b: w.submit("scan", background=b), lambda b: w.run_script("x = 1", background=b),
              lambda b: w.update_environment(background=b))
    for start in starts:
        for text in ("no", "False", "", b"yes"):
            with pytest.raises(TypeError) as info:
                start(text)
            assert info.value._render_traceback_() == [
                f"TypeError: background must be True or False, not the text {text!r}."]
    assert w.tasks() == [] and "x" not in w.namespace
    for value, background in ((1, True), (0, False), (None, False)):
        task = w.submit("scan", background=value)
        assert task.result(TIMEOUT) == "done" and task.background is background


def test_polling_a_task_with_a_timeout_leaves_no_callback_behind(make_worker):
    """``await asyncio.wait_for(task, t)`` in a loop (a dashboard polling a long scan): each
    abandoned wait takes its done callback back, the task is never stopped."""
    gate = Gate()
    w = make_worker({"gate": gate})

    async def main():
        task = w.submit("gate", ("v",))
        for _ in range(200):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(task, 0.001)
        assert len(task._done_callbacks) == 0 and not task.done() and not task.cancel_requested
        gate.release.set()
        return await task

    assert asyncio.run(main()) == "v"


def test_cancelled_task_raises_cancelled_error_when_awaited(make_worker):
    w = make_worker({"sleepy": lambda: qmagic.cancellable_sleep(60)})
    task = w.submit("sleepy")
    task.cancel()

    async def main():
        with pytest.raises(cf.CancelledError, match="was cancelled"):
            await task

    asyncio.run(main())
    assert cf.wait([task], timeout=TIMEOUT).done == {task}


def test_permissions_checked_on_request_and_at_start(make_worker):
    gate = Gate()
    rules = {
        "user_groups": {
            "root": {"allowed_functions": [None], "forbidden_functions": [":^_"]},
            "primary": {"allowed_functions": ["gate", "scan"], "forbidden_functions": []},
        }
    }
    w = make_worker({"gate": gate, "scan": lambda: "scanned", "other": lambda: 1},
                    user_group_permissions=rules, max_background_tasks=1)
    with pytest.raises(PermissionRefused, match="Function 'other' is not allowed for users from 'primary' group"):
        w.submit("other")
    with pytest.raises(PermissionRefused, match="Unknown user group: 'admin'"):
        w.submit("scan", user_group="admin")
    running = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    queued = w.submit("scan")  # allowed now ...
    w.user_group_permissions = {  # ... but no longer when it starts
        "user_groups": {"root": {"allowed_functions": [None]}, "primary": {"allowed_functions": ["gate"]}}
    }
    gate.release.set()
    running.result(TIMEOUT)
    queued.wait(TIMEOUT)
    assert queued.status is TaskStatus.FAILED
    assert "not allowed for users from 'primary' group" in str(queued.exception())


def test_set_and_reload_permissions(make_worker, tmp_path):
    path = tmp_path / "perm.yaml"
    path.write_text("user_groups:\n  root:\n    allowed_functions: [null]\n  primary:\n"
                    "    allowed_functions: [f]\n")
    w = make_worker({"f": lambda: 1, "g": lambda: 2}, user_group_permissions_file=str(path))
    with pytest.raises(PermissionRefused):
        w.submit("g")
    w.set_permissions({"user_groups": {"root": {"allowed_functions": [None]},
                                       "primary": {"allowed_functions": [None]}}})
    assert w.submit("g").result(TIMEOUT) == 2
    w.reload_permissions()  # back to the file, as queueserver does
    with pytest.raises(PermissionRefused):
        w.submit("g")
    with pytest.raises(qmagic.PermissionsFormatError, match="root"):
        w.set_permissions({"user_groups": {"primary": {}}})
    for where in (str(path), path):  # (a file's name said only "must be 'dict'")
        with pytest.raises(qmagic.PermissionsFormatError, match=r"must be 'dict': to read the rules from a file, "
                           r"set QMagic.user_group_permissions_file and call reload_permissions\(\)$"):
            w.set_permissions(where)
    assert w.submit("f").result(TIMEOUT) == 1  # bad rules changed nothing


def test_lock_rules_through_the_worker(make_worker, monkeypatch):
    monkeypatch.setenv("QMAGIC_EMERGENCY_LOCK_KEY", "break-glass")
    w = make_worker({"f": lambda: 1})
    state = w.lock("hutch", environment=True, note="Changing samples", user="Alice")
    assert state.environment and state.user == "Alice" and w.holds_lock_key
    assert w.submit("f").result(TIMEOUT) == 1  # this kernel remembers the key
    with pytest.raises(LockRefused, match="Invalid lock key"):
        w.submit("f", lock_key="wrong")
    with pytest.raises(LockRefused):
        w.submit("f", origin="remote", user="u", user_group="primary")  # remote callers need it
    with pytest.raises(LockRefused):
        w.cancel_all(lock_key="wrong")
    other = make_worker({"f": lambda: 1})  # another kernel of the same environment
    with pytest.raises(RequestRefused, match=r"does not hold the key .*\(unlock\(lock_key=KEY\)\)"):
        other.unlock()  # (the hint is Python's: each door says how it takes a key)
    with pytest.raises(LockRefused):
        other.submit("f")
    assert not other.unlock("break-glass").environment
    assert other.submit("f").result(TIMEOUT) == 1


def test_clear_finished_follows_the_queue_lock_and_the_log_keeps_the_tasks(make_worker):
    """queueserver's history_clear through the Python API: a locked queue refuses it without
    the key; it forgets finished tasks kept in memory, never running ones or their records."""
    w = make_worker({"f": lambda: 1, "nap": lambda: qmagic.cancellable_sleep(TIMEOUT)})
    done, running = w.submit("f"), w.submit("nap")
    assert done.result(TIMEOUT) == 1
    w.lock("hutch", queue=True, note="Changing samples", user="Alice")
    with pytest.raises(LockRefused, match="Invalid lock key"):
        w.clear_finished(lock_key="wrong")
    with pytest.raises(LockRefused):
        w.clear_finished(origin="remote")  # remote callers must present the key
    assert w.get_task(done.uid) is done  # refused: nothing was forgotten
    w.clear_finished()  # this kernel remembers its key
    with pytest.raises(TaskNotFound):
        w.get_task(done.uid)
    assert w.get_task(running.uid) is running
    assert w.find(done.uid)["status"] == "completed"  # the experiment log keeps it
    running.cancel()
    assert running.wait(TIMEOUT)


def test_task_cancel_follows_the_lock_rule_of_worker_cancel(make_worker):
    """A Task handle is one more door to the worker: while another kernel has locked the
    environment, task.cancel() is refused exactly as worker.cancel(task) is."""
    nap = {"nap": lambda: qmagic.cancellable_sleep(TIMEOUT)}
    w = make_worker(nap)
    other = make_worker(nap)  # another kernel of the same environment
    mine, theirs = w.submit("nap"), other.submit("nap")
    w.lock("hutch", environment=True, note="Changing samples", user="Alice")
    eventually(lambda: other.current_lock().environment, TIMEOUT, "the other kernel to see the lock")
    try:
        with pytest.raises(LockRefused, match="Invalid lock key"):
            theirs.cancel()
        with pytest.raises(LockRefused, match="Invalid lock key"):
            other.cancel(theirs)
        assert not theirs.cancel_requested and not theirs.done()
        assert mine.cancel() is True  # the kernel that locked remembers its key
        assert mine.wait(TIMEOUT) and mine.status is TaskStatus.CANCELLED
        assert mine.error == "Task was cancelled from Python"
    finally:
        w.unlock()
    eventually(lambda: not other.current_lock().environment, TIMEOUT, "the other kernel to see the unlock")
    assert theirs.cancel() is True and theirs.wait(TIMEOUT)
    assert theirs.status is TaskStatus.CANCELLED
    assert theirs.cancel() is False  # already finished: nothing to do, as a Future says


def test_lock_without_key_uses_the_default_key(make_worker):
    w = make_worker()
    w.lock(environment=True)
    assert w.lock_state().environment
    w2 = make_worker()
    w2.unlock(qmagic.get_default_lock_key())
    assert not w.lock_state().environment


def test_scripts_apply_names_and_report_changes(make_worker):
    ns = {"keep": 1, "old": 2, "gone": 3}
    w = make_worker(ns)
    task = w.run_script("def scan(n):\n    'Scan n points.'\n    return n\nold = 20\ndel gone\n",
                        name="calibration.py", background=True)
    assert task.wait(TIMEOUT) and task.status is TaskStatus.COMPLETED, task.traceback
    assert task.name == "calibration.py" and task.kind == "script"
    assert task.namespace_changes == {"added": ["scan"], "changed": ["old"], "removed": ["gone"]}
    assert ns["old"] == 20 and "gone" not in ns and ns["keep"] == 1
    assert w.functions_available()["scan"] == {"signature": "(n)", "doc": "Scan n points."}
    with pytest.raises(RequestRefused, match="Unknown user group: 'students'"):
        w.functions_available("students")
    assert w.submit("scan", (7,)).result(TIMEOUT) == 7
    with pytest.raises(RequestRefused, match="Invalid script name"):
        w.run_script("x = 1", name="../etc")


def test_functions_available_follows_the_namespace_it_was_given(make_worker):
    """README: ``w = qmagic.Worker(namespace_dict)``; functions defined there afterwards run by
    name, and functions_available() lists them too (it listed the names the dict held when
    the worker was made: {} here, while submit("scan") ran)."""
    ns = {}
    w = make_worker(ns)
    assert w.functions_available() == {}

    def scan(n):
        """Scan n points."""
        return n

    ns["scan"] = scan
    typo = w.submit("scna")  # (the NameError names the closest function: one put there since)
    assert typo.wait(TIMEOUT) and "(did you mean 'scan'?)" in str(typo.exception())
    ns["scan_fast"] = scan
    assert w.functions_available() == {name: {"signature": "(n)", "doc": "Scan n points."}
                                       for name in ("scan", "scan_fast")}
    assert w.submit("scan", (3,)).result(TIMEOUT) == 3
    del ns["scan"], ns["scan_fast"]
    assert w.functions_available() == {}


def test_failing_script_leaves_namespace_exactly_as_it_was(make_worker):
    ns = {"a": 1, "b": [1, 2]}
    w = make_worker(ns)
    snapshot = dict(ns)
    task = w.run_script("a = 10\nc = 3\ndel b\nraise RuntimeError('half way')\n", background=True)
    task.wait(TIMEOUT)
    assert task.status is TaskStatus.FAILED
    assert {k: v for k, v in ns.items() if k != "__builtins__"} == snapshot
    assert ns["b"] is snapshot["b"]
    assert 'File "<script>", line 4' in task.traceback


def test_a_running_script_never_stalls_the_next_upload(make_worker):
    release = threading.Event()
    ns = {"release": release}
    w = make_worker(ns)
    blocking = w.run_script("release.wait(60)\n", name="slow", background=True)
    other = w.run_script("x = 1\n", background=True)  # runs at once, beside the slow one
    assert other.result(TIMEOUT) is None and ns["x"] == 1 and not blocking.done()
    release.set()
    assert blocking.result(TIMEOUT) is None


def test_update_re_false_keeps_the_run_engine(make_worker):
    ns = {"RE": "the run engine", "db": "the catalog"}
    w = make_worker(ns)
    task = w.run_script("RE = None\ndb = None\ny = 2\n", background=True)
    assert task.result(TIMEOUT) is None
    assert ns["RE"] == "the run engine" and ns["db"] == "the catalog" and ns["y"] == 2
    w.run_script("RE = 'new'\n", background=True, update_re=True).result(TIMEOUT)
    assert ns["RE"] == "new"


def test_plans_are_not_functions(make_worker):
    def count():
        yield "msg"

    w = make_worker({"count": count})
    with pytest.raises(RequestRefused, match=r"bluesky plan.*RE\(count\(\.\.\.\)\)"):
        w.submit("count")
    with pytest.raises(RequestRefused, match="bluesky plan"):
        w.submit(count)
    assert w.tasks() == []


def test_coroutine_functions_are_awaited(make_worker):
    async def acq(n):
        for i in range(n):
            qmagic.report_progress(i + 1, n)
            await asyncio.sleep(0.001)
        return n * 2

    def returns_awaitable(n):
        return acq(n)

    w = make_worker({"acq": acq, "wrapped": returns_awaitable})
    task = w.submit("acq", (3,))
    assert task.result(TIMEOUT) == 6 and task.kind == "coroutine" and task.progress.value == 3
    assert w.submit("wrapped", (2,)).result(TIMEOUT) == 4
    fg = w.submit("acq", (1,), background=False)
    assert fg.result(TIMEOUT) == 2


def test_deadline_cancels_and_says_why(make_worker):
    async def forever():
        await asyncio.sleep(60)

    w = make_worker({"slow": lambda: qmagic.cancellable_sleep(60), "forever": forever})
    for name in ("slow", "forever"):
        task = w.submit(name, timeout=0.05)
        assert task.wait(TIMEOUT) and task.status is TaskStatus.CANCELLED
        assert task.error == "deadline of 0.05 s passed" and task.timeout == 0.05
        assert task.to_dict()["timeout"] == 0.05
    for bad in (-1, 0, float("nan"), float("inf"), True, "5"):
        with pytest.raises(RequestRefused, match="Invalid timeout .*finite number of seconds"):
            w.submit("slow", timeout=bad)


def test_a_deadline_beyond_the_clock_leaves_the_timer_thread_alive(make_worker):
    """A deadline further away than a lock wait can take (about 9.2e9 s) once killed the
    timer thread, and with it every later deadline and forced cancel."""
    w = make_worker({"slow": lambda: qmagic.cancellable_sleep(60)})
    far = w.submit("slow", timeout=1e12)
    near = w.submit("slow", timeout=0.05)
    assert near.wait(TIMEOUT) and near.error == "deadline of 0.05 s passed"
    assert not far.done()
    far.cancel()
    assert far.wait(TIMEOUT)


def test_a_task_that_survives_an_interrupt_can_still_be_forced(make_worker):
    """Code that catches KeyboardInterrupt and goes on: after ■ a forced cancel still stops it
    once the grace time passed (the interrupt used up the one forced exception, so
    environment_destroy could never stop such a foreground task) (found by the remote tester)."""
    import time

    caught = []

    def stubborn():
        while True:
            try:
                time.sleep(0.01)
            except KeyboardInterrupt:
                caught.append(1)

    w = make_worker({"stubborn": stubborn}, cancel_grace_s=0.1)
    task = w.submit("stubborn", background=False)  # (the worker's own foreground thread)
    eventually(lambda: task.status is TaskStatus.RUNNING)
    assert w.interrupt(interrupt_task=True) == "interrupted"
    eventually(lambda: caught, what="the task caught the interrupt")
    assert w.interrupt(interrupt_task=True) == "pending"  # (still at most one interrupt)
    w.cancel(task, force=True)
    assert task.wait(TIMEOUT) and task.status is TaskStatus.CANCELLED and caught == [1]


def test_find_and_cancel_by_prefix(make_worker):
    w = make_worker({"sleepy": lambda: qmagic.cancellable_sleep(60)})
    task = w.submit("sleepy")
    assert w.find(task.uid[:6]) is task
    assert w.cancel(task.uid[:6]) is task
    task.wait(TIMEOUT)
    assert task.cancel_reason == "Task was cancelled from Python"
    with pytest.raises(RequestRefused, match="already finished"):
        w.cancel(task)
    with pytest.raises(TaskNotFound):
        w.find("ffff0000")


def test_worker_cancel_takes_force_as_the_task_handle_does(make_worker):
    """README: ``cancel(task_or_uid, force=False)``; ``task.cancel(True)`` forces, and so does
    ``w.cancel(task, True)`` now (it was keyword-only: a TypeError).  The task ignores
    cooperative cancels: only the forced one stops it."""
    import time

    def stubborn():
        while True:
            time.sleep(0.01)

    w = make_worker({"stubborn": stubborn}, cancel_grace_s=0.1)
    task = w.submit("stubborn")
    assert w.cancel(task, True) is task
    assert task.wait(TIMEOUT) and task.status is TaskStatus.CANCELLED


def test_a_text_for_force_is_refused_not_read_as_true(make_worker):
    """Since force may be given in its place, ``w.cancel(uid, "my-key")`` (a lock key put
    where force goes) read the text as True: a forced cancel, without a word.  A text is
    refused in one line, as for ``background`` (every text but "" is true in Python), and
    the task goes on untouched; True, 1 and a numpy bool still force."""
    gate = Gate()
    w = make_worker({"gate": gate})
    task = w.submit("gate")
    assert gate.started.wait(TIMEOUT)
    for call in (lambda: w.cancel(task, "my-key"), lambda: w.cancel(task.uid, force="no"),
                 lambda: w.cancel_all(force="false"), lambda: task.cancel("yes")):
        with pytest.raises(TypeError, match="^force must be True or False, not the text '") as info:
            call()
        assert "\n" not in str(info.value)
    assert not task.cancel_requested and not task.done()
    assert w.cancel(task, 1) is task and task.cancel_requested
    gate.release.set()
    assert task.wait(TIMEOUT)


def test_cancel_all(make_worker):
    gate = Gate()
    w = make_worker({"gate": gate}, max_background_tasks=1)
    tasks = [w.submit("gate") for _ in range(3)]
    assert gate.started.wait(TIMEOUT)
    cancelled = w.cancel_all(force=True)
    assert set(cancelled) == set(tasks)
    gate.release.set()
    for t in tasks:
        assert t.wait(TIMEOUT)
    assert tasks[1].status is TaskStatus.CANCELLED and tasks[2].status is TaskStatus.CANCELLED


def test_tasks_filter_and_last_task(make_worker):
    w = make_worker({"ok": lambda: 1, "bad": lambda: 1 / 0})
    a = w.submit("ok")
    b = w.submit("bad")
    a.wait(TIMEOUT)
    b.wait(TIMEOUT)
    assert w.tasks() == [a, b]
    assert w.tasks("failed") == [b]
    assert w.tasks([TaskStatus.COMPLETED, "failed"]) == [a, b]
    assert w.last_task is b


def test_submit_callable_and_bad_target(make_worker):
    w = make_worker()
    assert w.submit(lambda x: x * 2, (4,)).result(TIMEOUT) == 8
    with pytest.raises(TypeError, match="name or a callable"):
        w.submit(42)


def test_a_coroutine_object_as_target_says_how_to_pass_the_call(make_worker):
    """``w.submit(acq(3))`` (the coroutine an ``async def`` returns, instead of the function)
    said "needs a function name or a callable, got <coroutine object acq at 0x...>", and a
    "coroutine 'acq' was never awaited" warning followed: one line says how to pass the call,
    the coroutine is closed (no warning), nothing starts.  A call written as a name
    (``"acq(3)"``, from any door) says to give the name alone."""
    import gc
    import warnings

    async def acq(n):
        return n

    w = make_worker({"acq": acq})
    coro = acq(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(TypeError) as info:
            w.submit(coro)
        del coro
        gc.collect()
    assert info.value._render_traceback_() == [
        "TypeError: submit() got acq(...) already called (a coroutine): pass the function and its "
        "arguments instead, submit(acq, args), not submit(acq(...))."]
    assert [str(c.message) for c in caught if "never awaited" in str(c.message)] == []

    def plan(n):  # (a bluesky plan already called: a generator)
        yield n

    with pytest.raises(TypeError) as info:
        w.submit(plan(3))
    assert info.value._render_traceback_() == [
        "TypeError: submit() got plan(...) already called (a generator: a plan?): pass the function "
        "and its arguments instead, submit(plan, args), not submit(plan(...))."]
    with pytest.raises(RequestRefused, match=r"'acq\(3\)' is not a function name: give the name alone "
                                            r"\('acq'\) and the arguments apart"):
        w.submit("acq(3)")
    assert w.tasks() == []
    assert w.submit(acq, (3,)).result(TIMEOUT) == 3


def test_task_repr_is_deterministic(make_worker):
    w = make_worker({"add": lambda a, b=0: a + b})
    t = w.submit("add", (1,), {"b": 5})
    t.wait(TIMEOUT)
    assert repr(t) == "<Task add(1, b=5) background completed>"
    assert t.to_dict()["result"] == 6 and t.to_dict()["status"] == "completed"


def test_settings_reach_the_engine_and_have_bounds(make_worker):
    from traitlets import TraitError

    w = make_worker()
    w.max_background_tasks = 4
    w.cancel_grace_s = 0.5
    assert w.engine.max_background == 4 and w.engine.cancel_grace_s == 0.5
    for name, bad in (("max_background_tasks", 0), ("task_retention_s", 30), ("cancel_grace_s", -1),
                      ("cancel_grace_s", 3601), ("task_output_limit", 10**9),
                      ("panel_update_hz", 0), ("async_loop", "other")):
        with pytest.raises(TraitError):
            setattr(w, name, bad)
    for name, bad, says in (("default_user", "", "QMagic.default_user must be a non-empty string"),
                            ("default_user", "\udcff", "without lone surrogates"),
                            ("default_user_group", "", "QMagic.default_user_group must be the name"),
                            # (a raw UnicodeEncodeError came from deep in the lock store)
                            ("state_dir", "/x/\ud800", "QMagic.state_dir must be a path in UTF-8 text"),
                            ("state_dir", "/x/\udcff", "QMagic.state_dir must be a path in UTF-8 text"),
                            # (the name as escapes, each backslash once: '/x/\\udcff' read as two)
                            ("state_dir", "/x/\udcff", r"; '/x/\\udcff' is not: "),
                            ("user_group_permissions_file", "/x/\ud800.yaml",
                             "QMagic.user_group_permissions_file must be a path in UTF-8 text")):
        with pytest.raises(TraitError, match=says):
            setattr(w, name, bad)
    # settings each within bounds always combine: a first wait above the longest is the longest
    w.lock_backoff_s = 600
    assert w.lock_backoff_s == 600 and w._locks._keys.throttle.base_s == w.lock_backoff_max_s == 300
    from traitlets import Float, Int

    for name, trait in type(w).class_traits(config=True).items():  # every number is bounded
        if isinstance(trait, (Int, Float)):
            assert trait.min is not None and trait.max is not None, name
        if isinstance(trait, Float):  # and NaN passes no bound: refused as a TraitError, kept
            old = getattr(w, name)    # (cancel_grace_s = nan made every forced cancel raise)
            with pytest.raises(TraitError, match=f"The '{name}' trait of a Worker instance expected "
                               "a number, not the float nan"):
                setattr(w, name, float("nan"))
            assert getattr(w, name) == old, name


def test_a_worker_that_cannot_start_leaves_the_streams_as_they_were(tmp_path):
    """A bad setting refuses the worker with one clear error, and undoes what it had set up:
    stdout/stderr are not left wrapped by a worker that never existed."""
    import sys

    from qmagic import PermissionsFormatError

    bad = tmp_path / "permissions.yaml"
    bad.write_text("user_groups: [not, a, mapping]\n")
    before = (sys.stdout, sys.stderr)
    for _ in range(3):
        with pytest.raises(PermissionsFormatError):
            qmagic.Worker({}, user_group_permissions_file=str(bad), state_dir=str(tmp_path / "state"))
    assert (sys.stdout, sys.stderr) == before


def test_the_catalog_ignores_names_that_are_not_text(make_worker):
    w = make_worker({"f": lambda: 1})
    w.namespace[1] = "not a name"
    task = w.update_environment()
    assert task.wait(TIMEOUT) and task.status is TaskStatus.COMPLETED, task.error
    assert "f" in w.catalog.functions()


def test_the_catalog_never_reads_a_callable_objects_attributes(make_worker):
    """A callable proxy whose attribute reads go over the network (an rpyc netref): the
    catalog (after every cell, and on the control thread for a request) judges it by its
    type; it made every cell 10 s slower and froze the channel (found by a hostile test)."""
    reads = []

    class RemoteProxy:
        def __call__(self, x):
            return x + 1

        def __getattr__(self, name):
            reads.append(name)
            raise AttributeError(name)

    w = make_worker({"motor_server": RemoteProxy()})
    w.namespace["other"] = lambda: 1
    w.catalog.refresh(force=True)
    assert "motor_server" in w.catalog.functions()
    assert w.submit("motor_server", (1,)).result(TIMEOUT) == 2
    assert reads == []


def test_a_slow_refresh_never_puts_back_an_older_catalog(make_worker, monkeypatch):
    """Two refreshes at once (a cell's end and a background script): the one that read the
    namespace first but finished last leaves the newer tables in place."""
    from qmagic import catalog as catalog_module

    entered, release = threading.Event(), threading.Event()
    is_plan = catalog_module.is_plan

    def slow_is_plan(obj):
        if getattr(obj, "__name__", "") == "old" and threading.current_thread().name == "slow":
            entered.set()
            release.wait(TIMEOUT)
        return is_plan(obj)

    def old():
        return 1

    def new():
        return 2

    monkeypatch.setattr(catalog_module, "is_plan", slow_is_plan)
    w = make_worker({"old": old})
    cat = w.catalog
    results = []
    slow = threading.Thread(target=lambda: results.append(cat.refresh(force=True)), name="slow")
    slow.start()
    assert entered.wait(TIMEOUT)
    del w.namespace["old"]
    w.namespace["new"] = new
    assert cat.refresh(force=True) is True
    release.set()
    slow.join(TIMEOUT)
    assert results == [False]
    assert "new" in cat.functions() and "old" not in cat.functions()


def test_lock_from_python_locks_the_environment_by_default(make_worker):
    w = make_worker({"f": lambda: 1})
    state = w.lock("hutch-key", note="sample change")
    assert state.environment and not state.queue
    assert w.submit("f").result(TIMEOUT) == 1  # this kernel remembers its key
    w.unlock()
    assert not w.lock_state().environment


def test_a_callable_runs_as_given_but_only_for_a_known_group(make_worker):
    w = make_worker({})

    def _private():
        return "ok"

    assert w.submit(_private).result(TIMEOUT) == "ok"  # not a name: no name rule applies
    with pytest.raises(PermissionRefused, match="Unknown user group: 'nonexistent-group'"):
        w.submit(_private, user_group="nonexistent-group")
    with pytest.raises(PermissionRefused):
        w.submit("_private")


def test_a_refused_setting_keeps_its_old_value(make_worker, tmp_path):
    w = make_worker({"f": lambda: 1})
    name, folder = w.environment_name, w.state_dir
    with pytest.raises(ValueError):
        w.environment_name = "../evil"
    assert w.environment_name == name
    bad = tmp_path / "rules.yaml"
    bad.write_text("user_groups: 3\n")
    with pytest.raises(qmagic.PermissionsFormatError):
        w.user_group_permissions_file = str(bad)
    assert w.user_group_permissions_file != str(bad)
    assert w.submit("f").result(TIMEOUT) == 1 and w.state_dir == folder


def test_a_failing_script_restores_only_its_own_names(make_worker):
    """While a background script runs, a cell sets a name: the script fails, its own names
    are restored, and the cell's work stays."""
    inside, go_on = threading.Event(), threading.Event()
    w = make_worker({"inside": inside, "go_on": go_on, "calibration": 1.0})
    task = w.run_script(
        "calibration = 2.0\nscratch = []\ninside.set()\ngo_on.wait(10)\nraise RuntimeError('bad fit')",
        background=True)
    assert inside.wait(TIMEOUT)
    w.namespace["measurement"] = [1, 2, 3]  # a cell, meanwhile
    go_on.set()
    assert task.wait(TIMEOUT) and task.status is TaskStatus.FAILED
    assert w.namespace["calibration"] == 1.0 and "scratch" not in w.namespace
    assert w.namespace["measurement"] == [1, 2, 3]


def test_a_failing_script_that_writes_through_globals_is_rolled_back_too(make_worker):
    """Names written with globals()[...], globals().update(...) or exec(...) are the script's
    too (found by a hostile test: they stayed after the script raised)."""
    w = make_worker({"calibration": 1.0, "RE": "the run engine"})
    before = dict(w.namespace)
    for script in ("globals()['calibration'] = 999.0\nraise RuntimeError('bad fit')",
                   "globals().update(injected=1, calibration=2.0)\nraise RuntimeError('bad fit')",
                   "exec('also = 1; calibration = 3.0')\nraise RuntimeError('bad fit')",
                   "import sys\nsys._getframe().f_globals['calibration'] = 4.0\nraise RuntimeError('x')",
                   "def f(): pass\nf.__globals__['leak'] = 1\nraise RuntimeError('bad fit')"):
        task = w.run_script(script)
        assert task.wait(TIMEOUT) and task.status is TaskStatus.FAILED
        assert {k: v for k, v in w.namespace.items() if k != "__builtins__"} == before, script
    # queueserver's update_re=False: RE and db stay as they were, however the script reaches them
    task = w.run_script("globals()['RE'] = 'replaced'\ndb = 'a new catalog'\nx = 1")
    task.result(TIMEOUT)
    assert w.namespace["RE"] == "the run engine" and "db" not in w.namespace and w.namespace["x"] == 1
    # ... and a script that cannot bind them leaves a cell's RE and db of the meantime alone
    inside, go_on = threading.Event(), threading.Event()
    w.namespace.update(inside=inside, go_on=go_on)
    task = w.run_script("inside.set()\ngo_on.wait(10)\ny = 2", background=True)
    assert inside.wait(TIMEOUT)
    w.namespace.update(RE="a cell's new run engine", db="a cell's catalog")
    go_on.set()
    task.result(TIMEOUT)
    assert (w.namespace["RE"], w.namespace["db"]) == ("a cell's new run engine", "a cell's catalog")


def test_sys_exit_in_a_script_says_what_the_code_did(make_worker):
    w = make_worker({})
    for script, error in (("import sys\nsys.exit(3)", "the code called sys.exit(3)"),
                          ("raise SystemExit", "the code called sys.exit()")):
        task = w.run_script(script)
        assert task.wait(TIMEOUT) and task.status is TaskStatus.FAILED and task.error == error
    # one wording of the user rule for a task and a lock from this kernel (queueserver's
    # "Incorrect request format: user name is not specified" only for remote clients)
    with pytest.raises(RequestRefused, match="^Error: User name must be text of at most 1000 characters"):
        w.submit(lambda: 1, user="u" * 1001)
    with pytest.raises(RequestRefused, match="^Error: User name must be text of at most 1000 characters"):
        w.lock("k", user="\udcff")
    for door in (lambda: w.submit(lambda: 1, user=""), lambda: w.lock("k", user="")):
        with pytest.raises(RequestRefused, match="^Error: User name must be a non-empty string: user = ''$"):
            door()


def test_run_script_says_what_it_needs(make_worker):
    w = make_worker({})
    with pytest.raises(TypeError, match=r"Python code as a str, got bytes \(decode it first\)"):
        w.run_script(b"x = 1")
    with pytest.raises(TypeError, match="got NoneType"):
        w.run_script(None)
    assert w.tasks() == []


def test_a_script_reports_only_what_it_changed(make_worker):
    w = make_worker({"a": 1, "b": 2})
    w.namespace["c"] = 3
    task = w.run_script("a = 10\ndel b\nimport math\ndef helper():\n    global made\n    made = 1\n")
    task.result(TIMEOUT)
    assert task.namespace_changes == {"added": ["helper", "math"], "changed": ["a"], "removed": ["b"]}


def test_a_failing_script_undoes_only_its_own_writes(make_worker):
    """A background script that fails after a cell set names meanwhile: the cell's values stay,
    also for names the script could bind but never reached, and for a name the script set
    first and the cell set afterwards; the script's own writes are undone (it wiped the
    cell's work: found by the remote tester)."""
    import threading

    ready, release = threading.Event(), threading.Event()
    w = make_worker({"ready": ready, "release": release, "calib": "v1", "long1": "old"})
    task = w.run_script(
        "mine = 1\nlong1 = 'script'\nready.set()\nrelease.wait(10)\n"
        "raise RuntimeError('motor not found')\ncalib = 'v3'\nresults = []\n", background=True)
    assert ready.wait(TIMEOUT)
    w.namespace.update(calib="v2", results=[1, 2, 3], long1="from cell")  # a cell meanwhile
    release.set()
    assert task.wait(TIMEOUT) and task.status is TaskStatus.FAILED
    ns = w.namespace
    assert (ns["calib"], ns["results"], ns["long1"]) == ("v2", [1, 2, 3], "from cell")
    assert "mine" not in ns
    # and what the script alone set is put back
    task = w.run_script("calib = 'v9'\ndel long1\nraise ValueError('no')\n")
    assert task.wait(TIMEOUT) and task.status is TaskStatus.FAILED
    assert (ns["calib"], ns["long1"]) == ("v2", "from cell")


def test_a_busy_foreground_is_explained_in_notebook_terms(make_worker):
    gate = Gate()
    w = make_worker({"gate": gate, "f": lambda: 1})
    running = w.submit("gate", background=False)
    assert gate.started.wait(TIMEOUT)
    try:
        with pytest.raises(RequestRefused) as info:
            w.submit("f", background=False)
        assert str(info.value) == (
            "Error: A foreground task is running (gate()): wait for it to end, start this one in "
            "the background (-b, or background=True), or cancel the running one (%task_cancel).")
        assert w.submit("f").result(TIMEOUT) == 1  # the background is free
    finally:
        gate.release.set()
    assert running.wait(TIMEOUT)


def _refusal_of_a_foreground_start(w) -> str | None:
    """The refusal's text when ``f`` is started in the foreground from here, else None."""
    try:
        w.submit("f", background=False)
    except RequestRefused as exc:
        return str(exc)
    return None


def test_a_foreground_task_starting_another_in_the_foreground_is_told_not_to_wait(make_worker):
    """A foreground "macro" whose code starts another foreground task (a magic inside it): it
    was told "A foreground task is running (macro()): wait for it to end ... or cancel the
    running one" -- itself.  It now says why it cannot, and what to do instead."""
    seen = {}

    def macro():
        seen["refused"] = _refusal_of_a_foreground_start(w)
        return w.submit("f").result(TIMEOUT)  # (the background is free)

    w = make_worker({"macro": macro, "f": lambda: 1})
    assert w.submit("macro", background=False).result(TIMEOUT) == 1
    assert seen["refused"] == (
        "Error: macro() runs in the foreground, so its code cannot start another foreground task: "
        "call the function directly, or start it in the background (-b, or background=True).")


def test_a_foreground_task_s_thread_starting_a_foreground_task_is_told_not_to_wait(make_worker):
    """The same from a thread the foreground macro started (its detectors' pool): it was told
    to wait for the macro to end -- which waits for that thread."""
    from concurrent.futures import ThreadPoolExecutor

    seen = {}

    def in_thread():
        seen["refused"] = _refusal_of_a_foreground_start(w)

    def macro():
        with ThreadPoolExecutor(1) as pool:
            pool.submit(in_thread).result(TIMEOUT)

    w = make_worker({"macro": macro, "f": lambda: 1})
    w.submit("macro", background=False).result(TIMEOUT)
    assert seen["refused"].startswith("Error: macro() runs in the foreground, so its code cannot start"), seen


def test_lock_calls_never_wait_for_each_other_s_key_derivation(make_worker, monkeypatch):
    # Found by a review: the worker held its key lock across the store's key derivation
    # (tens of ms) and file I/O (up to flock_timeout_s), so a remote lock request on the
    # control thread waited for a click's or a cell's disk.
    import qmagic.store.locks as locks_module

    w = make_worker({})
    inside, release = threading.Event(), threading.Event()
    derive = locks_module.hash_key
    local_thread: list[int] = []

    def slow_hash(key):
        if local_thread and threading.get_ident() == local_thread[0]:
            inside.set()
            release.wait(TIMEOUT)
        return derive(key)

    monkeypatch.setattr(locks_module, "hash_key", slow_hash)
    outcome: list = []

    def local_lock() -> None:
        local_thread.append(threading.get_ident())
        try:
            outcome.append(w.lock("cell-key"))
        except LockRefused as exc:
            outcome.append(exc)

    th = threading.Thread(target=local_lock)
    th.start()
    try:
        assert inside.wait(TIMEOUT)  # the cell's lock is deriving its key now
        remote = w.lock("remote-key", environment=True, user="op", origin="remote")
        assert remote.environment  # done meanwhile
        assert w.unlock("remote-key", origin="remote").locked is False
        assert w.lock("remote-key", environment=True, user="op", origin="remote").environment
    finally:
        release.set()
        th.join(TIMEOUT)
    assert isinstance(outcome[0], LockRefused)  # locked with another key meanwhile
    assert not w.holds_lock_key  # and the kernel remembers no key it does not hold
    assert w.unlock("remote-key", origin="remote").locked is False
    state = w.lock()
    assert w.holds_lock_key and w.current_lock().uid == state.uid
    w.lock()  # again: the remembered key
    assert w.unlock().locked is False and not w.holds_lock_key


def test_the_remembered_key_follows_the_last_change_of_racing_lock_calls(make_worker):
    w = make_worker({})
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(10):
            barrier = threading.Barrier(2)

            def locker() -> None:
                barrier.wait(TIMEOUT)
                w.lock("k1")

            def unlocker() -> None:
                barrier.wait(TIMEOUT)
                try:
                    w.unlock("k1")
                except (LockRefused, RequestRefused):
                    pass

            threads = [threading.Thread(target=locker), threading.Thread(target=unlocker)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(TIMEOUT)
            # the kernel remembers the key exactly when the environment is locked (with it)
            assert w.holds_lock_key == w.current_lock().environment
            if w.holds_lock_key:
                w.unlock()
    finally:
        sys.setswitchinterval(old)


def test_a_remote_change_right_after_the_kernel_s_own_does_not_make_it_forget(make_worker, monkeypatch):
    # Found by a review: the kernel remembered its key only if the lock was still the one
    # its own change made, so a remote re-lock (same key) landing just after made it forget
    # the key of a lock it held, and its next cell was refused.
    w = make_worker({"f": lambda: 1})
    store = w._locks
    real = store.lock

    def then_remote(key, **kw):
        state = real(key, **kw)
        if kw.get("client") is None:  # the kernel's own change: a remote one lands right after
            real(key, environment=True, queue=False, note="remote", user="op", client="op-client")
        return state

    monkeypatch.setattr(store, "lock", then_remote)
    w.lock("mine")
    assert w.current_lock().note == "remote" and w.holds_lock_key
    assert w.submit("f").result(TIMEOUT) == 1  # the kernel still opens its lock
    monkeypatch.setattr(store, "lock", real)
    assert w.unlock().locked is False and not w.holds_lock_key


def test_an_interrupt_anywhere_in_a_lock_change_lands_after_it(make_worker, sigint_as_in_a_cell):
    """■ landing inside the lock file's writing (in ``tempfile.mkstemp``, between an
    ``os.open`` and its ``try``) left empty ``.default.lock.json.*.tmp`` files and open
    descriptors behind, and could leave the lock store's own lock held (every later change of
    the lock then failed for 2 s and gave up): found by a hostile interrupt storm.  A
    kernel's own lock and unlock hold ■ until the change is made whole, then raise it."""
    import os
    from pathlib import Path

    from interrupt_points import interrupted_at, lines_of

    from qmagic.store import files, locks

    w = make_worker({})
    folder = Path(w.state_dir)
    codes = [files.replace_state_file.__code__, locks.LockStore._exclusive.__wrapped__.__code__,
             locks.LockStore._write.__code__, locks.LockStore._change.__code__,
             locks.LockStore.lock.__code__, locks.LockStore.unlock.__code__]
    def lock_files_open() -> list[str]:  # (descriptors on the lock's files: the log's writer
        found = []  # thread opens and closes its own meanwhile)
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(folder)) and ".lock" in target and ".journal." not in target:
                found.append(target)
        return sorted(found)

    w.lock("kk")
    w.unlock("kk")
    descriptors = lock_files_open()
    fired = 0
    for code in codes:
        for line in lines_of(code):
            for change, locked in ((lambda: w.lock("kk"), True), (lambda: w.unlock("kk"), False)):
                if interrupted_at(code, line, change):
                    fired += 1
                    assert w.lock_state().environment is locked, (code.co_name, line)  # made whole
                    assert not list(folder.glob(".*.tmp")), (code.co_name, line)
                    assert lock_files_open() == descriptors, (code.co_name, line)
                elif w.lock_state().environment is not locked:  # (the line did not run: as it is)
                    change()
    assert fired > 20
    w.lock("kk")  # (nothing is left held)
    assert w.unlock("kk").environment is False


def test_an_interrupt_held_during_a_change_that_fails_still_stops_the_call(sigint_as_in_a_cell):
    """A ■ held during a lock change that then failed (refused, or the lock file held by
    another process for 2 s) was dropped with it: a loop retrying on that error could not be
    stopped with ■ (a reviewer's finding).  The ■ ends the call, the error as its context."""
    import signal

    from qmagic.core.foreground import interrupt_after

    assert threading.current_thread() is threading.main_thread()
    with pytest.raises(KeyboardInterrupt) as info:
        with interrupt_after():
            signal.raise_signal(signal.SIGINT)
            raise LockRefused("refused")
    assert isinstance(info.value.__context__, LockRefused)
    with interrupt_after():  # (no ■: nothing raised)
        pass


# -- the default user group and the permission rules ------------------------------------------------
STUDENTS = {"user_groups": {"root": {"allowed_functions": [None]}, "students": {"allowed_functions": [None]}}}


def _default_group_warnings(caplog) -> list[str]:
    found = [r.getMessage() for r in caplog.records if "QMagic.default_user_group" in r.getMessage()]
    caplog.clear()
    return found


def test_a_default_group_the_rules_do_not_define_is_said_once_and_named_in_the_refusal(make_worker, tmp_path,
                                                                                      caplog):
    """``QMagic.default_user_group = "students"`` without a rule for it was taken silently;
    every request naming no group then failed "Unknown user group: 'students'", which named
    no setting.  The worker warns once when the setting or the rules (a file read again too)
    come to disagree, and the refusal names the setting and what to do; the configuration's
    order does not matter (both set at once: no warning)."""
    caplog.set_level(logging.WARNING, logger="qmagic")
    rules_file = tmp_path / "permissions.yaml"
    rules_file.write_text("user_groups:\n  root:\n    allowed_functions: [null]\n"
                          "  students:\n    allowed_functions: [null]\n")
    w = make_worker({"f": lambda: 1}, default_user_group="students", user_group_permissions_file=str(rules_file))
    assert w.submit("f").result(TIMEOUT) == 1 and w.run_script("x = 1").wait(TIMEOUT)
    assert _default_group_warnings(caplog) == []
    rules_file.write_text("user_groups:\n  root:\n    allowed_functions: [null]\n"
                          "  primary:\n    allowed_functions: [null]\n")
    w.reload_permissions()  # (the file changed under it: students is gone)
    (warning,) = _default_group_warnings(caplog)
    assert warning == ("qmagic: QMagic.default_user_group 'students' (the group of requests that name none) is "
                       "not a group of the permission rules (root, primary): set it to one of them, or add "
                       "'students' to the rules; until then every request that names no group is refused.")
    w.reload_permissions()
    assert _default_group_warnings(caplog) == []  # (the same disagreement: said once)
    refusal = ("Error: Unknown user group: 'students': QMagic.default_user_group (the group of requests that name "
               "none) is not a group of the permission rules (root, primary): set it to one of them, or add "
               "'students' to the rules.")
    for request in (lambda: w.submit("f"), lambda: w.submit(lambda: 1), lambda: w.run_script("x = 2")):
        with pytest.raises(PermissionRefused) as info:
            request()
        assert str(info.value) == refusal
    with pytest.raises(PermissionRefused, match=r"^Error: Unknown user group: 'students'$"):
        w.submit("f", user_group="students")  # (named by the request: queueserver's text alone)
    w.default_user_group = "primary"
    assert w.submit("f").result(TIMEOUT) == 1 and _default_group_warnings(caplog) == []
    w.default_user_group = "visitors"  # the setting itself
    assert "QMagic.default_user_group 'visitors'" in _default_group_warnings(caplog)[0]
    for order in (("default_user_group", "user_group_permissions"), ("user_group_permissions", "default_user_group")):
        settings = {"default_user_group": "students", "user_group_permissions": STUDENTS}
        other = make_worker({"f": lambda: 2}, **{name: settings[name] for name in order})
        assert other.submit("f").result(TIMEOUT) == 2
    assert _default_group_warnings(caplog) == []
    make_worker({}, default_user_group="students")
    assert len(_default_group_warnings(caplog)) == 1  # (a worker made so says it at once)


def test_lowered_memory_limits_let_finished_tasks_leave_at_once(make_worker):
    """w.max_finished_tasks = 3 (or a lower max_finished_task_bytes) kept every finished task
    in memory until the next task ended, which after a beamtime may never come: the tasks
    beyond the new limit now leave at once (the experiment log keeps them)."""
    w = make_worker({"f": lambda: 1})
    tasks = [w.submit("f") for _ in range(10)]
    assert all(t.wait(TIMEOUT) for t in tasks)
    w.max_finished_tasks = 3
    assert w.tasks() == tasks[-3:]
    w.max_finished_tasks = 1000
    sized = [w.submit("f", payload_bytes=1000) for _ in range(3)]
    assert all(t.wait(TIMEOUT) for t in sized)
    w.max_finished_task_bytes = 1500  # the oldest sized ones leave; the others have no size
    assert w.tasks() == tasks[-3:] + sized[-1:]
    assert isinstance(w.find(sized[0].uid), dict)  # (from the log now)


def test_a_misspelt_setting_is_refused_not_dropped(tmp_path):
    """Worker(ns, max_background_task=8) was taken (traitlets drops an unknown keyword with a
    DeprecationWarning nobody sees) and the default of 32 applied: refused, naming the
    setting meant; nothing is left running."""
    import threading

    before = set(threading.enumerate())
    with pytest.raises(TypeError, match=r"^Worker\(\) has no setting 'max_background_task': did you "
                       r"mean 'max_background_tasks'\? the settings are listed by "
                       r"qmagic\.QMagic\.class_get_help\(\)\.$"):
        qmagic.Worker({}, max_background_task=8, state_dir=str(tmp_path))
    with pytest.raises(TypeError, match=r"^QMagic\(\) has no setting 'zzz': the settings"):
        qmagic.QMagic(zzz=1)
    assert set(threading.enumerate()) <= before | {t for t in threading.enumerate() if t.name == "qmagic-timer"}
    assert qmagic.QMagic(max_background_tasks=8).max_background_tasks == 8
    # on a live worker, likewise: the attribute was kept, and did nothing
    w = qmagic.Worker({}, state_dir=str(tmp_path))
    try:
        with pytest.raises(AttributeError, match=r"^Worker has no setting 'max_background_task': did "
                           r"you mean 'max_background_tasks'\? the settings are listed by "):
            w.max_background_task = 8
        assert "max_background_task" not in vars(w) and w.max_background_tasks == 32
        w.my_note = "beamtime 7"  # (a name like no setting's is the caller's own)
        w.max_background_tasks = 8
        assert w.engine.max_background == 8
    finally:
        w.close()
