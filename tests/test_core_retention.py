"""Retention of finished tasks by bytes (``max_finished_bytes``), on an engine alone: tasks
that carry the size of the request that sent their arguments leave memory, oldest first,
once the sizes sum above the budget; the newest always stays; tasks without a size are left
to the count and the age limits.  The sizes are counted without a blocking lock (a deque
drained by the lock holder): a race test checks that the total stays exact."""

from __future__ import annotations

import random
import sys
import threading

import pytest

from qmagic.core.engine import Engine
from qmagic.errors import RequestRefused

from engine_helpers import TIMEOUT


@pytest.fixture
def engine_factory():
    engines: list[Engine] = []

    def make(**settings) -> tuple[Engine, list]:
        engine = Engine(**settings)
        expired: list = []
        engine.on_expire = expired.extend
        engines.append(engine)
        return engine, expired

    yield make
    for engine in engines:
        engine.close()


def run(engine: Engine, size: int = 0, value=None, background: bool = True):
    """One task carrying ``size`` bytes, finished when this returns (its retention done)."""
    task = engine.submit(lambda: value, name="f", user="u", user_group="g",
                         background=background, payload_bytes=size)
    task.result(TIMEOUT)
    return task


def retained(engine: Engine) -> list:
    """The finished tasks in memory, oldest first."""
    return [job.task for job in list(engine._finished.values())]


def accounting_exact(engine: Engine, ordered: bool = True) -> int:
    """The counted total equals the sizes of the sized tasks in memory (returns it);
    ``ordered``: counted in the order they finished (tasks finishing one at a time)."""
    total = engine.finished_bytes()
    with engine._lock:
        sized = [t for t in retained(engine) if t.payload_bytes]
        if ordered:
            assert list(engine._sized) == [t.uid for t in sized]
        assert set(engine._sized) == {t.uid for t in sized}
        assert total == engine._retained_bytes == sum(t.payload_bytes for t in sized)
    return total


def test_sized_tasks_leave_memory_oldest_first_within_the_budget(engine_factory):
    engine, expired = engine_factory(max_finished_bytes=1000)
    tasks = []
    for i in range(10):
        tasks.append(run(engine, 300, value=i))
        assert accounting_exact(engine) <= 1000
    assert retained(engine) == tasks[-3:]  # 900 bytes; a fourth would be 1200
    assert expired == tasks[:-3]  # oldest first, each told once
    assert engine.get(tasks[0].uid) is None and engine.get(tasks[-1].uid) is tasks[-1]
    assert tasks[0].result(0) == 0  # (the handle a caller holds still works)


def test_tasks_without_a_size_are_not_counted_nor_dropped_for_bytes(engine_factory):
    engine, expired = engine_factory(max_finished_bytes=500)
    plain = [run(engine) for _ in range(5)]
    sized = [run(engine, 400) for _ in range(3)]
    plain += [run(engine) for _ in range(5)]
    assert accounting_exact(engine) == 400
    assert retained(engine) == plain[:5] + sized[-1:] + plain[5:]
    assert expired == sized[:2]
    assert engine.counts()["finished"] == 11


def test_the_newest_sized_task_stays_even_when_it_alone_is_over_the_budget(engine_factory):
    engine, expired = engine_factory(max_finished_bytes=100)
    first = run(engine, 5000)
    assert retained(engine) == [first] and accounting_exact(engine) == 5000
    second = run(engine, 7000)
    assert retained(engine) == [second] and accounting_exact(engine) == 7000
    assert expired == [first]
    # foreground tasks are retained the same way
    third = run(engine, 50, background=False)
    assert retained(engine) == [third] and accounting_exact(engine) == 50


def test_count_and_byte_limits_together(engine_factory):
    engine, expired = engine_factory(max_finished=4, max_finished_bytes=1000)
    a = run(engine, 600)
    b = run(engine)
    c = run(engine, 300)
    d = run(engine)
    assert retained(engine) == [a, b, c, d] and accounting_exact(engine) == 900
    e = run(engine, 200)  # count: a leaves first (and its bytes with it); then 500 <= 1000
    assert retained(engine) == [b, c, d, e] and accounting_exact(engine) == 500
    f = run(engine, 900)  # count: b leaves; bytes 1400 > 1000: c, then e leave
    assert retained(engine) == [d, f] and accounting_exact(engine) == 900
    assert expired == [a, b, c, e]


