"""Write the tutorial notebooks and fill in their outputs by running them.

    python notebooks/_build.py              # every notebook
    python notebooks/_build.py 02 05        # the notebooks whose names start with 02 and 05

The cells of every tutorial are defined below, those of tutorial 7 in
``_async_tutorial.py`` (the single source of the notebooks: edit them there, not in
JupyterLab, then run this script).  Each notebook is written with nbformat and executed
top to bottom with nbclient in a fresh ``python3`` kernel started in ``notebooks/``, so the
committed outputs are real.  Afterwards check them with

    python -m pytest notebooks/        # nbval, options from pyproject.toml

The kernel gets the repository on ``PYTHONPATH`` (qmagic need not be installed), no
auto-load (the notebooks print the same text whether qmagic is auto-loaded or not), and
the notebook's path in ``JPY_SESSION_NAME``, as JupyterLab gives it (``conftest.py`` does
the same for nbval), so the experiment log knows which notebook started each task.
Cells marked ``raises=True`` are meant to stop with an error (tag ``raises-exception``:
JupyterLab's Run All goes on after them, nbclient and nbval accept the error).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

#: The first code cell of every tutorial after the first: load qmagic, private state folder.
SETUP = """\
get_ipython().extension_manager.load_extension("qmagic")  # only needed where qmagic is not auto-loaded
import qmagic
import _scratch  # a helper next to the tutorials

w = qmagic.get_worker()
w.state_dir = _scratch.scratch_folder()  # this tutorial's lock and log go to a scratch folder"""

SETUP_TEXT = """\
**Setup.** qmagic loads by itself in the Jupyter kernels of the environment it is installed
in; the first line only matters elsewhere and does nothing otherwise. `w` is the kernel's
*worker*, the object behind every magic. The last line keeps this tutorial's lock and
experiment log in a scratch folder, away from your real ones (you would not do this in
your own notebooks); the folder is removed when the kernel stops, however it stops."""


def md(text: str) -> nbformat.NotebookNode:
    """A markdown cell (the text is dedented)."""
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str, *, raises: bool = False) -> nbformat.NotebookNode:
    """A code cell; ``raises=True`` for a cell whose error is the lesson."""
    cell = nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))
    if raises:
        cell.metadata["tags"] = ["raises-exception"]
    return cell


