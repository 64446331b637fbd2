"""Coroutine tasks driving ophyd-async's simulated devices on bluesky's event loop.

The devices are real (``ophyd_async.sim.SimMotor`` with a velocity, ``SimPointDetector``),
connected on bluesky's event loop the documented way (``init_devices()`` after a RunEngine
exists); the tasks run on that same loop.  A task moves the motor while reporting progress
and reads the detector; cancelled mid-move, its ``finally`` stops the motor between start
and target, where it stays; a remote ``REManagerAPI`` client reads a move's result; the
RunEngine keeps running plans with the same devices.  One test does the same in a real
kernel, with ■.
"""

from __future__ import annotations

import asyncio
import functools
from types import SimpleNamespace

import pytest

import bluesky  # noqa: F401 - a test dependency
import ophyd_async  # noqa: F401 - a test dependency

from async_helpers import TIMEOUT, EventLog, in_loop, run_engine  # noqa: E402,F401 - fixture
from engine_helpers import make_worker  # noqa: E402,F401 - fixture

import qmagic  # noqa: E402
from qmagic import TaskStatus  # noqa: E402

pytestmark = pytest.mark.timeout(120)

#: Motor speed (mm/s) and ramp time (s): a move of 100 mm takes about 5 s, one of 2 mm 0.2 s.
VELOCITY, ACCELERATION_TIME = 20.0, 0.1


def make_scan_to(motor, det, cleanup: list):
    """``scan_to(target)``: move, report progress on every readback update, read det."""
    from bluesky.run_engine import get_bluesky_event_loop
    from ophyd_async.core import observe_value

    async def scan_to(target):
        """Move stage_x to target (mm), then read the detector."""
        on_bluesky_loop = asyncio.get_running_loop() is get_bluesky_event_loop()
        start = await motor.user_readback.get_value()
        distance = abs(target - start)
        move = motor.set(target)
        try:
            async for position in observe_value(motor.user_readback, done_status=move):
                qmagic.report_progress(abs(position - start), distance, f"stage_x at {position:.2f}")
            await det.trigger()
            reading = await det.read()
            return {
                "position": await motor.user_readback.get_value(),
                "counts": [reading[name]["value"] for name in sorted(reading)],
                "on_bluesky_loop": on_bluesky_loop,
            }
        finally:
            if not move.done:  # cancelled mid-move: stop the motor where it is
                await motor.stop(success=True)
                print("stage_x stopped", flush=True)
            cleanup.append(await motor.user_readback.get_value())

    return scan_to


async def _configure(motor, det) -> None:
    await motor.velocity.set(VELOCITY)
    await motor.acceleration_time.set(ACCELERATION_TIME)
    await det.acquire_time.set(0.05)


async def _updates_within(signal, seconds: float) -> list:
    """The values ``signal`` reports during ``seconds`` (its current value first)."""
    seen: list = []

    def callback(reading: dict) -> None:
        seen.extend(r["value"] for r in reading.values())

    signal.subscribe_reading(callback)
    try:
        await asyncio.sleep(seconds)  # an observation window, not a synchronisation
    finally:
        signal.clear_sub(callback)
    return seen


@pytest.fixture
def beamline(run_engine):
    """A motor and a detector connected on bluesky's loop, and a namespace using them."""
    from bluesky.plans import count
    from bluesky.run_engine import get_bluesky_event_loop
    from ophyd_async.core import init_devices
    from ophyd_async.sim import SimMotor, SimPointDetector

    with init_devices():  # names and connects them on bluesky's event loop
        stage_x = SimMotor(instant=False)
        det = SimPointDetector(None, num_channels=2)
    loop = get_bluesky_event_loop()
    in_loop(loop, _configure(stage_x, det))
    cleanup: list = []
    namespace = {"stage_x": stage_x, "det": det, "count": count,
                 "scan_to": make_scan_to(stage_x, det, cleanup)}
    return SimpleNamespace(RE=run_engine, loop=loop, motor=stage_x, det=det, cleanup=cleanup,
                           namespace=namespace)


def test_devices_are_connected_on_bluesky_loop_and_catalogued(beamline, make_worker):
    w = make_worker(beamline.namespace)
    assert beamline.motor.name == "stage_x" and beamline.det.name == "det"
    assert set(w.catalog.devices()) == {"stage_x", "det"}
    assert "scan_to" in w.functions_available() and "count" not in w.functions_available()