def test_budget_lowered_on_a_live_engine_applies_at_the_next_finish(engine_factory):
    engine, expired = engine_factory(max_finished_bytes=10_000)
    tasks = [run(engine, 1000) for _ in range(5)]
    engine.max_finished_bytes = 1500
    new = run(engine)  # (a task without a size also trims)
    assert retained(engine) == [tasks[-1], new] and accounting_exact(engine) == 1000
    assert expired == tasks[:-1]


def test_clear_and_the_age_sweep_take_their_bytes_with_them(engine_factory):
    engine, _ = engine_factory(max_finished_bytes=10_000)
    for _ in range(3):
        run(engine, 1000)
    assert engine.clear_finished() == 3 and accounting_exact(engine) == 0

    engine, expired = engine_factory(max_finished_bytes=10_000, retention_s=0.2)
    swept = threading.Event()
    engine.on_expire = lambda tasks: (expired.extend(tasks), swept.set())
    tasks = [run(engine, 1000) for _ in range(3)]
    assert swept.wait(TIMEOUT), "the timer never swept the finished tasks"
    for _ in range(100):  # (a sweep may take them in two rounds)
        if len(expired) == 3:
            break
        swept.clear()
        assert swept.wait(TIMEOUT)
    assert expired == tasks and retained(engine) == [] and accounting_exact(engine) == 0


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("max_finished, clearing", [(10_000, False), (30, False), (10_000, True)])
def test_sizes_counted_by_racing_threads_stay_exact(engine_factory, seed, max_finished, clearing):
    """Eight pool threads finish sized (and unsized) tasks at once, over and over, with the
    interpreter switching threads as often as it can (with a small ``max_finished`` the
    count limit drops tasks too; ``clearing``: another thread forgets every finished task
    again and again, also those whose sizes are not counted yet): no size is lost or counted
    twice, and after the last task both limits hold."""
    rng = random.Random(seed)
    budget = 50_000
    engine, expired = engine_factory(max_background=8, max_queued=10_000,
                                     max_finished=max_finished, max_finished_bytes=budget)
    barrier = threading.Barrier(8)

    def together():
        try:
            barrier.wait(TIMEOUT)
        except threading.BrokenBarrierError:
            pass  # (the last round may have fewer than eight tasks)

    stop = threading.Event()

    def clear():
        while not stop.is_set():
            engine.clear_finished()

    clearer = threading.Thread(target=clear, daemon=True)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        if clearing:
            clearer.start()
        tasks = []
        for _ in range(800):
            size = rng.choice([0, 1, 100, 999, 5000])
            tasks.append(engine.submit(together, name="f", user="u", user_group="g",
                                       background=True, payload_bytes=size))
        for task in tasks:
            task.wait(TIMEOUT)
    finally:
        stop.set()
        sys.setswitchinterval(old)
        barrier.abort()
    if clearing:
        clearer.join(TIMEOUT)
    assert all(t.done() for t in tasks)
    total = accounting_exact(engine, ordered=False)
    with engine._lock:
        assert total <= budget or len(engine._sized) == 1
    kept = retained(engine)
    assert len(kept) <= max_finished
    assert len(kept) + len(expired) == len(tasks)
    assert {t.uid for t in kept} | {t.uid for t in expired} == {t.uid for t in tasks}
    if max_finished > len(tasks) and not clearing:  # only sized tasks leave (for bytes)
        assert all(t.payload_bytes for t in expired)
        assert {t for t in tasks if not t.payload_bytes} <= set(kept)


# ---- waiting and running: max_queued_bytes -------------------------------------------------------
def held(engine: Engine, size: int, gate: threading.Event, background: bool = True):
    """A sized task that runs until ``gate`` is set."""
    return engine.submit(lambda: gate.wait(TIMEOUT), name="hold", user="u", user_group="g",
                         background=background, payload_bytes=size)


