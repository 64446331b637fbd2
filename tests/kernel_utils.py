"""A small harness around a real IPython kernel started with jupyter_client.

Use it for what only a real kernel shows: interrupts, output routing, auto-load, the
control channel.  Everything synchronises on kernel messages with timeouts; nothing sleeps.

    def test_something(kernel):              # module-scoped kernel, qmagic loaded
        r = kernel.execute("1 + 1")
        assert r.status == "ok" and r.result == "2"

    def test_other(kernel_factory):          # a fresh kernel with its own argv / env
        k = kernel_factory(argv=["--ext=qmagic", "--QMagic.default_user=Alice"])
        ...

Every kernel gets isolated HOME, IPYTHONDIR, JUPYTER_{CONFIG,DATA,RUNTIME}_DIR and
QMAGIC_STATE_DIR under a temporary folder, and the repository on PYTHONPATH (the package
does not need to be installed).  Kernels listen on Unix sockets in that folder, not on TCP
ports (a free port can be taken by another process before the kernel binds it).
"""

from __future__ import annotations

import os
import queue
import secrets
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "REPO_ROOT",
    "ExecResult",
    "KernelSession",
    "isolated_env",
    "kernel",
    "kernel_factory",
]

#: The repository root (holds the ``qmagic`` package).
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Longest Unix socket path (sun_path is 108 bytes on Linux, 104 on macOS), with a margin.
_MAX_UNIX_SOCKET_PATH = 100

#: Default seconds to wait for a kernel to start / a cell to finish.
START_TIMEOUT = 60.0
EXEC_TIMEOUT = 30.0