# =========================================================================================
# 01 getting started
# =========================================================================================
GETTING_STARTED = [
    md("""
    # 1. Getting started with qmagic

    qmagic turns this Jupyter kernel into a task runner for the lab. Any function you
    define here can run as a **tracked task**: in the foreground, like a normal cell, or in
    the **background** while you keep working. qmagic keeps each task's status, result,
    traceback and printed output, shows them in a live panel, and lets remote programs
    (bluesky-queueserver clients) start the same functions.

    This notebook shows the basics: starting tasks, reading their results and tracebacks,
    and the task panel. Run the cells from top to bottom (it takes a few seconds).

    Tutorials: **1 getting started** ·
    [2 progress, cancel, output](02-progress-cancel-output.ipynb) ·
    [3 scripts and permissions](03-scripts-and-permissions.ipynb) ·
    [4 locking for a hutch entry](04-locking-for-hutch-entry.ipynb) ·
    [5 remote control](05-remote-control.ipynb) ·
    [6 the experiment log](06-experiment-log.ipynb) ·
    [7 async tasks and ophyd-async](07-async-tasks.ipynb)
    """),
    md("""
    ## Load qmagic

    When qmagic is installed in an environment, it loads by itself in every Jupyter kernel
    of that environment. The first line below is only needed elsewhere (for instance in a
    kernel of another environment); when qmagic is already loaded it does nothing.
    `qmagic.get_worker()` returns the kernel's **worker**: the object behind every magic.
    """),
    code("""
    get_ipython().extension_manager.load_extension("qmagic")  # only needed where qmagic is not auto-loaded
    import qmagic

    w = qmagic.get_worker()
    w
    """),
    md("""
    qmagic keeps the environment's lock and its experiment log in a state folder shared by
    your kernels. So that this tutorial does not touch yours, it uses a scratch folder
    (you would not do this in your own notebooks). `scratch_folder()`, from the small file
    `_scratch.py` next to the tutorials, makes one that is removed when the kernel stops,
    however it stops (shut down, restarted, or killed):
    """),
    code("""
    import _scratch

    w.state_dir = _scratch.scratch_folder()
    """),
    md("""
    ## A function to run

    Tasks run the functions of the notebook's namespace. This one stands in for a
    measurement: it waits for the "exposure", prints a line and returns a result.
    """),
    code("""
    import time


    def measure(sample, exposure=0.2):
        \"\"\"Expose one sample and return its counts.\"\"\"
        time.sleep(exposure)  # the detector would be busy here
        counts = 1000 * len(sample)
        print(f"{sample}: {counts} counts")
        return {"sample": sample, "counts": counts}
    """),
    md("""
    ## A foreground task

    `%function_execute [OPTIONS] NAME ARG ... KEY=VALUE ...` starts a function as a task.
    Without options it runs in the **foreground**: here, in this cell, exactly like calling
    `measure("silicon")` would — its output appears below, and ■ (interrupt) stops it. The
    arguments are Python expressions (strings need quotes); options such as `-b` go before
    the function's name. The call may also be written as in Python, alone after the options:
    `%function_execute measure("silicon")`.

    While the task runs, the cell shows its **live row**: status, progress, elapsed time and
    a *Cancel* button. The cell's value is the **task**; its line reads: the call, who
    started it, where it ran (foreground or background), and its status. (Where widgets
    are not available, as in a terminal, both are plain text lines.)
    """),
    code("""
    %function_execute measure "silicon"
    """),
    md("""
    Keep the task in a variable to get at its return value. A `Task` behaves like a
    `concurrent.futures.Future`: `result()`, `done()`, `exception()`...
    """),
    code("""
    task = %function_execute measure "graphite" exposure=0.1
    task.result()
    """),
    md("""
    ## A background task

    With `-b` the task runs in a background thread and the cell goes on at once: you can
    keep working while it measures. What it prints still appears under the cell that
    started it. `result(timeout=...)` waits for the task to finish.
    """),
    code("""
    bg = %function_execute -b measure "quartz" exposure=1.0
    print("started in the background; finished yet?", bg.done())
    bg.result(timeout=30)
    """),
    md("""
    Python code starts the same tasks with `w.submit(name, args, kwargs)` (background by
    default). That is what your own scripts and helper functions would use.
    """),
    code("""
    glass = w.submit("measure", ("glass",), {"exposure": 0.1})
    glass.result(timeout=30)
    """),
    md("""
    ## Results and tracebacks

    `%task_result` prints the outcome of the latest task (or of the task whose uid you
    give; any unique prefix of 4 or more characters will do): its status and last
    progress, the result, and what it printed.
    """),
    code("""
    %task_result
    """),
    md("""
    A function that fails in the **foreground** stops the cell with its traceback, as if
    you had called it directly. (This cell carries the `raises-exception` tag, so that
    *Run All* carries on after it.)
    """),
    code("""
    def calibrate(offset):
        \"\"\"Return the gain for a detector offset.\"\"\"
        return 100 / offset


    %function_execute calibrate 0
    """, raises=True),
    md("""
    The task keeps the traceback, without qmagic's own frames:
    """),
    code("""
    %task_result
    """),
    md("""
    A **background** task that fails does not disturb your cells: it is recorded as
    `failed`, with its exception and traceback on the task.
    """),
    code("""
    bad = %function_execute -b calibrate 0
    bad.wait(timeout=30)
    print("status:", bad.status)
    print("error: ", repr(bad.exception()))
    print("last traceback line:", bad.traceback.splitlines()[-1])
    """),
    md("""
    ## The task panel

    `%tasks` shows the latest 10 tasks, newest first. In JupyterLab it is a **live panel**:
    the status, progress bar and elapsed time of every task update as they change;
    *Cancel* asks a queued or running task to stop (once asked, it turns into
    *Force stop* until the task has stopped); *Details* shows a task's result or
    traceback, its output and its log; *Running* / *All* choose the tasks listed. Where widgets are not available
    (a terminal IPython) `%tasks` prints the same table as text. `%tasks --running` lists
    only unfinished tasks, `%tasks --all` every task kept in memory, and
    `%tasks --history` the experiment log (tutorial 6).
    """),
    code("""
    %tasks
    """),
    md("""
    `%task_status` gives the status of the latest task, or of the uids you list (and for a
    failed task, its error):
    """),
    code("""
    %task_status
    """),
    md("""
    ## What next

    Every magic has full help: try `%function_execute?`. The next tutorial,
    [2 progress, cancel, output](02-progress-cancel-output.ipynb), shows how a long
    measurement reports its progress, how to stop it, and where its printed output and
    log messages go.
    """),
]

