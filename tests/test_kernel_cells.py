"""What a scientist sees in a cell (issue 17) and tasks as futures in a cell (issue 12),
against a real kernel.

Every error a user causes shows the user's own frames (``Cell In[n]``) and one clear line:
no qmagic frame, temporary cell file or threading frame, neither in the cell's output nor in
a stored traceback (``task.traceback``, ``%task_result``).  Refusals are one UsageError
line; texts show short uids only; ``%magic?`` has no reStructuredText markup; scripts show
their names.  ``await task``, ``concurrent.futures.wait`` and ``asyncio.wrap_future`` work
on tasks in a cell.
"""

from __future__ import annotations

import pytest

from kernel_helpers import assert_no_internals, error_text, one_line, plain, start_kernel

pytestmark = pytest.mark.timeout(120)

MORE = r'''
import asyncio
import concurrent.futures as cf

def patient():
    print("patient started", flush=True)
    qmagic.cancellable_sleep(60)

def stubborn():
    """Ignores cancel requests (only a forced cancel stops it)."""
    print("stubborn started", flush=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.005)

async def co_fail(x):
    await asyncio.sleep(0.001)
    raise ValueError(f"async {x}")

def user_frames(text):
    return [line.strip() for line in text.splitlines() if line.strip().startswith('File "Cell In[')]
'''


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    session = start_kernel(tmp_path_factory.mktemp("cells"))
    session.execute(MORE, check=True)
    yield session
    session.shutdown()


def _last_traceback(k) -> str:
    text = k.eval("w.last_task.traceback")
    assert_no_internals(text)
    return text


# =========================================================================================
# errors: the user's frames and one line
# =========================================================================================
def test_a_failing_function_shows_the_users_frames_and_one_error_line(ck):
    result = ck.execute("%function_execute outer 3")
    lines = error_text(result)
    assert_no_internals("\n".join(lines))
    assert lines[-1] == "ValueError: bad value 3"
    frames = [line for line in lines if line.startswith("Cell In[")]
    assert len(frames) == 2 and "in outer(x)" in frames[0] and "in boom(x)" in frames[1]
    stored = _last_traceback(ck)
    assert stored.strip().splitlines()[-1] == "ValueError: bad value 3"
    assert len(ck.eval("user_frames(w.last_task.traceback)")) == 2
    shown = ck.execute("%task_result", check=True).stdout
    assert_no_internals(shown)
    assert shown.startswith("outer(3)  qmagic user  foreground  failed\ntraceback:\n")
    assert 'File "Cell In[' in shown and "ValueError: bad value 3" in shown


def test_background_failures_keep_the_users_frames_only(ck):
    result = ck.execute("%function_execute -b --wait outer 5")
    lines = error_text(result)
    assert_no_internals("\n".join(lines))
    assert lines[-1] == "ValueError: bad value 5"
    assert sum(line.startswith("Cell In[") for line in lines) == 2

    ck.execute("t = %function_execute -b outer 6\nt.wait(10)", check=True)
    stored = ck.eval("t.traceback")
    assert_no_internals(stored)  # no threading.py frames of the worker thread
    assert len(ck.eval("user_frames(t.traceback)")) == 2
    assert_no_internals(ck.execute("%task_result", check=True).stdout)
    result = ck.execute("t.result()")  # the future raises the function's own exception
    lines = error_text(result)
    assert_no_internals("\n".join(lines))
    assert lines[-1] == "ValueError: bad value 6"


def test_a_failing_coroutine_task_shows_the_users_frames(ck):
    result = ck.execute("%function_execute co_fail 7")
    lines = error_text(result)
    assert_no_internals("\n".join(lines))
    assert lines[-1] == "ValueError: async 7"
    assert any(line.startswith("Cell In[") and "co_fail" in line for line in lines)
    assert ck.eval("user_frames(w.last_task.traceback)")
    _last_traceback(ck)


