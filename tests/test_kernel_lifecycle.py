"""A kernel's life with qmagic (issue 14, items 1, 6 and 8), against real kernels.

- Remote requests (over the real 0MQ control channel) for ``exit``, ``quit``,
  ``get_ipython`` or any name outside the function catalog — in the foreground and in the
  background — never end or freeze the kernel: it answers a cell afterwards.
- 50 unload/load cycles with tasks (and the control channel) in between leave no file
  descriptor, no mapping of qmagic's files and no thread behind.
- ``%lock --prompt-key`` asks in a hidden prompt (``input_request`` with ``password``); the
  key lands in no history, and the help says which forms are recorded.
"""

from __future__ import annotations

import json
import time

import pytest
import zmq

from kernel_helpers import one_line, start_kernel
from kernel_utils import KernelSession

pytestmark = pytest.mark.timeout(120)

#: Names a remote client may ask for that are not in the function catalog.
FORBIDDEN = ["exit", "quit", "get_ipython", "In", "Out", "_ih", "input", "print", "open", "eval",
             "exec", "breakpoint", "__import__", "_private_helper", "no_such_function", "w"]


class RemoteClient:
    """A queueserver-style client on the kernel's control channel (JSON over 0MQ REQ)."""

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.address = address
        self._connect()

    def _connect(self) -> None:
        self.socket = self.context.socket(zmq.REQ)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(self.address)

    def call(self, method: str, timeout: float = 5.0, **params) -> dict:
        self.socket.send(json.dumps({"method": method, "params": params}).encode())
        if not self.socket.poll(int(timeout * 1000)):
            self.socket.close()
            self._connect()
            raise TimeoutError(f"no reply to {method} within {timeout} s")
        return json.loads(self.socket.recv())

    def execute(self, name: str, background: bool) -> dict:
        return self.call("function_execute", item={"item_type": "function", "name": name},
                         run_in_background=background, user="remote user", user_group="primary")

    def wait(self, uid: str, timeout: float = 10.0) -> dict:
        """Poll task_status (as a remote client does) until the task ended; its task_result."""
        deadline = time.monotonic() + timeout
        while self.call("task_status", task_uid=uid)["status"] != "completed":
            assert time.monotonic() < deadline, f"task {uid} still running after {timeout} s"
        return self.call("task_result", task_uid=uid)

    def close(self) -> None:
        self.socket.close()
        self.context.term()


# =========================================================================================
# item 1: names outside the catalog
# =========================================================================================
def test_remote_requests_for_hidden_and_unknown_names_never_end_the_kernel(tmp_path):
    address = f"ipc://{tmp_path}/control"
    k = start_kernel(tmp_path / "kernel")
    client = None
    try:
        k.execute("def _private_helper():\n    return 'private'\n", check=True)
        k.execute(f"%control_channel start {address}", check=True)
        client = RemoteClient(address)
        assert client.call("status")["ip_kernel_state"] == "idle"
        outcomes = {}
        for name in FORBIDDEN:
            for background in (False, True):
                reply = client.execute(name, background)
                if reply["success"]:
                    result = client.wait(reply["task_uid"])["result"]
                    outcomes[name, background] = ("failed", result["msg"])
                    assert result["success"] is False and result["return_value"] is None
                else:
                    outcomes[name, background] = ("refused", reply["msg"])
                # the kernel is alive and idle after every request
                assert k.is_alive(), (name, background)
                assert client.call("status")["ip_kernel_state"] == "idle", (name, background)
        for name in ("exit", "quit", "get_ipython", "In", "input", "print", "eval", "no_such_function"):
            for background in (False, True):
                kind, msg = outcomes[name, background]
                assert kind == "failed" and msg == (
                    "Error occurred while executing 'Execute function': Function "
                    f"'{name}' is not found in the worker namespace"
                ), (name, background, kind, msg)
        for background in (False, True):
            assert outcomes["_private_helper", background] == (
                "refused", "Error: Function '_private_helper' is not allowed for users from "
                "'primary' group.")
            assert outcomes["__import__", background][0] == "refused"
            assert outcomes["w", background] == (
                "refused", "Error: Object 'w' defined in worker namespace is not callable")
        # The kernel answers cells and runs tasks as before.
        assert k.eval("1 + 1") == 2
        assert k.execute("%function_execute add 2 3", check=True).result.startswith("add(2, 3)")
        reply = client.call("function_execute", item={"item_type": "function", "name": "add",
                                                      "args": [40, 2]},
                            user="remote user", user_group="primary")
        assert client.wait(reply["task_uid"])["result"]["return_value"] == 42
    finally:
        if client is not None:
            client.close()
        k.shutdown()