# =========================================================================================
# 02 progress, cancellation, captured output
# =========================================================================================
PROGRESS = [
    md("""
    # 2. Progress, cancellation and captured output

    A long measurement should say how far it got, stop cleanly when asked, and keep what it
    printed and logged. qmagic gives a task three helpers for that — all three do nothing
    outside a task, so the same function still works when you call it directly:

    | helper | what it does |
    |---|---|
    | `qmagic.report_progress(value, total, message)` | live progress for the panel; stops the task if a cancel was requested |
    | `qmagic.cancellable_sleep(seconds)` | sleeps, but wakes at once when the task is cancelled |
    | `qmagic.raise_if_cancelled()` | stops the task here if a cancel was requested |
    """),
    md(SETUP_TEXT),
    code(SETUP),
    md("""
    ## Reporting progress

    `scan` reports its progress at every point and logs each reading through Python's
    `logging` module (the `beamline` logger is set to INFO so that the messages are
    emitted).
    """),
    code("""
    import logging

    log = logging.getLogger("beamline")
    log.setLevel(logging.INFO)


    def scan(points, exposure=0.1):
        \"\"\"Measure `points` positions; return the total counts.\"\"\"
        total = 0
        for i in range(1, points + 1):
            qmagic.report_progress(i, points, f"point {i} of {points}")
            qmagic.cancellable_sleep(exposure)  # the exposure; wakes at once on cancel
            counts = 100 * i
            total += counts
            log.info("point %d: %d counts", i, counts)
        print(f"scan finished: {total} counts")
        return total
    """),
    md("""
    `-b --wait` runs the task in the background and waits for it here. In JupyterLab the
    task's row in `%tasks` shows a progress bar that moves while it runs; the task line
    ends with the last progress reported. The same is in `task.progress`.
    """),
    code("""
    t = %function_execute -b --wait scan 5
    t
    """),
    code("""
    t.progress
    """),
    md("""
    ## Captured output and logs

    Everything a task prints, and every log record it emits, is kept on the task (besides
    going where it normally goes). `%task_result` shows it with the result:
    """),
    code("""
    %task_result
    """),
    md("""
    The same from Python: `task.output` is the printed text, `task.log` the log records
    (time, level, logger, message).
    """),
    code("""
    print(repr(t.output))
    [record["message"] for record in t.log]
    """),
    md("""
    ## Cancelling tasks

    `expose` opens a shutter, waits for the exposure and always closes the shutter again
    (the `finally` block), also when it is cancelled.

    To see a task wait in the queue, the worker here runs one background task at a time
    (`max_background_tasks`, normally 32). The second exposure is therefore *queued* behind
    the first. The last two lines wait until the first exposure has reported that it is
    exposing: `subscribe` delivers a task's events (status, progress, result), the same
    ones the panel follows.
    """),
    code("""
    import threading


    def expose(seconds):
        \"\"\"Open the shutter for `seconds`.\"\"\"
        print("shutter open")
        try:
            qmagic.report_progress(None, None, f"exposing for {seconds} s")
            qmagic.cancellable_sleep(seconds)
        finally:
            print("shutter closed")
        return "image"


    w.max_background_tasks = 1
    first = %function_execute -b expose 30
    second = %function_execute -b expose 5

    exposing = threading.Event()
    with first.subscribe(lambda **event: "progress" in event and exposing.set()):
        exposing.wait(timeout=10)
    """),
    code("""
    %tasks --running
    """),
    md("""
    `%task_cancel UID` asks a task to stop (`{second.uid}` puts the uid into the line; a
    unique prefix of 4 or more characters would do too; without a UID it cancels the
    latest task). A queued task is cancelled before it ever starts:
    """),
    code("""
    %task_cancel {second.uid}
    """),
    md("""
    A running task stops at its next helper call — here `cancellable_sleep` wakes at once.
    The cancel is recorded like a failure: status `cancelled`, with a traceback that shows
    where the task stopped, and the output shows that the shutter was closed.

    (The shutter lines also appear under the cell that started `expose`, when they are
    printed: in JupyterLab you would see "shutter closed" appear up there now.)
    """),
    code("""
    first.cancel()
    first.wait(timeout=10)
    %task_result {first.uid}
    """),
    md("""
    In the task panel, a task's *Cancel* button does the same; `%task_cancel --all`
    cancels every queued and running task.

    ## Stopping a foreground task, and deadlines

    A **foreground** task is stopped with ■ (interrupt the kernel), like any cell, or with
    the *Cancel* button of its live row. Either way the cell ends with one `TaskCancelled`
    line that says how the task was stopped, so *Run All* stops there too, as after any
    error.

    A **deadline** stops a task that runs too long: `%function_execute --timeout SECONDS`
    (or `w.submit(..., timeout=SECONDS)`, for background tasks too). This exposure would
    take 30 s; its deadline stops it after 0.3 s, and the shutter is closed. (The cell
    carries the `raises-exception` tag, so that *Run All* carries on.)
    """),
    code("""
    %function_execute --timeout 0.3 expose 30
    """, raises=True),
    md("""
    The task is recorded as cancelled, with the reason:
    """),
    code("""
    late = w.last_task
    print(late.status.value, "|", late.error)
    """),
    md("""
    ## When a task ignores the cancel

    Code that never calls a helper cannot notice a cancel request. `cancel(force=True)`
    waits `cancel_grace_s` seconds (normally 2; 0.5 here) and then raises `TaskCancelled`
    inside the task's thread. That stops Python code, but not a call blocked inside C
    (a `socket.recv()` or `lock.acquire()` without timeout): use the helpers, or timeouts,
    in code that must be stoppable.
    """),
    code("""
    def busy_loop():
        \"\"\"Compute forever, never asking whether to stop.\"\"\"
        qmagic.report_progress(None, None, "computing")
        n = 0
        while True:
            n += 1


    w.cancel_grace_s = 0.5
    stubborn = %function_execute -b busy_loop
    computing = threading.Event()
    with stubborn.subscribe(lambda **event: "progress" in event and computing.set()):
        computing.wait(timeout=10)

    stubborn.cancel()
    stubborn.wait(timeout=1)  # True if it stopped within 1 s
    """),
    md("""
    The polite cancel did nothing. Force it; qmagic says so in the kernel's log when it
    has to raise inside a task:
    """),
    code("""
    stubborn.cancel(force=True)
    stubborn.wait(timeout=10)
    stubborn
    """),
    md("""
    Back to normal settings, and a last look at the tasks of this tutorial:
    """),
    code("""
    w.max_background_tasks = 32
    w.cancel_grace_s = 2.0
    %tasks
    """),
    md("""
    Next: [3 scripts and permissions](03-scripts-and-permissions.ipynb) — loading code into
    the kernel as a task, and deciding who may run what.
    """),
]

