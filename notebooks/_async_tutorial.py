"""Cells of the tutorial notebook ``07-async-tasks.ipynb`` (``notebooks/_build.py`` makes it).

``CELLS`` is a list of ``(kind, source)`` pairs in notebook order.  ``kind`` is
``"markdown"``, ``"code"``, ``"code-raises"`` (a code cell whose error is the lesson: tagged
``raises-exception``) or ``"setup"`` (``_build.py`` puts the tutorials' common setup text
and cell there; its source is empty).  The notebook is deterministic for nbval
(``notebooks/sanitize.cfg``): no uids, clock times or durations in its outputs (a
deadline's "0.2 s" is sanitized), and background tasks print only while the cell that
started them still runs.  It needs bluesky and ophyd-async (``ophyd_async.sim``), and runs
top to bottom in a few seconds (most of it importing them).
"""

from __future__ import annotations

import textwrap

__all__ = ["CELLS", "NOTEBOOK_NAME"]

#: File name of the notebook these cells make.
NOTEBOOK_NAME = "07-async-tasks.ipynb"


def _md(text: str) -> tuple[str, str]:
    return ("markdown", textwrap.dedent(text).strip("\n"))


def _code(text: str, *, raises: bool = False) -> tuple[str, str]:
    return ("code-raises" if raises else "code", textwrap.dedent(text).strip("\n"))


