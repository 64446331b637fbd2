"""``%script_upload PATH`` with a path that is not a script file, in a real kernel.

The magic reads the file on the kernel's main thread: a FIFO blocked the kernel until ■
(then a traceback through pathlib), a device such as ``/dev/zero`` would be read until the
kernel's memory ran out, and a data file of gigabytes was read whole before its decoding
failed.  Each must end the cell at once with one line that says what is wrong.
"""

from __future__ import annotations

import os

import pytest

from kernel_helpers import one_line, start_kernel

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def k(tmp_path_factory):
    session = start_kernel(tmp_path_factory.mktemp("scripts"))
    yield session
    session.shutdown()


def _upload(k, path: str, timeout: float = 10.0):
    """Run %script_upload PATH; fail (after ■ frees the kernel) if it does not end in time."""
    msg_id = k.execute_async(f"%script_upload '{path}'")
    try:
        return k.wait(msg_id, timeout)
    except TimeoutError:
        k.interrupt()
        k.wait(msg_id)
        pytest.fail(f"%script_upload {path} froze the kernel (ended by ■)")


def test_a_fifo_is_refused_at_once(k, tmp_path):
    fifo = tmp_path / "pipe.py"
    os.mkfifo(fifo)
    line = one_line(_upload(k, str(fifo)))
    assert line == f"UsageError: Cannot read the script {str(fifo)!r}: it is not a regular file.", line


def test_a_device_is_refused_at_once(k):
    line = one_line(_upload(k, "/dev/zero"))
    assert line == "UsageError: Cannot read the script '/dev/zero': it is not a regular file.", line


def test_a_folder_is_refused(k, tmp_path):
    line = one_line(_upload(k, str(tmp_path)))
    assert line == f"UsageError: Cannot read the script {str(tmp_path)!r}: it is a folder.", line


_TASKS = "sorted(t.uid for t in w.tasks())"


def test_a_huge_file_is_refused_unread(k, tmp_path):
    """...and starts no task (this kernel is shared: its own tasks, not every task, count)."""
    data = tmp_path / "scan.h5"
    with open(data, "wb") as f:
        f.truncate(3 << 30)  # sparse: takes no disk space, but 3 GiB to read
    before = k.eval(_TASKS)
    line = one_line(_upload(k, str(data)))
    assert line == (f"UsageError: Cannot read the script {str(data)!r}: it holds 3,221,225,472 bytes, "
                    "more than a script (at most 10,000,000): is it the right file?"), line
    assert set(k.eval(_TASKS)) - set(before) == set()


def test_a_missing_file_says_where_relative_paths_start(k):
    cwd = k.eval("__import__('os').getcwd()")
    line = one_line(_upload(k, "no_such_script.py"))
    assert line == (f"UsageError: Cannot read the script 'no_such_script.py': no such file (relative "
                    f"paths start in the kernel's folder, {cwd}).")


def test_a_file_that_is_not_utf8_says_so(k, tmp_path):
    script = tmp_path / "latin1.py"
    script.write_bytes(b"name = '\xe9'\n")
    line = one_line(_upload(k, str(script)))
    assert line == (f"UsageError: Cannot read the script {str(script)!r}: it is not UTF-8 text (byte "
                    "0xe9 at position 8): save it as UTF-8."), line


def test_a_file_script_still_runs(k, tmp_path):
    script = tmp_path / "ok.py"
    script.write_text("uploaded_value = 41 + 1\n")
    _upload(k, str(script)).check()
    assert k.eval("uploaded_value") == 42