# =========================================================================================
# 03 scripts and permissions
# =========================================================================================
SCRIPTS = [
    md("""
    # 3. Scripts and permissions

    Beamline code usually lives in script files. qmagic loads a script into the kernel's
    namespace as a tracked task (`%script_upload`, also available to remote clients), and
    if the script fails, **nothing changes**: every name it added, changed or removed is
    put back. User-group **permissions**, in bluesky-queueserver's format, decide which
    functions each group may run.
    """),
    md(SETUP_TEXT),
    code(SETUP),
    md("""
    ## Uploading a script

    `%%script_upload` runs the body of the cell as a script; `--name` labels it in task
    tables, panels, tracebacks and the experiment log. Its task's `namespace_changes`
    lists what the script added, changed and removed; the new functions are ready to run
    as tasks.
    """),
    code("""
    %%script_upload --name peak_tools
    import math


    def gaussian(x, center=0.0, width=1.0):
        \"\"\"Height of a unit Gaussian at x.\"\"\"
        return math.exp(-(((x - center) / width) ** 2) / 2)


    def scan_peak(start, stop, points=5):
        \"\"\"Sample the peak between start and stop.\"\"\"
        step = (stop - start) / (points - 1)
        return [round(gaussian(start + i * step), 3) for i in range(points)]


    def scan_coarse(start, stop):
        \"\"\"A quick look: three points.\"\"\"
        return scan_peak(start, stop, points=3)
    """),
    code("""
    _.namespace_changes  # _ is the value of the cell above: the script's task
    """),
    code("""
    peak = %function_execute scan_peak -1 1
    peak.result()
    """),
    md("""
    ## A failing script changes nothing

    This script replaces `scan_peak`, adds `scan_wide`, and then fails on its last line.
    The cell stops with the traceback...
    """),
    code("""
    %%script_upload --name wide_scans
    def scan_peak(start, stop, points=9):
        return [0.0] * points


    def scan_wide():
        return scan_peak(-5, 5)


    calibration = load_calibration("detector.yaml")
    """, raises=True),
    md("""
    ...and the namespace is exactly as before: no `scan_wide`, and the old `scan_peak`.
    """),
    code("""
    print("scan_wide defined?", "scan_wide" in globals())
    scan_peak(-1, 1)
    """),
    md("""
    The failed upload is a task like any other; its traceback points into the script:
    """),
    code("""
    %task_result
    """),
    md("""
    ## Scripts from files

    `%script_upload PATH` runs a file; the task is named after the file. (This tutorial
    writes one into its scratch folder; yours would be in your beamline's code folder.)
    """),
    code("""
    import pathlib

    script = pathlib.Path(w.state_dir) / "alignment.py"
    script.write_text('''
    def align(motor="theta"):
        \"\"\"Align one motor.\"\"\"
        return f"{motor} aligned"
    ''')

    uploaded = %script_upload {script}
    uploaded.namespace_changes
    """),
    md("""
    From Python the same is `w.run_script(text, name=...)`, which returns the script's
    task (remote clients send bluesky-queueserver's `script_upload`, tutorial 5):
    """),
    code("""
    parking = w.run_script("def park():\\n    return 'all motors parked'\\n", name="parking")
    print(parking.call_text(), "|", parking.status.value, "| added:", parking.namespace_changes["added"])
    parked = %function_execute park
    parked.result()
    """),
    md("""
    `w.functions_available()` lists the functions tasks can run, with their signature and
    the first line of their docstring (remote clients see this list too):
    """),
    code("""
    {name: info["signature"] for name, info in w.functions_available().items()}
    """),
    md("""
    ## Permissions

    Every request comes with a **user** and a **user group** (the magics use
    `QMagic.default_user` / `default_user_group` unless you pass `--user` / `--group`).
    Without rules of your own, qmagic's default rules apply: the groups `root` and
    `primary` may run every function whose name does not start with `_`. Rules use the
    format of bluesky-queueserver's `user_group_permissions.yaml`: a function must pass the
    `root` group's lists *and* the caller's group's lists; `null` in `allowed_functions`
    means "everything"; names starting with `:` are regular expressions.

    In the lab you would point `c.QMagic.user_group_permissions_file` at the facility's
    file in your IPython profile. Here we write one and set it on the live worker:
    """),
    code("""
    rules = pathlib.Path(w.state_dir) / "permissions.yaml"
    rules.write_text('''
    user_groups:
      root:
        allowed_functions: [null]
        forbidden_functions: [":^_"]      # nobody runs private helpers
      primary:
        allowed_functions: [null]         # staff: everything else
      students:
        allowed_functions: [":^scan_", "gaussian", "align"]
        forbidden_functions: ["scan_peak"]
    ''')
    w.user_group_permissions_file = str(rules)
    sorted(w.functions_available("students"))
    """),
    md("""
    A student may align a motor...
    """),
    code("""
    %function_execute --user Bob --group students align "chi"
    """),
    md("""
    ...but a forbidden function is refused before it starts, with bluesky-queueserver's
    message (a refused request also stops the cell, so *Run All* does not run on):
    """),
    code("""
    %function_execute --user Bob --group students scan_peak -1 1
    """, raises=True),
    md("""
    The same rules apply to the Python API (`w.submit(..., user_group="students")`) and to
    remote clients. Remove the rules again: qmagic's default rules apply, which know the
    groups `root` and `primary` only — so the `students` group is refused as unknown, and
    `primary` runs every function again:
    """),
    code("""
    w.user_group_permissions_file = None
    print("primary: ", sorted(w.functions_available("primary")))
    try:
        w.functions_available("students")
    except qmagic.RequestRefused as exc:
        print("students:", exc)
    """),
    md("""
    Next: [4 locking for a hutch entry](04-locking-for-hutch-entry.ipynb).
    """),
]