def test_live_sized_tasks_are_refused_beyond_the_budget_and_admitted_again(engine_factory):
    engine, _ = engine_factory(max_queued_bytes=10, max_background=1)
    gate = threading.Event()
    first = held(engine, 6, gate)
    second = held(engine, 4, gate)  # 6 + 4 <= 10 (this one waits for the only thread)
    with pytest.raises(RequestRefused) as refused:
        held(engine, 1, gate)
    text = str(refused.value)
    assert "\n" not in text and "its 1 bytes of request data and the 10 that tasks" in text, text
    assert "pass QMagic.max_queued_task_bytes (10)" in text and "send less data" in text
    assert list(engine._live_sizes.values()) == [6, 4]  # the refused one left no trace
    assert [t.uid for t in engine.tasks()] == [first.uid, second.uid]
    own = engine.submit(lambda: "mine", name="own", user="u", user_group="g", background=False)
    assert own.result(TIMEOUT) == "mine"  # tasks without a size are never refused for bytes
    gate.set()
    assert first.result(TIMEOUT) and second.result(TIMEOUT)
    assert engine._live_sizes == {}
    assert held(engine, 10, gate).result(TIMEOUT)  # room again


def test_the_first_sized_task_always_passes(engine_factory):
    engine, _ = engine_factory(max_queued_bytes=0)
    gate = threading.Event()
    big = held(engine, 10**9, gate)  # alone: it passes, however large
    with pytest.raises(RequestRefused):
        held(engine, 1, gate)
    gate.set()
    assert big.result(TIMEOUT) and engine._live_sizes == {}


def test_a_cancelled_waiting_task_gives_its_bytes_back(engine_factory):
    engine, _ = engine_factory(max_queued_bytes=10, max_background=1)
    gate = threading.Event()
    running = held(engine, 5, gate)
    waiting = held(engine, 5, gate)
    assert waiting.cancel()
    assert list(engine._live_sizes.values()) == [5]
    again = held(engine, 5, gate)
    gate.set()
    assert running.result(TIMEOUT) and again.result(TIMEOUT)
    assert engine._live_sizes == {}


def test_racing_sized_submits_never_pass_the_budget_together(engine_factory):
    engine, _ = engine_factory(max_queued_bytes=10, max_background=32)
    gate = threading.Event()
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(20):
            barrier, passed, lock = threading.Barrier(8), [], threading.Lock()

            def submit() -> None:
                barrier.wait(TIMEOUT)
                try:
                    task = held(engine, 6, gate)
                except RequestRefused:
                    return
                with lock:
                    passed.append(task)

            threads = [threading.Thread(target=submit) for _ in range(8)]
            for th in threads:
                th.start()
            for th in threads:
                th.join(TIMEOUT)
            assert len(passed) <= 1, passed  # 6 + 6 > 10: never two at once
            assert sorted(engine._live_sizes.values()) == [6] * len(passed)
            gate.set()
            for task in passed:
                assert task.result(TIMEOUT)
            gate.clear()
            assert engine._live_sizes == {}
    finally:
        sys.setswitchinterval(old)
        gate.set()


def test_a_size_that_is_not_a_count_of_bytes_is_refused(engine_factory):
    engine, _ = engine_factory()
    for bad in (-5, 1.5, True):
        with pytest.raises(ValueError, match="payload_bytes must be an int >= 0"):
            held(engine, bad, threading.Event())
    assert engine._live_sizes == {} and engine.tasks() == []


def test_an_interrupt_inside_the_size_check_takes_the_size_back(engine_factory, monkeypatch):
    engine, _ = engine_factory(max_queued_bytes=10)
    real = engine._hold_size

    def interrupted(job, size):
        real(job, size)
        raise KeyboardInterrupt  # (lands after the size was counted)

    monkeypatch.setattr(engine, "_hold_size", interrupted)
    with pytest.raises(KeyboardInterrupt):
        held(engine, 6, threading.Event())
    assert engine._live_sizes == {} and engine.tasks() == []


def test_a_lowered_retention_lets_the_tasks_past_it_leave_without_waiting_for_the_old_one(engine_factory):
    """task_retention_s lowered (600 s -> 120 s: here 600 -> 0.2) left the finished tasks in
    memory until the sweep planned at the old retention, ten minutes on: they now leave once
    past the new one, and one chain of sweeps goes on (the planned sweep ends the early ones)."""
    from polling import eventually

    engine, expired = engine_factory(retention_s=600.0)
    tasks = [run(engine) for _ in range(3)]
    assert retained(engine) == tasks
    engine.retention_s = 0.2
    engine.apply_limits()  # (what the worker's task_retention_s does)
    eventually(lambda: retained(engine) == [], TIMEOUT, "the tasks past the new retention to leave")
    assert expired == tasks
    later = run(engine)  # a task that ends now is kept its 0.2 s, then leaves too
    eventually(lambda: retained(engine) == [], TIMEOUT, "the later task to leave")
    assert expired == tasks + [later]