# =========================================================================================
# item 6: unload/load cycles release everything
# =========================================================================================
PROBE = r'''
import gc, os, threading, time
from collections import Counter

def qmagic_threads():
    return sorted(t.name for t in threading.enumerate() if t.name.startswith(("qmagic", "subshell")))

def open_files():
    """Open file descriptors by what they point to (IPython's history database aside)."""
    found = Counter()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if "history.sqlite" not in target:
            found[target.split("[")[0]] += 1  # socket:[123] -> socket:
    return dict(found)

def qmagic_maps():
    state = os.environ["QMAGIC_STATE_DIR"]
    return sorted({line.split()[-1] for line in open("/proc/self/maps")
                   if "qmagic" in line or state in line})

def snapshot():
    gc.collect()
    return {"files": open_files(), "maps": qmagic_maps(), "threads": threading.active_count(),
            "qmagic_threads": qmagic_threads()}

def sweep_event_pipes():
    """Close the IOPub event pipes of ended threads now, as ipykernel's own sweep does every
    10 s.  ipykernel gives each thread that publishes on IOPub a 0MQ socket of its own (an
    eventfd); qmagic's panel thread publishes widget updates, so after an unload its ended
    thread's socket stayed up to 10 s (the 0MQ context is the kernel's).  A live thread's
    pipe is never closed here (and a live thread counts anyway)."""
    iopub = get_ipython().kernel.iopub_thread
    if not hasattr(iopub, "_event_pipe_gc"):  # another ipykernel: wait for its own sweep
        return
    done = threading.Event()

    async def sweep():
        try:
            await iopub._event_pipe_gc()
        finally:
            done.set()

    iopub.io_loop.add_callback(sweep)
    assert done.wait(10), "the IOPub thread did not run the sweep"

def settled(base, timeout=10):
    """Wait until nothing is left beyond ``base``; what is left."""
    deadline = time.monotonic() + timeout
    while True:
        sweep_event_pipes()
        now = snapshot()
        extra = {"files": dict(Counter(now["files"]) - Counter(base["files"])),
                 "maps": sorted(set(now["maps"]) - set(base["maps"])),
                 "threads": max(0, now["threads"] - base["threads"]),
                 "qmagic_threads": now["qmagic_threads"]}
        if not any(extra.values()) or time.monotonic() > deadline:
            return extra
        time.sleep(0.01)

def ident(x):
    return x
'''

#: (A leak of a file, mapping or thread per cycle, or per control-channel cycle, shows in
#: any number of cycles; twenty repeat each kind of cycle, every-fifth ones four times.)
CYCLES = 20


def test_unload_load_cycles_leave_nothing_behind(tmp_path):
    """20 cycles of %load_ext, tasks (foreground, background, a script; every fifth cycle the
    control channel), %unload_ext: file descriptors, qmagic mappings and threads come back to
    where they were."""
    k = KernelSession(tmp_path / "kernel").start()
    try:
        k.execute(PROBE, check=True)

        script = tmp_path / "cycle_script.py"
        script.write_text("script_value = ident(script_value + 1)\n")

        def cycle(i: int, *, channel: bool, look: bool = False) -> list[str]:
            k.execute("%load_ext qmagic", check=True)
            k.execute(
                "import qmagic\n"
                "w = qmagic.get_worker()\n"
                f"script_value = {i}\n"
                f"t = %function_execute -b ident {i}\n"
                f"%function_execute ident {i}\n"
                f"%script_upload {script}\n"
                + (f"%control_channel start ipc://{tmp_path}/ctl-{i}\n" if channel else "")
                + f"assert t.result(10) == {i} and script_value == {i + 1}\n",
                check=True,
            )
            threads = k.eval("qmagic_threads()") if look else []
            k.execute("%unload_ext qmagic", check=True)
            return threads

        cycle(0, channel=True)  # first use: imports and one-time set-up
        k.execute("base = snapshot()", check=True)
        seen_threads: list[str] = []
        for i in range(1, CYCLES + 1):
            seen_threads += cycle(i, channel=i % 5 == 0, look=i in (1, CYCLES))
        left = k.eval("settled(base)")
        assert left == {"files": {}, "maps": [], "threads": 0, "qmagic_threads": []}
        # What was measured is real: while loaded, qmagic had threads of its own.
        assert seen_threads
        assert k.eval("'qmagic' in get_ipython().extension_manager.loaded") is False
        k.execute("%load_ext qmagic", check=True)
        assert k.execute("%function_execute ident 7", check=True).result.startswith("ident(7)")
    finally:
        k.shutdown()