# =========================================================================================
# 04 locking
# =========================================================================================
LOCKING = [
    md("""
    # 4. Locking the environment for a hutch entry

    Before you walk into the hutch, make sure nobody moves a motor: **lock** the
    environment with a key. While it is locked, only requests that carry the key may start
    tasks — from any notebook, Python code, panel or remote client. The lock is kept in a
    file, so it survives kernel restarts and holds for every kernel that shares the
    environment. The key itself is never shown, and stored only as a salted hash: others
    see who locked, when, and why.
    """),
    md("""
    **Setup.** As in the other tutorials: load qmagic (automatic in this environment's
    kernels), and keep the lock in a scratch folder. The facility's **emergency key**
    unlocks any lock whose key got lost; it is normally set for every kernel through the
    environment variable `QMAGIC_EMERGENCY_LOCK_KEY` or `c.QMagic.emergency_lock_key`.
    Here it is set on the live worker.
    """),
    code(SETUP + '\nw.emergency_lock_key = "facility-emergency-key"  # normally set by the facility'),
    code("""
    def move_sample(position):
        \"\"\"Move the sample stage to `position` (mm).\"\"\"
        print(f"sample stage at {position} mm")
        return position
    """),
    md("""
    ## Lock

    `%lock` locks the environment. (`--queue` locks bluesky-queueserver's *queue* instead:
    the permissions and the task history; `--all` locks both.) `--note` tells the others
    why, `--user` who you are (default: `QMagic.default_user`).

    The key: `--key KEY`, as here, or `--prompt-key` to type it into a hidden prompt — a key
    written on the line stays in IPython's history, like everything you type. With neither,
    `%lock` uses the key this kernel locked with last, else your personal default key
    (`qmagic.get_default_lock_key()`, kept in your home folder and shared by your
    sessions, as in bluesky-queueserver-api).
    """),
    code("""
    %lock --key hutch-entry-42 --user Alice --note "In the hutch changing samples, back at 15:00"
    """),
    md("""
    `%lock_info` shows the lock. In JupyterLab it is a live **lock panel**: it follows
    every change, made anywhere (magics, panels, remote clients, other kernels), at
    once; it says whether this kernel holds the key and whether an emergency key
    is set; and it has a *Key* field (left empty: this kernel's key), a *Note* field,
    *environment* and *queue* boxes, and *Lock* and *Unlock* buttons.

    The lock changes further down this notebook. The panel then keeps what it showed when
    its cell ran, under *When this cell ran (time)*, above the live state under
    *Now (live) — changed since this cell ran*. The text below the cell (what a terminal
    or a notebook viewer shows) is the lock when the cell ran.
    """),
    code("""
    %lock_info
    """),
    md("""
    This kernel remembers the key it locked with, so your own magics and Python calls keep
    working:
    """),
    code("""
    %function_execute move_sample 10
    """),
    md("""
    ## Everybody else is refused

    A request with a wrong key (or none, from anywhere else) is refused. The cell stops
    with one line: who locked, since when, the note, and what to do. (The cell carries the
    `raises-exception` tag, so that *Run All* carries on.)
    """),
    code("""
    %function_execute --lock-key wrong-key move_sample 20
    """, raises=True),
    md("""
    The lock lives in the state folder, so another kernel that uses the same folder sees
    it at its very next request. A second worker in this notebook stands in for a
    colleague's kernel (configured with the facility's emergency key, like every kernel).
    In Python a refusal is a `qmagic.LockRefused` error; its text is bluesky-queueserver's
    message, the one remote clients get:
    """),
    code("""
    colleague = qmagic.Worker({"move_sample": move_sample}, state_dir=w.state_dir,
                              emergency_lock_key="facility-emergency-key")
    try:
        colleague.submit("move_sample", (30,))
    except qmagic.LockRefused as exc:
        print(exc)
    """),
    md("""
    ## Unlock

    Back from the hutch, `%unlock` (this kernel holds the key). Elsewhere:
    `%unlock --key KEY` or `%unlock --prompt-key`.
    """),
    code("""
    %unlock
    """),
    code("""
    colleague.submit("move_sample", (30,)).result(timeout=10)
    """),
    md("""
    ## When the key is lost: the emergency key

    Your colleague Bob locks the environment from his kernel for an overnight scan, and
    goes home with the key. This kernel does not hold his key, so a plain `%unlock` is
    refused, saying what to do:
    """),
    code("""
    colleague.lock("bobs-key", environment=True, note="Overnight scan, do not touch", user="Bob")
    %unlock
    """, raises=True),
    md("""
    The emergency key opens his lock (it only unlocks; it never locks):
    """),
    code("""
    %unlock --key facility-emergency-key
    """),
    md("""
    ## No emergency key configured: `qmagic-clear-lock`

    Anybody with a terminal on the machine can remove the lock of an environment without
    any key; the tool says whose lock it was:

    ```
    qmagic-clear-lock                        # the default environment and state folder
    qmagic-clear-lock --environment beamline-1 --state-dir /path/to/state
    ```

    Bob locks once more, and this time we clear his lock with the tool. The notebook runs
    it as `python -m qmagic.store.clear_lock` (the same program) on this tutorial's scratch
    folder:
    """),
    code("""
    import subprocess
    import sys

    colleague.lock("bobs-key", environment=True, note="Overnight scan, do not touch", user="Bob")
    tool = subprocess.run(
        [sys.executable, "-m", "qmagic.store.clear_lock", "--state-dir", w.state_dir],
        capture_output=True, text=True, timeout=60,
    )
    print(tool.stdout + tool.stderr)
    """),
    md("""
    Running kernels see the change at once; no restart is needed:
    """),
    code("""
    %lock_info
    """),
    code("""
    %function_execute move_sample 0
    """),
    code("""
    colleague.close()
    """),
    md("""
    Next: [5 remote control](05-remote-control.ipynb) — driving this kernel from another
    program with the bluesky-queueserver client.
    """),
]