def test_a_coroutine_task_moves_the_motor_reports_progress_and_reads_the_detector(beamline,
                                                                                   make_worker):
    w = make_worker(beamline.namespace)
    log = EventLog()
    w.subscribe(log)
    task = w.submit("scan_to", (2.0,))
    result = task.result(TIMEOUT)
    assert result["position"] == 2.0 and result["on_bluesky_loop"] is True
    assert len(result["counts"]) == 2 and all(isinstance(c, int) and c > 0 for c in result["counts"])
    assert task.kind == "coroutine" and task.status is TaskStatus.COMPLETED
    assert task.progress.value == 2.0 and task.progress.total == 2.0
    assert task.progress.message == "stage_x at 2.00"
    events = log.wait_final(task.uid)
    values = [e["progress"].value for e in events if "progress" in e]
    assert values and values == sorted(values) and values[-1] == 2.0  # moving, step by step
    assert in_loop(beamline.loop, beamline.motor.locate()) == {"setpoint": 2.0, "readback": 2.0}
    assert beamline.cleanup == [2.0]


def test_cancel_mid_move_stops_the_motor_between_start_and_target(beamline, make_worker):
    w = make_worker(beamline.namespace)
    log = EventLog()
    w.subscribe(log)
    task = w.submit("scan_to", (100.0,))
    log.wait_for(lambda evs: any(e["task_uid"] == task.uid and "progress" in e
                                 and e["progress"].value >= 0.5 for e in evs))
    w.cancel(task)
    assert task.wait(TIMEOUT) and task.status is TaskStatus.CANCELLED
    assert task.error == "Task was cancelled from Python"
    assert task.output == "stage_x stopped\n"  # the finally ran, and its output was kept
    [stopped_at] = beamline.cleanup
    assert 0.5 <= stopped_at < 100.0
    # it stays there: no readback update over three of the simulator's update periods
    assert in_loop(beamline.loop, _updates_within(beamline.motor.user_readback, 0.3)) == [stopped_at]
    where = in_loop(beamline.loop, beamline.motor.locate())
    assert where["readback"] == stopped_at and where["setpoint"] < 100.0
    # the motor, the loop and the task machinery are fine: the next move completes
    assert w.submit("scan_to", (1.0,)).result(TIMEOUT)["position"] == 1.0


def test_a_deadline_stops_a_move_too(beamline, make_worker):
    w = make_worker(beamline.namespace)
    task = w.submit("scan_to", (100.0,), timeout=0.3)
    assert task.wait(TIMEOUT) and task.status is TaskStatus.CANCELLED
    assert task.error == "deadline of 0.3 s passed"
    [stopped_at] = beamline.cleanup
    assert 0.0 < stopped_at < 100.0
    assert in_loop(beamline.loop, beamline.motor.locate())["readback"] == stopped_at


def test_a_remote_client_reads_the_result_of_a_move(beamline, make_worker):
    import bluesky_queueserver_api  # noqa: F401 - a test dependency
    from bluesky_queueserver_api import BFunc
    from remote_client import LoopClient

    from qmagic.protocol import QueueserverProtocol
    from qmagic.remote.dispatch import dispatch
    from qmagic.remote.server import ControlServer

    w = make_worker(beamline.namespace)
    server = ControlServer(functools.partial(dispatch, QueueserverProtocol(w)),
                           "tcp://127.0.0.1:*").start()
    RM = LoopClient(zmq_control_addr=server.address, status_polling_period=0.05,
                    timeout_recv=TIMEOUT)  # remote_client.py: why not the threads client
    try:
        for target, background in ((2.0, True), (0.5, False)):
            reply = RM.function_execute(BFunc("scan_to", target), run_in_background=background)
            uid = reply["task_uid"]
            assert RM.wait_for_completed_task(uid, timeout=TIMEOUT) == {uid: "completed"}
            result = RM.task_result(uid)["result"]
            assert result["success"] is True, result
            value = result["return_value"]
            assert value["position"] == target and value["on_bluesky_loop"] is True
            assert len(value["counts"]) == 2
        with pytest.raises(RM.RequestFailedError) as info:  # a plan is run by the RunEngine
            RM.function_execute(BFunc("count", ["det"]), run_in_background=True)
        assert "RE(count(...))" in info.value.response["msg"]
    finally:
        RM.close()
        server.stop()


