"""A kernel that is still running its start-up code, or already shutting down, seen by a
remote operator (a real kernel, queueserver's real client).

qmagic loads before a profile's startup files and ``exec_lines`` run (``--ext=qmagic``;
the auto-load's startup file sorts among the others), so its control channel answers
while a beamline profile still connects its devices, which takes minutes at some
beamlines.  Before, status said the kernel was ``idle`` and the environment open; a
foreground request was refused with "this IPython session has no kernel event loop ...
use a Jupyter kernel", and a background one ran on the half-made namespace (the function
not yet defined: NameError; or one whose devices were not yet made).  An RE Manager says
``creating_environment`` until its worker's start-up code ran, and refuses tasks meanwhile.

As the kernel shuts down or restarts, its tasks get seconds to stop while the channel still
answers; requests were refused meanwhile with "the qmagic worker was closed; run %reload_ext
qmagic in the kernel", which a remote operator cannot do and need not: the kernel is coming
back (or going).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from bluesky_queueserver_api import BFunc
from kernel_utils import KernelSession
from remote_client import LoopClient

from qmagic.worker_state import MSG_ENV_CLOSED, MSG_ENV_STARTING, MSG_EXITING

pytestmark = pytest.mark.timeout(120)

WAIT = 60.0

#: A beamline profile's startup file: tells the test it runs (connects to its socket), waits
#: for the test's word (its devices "connecting"), then defines what operators call.
STARTUP = '''
import socket as _socket
with _socket.socket(_socket.AF_UNIX) as _s:
    _s.settimeout({wait})
    _s.connect({path!r})
    _s.recv(1)
def measure(n):
    return 2 * n
'''


def test_a_kernel_running_its_startup_code_says_so_and_starts_no_task(tmp_path):
    address = f"ipc://{tmp_path}/control"
    gate_path = str(tmp_path / "gate")
    base = tmp_path / "kernel"
    startup = base / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "10-beamline.py").write_text(STARTUP.format(wait=WAIT, path=gate_path))
    k = KernelSession(base, argv=["--ext=qmagic", f"--QMagic.zmq_control_address={address}"])
    started: list = []
    with socket.socket(socket.AF_UNIX) as gate:
        gate.bind(gate_path)
        gate.listen(1)
        gate.settimeout(WAIT)
        starter = threading.Thread(target=lambda: started.append(k.start()), daemon=True)
        starter.start()
        rm = LoopClient(zmq_control_addr=address, timeout_recv=10)
        try:
            conn, _ = gate.accept()  # the startup file runs: qmagic is loaded, the kernel not ready
            with conn:
                status = rm.status(reload=True)
                assert (status["manager_state"], status["worker_environment_exists"],
                        status["worker_environment_state"], status["ip_kernel_state"]) == (
                    "creating_environment", False, "initializing", "starting"), status
                refusal = f"Error: {MSG_ENV_CLOSED}: {MSG_ENV_STARTING}"
                for background in (False, True):
                    with pytest.raises(rm.RequestFailedError) as info:
                        rm.function_execute(BFunc("measure", 2), run_in_background=background)
                    assert info.value.response["msg"] == refusal, background
                with pytest.raises(rm.RequestFailedError) as info:
                    rm.script_upload("x = 1\n", run_in_background=True)
                assert MSG_ENV_STARTING in info.value.response["msg"]
                with pytest.raises(rm.RequestFailedError, match="already in the process of creating"):
                    rm.environment_open()
                conn.sendall(b"g")  # the devices are connected: the start-up goes on
            starter.join(WAIT)
            assert started, "the kernel did not start"
            rm.wait_for_idle(timeout=WAIT)
            status = rm.status(reload=True)
            assert (status["manager_state"], status["worker_environment_exists"],
                    status["worker_environment_state"], status["ip_kernel_state"]) == (
                "idle", True, "idle", "idle"), status
            uid = rm.function_execute(BFunc("measure", 2))["task_uid"]  # in the foreground
            rm.wait_for_completed_task(uid, timeout=WAIT)
            assert rm.task_result(uid)["result"]["return_value"] == 4
        finally:
            rm.close()
            k.shutdown()


def test_requests_while_the_kernel_shuts_down_say_so(tmp_path):
    address = f"ipc://{tmp_path}/control"
    k = KernelSession(tmp_path / "kernel", argv=["--ext=qmagic", f"--QMagic.zmq_control_address={address}"])
    k.start()
    rm = LoopClient(zmq_control_addr=address, timeout_recv=2)
    try:
        # a measurement blocked in a C call: the exit's cancel waits for it (up to 2 s)
        k.execute("import time\ndef stubborn():\n    time.sleep(4)\n", check=True)
        rm.function_execute(BFunc("stubborn"), run_in_background=True)
        deadline = time.monotonic() + WAIT
        while rm.status(reload=True)["worker_background_tasks"] != 1:
            assert time.monotonic() < deadline, "the task did not start"
        k.km.request_shutdown()  # as JupyterLab's Shut Down Kernel
        deadline = time.monotonic() + WAIT
        while True:  # accepted until the kernel takes the request, then refused while it exits
            assert time.monotonic() < deadline, "never refused"
            try:
                rm.function_execute(BFunc("stubborn"), run_in_background=True)
            except rm.RequestFailedError as exc:
                msg = exc.response["msg"]
                break
        assert msg == f"Error: Failed to start the task: {MSG_EXITING}.", msg
        with pytest.raises(rm.RequestFailedError) as info:
            rm.lock_environment("k1")
        assert MSG_EXITING[4:] in info.value.response["msg"] and "reload_ext" not in info.value.response["msg"]
    finally:
        rm.close()
        k.shutdown()