# =========================================================================================
# 05 remote control
# =========================================================================================
REMOTE = [
    md("""
    # 5. Remote control with the bluesky-queueserver client

    Automated agents and remote operators can drive this kernel with the client they
    already use: `REManagerAPI` from
    [bluesky-queueserver-api](https://github.com/bluesky/bluesky-queueserver-api), talking
    0MQ directly to the kernel. The rules are the same as for your cells: locks,
    permissions, and the foreground rule.

    This tutorial starts a second Python process that plays the remote client.
    """),
    md(SETUP_TEXT),
    code(SETUP),
    code("""
    def measure(sample, exposure=0.2):
        \"\"\"Expose one sample and return its counts.\"\"\"
        qmagic.report_progress(None, None, f"exposing {sample}")
        qmagic.cancellable_sleep(exposure)
        return {"sample": sample, "counts": 1000 * len(sample)}
    """),
    md("""
    ## Open the control channel

    `%control_channel start` serves remote clients on `tcp://127.0.0.1:60615`: loopback,
    reachable from this machine only. (Another machine needs an explicit address and
    CurveZMQ encryption; see the README.) Here the `*` lets the system pick a free port,
    so that the tutorial never clashes with a channel that is already running;
    `w.zmq_control_address` holds the address it got.
    """),
    code("""
    %control_channel start tcp://127.0.0.1:*
    """),
    md("""
    ## The remote client

    This is an ordinary client program, written to a string so that the notebook can run
    it as a second process. It asks for the status, starts `measure` in the background,
    waits for it and reads the result, then asks for a foreground task.
    """),
    code("""
    CLIENT = '''
    import sys
    from bluesky_queueserver_api import BFunc
    from bluesky_queueserver_api.zmq import REManagerAPI

    RM = REManagerAPI(zmq_control_addr=sys.argv[1])
    status = RM.status()
    print("manager state:", status["manager_state"], "| kernel:", status["ip_kernel_state"])

    reply = RM.function_execute(BFunc("measure", "silicon", exposure=0.5), run_in_background=True)
    print("background task accepted:", reply["success"])
    RM.wait_for_completed_task(reply["task_uid"], timeout=30)
    result = RM.task_result(reply["task_uid"])["result"]
    print("success:", result["success"], "| return value:", result["return_value"])

    try:
        RM.function_execute(BFunc("measure", "quartz"))  # a foreground task
    except RM.RequestFailedError as exc:
        print("foreground task refused:", exc)
    RM.close()
    '''
    """),
    md("""
    Run it. While this cell runs, the kernel is busy — the client sees
    `ip_kernel_state: busy` — and yet it answers at once: the channel has a thread of its
    own. **Background** requests are accepted at any time; a **foreground** request is
    refused while a cell runs, because the foreground belongs to the notebook. (When the
    notebook is idle, a remote foreground task runs on the kernel's main thread like a
    cell, and your next cell waits for it.)
    """),
    code("""
    import subprocess
    import sys

    client = subprocess.run(
        [sys.executable, "-c", CLIENT, w.zmq_control_address],
        capture_output=True, text=True, timeout=60,
    )
    print(client.stdout + client.stderr)
    """),
    md("""
    The remote task is a task like yours: it is in the panel (with the client's user
    name) and in the experiment log.
    """),
    code("""
    %tasks
    """),
    code("""
    %task_result
    """),
    md("""
    `%control_channel status` shows the address and the request counters; the refused
    request is the last error.
    """),
    code("""
    %control_channel status
    """),
    md("""
    ## Close the channel
    """),
    code("""
    %control_channel stop
    """),
    md("""
    To open the channel in every kernel, set `c.QMagic.zmq_control_address =
    "tcp://127.0.0.1:60615"` in your IPython profile (`ipython_kernel_config.py`).

    Next: [6 the experiment log](06-experiment-log.ipynb).
    """),
]

