"""What the task magics say in a kernel that has no tasks in memory yet, although the
experiment log holds earlier ones (a restart after a crash, a reload of qmagic, or
tasks gone from memory after ``QMagic.task_retention_s``).

``%task_result`` said "No tasks yet: start one with %function_execute NAME.", ``%task_status``
"No tasks." and ``%tasks`` "No tasks." — as if nothing had ever run, while the task that
was running when the kernel died sat in the log.  Each now points to the log.
"""

from __future__ import annotations

import pytest

from kernel_helpers import SETUP, one_line, start_kernel

pytestmark = pytest.mark.timeout(120)

HINT = "earlier ones, also of restarted kernels, are in the experiment log: %tasks --history."


def test_the_task_magics_point_to_the_log_after_a_restart(tmp_path):
    with start_kernel(tmp_path) as k:
        k.execute('t = %function_execute -b bg_wait "x"\nwait_until(lambda: t.running())', check=True)
        uid = k.eval("t.uid[:8]")
        k.restart()
        k.execute(SETUP, check=True)
        line = one_line(k.execute("%task_result"))
        assert line == ("UsageError: No tasks in this kernel's memory (start one with %function_execute "
                        f"NAME); {HINT}"), line
        assert k.execute("%task_status").check().stdout == f"No tasks in this kernel's memory; {HINT}\n"
        shown = k.execute("%tasks").check()
        text = shown.stdout + "".join(d.get("text/plain", "") for d in shown.displayed)
        assert HINT in text, text
        history = k.execute("%tasks --history").check().stdout
        assert uid in history and "kernel stopped while the task was running" in history