def test_unknown_names_and_wrong_arguments_are_one_line(ck):
    assert one_line(ck.execute("%function_execute scna 5")) == (
        "NameError: Function 'scna' is not found in the worker namespace"
    )
    _last_traceback(ck)
    assert one_line(ck.execute("%function_execute ad 5")) == (
        "NameError: Function 'ad' is not found in the worker namespace (did you mean 'add'?)"
    )
    _last_traceback(ck)
    assert one_line(ck.execute("%function_execute add")) == (
        "TypeError: add() missing 1 required positional argument: 'a'"
    )
    _last_traceback(ck)
    assert one_line(ck.execute("%function_execute add 1 2 3")).startswith(
        "TypeError: add() takes from 1 to 2 positional arguments but 3 were given"
    )


def test_options_after_the_name_are_one_line_saying_where_they_go(ck):
    line = one_line(ck.execute("%function_execute add 3 -b"))
    assert line.startswith("UsageError: Options go before the function name: %function_execute -b add")
    line = one_line(ck.execute("%function_execute scan_x 3 --timeout 5"))
    assert "Options go before the function name" in line
    assert "Cannot evaluate" not in line


def test_refused_requests_are_one_usage_error_line(ck):
    ck.execute(
        "w.user_group_permissions = {'user_groups': {'root': {'allowed_functions': [None]},"
        " 'primary': {'allowed_functions': ['add']}}}",
        check=True,
    )
    try:
        assert one_line(ck.execute("%function_execute outer 1")) == (
            "UsageError: Function 'outer' is not allowed for users from 'primary' group."
        )
    finally:
        ck.execute("w.user_group_permissions = None", check=True)
    ck.execute("%lock --key cells-key --note 'Aligning the laser'", check=True)
    try:
        ck.execute("w._remembered_key = None", check=True)  # as another kernel
        line = one_line(ck.execute("%function_execute add 1"))
        assert line.startswith("UsageError: ") and "locked by" in line
        assert "cells-key" not in line
        line = one_line(ck.execute("%function_execute --lock-key wrong add 1"))
        assert line.startswith("UsageError: ") and "cells-key" not in line
    finally:
        ck.execute("%unlock --key cells-key", check=True)
    assert ck.execute("%function_execute add 1", check=True).result.startswith("add(1)")


# =========================================================================================
# cancelling, and texts with short uids
# =========================================================================================
def test_task_cancel_without_uid_cancels_the_latest_task(ck):
    started = ck.execute("p = %function_execute -b patient", check=True)
    ck.wait_for_output(started.msg_id, "patient started")
    uid = ck.eval("p.uid")
    result = ck.execute("%task_cancel", check=True)
    assert result.stdout == "Cancel requested: patient()  qmagic user  background  running\n"
    assert ck.eval("p.wait(10), p.status.value, p.error") == (
        True, "cancelled", "Task was cancelled with %task_cancel")
    assert uid[:8] not in result.stdout
    finished = ck.execute("%task_cancel")
    line = one_line(finished)
    assert line == ("UsageError: patient() has already finished (cancelled); there is nothing to "
                    "cancel.")
    stored = ck.execute("%task_result", check=True).stdout
    assert_no_internals(stored)
    assert uid not in stored and uid[:8] not in stored


def test_forced_cancel_names_the_task_with_a_short_uid(ck):
    started = ck.execute("s = %function_execute -b stubborn\nw.cancel_grace_s = 0.1", check=True)
    ck.wait_for_output(started.msg_id, "stubborn started")
    uid = ck.eval("s.uid")
    cancel = ck.execute("%task_cancel --force", check=True)
    assert cancel.stdout == (
        "Cancel requested (forced if it does not stop): stubborn()  qmagic user  background  running\n"
    )
    warning = ck.wait_for_output(cancel.msg_id, "stopping it by force", name="stderr")
    assert warning.strip() == (
        f"qmagic: stubborn() (task {uid[:8]}) did not stop within 0.1 s; stopping it by force."
    )
    assert uid not in warning
    assert ck.eval("s.wait(10), s.status.value") == (True, "cancelled")
    ck.execute("w.cancel_grace_s = 2.0", check=True)
    _last_traceback(ck)


# =========================================================================================
# help and names
# =========================================================================================
@pytest.mark.parametrize("magic", ["function_execute", "script_upload", "task_cancel", "tasks",
                                   "lock", "unlock", "control_channel"])