# =========================================================================================
# 06 the experiment log
# =========================================================================================
EXPERIMENT_LOG = [
    md("""
    # 6. The experiment log

    Every task — started by a magic, by Python code, by a remote client or from a panel —
    is recorded in the environment's **experiment log**: who ran which function with which
    arguments, from which notebook cell, when, and how it ended (result, or error and
    traceback). The log is a database in the state folder,
    `<state folder>/<environment>.journal.sqlite3` (SQLite), shared by every kernel of the
    environment. It outlives the kernels, also those that crash. Finished tasks leave it
    after 30 days, or when it grows beyond 200 MB (`QMagic.journal_max_age_s`,
    `QMagic.journal_max_bytes`).
    """),
    md(SETUP_TEXT),
    code(SETUP),
    md("""
    ## A few tasks to log
    """),
    code("""
    import time


    def measure(sample, exposure=0.2):
        \"\"\"Expose one sample and return its counts.\"\"\"
        time.sleep(exposure)  # the detector would be busy here
        return {"sample": sample, "counts": 1000 * len(sample)}


    def calibrate(offset):
        \"\"\"Return the gain for a detector offset.\"\"\"
        return 100 / offset


    %function_execute measure "silicon"
    """),
    code("""
    quartz = %function_execute -b --user Alice measure "quartz"
    bad = w.submit("calibrate", (0,))
    quartz.wait(timeout=30), bad.wait(timeout=30)
    """),
    md("""
    ## `%tasks --history`

    `%tasks` shows the tasks the kernel keeps in memory (finished ones for 10 minutes).
    `%tasks --history N` reads the newest N tasks of the experiment log (default 20), from
    this kernel and from earlier ones. Unlike the task tables above, it prints clock
    times: when each task was submitted, how long it ran, and its full uid. The *cell* column
    says which notebook cell started the task: the notebook's name and the cell's number
    (`06-experiment-log.ipynb [3]`); an error follows its task's row. The `qmagic-history` command prints the
    same table (below).
    """),
    code("""
    %tasks --history
    """),
    md("""
    ## From Python: `qmagic.history()`

    `qmagic.history()` returns the records as dicts, newest first. It filters by `status`,
    `user`, `name` (exact or a pattern like `"scan_*"`), `notebook` (a path, a file name or
    a pattern), `since` / `until` (a datetime, an ISO date, or `"-30m"`, `"-2h"`, `"-7d"`),
    `uid` and `limit`.
    """),
    code("""
    for record in qmagic.history():
        print(f"{record['status']:<10} {record['user']:<12} {record['name']} {record['args']}")
    """),
    code("""
    [(record["name"], record["error_type"], record["error"]) for record in qmagic.history(status="failed", since="-1h")]
    """),
    code("""
    qmagic.history(name="meas*", user="Alice")[0]["result"]
    """),
    md("""
    Each record also says where it came from (`provenance`): the notebook, the cell's id
    and number, and a short hash of the cell's code — so that after a beamtime you can
    tell which cell launched which scan:
    """),
    code("""
    [(record["name"], record["provenance"]["execution_count"])
     for record in qmagic.history(notebook="06-experiment-log.ipynb")]
    """),
    md("""
    `qmagic.history_dataframe()` gives the same as a pandas DataFrame (with times as
    datetimes, a `duration_s` column and the provenance in columns of its own), ready for
    plots and reports:
    """),
    code("""
    df = qmagic.history_dataframe()
    df[["name", "args", "user", "origin", "background", "status", "cell"]]
    """),
    md("""
    ## When a kernel dies during a task

    A task that was running when its kernel died (a power cut, a crash in a driver, the
    out-of-memory killer) cannot record its end. The log notices that the kernel is gone
    and reports the task as **failed**, with the reason. This second Python process plays
    Carol's kernel, which dies at the third point of a scan:
    """),
    code('''
    import subprocess
    import sys

    CRASHING_KERNEL = """
    import os, sys
    import qmagic

    def long_scan(points):
        for i in range(1, points + 1):
            qmagic.report_progress(i, points, f"point {i} of {points}")
            if i == 3:
                os._exit(1)  # the process dies here, without any clean-up

    w = qmagic.Worker({"long_scan": long_scan}, state_dir=sys.argv[1], default_user="Carol")
    w.submit("long_scan", (10,)).wait(timeout=30)
    """
    crash = subprocess.run([sys.executable, "-c", CRASHING_KERNEL, w.state_dir], timeout=60)
    print("exit code:", crash.returncode)
    '''),
    md("""
    ## From a terminal: `qmagic-history`

    Any program can read the log while kernels write it — no Jupyter needed. The
    `qmagic-history` command prints it (oldest first) and settles what dead kernels left
    behind:

    ```
    qmagic-history --since -2h
    qmagic-history --status failed --user Carol
    qmagic-history --notebook 06-experiment-log.ipynb --csv > shift.csv
    qmagic-history --environment beamline-1 --json
    ```

    The notebook runs it as `python -m qmagic.store.history` (the same program) on this
    tutorial's scratch folder. Carol's scan is there, failed; its duration reads `≥`: the
    scan ran at least that long, up to the last thing her kernel wrote before it died:
    """),
    code("""
    def qmagic_history(*options):
        \"\"\"Run `qmagic-history OPTIONS` on this tutorial's state folder; return its output.\"\"\"
        done = subprocess.run(
            [sys.executable, "-m", "qmagic.store.history", "--state-dir", w.state_dir, *options],
            capture_output=True, text=True, timeout=60,
        )
        return done.stdout + done.stderr


    print(qmagic_history("--user", "Carol"))
    """),
    md("""
    `--csv` writes one row per task for spreadsheets and pandas: times in ISO format, the
    notebook, cell id, cell number and cell hash, the host and process that ran the task.
    The tasks this notebook started:
    """),
    code("""
    import io

    import pandas as pd

    shift = pd.read_csv(io.StringIO(qmagic_history("--notebook", "06-experiment-log.ipynb", "--csv")))
    shift[["call", "status", "user", "notebook", "execution_count"]]
    """),
    md("""
    ## Tasks that are no longer in memory

    `%task_result` and `%task_status` look a uid up in the log when this kernel does not
    know it (a task of another kernel, or one that left memory). Carol's scan:
    """),
    code("""
    carol = qmagic.history(user="Carol")[0]
    %task_result {carol["uid"]}
    """),
    md("""
    ## A picture of the shift: `qmagic.timeline()`

    `qmagic.timeline()` draws the tasks of the log on a time axis: one lane per function
    (`lanes="user"`: one per user), a bar from each task's start to its end coloured by how
    it ended, and a mark where the progress of a task that did not complete stopped. It
    takes the filters of `qmagic.history()` (`since="-8h"`, `notebook=...`, ...) and needs
    matplotlib.
    """),
    code("""
    qmagic.timeline(since="-1h", title="This tutorial's tasks")
    """),
    md("""
    ## Is the log healthy?

    When the disk is full, the folder read-only, or the database locked by another
    program, tasks go on at full speed: their records wait (in a spool file next to the
    database, or in memory), are stored when writing works again, and qmagic warns once in
    the kernel's log. `w.log_health()` says how things stand: `ok`, the records `pending`
    (not in the database yet — normally none a fraction of a second after a task
    changes), those `dropped` (lost), and the `last_error`. `%tasks --history` and
    `%control_channel status` add a line when records are pending or were lost.
    """),
    code("""
    health = w.log_health()
    print("ok:", health["ok"], "| dropped:", health["dropped"], "| last error:", health["last_error"])
    """),
    md("""
    Next: [7 async tasks and ophyd-async](07-async-tasks.ipynb) — `async def` functions as
    tasks, on the event loop where ophyd-async devices live. The repository's README lists
    every magic, setting and Python function; every magic also has its help: `%tasks?`.
    """),
]