def test_the_run_engine_runs_plans_with_the_same_devices(beamline, make_worker):
    import bluesky.plan_stubs as bps
    from bluesky.plans import count

    RE = beamline.RE
    w = make_worker(beamline.namespace)
    documents: list = []
    result = RE(count([beamline.det], num=2), lambda name, doc: documents.append(name))
    assert result.exit_status == "success" and documents.count("event") == 2
    assert RE(bps.mv(beamline.motor, 1.5)).exit_status == "success"
    assert w.submit("scan_to", (1.5,)).result(TIMEOUT)["position"] == 1.5
    task = w.submit("scan_to", (100.0,))
    assert task.cancel() and task.wait(TIMEOUT)
    assert RE(bps.mv(beamline.motor, 0.0)).exit_status == "success" and RE.state == "idle"
    assert in_loop(beamline.loop, beamline.motor.locate()) == {"setpoint": 0.0, "readback": 0.0}


def test_a_run_engine_called_by_a_background_or_coroutine_task_says_what_to_do(beamline, make_worker):
    """``RE(plan)`` in a ``-b`` function, or in an ``async def`` one, fails as bluesky sets
    its SIGINT handler: the task's error read "signal only works in main thread of the
    main interpreter", which does not say what to do (the beamtime tester).  It says so;
    the RunEngine is untouched and runs the plan from the main thread."""
    from bluesky import RunEngine
    from bluesky.plans import count

    RE = RunEngine({}, call_returns_result=True)  # (bluesky's default: its SIGINT handler)

    def scan_bg():
        return RE(count([beamline.det]))

    async def scan_async():
        return RE(count([beamline.det]))

    w = make_worker({"scan_bg": scan_bg, "scan_async": scan_async})
    for name in ("scan_bg", "scan_async"):
        task = w.submit(name)
        assert task.wait(TIMEOUT) and task.status is TaskStatus.FAILED
        assert task.error == (
            "signal only works in main thread of the main interpreter: the code set a signal handler, "
            "which only the kernel's main thread may (bluesky's RE(...) does): run it in the "
            "foreground (without -b, from a plain def), or RE(plan) in a cell")
        assert task.traceback.rstrip().endswith(
            "ValueError: signal only works in main thread of the main interpreter")
    assert RE.state == "idle" and RE(count([beamline.det])).exit_status == "success"


# =========================================================================================
# a real kernel
# =========================================================================================
KERNEL_BEAMLINE = r'''
import asyncio
from bluesky import RunEngine
from bluesky.run_engine import call_in_bluesky_event_loop, get_bluesky_event_loop
from ophyd_async.core import init_devices, observe_value
from ophyd_async.sim import SimMotor, SimPointDetector

RE = RunEngine({}, call_returns_result=True)
with init_devices():
    stage_x = SimMotor(instant=False)
    det = SimPointDetector(None, num_channels=2)

async def configure():
    await stage_x.velocity.set(%r)
    await stage_x.acceleration_time.set(%r)

await w.submit(configure)

async def scan_to(target):
    move = stage_x.set(target)
    told = False
    try:
        async for position in observe_value(stage_x.user_readback, done_status=move):
            qmagic.report_progress(position, target)
            if position > 0.5 and not told:
                print("moving", flush=True)
                told = True
        return await stage_x.user_readback.get_value()
    finally:
        if not move.done:
            await stage_x.stop(success=True)
            print("stopped", flush=True)
''' % (VELOCITY, ACCELERATION_TIME)


def test_kernel_interrupt_stops_a_move_on_bluesky_loop(tmp_path_factory):
    from kernel_helpers import one_line, start_kernel

    k = start_kernel(tmp_path_factory.mktemp("ophyd-kernel"))
    try:
        k.execute(KERNEL_BEAMLINE, check=True, timeout=60)
        cell = k.execute_async("%function_execute scan_to 100")
        k.wait_for_output(cell, "moving")
        k.interrupt()
        result = k.wait(cell)
        assert one_line(result) == (
            "TaskCancelled: scan_to(100) was interrupted (■ or KeyboardInterrupt); it is recorded "
            "as cancelled.")
        assert result.stdout == "moving\nstopped\n"
        where = k.eval("call_in_bluesky_event_loop(stage_x.locate())")
        assert 0.5 < where["readback"] < 100.0
        assert k.eval("(w.last_task.status.value, w.last_task.kind, RE.state)") == (
            "cancelled", "coroutine", "idle")
        back = k.execute("%function_execute scan_to 0\nprint(w.last_task.result())", check=True)
        assert back.stdout.endswith("0.0\n")
        assert k.eval("await w.submit(stage_x.locate)") == {"setpoint": 0.0, "readback": 0.0}
    finally:
        k.shutdown()
