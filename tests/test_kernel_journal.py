"""The experiment log against real kernels: SIGKILL, two kernels at once, a torn journal."""

from __future__ import annotations

import os
import signal
import time

from kernel_utils import kernel_factory  # noqa: F401 - fixture

SETUP = """
import os, threading, qmagic
w = qmagic.get_worker()
hold = threading.Event()
def ok(x):
    return x * 10
def boom():
    raise RuntimeError('detector saturated')
def hang():
    hold.wait()
"""


def _start(kernel_factory, state, **env):
    k = kernel_factory(argv=["--ext=qmagic"], env={"QMAGIC_STATE_DIR": str(state), **env})
    k.execute(SETUP, check=True)
    return k


def test_sigkill_while_a_task_runs_then_a_new_kernel_finds_every_task(kernel_factory, tmp_path):
    state = tmp_path / "shared-state"
    k1 = _start(kernel_factory, state)
    k1.execute(
        "t_ok = %function_execute ok 2\n"
        "t_bg = %function_execute -b --wait ok 3\n"
        "try:\n"
        "    %function_execute boom\n"
        "except RuntimeError:\n"
        "    pass\n"
        "t_bad = w.last_task\n"
        "t_hang = %function_execute -b hang\n",
        check=True,
    )
    uids = k1.eval("[t.uid for t in (t_ok, t_bg, t_bad, t_hang)]")
    assert k1.eval("t_hang.status.value") == "running"
    pid = k1.eval("os.getpid()")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while k1.km.is_alive():
        assert time.monotonic() < deadline, "the killed kernel did not die"
        time.sleep(0.05)

    k2 = _start(kernel_factory, state)
    status = k2.eval(f"w.task_status({uids!r})['status']")
    assert status == {uid: "completed" for uid in uids}
    results = k2.eval(
        f"[(r['success'], r['return_value'], r['msg']) for r in "
        f"(w.task_result(u)['result'] for u in {uids!r})]"
    )
    assert results[0] == (True, 20, "") and results[1] == (True, 30, "")
    assert results[2][0] is False and results[2][2].endswith("detector saturated")
    assert results[3] == (
        False, None,
        "Error occurred while executing 'Execute function': kernel stopped while the task was running",
    )
    table = k2.execute("%tasks --history 10", check=True).stdout
    lines = table.splitlines()
    assert lines[0].split() == ["submitted", "task", "user", "origin", "mode", "status", "note"]
    assert "hang()" in lines[1] and "failed" in lines[1] and "kernel stopped while the task was running" in lines[1]
    assert "boom()" in table and "detector saturated" in table
    assert sum("magic" in line for line in lines[1:]) == 4
    # The magics read the journal too, by uid prefix.
    assert k2.execute(f"%task_status {uids[0][:8]}", check=True).stdout == (
        f"{uids[0][:8]}: completed (from the journal)\n"
    )
    detail = k2.execute(f"%task_result {uids[3][:8]}", check=True).stdout
    assert detail.startswith("hang()") and "failed  (from the journal)" in detail
    assert "failed: kernel stopped while the task was running" in detail
    assert k2.execute(f"%task_result {uids[0][:8]}", check=True).stdout.endswith("result: 20\n")


def test_two_kernels_append_to_one_journal_at_once(kernel_factory, tmp_path):
    state = tmp_path / "shared-state"
    kernels = [_start(kernel_factory, state) for _ in range(2)]
    code = (
        "ts = [w.submit('ok', (i,), user=USER) for i in range(300)]\n"
        "print(sum(t.result(30) for t in ts))\n"
    )
    cells = [k.execute_async(code.replace("USER", repr(f"user{n}"))) for n, k in enumerate(kernels)]
    for k, cell in zip(kernels, cells):
        assert k.wait(cell, 60).stdout == f"{sum(i * 10 for i in range(300))}\n"
    counts = kernels[0].eval(
        "(len(qmagic.history()), sorted({r['status'] for r in qmagic.history()}), "
        "sorted({r['user'] for r in qmagic.history()}))"
    )
    assert counts == (600, ["completed"], ["user0", "user1"])


def test_a_torn_last_line_is_skipped_with_a_warning(kernel_factory, tmp_path):
    state = tmp_path / "shared-state"
    k1 = _start(kernel_factory, state)
    uid = k1.eval("w.submit('ok', (4,)).uid")
    k1.execute(f"w.get_task({uid!r}).wait(10)", check=True)
    k1.shutdown()
    journal = state / "default.journal.jsonl"
    with open(journal, "ab") as f:  # power loss in the middle of a line
        f.write(b'{"v": 1, "event": "start", "task": {"uid": "torn-')
    k2 = _start(kernel_factory, state)
    result = k2.execute(
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    recs = qmagic.history()\n"
        "print(len(recs), [str(c.message)[:40] for c in caught])\n",
        check=True,
    )
    count, _, warning = result.stdout.partition(" ")
    assert count == "1" and "journal" in warning.lower()
    assert k2.eval(f"w.task_result({uid!r})['result']['return_value']") == 40
    new_uid = k2.eval("w.submit('ok', (5,)).uid")
    k2.execute(f"w.get_task({new_uid!r}).wait(10)", check=True)
    assert k2.eval("sorted(r['result'] for r in qmagic.history())") == [40, 50]