# =========================================================================================
# item 8: keys typed in a hidden prompt stay out of every history
# =========================================================================================
KEY = "Prompted-K3y-9d27"


def _with_prompt(k: KernelSession, code: str, answer: str, timeout: float = 20.0):
    """Run ``code`` with stdin allowed; answer its one input request; return (request, result)."""
    msg_id = k.kc.execute(code, allow_stdin=True)
    request = k.kc.get_stdin_msg(timeout=timeout)
    assert request["parent_header"]["msg_id"] == msg_id
    k.kc.input(answer)
    return request["content"], k.wait(msg_id, timeout)


def test_lock_with_a_hidden_prompt_keeps_the_key_out_of_history(tmp_path):
    k = start_kernel(tmp_path / "kernel", "--QMagic.default_user=Alice")
    try:
        prompt, locked = _with_prompt(k, "%lock --prompt-key --note 'Changing samples'", KEY)
        assert prompt == {"prompt": "Lock key (hidden): ", "password": True}
        assert locked.check().stdout == "Locked by Alice: environment\nNote: Changing samples\n"
        # The key works (and is the only key that does), without ever being typed in a cell.
        k.execute("w._remembered_key = None", check=True)
        assert "locked by Alice" in one_line(k.execute("%function_execute add 1"))
        assert k.execute(f"%function_execute --lock-key {KEY[:-1]}X add 1").status == "error"
        _, unlocked = _with_prompt(k, "%unlock --prompt-key", KEY)
        assert unlocked.check().stdout == "Unlocked.\n"

        # Nowhere in IPython's history: the database, In / _ih, %history.
        k.execute("get_ipython().history_manager.writeout_cache()", check=True)
        history = k.eval(
            "[row for row in __import__('sqlite3').connect(str(get_ipython().history_manager.hist_file))"
            ".execute('select source, source_raw from history')]"
        )
        assert any("%lock --prompt-key" in raw for _, raw in history)
        flat = (repr(history) + repr(k.eval("list(In) + list(_ih)"))
                + k.execute("%history -g", check=True).stdout)
        assert KEY not in flat
        # Nor in the kernel's namespace or qmagic's state folder.
        texts = k.eval("[v for v in list(globals().values()) if isinstance(v, str)]")
        assert texts and not [text for text in texts if KEY in text]
        state = tmp_path / "kernel" / "qmagic-state"
        for path in state.rglob("*"):
            assert not path.is_file() or KEY.encode() not in path.read_bytes(), path

        # Without a frontend that can prompt: one line saying what to do instead.
        line = one_line(k.execute("%lock --prompt-key"))
        assert line.startswith("UsageError: This frontend cannot show a hidden prompt")
        assert k.eval("w.lock_state().to_lock_info()['environment']") is False
        # An empty answer changes nothing.
        _, empty = _with_prompt(k, "%lock --prompt-key", "")
        assert one_line(empty) == "UsageError: No key typed; nothing was changed."
    finally:
        k.shutdown()


def test_lock_help_says_which_forms_are_recorded(tmp_path):
    k = start_kernel(tmp_path / "kernel", setup=False)
    try:
        for magic in ("lock", "unlock"):
            help_text = k.execute(f"%{magic}?", check=True).reply["payload"][0]["data"]["text/plain"]
            flat = " ".join(help_text.split())
            assert "--key KEY" in flat and "--prompt-key" in flat
            assert "kept in IPython's history" in flat, magic
            assert "hidden prompt (not kept in any history)" in flat, magic
    finally:
        k.shutdown()


def test_the_worker_asked_for_after_an_unload_is_one_line(tmp_path):
    """``qmagic.get_worker()`` after ``%unload_ext qmagic`` ended the cell with a traceback
    into qmagic's extension module; the error says what to do, in one line."""
    with start_kernel(tmp_path) as k:
        k.execute("%unload_ext qmagic", check=True)
        k.execute("def _get_err():\n    try:\n        qmagic.get_worker()\n    except Exception as exc:\n"
                  "        return exc\n", check=True)
        line = one_line(k.execute("qmagic.get_worker()"))
        assert line == ("NotLoaded: qmagic is not loaded in this IPython session: run %load_ext "
                        "qmagic first (outside IPython, create a qmagic.Worker(namespace) instead)."), line
        assert k.eval("isinstance(_get_err(), RuntimeError)") is True  # what it was
        k.execute("%load_ext qmagic", check=True)
        assert k.eval("type(qmagic.get_worker()).__name__") == "Worker"