def test_magic_help_has_no_stray_markup(ck, magic):
    result = ck.execute(f"%{magic}?", check=True)
    text = plain(result.reply["payload"][0]["data"]["text/plain"])
    assert "::" not in text
    assert f"%{magic} " in text or f"%{magic}\n" in text


def test_scripts_show_their_names(ck, tmp_path):
    result = ck.execute("%%script_upload --name calibration\ncalibration_done = True\n", check=True)
    assert result.result == "calibration (script)  qmagic user  foreground  completed"
    assert ck.eval("w.last_task.name") == "calibration"
    table = ck.execute("%tasks", check=True)
    shown = table.stdout + "".join(d.get("text/plain", "") for d in table.displayed)
    assert "calibration" in shown
    failed = ck.execute("%%script_upload --name calibration\nx_cal = 1\nraise RuntimeError('half way')\n")
    lines = error_text(failed)
    assert lines and lines[-1] == "RuntimeError: half way", (failed.status, failed.stdout, failed.stderr, failed.reply)
    assert_no_internals("\n".join(lines))
    assert 'File "<script calibration>", line 2' in _last_traceback(ck)
    script = tmp_path / "align beam.py"
    script.write_text("aligned = 42\n")
    done = ck.execute(f"%script_upload '{script}'", check=True)
    assert done.result == "align_beam.py (script)  qmagic user  foreground  completed"


# =========================================================================================
# tasks are futures (issue 12)
# =========================================================================================
def test_await_a_task_in_a_cell(ck):
    result = ck.execute("t = w.submit(add, (41,))\nr = await t\nprint(r, t.status.value)", check=True)
    assert result.stdout == "42 completed\n"
    result = ck.execute("r = await w.submit('add', (1, 2), background=False)\nprint(r)", check=True)
    assert result.stdout == "3\n"
    failed = ck.execute("await w.submit(outer, (8,))")
    lines = error_text(failed)
    assert lines[-1] == "ValueError: bad value 8"
    assert_no_internals("\n".join(lines))


def test_concurrent_futures_and_asyncio_accept_tasks(ck):
    result = ck.execute(
        "ts = [w.submit(add, (i,)) for i in range(8)]\n"
        "done, not_done = cf.wait(ts, timeout=10)\n"
        "print(len(done), len(not_done), sorted(t.result() for t in done))\n"
        "print(sorted(f.result() for f in cf.as_completed(ts, timeout=10)))\n"
        "slow = w.submit(qmagic.cancellable_sleep, (60,))\n"
        "first = cf.wait([w.submit(add, (1,)), slow], timeout=10, return_when=cf.FIRST_COMPLETED)\n"
        "print(len(first.done), slow in first.not_done, slow.cancel(), slow.wait(10), slow.cancelled())\n"
        "print(await asyncio.wrap_future(w.submit(add, (99,))))\n",
        check=True,
    )
    assert result.stdout == (
        "8 0 [1, 2, 3, 4, 5, 6, 7, 8]\n[1, 2, 3, 4, 5, 6, 7, 8]\n1 True True True True\n100\n"
    )


def test_profiling_works_after_tasks_and_a_forced_cancel(ck):
    """After foreground, background and force-cancelled tasks the kernel can still profile
    (clearing a pending forced cancel the wrong way hangs every later cProfile / %prun)."""
    started = ck.execute(
        "w.cancel_grace_s = 0.05\n"
        "%function_execute add 1\n"
        "b = %function_execute -b add 2\n"
        "s2 = %function_execute -b stubborn\n",
        check=True,
    )
    ck.wait_for_output(started.msg_id, "stubborn started")
    ck.execute("s2.cancel(force=True); s2.wait(10); b.wait(10); w.cancel_grace_s = 2.0", check=True)
    assert ck.eval("s2.status.value") == "cancelled"
    result = ck.execute("import cProfile\ncProfile.run('sum(range(10))', sort='calls')", timeout=10)
    assert result.status == "ok" and "function calls" in result.stdout
    assert ck.execute("%prun -q add(1)", timeout=10).status == "ok"