# =========================================================================================
# 07 async tasks and ophyd-async: the cells are in _async_tutorial.py (kept apart for length)
# =========================================================================================
def _load(name: str):
    """The module ``notebooks/<name>.py`` (loaded by path: no sys.path changes)."""
    spec = importlib.util.spec_from_file_location(f"_qmagic_notebooks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_scratch():
    """``notebooks/_scratch.py``: folders removed when this process ends, however it ends."""
    return _load("_scratch")


def cells_from_pairs(pairs: list[tuple[str, str]]) -> list:
    """Notebook cells from ``(kind, source)`` pairs (see ``_async_tutorial.py``)."""
    cells = []
    for kind, source in pairs:
        if kind == "setup":
            cells += [md(SETUP_TEXT), code(SETUP)]
        elif kind == "markdown":
            cells.append(md(source))
        elif kind in ("code", "code-raises"):
            cells.append(code(source, raises=kind == "code-raises"))
        else:
            raise ValueError(f"unknown cell kind {kind!r}")
    return cells


_ASYNC = _load("_async_tutorial")
ASYNC_TASKS = cells_from_pairs(_ASYNC.CELLS)

NOTEBOOKS: dict[str, list] = {
    "01-getting-started.ipynb": GETTING_STARTED,
    "02-progress-cancel-output.ipynb": PROGRESS,
    "03-scripts-and-permissions.ipynb": SCRIPTS,
    "04-locking-for-hutch-entry.ipynb": LOCKING,
    "05-remote-control.ipynb": REMOTE,
    "06-experiment-log.ipynb": EXPERIMENT_LOG,
    _ASYNC.NOTEBOOK_NAME: ASYNC_TASKS,
}

# =========================================================================================
# writing and running
# =========================================================================================
def new_notebook(name: str, cells: list) -> nbformat.NotebookNode:
    """A notebook with stable cell ids (regenerating it gives small diffs)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    stem = name.split("-", 1)[0]
    for i, cell in enumerate(cells, 1):
        cell = nbformat.from_dict(dict(cell))
        cell["id"] = f"nb{stem}-{i:02d}"
        nb.cells.append(cell)
    return nb


def session_name(name: str) -> str:
    """The notebook's path as JupyterLab started from the repository root tells its kernel
    (``JPY_SESSION_NAME``; qmagic records it as the tasks' notebook)."""
    return f"{HERE.name}/{name}"


def kernel_env(name: str, run_folder: str) -> dict[str, str | None]:
    """Environment changes for the kernel of tutorial ``name`` (None: unset), the same for
    this script and for nbval (``conftest.py``), so both produce the same outputs:

    - the repository first on ``PYTHONPATH`` (the checkout's qmagic, installed or not);
    - ``JPY_SESSION_NAME`` as JupyterLab sets it (nbval does not);
    - ``QMAGIC_STATE_DIR`` and ``IPYTHONDIR`` inside ``run_folder``, a temporary folder of
      the run: the default state folder (opened by ``get_worker()`` before a tutorial
      switches to its scratch folder) and IPython's history database leave nothing behind;
    - no emergency lock key from the caller's environment.
    """
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {
        "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)),
        "JPY_SESSION_NAME": session_name(name),
        "QMAGIC_STATE_DIR": os.path.join(run_folder, "state"),
        "IPYTHONDIR": os.path.join(run_folder, "ipython"),
        "QMAGIC_EMERGENCY_LOCK_KEY": None,
        "QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER": None,
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


@contextlib.contextmanager
def environment(changes: dict[str, str | None]) -> Iterator[None]:
    """``os.environ`` with ``changes`` applied (None: unset), restored afterwards."""
    old = {key: os.environ.get(key) for key in changes}
    try:
        for key, value in changes.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def execute(nb: nbformat.NotebookNode) -> float:
    """Run ``nb`` in place in a fresh kernel started in ``notebooks/``; seconds taken."""
    from nbclient import NotebookClient

    started = time.monotonic()
    NotebookClient(
        nb,
        timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(HERE)}},
        record_timing=False,
        # No saved widget state: a live panel's final state would contradict the lesson of
        # the moment it was displayed.  Without a kernel, JupyterLab (and GitHub) then show
        # the panel's deterministic text/plain, i.e. the state at display time.
        store_widget_state=False,
    ).execute()
    nb.metadata.pop("widgets", None)
    return time.monotonic() - started


def main(argv: list[str]) -> int:
    notebooks = dict(NOTEBOOKS)
    wanted = [n for n in notebooks if not argv or any(n.startswith(a) for a in argv)]
    if not wanted:
        print(f"No notebook matches {argv}; names: {', '.join(notebooks)}", file=sys.stderr)
        return 2
    # The kernels' run folder: removed at the end, or when this process ends however it
    # ends (a scratch folder: _scratch.py), so building leaves nothing behind.
    scratch = load_scratch()
    run_folder = scratch.scratch_folder(prefix="qmagic-build-")
    try:
        for name in wanted:
            nb = new_notebook(name, notebooks[name])
            with environment(kernel_env(name, run_folder)):
                seconds = execute(nb)
            nbformat.validate(nb)
            nbformat.write(nb, HERE / name)
            print(f"{name}: executed in {seconds:.1f} s")
    finally:
        scratch.remove_scratch_folder(run_folder)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