CELLS: list[tuple[str, str]] = [
    _md("""
    # 7. Async functions as tasks, and ophyd-async devices

    Modern beamline code is asynchronous: [ophyd-async](https://blueskyproject.io/ophyd-async/)
    devices are moved and read with `await`, on bluesky's event loop. qmagic runs `async def`
    functions as tracked tasks too — from a cell, from Python, from remote clients — with
    the same status, progress, output, cancel and deadlines as every other task, **on the
    event loop where the devices live**.

    This notebook starts with plain coroutines, then drives a simulated motor and detector
    from `ophyd_async.sim`. Run the cells from top to bottom (it takes a few seconds, most of
    them importing bluesky).

    Tutorials: [1 getting started](01-getting-started.ipynb) ·
    [2 progress, cancel, output](02-progress-cancel-output.ipynb) ·
    [3 scripts and permissions](03-scripts-and-permissions.ipynb) ·
    [4 locking for a hutch entry](04-locking-for-hutch-entry.ipynb) ·
    [5 remote control](05-remote-control.ipynb) ·
    [6 the experiment log](06-experiment-log.ipynb) · **7 async tasks and ophyd-async**
    """),
    ("setup", ""),
    _md("""
    ## `async def` functions are tasks

    Start an `async def` function like any other. qmagic runs it on an event loop: here,
    without bluesky, on a loop that qmagic runs in a thread of its own. A foreground task
    holds the cell until it ends, with its live row (■ or the row's *Cancel* stop it);
    `report_progress`, `print` and logging work as in any task.
    """),
    _code("""
    import asyncio


    async def count_frames(n, exposure=0.05):
        \"\"\"Acquire n frames; every await lets other coroutines run meanwhile.\"\"\"
        for i in range(1, n + 1):
            qmagic.report_progress(i, n, f"frame {i} of {n}")
            await asyncio.sleep(exposure)
        return n


    %function_execute count_frames 3
    """),
    _md("""
    ## In the background, and `await task`

    With `-b` the cell returns at once with the task. A task can be **awaited** — in a cell
    (IPython runs cells that contain `await` on the kernel's event loop) and inside other
    coroutines. Waiting never blocks an event loop: the kernel's loop, and the loop the task
    runs on, go on with their other work.
    """),
    _code("""
    frames = %function_execute -b count_frames 5
    """),
    _code("""
    await frames
    """),
    _code("""
    frames.kind, frames.status.value, frames.progress
    """),
    _md("""
    ## Foreground and background together

    Coroutine tasks share their event loop, so a background task can wait for something
    a foreground task does. `wait_for_beam` waits in the background until the beam is on
    (the cell waits until it reports that it is waiting: `subscribe` delivers a task's
    events, the same ones the panels follow); the foreground task `open_shutters` then
    switches the beam on, in its own cell, while the background task waits on the same
    loop.
    """),
    _code("""
    import threading

    beam_on = asyncio.Event()


    async def wait_for_beam():
        \"\"\"Wait until the beam is on, then take one frame.\"\"\"
        qmagic.report_progress(None, None, "waiting for beam")
        await beam_on.wait()
        return await count_frames(1)


    async def open_shutters():
        \"\"\"Open the beam shutters.\"\"\"
        beam_on.set()
        return "beam on"


    waiting = %function_execute -b wait_for_beam
    reported = threading.Event()
    with waiting.subscribe(lambda **event: "progress" in event and reported.set()):
        reported.wait(timeout=10)
    waiting.status.value, waiting.progress.message
    """),
    _code("""
    %function_execute open_shutters
    """),
    _code("""
    await waiting
    """),
    _md("""
    ## Cancel is asyncio cancellation

    Cancelling a coroutine task is immediate: `asyncio.CancelledError` is raised at the
    `await` where the coroutine waits, so its `try` / `finally` cleanup runs (here: the
    shutter closes). The task is recorded as cancelled, with the reason.

    This cell starts an exposure in the background, waits until it runs, then cancels it.
    """),
    _code("""
    shutter = {"open": False}


    async def expose(seconds):
        \"\"\"Open the shutter for `seconds`; close it whatever happens.\"\"\"
        shutter["open"] = True
        print("shutter open", flush=True)
        try:
            qmagic.report_progress(None, None, "exposing")
            await asyncio.sleep(seconds)
            return "image"
        finally:
            shutter["open"] = False
            print("shutter closed", flush=True)


    exposure = %function_execute -b expose 30
    exposing = threading.Event()
    with exposure.subscribe(lambda **event: "progress" in event and exposing.set()):
        exposing.wait(timeout=10)

    exposure.cancel()
    exposure.wait(timeout=10)
    print(exposure.status.value, "|", exposure.error, "| shutter open:", shutter["open"])
    """),
    _md("""
    ## Deadlines

    `%function_execute --timeout SECONDS` (or `w.submit(..., timeout=SECONDS)`) gives a task
    a deadline: when it passes, the task is cancelled — a coroutine at its next `await`, a
    thread task cooperatively, then by force after `QMagic.cancel_grace_s` — and recorded
    as cancelled with the reason.
    """),
    _code("""
    late = %function_execute -b --timeout 0.2 expose 30
    late.wait(timeout=10)
    print(late.status.value, "|", late.error, "| shutter open:", shutter["open"])
    """),
    _md("""
    A **foreground** task whose deadline passes ends its cell like ■ does: with one
    `TaskCancelled` line saying why, so *Run All* stops there. (This cell carries the
    `raises-exception` tag, so that *Run All* carries on.)
    """),
    _code("""
    %function_execute --timeout 0.2 expose 30
    """, raises=True),
    _md("""
    ## Plans are not functions

    A generator function is a bluesky **plan**: it does nothing until the RunEngine runs
    it. Started as a task it would "complete" at once with a generator object, so qmagic
    refuses it and says how to run it:
    """),
    _code("""
    from bluesky.plans import count

    try:
        w.submit("count")
    except qmagic.RequestRefused as exc:
        print(exc)
    """),
    _md("""
    ## bluesky's event loop and ophyd-async devices

    ophyd-async devices are connected on **bluesky's event loop**, which a `RunEngine` runs
    in a thread of its own; awaiting a device's signals on any other loop fails. So once
    bluesky's loop runs, qmagic runs coroutine tasks on it (the setting
    `QMagic.async_loop = "auto"`; `"bluesky"` insists on it, `"qmagic"` never uses it).

    `init_devices()` names the devices after their variables and connects them on
    bluesky's loop. The motor is simulated with a velocity, so a move takes time.
    """),
    _code("""
    from bluesky import RunEngine
    from bluesky.run_engine import get_bluesky_event_loop
    from ophyd_async.core import init_devices, observe_value
    from ophyd_async.sim import SimMotor, SimPointDetector

    RE = RunEngine({}, call_returns_result=True)

    with init_devices():
        stage_x = SimMotor(instant=False)
        det = SimPointDetector(None, num_channels=2)


    async def setup_devices(velocity):
        \"\"\"Motor speed (mm/s), a short ramp, and the detector's exposure.\"\"\"
        await stage_x.velocity.set(velocity)
        await stage_x.acceleration_time.set(0.1)
        await det.acquire_time.set(0.05)
        return asyncio.get_running_loop() is get_bluesky_event_loop()


    await w.submit(setup_devices, (20,))
    """),
    _md("""
    The last line is `True`: the task ran on bluesky's loop.

    ## A measurement as a coroutine task

    `scan_to` moves the motor, reports its position as progress while it moves, then
    reads the detector. If it is cancelled during the move, its `finally` stops the motor
    where it is.
    """),
    _code("""
    async def scan_to(target):
        \"\"\"Move stage_x to `target` (mm), then read the detector.\"\"\"
        start = await stage_x.user_readback.get_value()
        move = stage_x.set(target)
        try:
            async for position in observe_value(stage_x.user_readback, done_status=move):
                qmagic.report_progress(abs(position - start), abs(target - start),
                                       f"stage_x at {position:.2f}")
            await det.trigger()
            reading = await det.read()
            return {"position": await stage_x.user_readback.get_value(),
                    "counts": [reading[name]["value"] for name in sorted(reading)]}
        finally:
            if not move.done:  # cancelled mid-move
                await stage_x.stop(success=True)
                print("stage_x stopped", flush=True)


    %function_execute scan_to 2
    """),
    _code("""
    w.last_task.result()
    """),
    _md("""
    ## Cancelling a move

    Start a long move in the background, wait until the motor has gone 1 mm, and cancel
    it. The motor stops between start and target and stays there. `await
    w.submit(stage_x.locate)` asks where it is: a coroutine task too, on bluesky's loop.
    """),
    _code("""
    move = %function_execute -b scan_to 100
    moving = threading.Event()
    with move.subscribe(lambda **event: "progress" in event and event["progress"].value > 1
                        and moving.set()):
        moving.wait(timeout=10)

    move.cancel()
    move.wait(timeout=10)
    where = await w.submit(stage_x.locate)
    print(move.status.value, "|", move.error)
    print("stopped between start and target:", 1 < where["readback"] < 100)
    """),
    _md("""
    The RunEngine shares the loop and the devices with the tasks: it runs plans as usual.
    """),
    _code("""
    import bluesky.plan_stubs as bps

    RE(bps.mv(stage_x, 0)).exit_status
    """),
    _code("""
    await w.submit(stage_x.locate)
    """),
    _md("""
    ## A script that awaits

    An uploaded script may `await` at its top level, as a cell may: a set-up script that
    parks the stage, say. It runs on bluesky's loop like the tasks above, and all or
    nothing: should it fail or be cancelled at an `await`, none of its names stay.
    """),
    _code("""
    %%script_upload --name park_stage
    await stage_x.set(0.5)
    parked_at = await stage_x.user_readback.get_value()
    """),
    _code("""
    parked_at, w.last_task.namespace_changes
    """),
    _md("""
    ## From a remote client

    Coroutine functions are functions for remote clients too: a bluesky-queueserver client
    starts `scan_to`, waits for it and reads its result (see tutorial 5 for the control
    channel). The client runs in this kernel here, for brevity.
    """),
    _code("""
    %control_channel start tcp://127.0.0.1:*
    """),
    _code("""
    from bluesky_queueserver_api import BFunc
    from bluesky_queueserver_api.zmq import REManagerAPI

    RM = REManagerAPI(zmq_control_addr=w.zmq_control_address)
    reply = RM.function_execute(BFunc("scan_to", 3), run_in_background=True)
    RM.wait_for_completed_task(reply["task_uid"], timeout=30)
    result = RM.task_result(reply["task_uid"])["result"]
    RM.close()
    result["success"], result["return_value"]
    """),
    _code("""
    %control_channel stop
    """),
    _md("""
    ## Summary

    - `async def` functions (and functions returning an awaitable) run as tasks, on
      bluesky's event loop once a RunEngine runs it, else on qmagic's own loop
      (`QMagic.async_loop`); so do scripts that `await` at their top level.
    - Foreground and background coroutine tasks share the loop; the cell waits for a
      foreground one, never for a background one.
    - Cancel — `task.cancel()`, ■, a panel's *Cancel*, `%task_cancel` — is asyncio
      cancellation: immediate at the next `await`, with `finally` cleanup.
    - `--timeout` / `timeout=` set deadlines, for every kind of task.
    - `await task` works in cells and in coroutines and never blocks a loop.
    - Plans go to the RunEngine: `RE(plan(...))`.

    That is the end of the tutorials. The repository's README lists every magic, setting
    and Python function; every magic also has its help: `%function_execute?`.
    """),
]