def isolated_env(base: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a kernel whose every per-user folder lives under ``base``.

    ``extra`` entries override; a value of ``None`` removes the variable.  Auto-load is
    off (``QMAGIC_NO_AUTOLOAD=1``) unless ``extra`` removes it.
    """
    env = dict(os.environ)
    for name in ("QMAGIC_NO_AUTOLOAD", "QMAGIC_EMERGENCY_LOCK_KEY", "JUPYTER_PATH",
                 "JUPYTER_PREFER_ENV_PATH", "XDG_CONFIG_HOME", "PYTEST_CURRENT_TEST"):
        env.pop(name, None)
    dirs = {
        "HOME": base / "home",
        "IPYTHONDIR": base / "ipython",
        "JUPYTER_CONFIG_DIR": base / "jupyter-config",
        "JUPYTER_DATA_DIR": base / "jupyter-data",
        "JUPYTER_RUNTIME_DIR": base / "jupyter-runtime",
        "QMAGIC_STATE_DIR": base / "qmagic-state",
    }
    for name, path in dirs.items():
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    paths = [str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    # Test kernels load qmagic only when a test asks (--ext=qmagic, %load_ext), whether or
    # not the package's auto-load startup file is installed; auto-load tests remove this.
    env["QMAGIC_NO_AUTOLOAD"] = "1"
    for name, value in (extra or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


@dataclass
class ExecResult:
    """What one ``execute_request`` produced (IOPub messages up to its idle status)."""

    msg_id: str
    #: "ok", "error" or "aborted" (from the execute_reply).
    status: str
    stdout: str
    stderr: str
    #: Every IOPub message of this request except status/execute_input, as
    #: ``{"msg_type": ..., "content": ...}`` in arrival order.
    outputs: list[dict] = field(default_factory=list)
    #: ``{"ename", "evalue", "traceback"}`` when status is "error", else None.
    error: dict | None = None
    #: The execute_reply content.
    reply: dict = field(default_factory=dict)

    @property
    def result(self) -> str | None:
        """``text/plain`` of the cell's execute_result, or None."""
        for out in self.outputs:
            if out["msg_type"] == "execute_result":
                return out["content"]["data"].get("text/plain")
        return None

    @property
    def displayed(self) -> list[dict]:
        """Data dicts of display_data / execute_result outputs."""
        return [
            out["content"]["data"]
            for out in self.outputs
            if out["msg_type"] in ("display_data", "execute_result")
        ]

    def check(self) -> ExecResult:
        """Raise AssertionError with the kernel's traceback unless the cell succeeded."""
        if self.status != "ok":
            tb = "\n".join((self.error or {}).get("traceback", []))
            raise AssertionError(
                f"cell failed ({self.status}): {self.error and self.error.get('ename')}: "
                f"{self.error and self.error.get('evalue')}\n{_strip_ansi(tb)}\n"
                f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
            )
        return self


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class KernelSession:
    """One running kernel plus a blocking client; IOPub messages are filed by parent msg_id."""

    def __init__(
        self,
        base: Path,
        *,
        argv: Iterable[str] = (),
        env: Mapping[str, str | None] | None = None,
        kernel_name: str = "python3",
        interrupt_mode: str | None = None,
    ) -> None:
        self.base = Path(base)
        self.argv = list(argv)
        self.env = isolated_env(self.base, env)
        self.kernel_name = kernel_name
        self.interrupt_mode = interrupt_mode
        self.km: Any = None
        self.kc: Any = None
        self._iopub: dict[str, list[dict]] = {}
        self._idle: set[str] = set()
        self._replies: dict[str, dict] = {}

    # -- life cycle ----------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT) -> KernelSession:
        """Start the kernel and wait until it answers."""
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name=self.kernel_name, **self._transport())
        if self.interrupt_mode is not None:
            self.km.kernel_spec.interrupt_mode = self.interrupt_mode
        workdir = self.base / "work"
        workdir.mkdir(exist_ok=True)
        self.km.start_kernel(extra_arguments=self.argv, env=self.env, cwd=str(workdir))
        self._connect(timeout)
        return self

    def _transport(self) -> dict[str, str]:
        """IPC (Unix sockets in ``base``) where the paths fit, else TCP on loopback.

        With TCP the client picks free ports, closes them, and the kernel binds them a moment
        later: any process of the machine may take one meanwhile ("Address already in use",
        the kernel dies at start).  Unix socket paths cannot be taken that way.
        """
        if os.name != "posix":  # pragma: no cover - no Unix sockets
            return {}
        prefix = str(self.base / f"ipc-{secrets.token_hex(3)}")
        if len(prefix) + len("-65535") >= _MAX_UNIX_SOCKET_PATH:
            return {}
        return {"transport": "ipc", "ip": prefix}

    def _connect(self, timeout: float) -> None:
        """Connect, then wait until the kernel answers on shell *and* is heard on IOPub.

        What jupyter_client's ``wait_for_ready`` checks, without its fixed pauses (at least
        0.2 s per start, waiting for IOPub to fall silent): a ``kernel_info_request`` is sent
        again until one has both its reply and its idle status back (IOPub drops what is
        published before the subscription is in place).  The traffic of earlier tries is
        filed by parent like any other, and never read.
        """
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self._iopub.clear()
        self._idle.clear()
        self._replies.clear()
        deadline = time.monotonic() + timeout
        asked: set[str] = set()
        while True:
            asked.add(self.kc.kernel_info())
            again = min(deadline, time.monotonic() + 1.0)  # (then ask once more)
            while time.monotonic() < again:
                answered = next((m for m in asked if m in self._replies and m in self._idle), None)
                if answered is not None:
                    self.kc._handle_kernel_info_reply({"content": self._replies[answered]})
                    return
                self._read_replies(0.02)
                self._pump(0.02)
            if not self.km.is_alive():
                raise RuntimeError(f"the kernel died before it answered (argv {self.argv})")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kernel did not start within {timeout} s (argv {self.argv})")

    def _read_replies(self, timeout: float) -> None:
        """File the shell replies that come within ``timeout`` by their request's msg_id."""
        try:
            reply = self.kc.get_shell_msg(timeout=timeout)
        except queue.Empty:
            return
        while True:
            self._replies[reply["parent_header"].get("msg_id")] = reply["content"]
            try:
                reply = self.kc.get_shell_msg(timeout=0)
            except queue.Empty:
                return

    def restart(self, timeout: float = START_TIMEOUT, *, now: bool = True) -> None:
        """Restart the kernel (same argv and env) and wait until it answers.  ``now=False``:
        as JupyterLab's Restart Kernel, a shutdown request first (the kernel exits itself)."""
        self.kc.stop_channels()
        self.km.restart_kernel(now=now)
        self._connect(timeout)

    def shutdown(self) -> None:
        """Stop the client and kill the kernel (idempotent)."""
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        if self.km is not None:
            try:
                if self.km.is_alive():
                    self.km.shutdown_kernel(now=True)
                else:  # killed (SIGKILL in a test): its connection file is still ours to remove
                    self.km.cleanup_resources()
            finally:
                self.km = None

    def interrupt(self) -> None:
        """Interrupt the kernel as the ■ button does (KernelManager.interrupt_kernel)."""
        self.km.interrupt_kernel()

    def is_alive(self) -> bool:
        """True while the kernel process runs."""
        return self.km is not None and self.km.is_alive()

    # -- messages ------------------------------------------------------------------------
    def _pump(self, timeout: float) -> bool:
        """Read one IOPub message (waiting up to ``timeout``) and file it; False on timeout."""
        try:
            msg = self.kc.get_iopub_msg(timeout=max(0.0, timeout))
        except queue.Empty:
            return False
        parent = (msg.get("parent_header") or {}).get("msg_id")
        if parent is None:
            return True
        msg_type = msg["header"]["msg_type"]
        if msg_type == "status":
            if msg["content"].get("execution_state") == "idle":
                self._idle.add(parent)
            return True
        if msg_type == "execute_input":
            return True
        self._iopub.setdefault(parent, []).append(
            {"msg_type": msg_type, "content": msg["content"]}
        )
        return True

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            self._pump(min(left, 1.0))

    def messages(self, msg_id: str) -> list[dict]:
        """IOPub messages received so far whose parent is ``msg_id`` (drains pending ones)."""
        while self._pump(0):
            pass
        return list(self._iopub.get(msg_id, []))

    def stream_text(self, msg_id: str, name: str = "stdout") -> str:
        """Concatenated ``stream`` text of ``name`` received so far under ``msg_id``."""
        return "".join(
            m["content"]["text"]
            for m in self.messages(msg_id)
            if m["msg_type"] == "stream" and m["content"]["name"] == name
        )

    def wait_for_output(
        self, msg_id: str, text: str, timeout: float = EXEC_TIMEOUT, name: str = "stdout"
    ) -> str:
        """Wait until ``text`` appears in the ``name`` stream under ``msg_id``; returns the stream."""

        def seen() -> bool:
            return text in "".join(
                m["content"]["text"]
                for m in self._iopub.get(msg_id, [])
                if m["msg_type"] == "stream" and m["content"]["name"] == name
            )

        self._wait(seen, timeout, f"{text!r} on {name} of {msg_id}")
        return self.stream_text(msg_id, name)

    # -- executing -----------------------------------------------------------------------
    def execute_async(self, code: str, *, silent: bool = False) -> str:
        """Send ``code`` and return its msg_id at once (see :meth:`wait`)."""
        return self.kc.execute(code, silent=silent, store_history=not silent, allow_stdin=False)

    def wait(self, msg_id: str, timeout: float = EXEC_TIMEOUT) -> ExecResult:
        """Wait for the request ``msg_id`` to finish (idle + reply) and collect its result."""
        self._wait(lambda: msg_id in self._idle, timeout, f"idle after {msg_id}")
        content = self._shell_reply(msg_id, timeout)
        outputs = self.messages(msg_id)
        stdout = "".join(
            o["content"]["text"] for o in outputs
            if o["msg_type"] == "stream" and o["content"]["name"] == "stdout"
        )
        stderr = "".join(
            o["content"]["text"] for o in outputs
            if o["msg_type"] == "stream" and o["content"]["name"] == "stderr"
        )
        error = None
        if content.get("status") == "error":
            error = {
                "ename": content.get("ename"),
                "evalue": content.get("evalue"),
                "traceback": content.get("traceback", []),
            }
        return ExecResult(
            msg_id=msg_id,
            status=content.get("status", "?"),
            stdout=stdout,
            stderr=stderr,
            outputs=outputs,
            error=error,
            reply=content,
        )

    def execute(self, code: str, timeout: float = EXEC_TIMEOUT, *, check: bool = False) -> ExecResult:
        """Run ``code`` and wait for it; ``check=True`` raises unless it succeeded."""
        result = self.wait(self.execute_async(code), timeout)
        return result.check() if check else result

    def _shell_reply(self, msg_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while msg_id not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply for {msg_id} within {timeout} s")
            try:
                reply = self.kc.get_shell_msg(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            self._replies[reply["parent_header"].get("msg_id")] = reply["content"]
        return self._replies.pop(msg_id)

    def complete(self, code: str, cursor_pos: int | None = None, timeout: float = EXEC_TIMEOUT) -> list[str]:
        """The kernel's completions (``matches``) for ``code`` at ``cursor_pos`` (default: end)."""
        msg_id = self.kc.complete(code, len(code) if cursor_pos is None else cursor_pos)
        return list(self._shell_reply(msg_id, timeout).get("matches", []))

    def eval(self, expression: str, timeout: float = EXEC_TIMEOUT) -> Any:
        """Evaluate ``expression`` in the kernel and return it (must be a Python literal)."""
        import ast

        result = self.execute(f"print(repr(({expression})))", timeout, check=True)
        return ast.literal_eval(result.stdout.strip())

    def __enter__(self) -> KernelSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


@pytest.fixture
def kernel_factory(tmp_path_factory):
    """``factory(argv=(), env=None, interrupt_mode=None) -> KernelSession`` (started).

    Kernels are shut down when the test ends.
    """
    sessions: list[KernelSession] = []

    def factory(
        argv: Iterable[str] = (),
        env: Mapping[str, str | None] | None = None,
        interrupt_mode: str | None = None,
        base: Path | None = None,
    ) -> KernelSession:
        session = KernelSession(
            base or tmp_path_factory.mktemp("kernel"),
            argv=argv,
            env=env,
            interrupt_mode=interrupt_mode,
        )
        sessions.append(session)
        return session.start()

    yield factory
    for session in sessions:
        session.shutdown()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A kernel shared by the tests of one module, started with ``--ext=qmagic``."""
    session = KernelSession(tmp_path_factory.mktemp("kernel"), argv=["--ext=qmagic"])
    session.start()
    yield session
    session.shutdown()


if __name__ == "__main__":  # pragma: no cover - a quick manual check
    import tempfile

    with tempfile.TemporaryDirectory() as tmp, KernelSession(Path(tmp)).start() as k:
        print(k.execute("import sys; print(sys.version)").stdout, file=sys.stderr)
