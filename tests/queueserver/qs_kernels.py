"""Start and stop qmagic kernels that stand in for queueserver's RE Manager (test helper).

Used by :mod:`plugin` (queueserver's own tests) and ``test_http_gateway.py``:
:func:`parse_manager_params` turns ``start-re-manager`` options into
:class:`KernelSpecOptions`; :class:`QSKernel` starts one kernel (isolated HOME, IPYTHONDIR,
JUPYTER_*, TMPDIR, QMAGIC_STATE_DIR under its own folder; ``--ext=qmagic``; startup files;
permissions file; control address); :class:`Spare` keeps one kernel started ahead.

Environment: ``QMAGIC_QS_SOURCE`` (folder holding ``qmagic``; default this repository),
``QMAGIC_QS_PREWARM=0`` (no spare kernel), ``QMAGIC_QS_PROFILE=lean`` (only the profile's
test functions: see :func:`lean_startup_code`), ``QMAGIC_QS_KERNEL_ARGS`` (extra kernel
arguments, split on spaces).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONTROL_ADDRESS",
    "KernelSpecOptions",
    "QSKernel",
    "Spare",
    "UnsupportedManagerOption",
    "lean_startup_code",
    "parse_manager_params",
]

#: queueserver's default control address, as the tests' helpers (``zmq_request``) use it.
CONTROL_ADDRESS = "tcp://127.0.0.1:60615"
#: Default repository holding ``qmagic`` (two levels up: tests/queueserver/qs_kernels.py).
_DEFAULT_SOURCE = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


class UnsupportedManagerOption(RuntimeError):
    """A ``start-re-manager`` option that has no qmagic equivalent in this plugin."""


# =========================================================================================
# start-re-manager parameters -> kernel configuration
# =========================================================================================
@dataclass(frozen=True)
class KernelSpecOptions:
    """What one kernel is started with (hashable: the prewarmed kernel is matched on it)."""

    #: Folder whose *.py / *.ipy files run at kernel start (sorted, as IPython startup files).
    startup_dir: str | None
    #: YAML file with queueserver user group permissions, or None for qmagic's default.
    permissions_file: str | None
    #: 0MQ control address the kernel binds.
    control_address: str = CONTROL_ADDRESS
    #: queueserver info (PUB) address asked for with --zmq-info-addr (None: default).
    info_address: str | None = None
    #: Environment variables handed to the kernel on top of the isolated ones (sorted pairs).
    env: tuple[tuple[str, str], ...] = ()


def _loopback(address: str) -> str:
    """``tcp://*:P`` / ``tcp://0.0.0.0:P`` -> ``tcp://127.0.0.1:P``: test servers stay local."""
    for wildcard in ("tcp://*:", "tcp://0.0.0.0:", "tcp://localhost:"):
        if address.startswith(wildcard):
            return "tcp://127.0.0.1:" + address[len(wildcard):]
    return address


def _permissions_path(value: str) -> str:
    path = Path(value)
    if path.is_dir():
        path = path / "user_group_permissions.yaml"
    return str(path)


def parse_manager_params(params: list[str] | None, environ: Mapping[str, str]) -> KernelSpecOptions:
    """Translate ``start-re-manager`` command-line parameters into a kernel configuration.

    Raises :class:`UnsupportedManagerOption` for an option qmagic cannot honour.
    """
    from bluesky_queueserver.manager.profile_ops import get_default_startup_dir

    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--startup-dir")
    parser.add_argument("--user-group-permissions")
    parser.add_argument("--existing-plans-devices")  # qmagic reads its namespace
    parser.add_argument("--zmq-control-addr", "--zmq-addr", dest="control")
    parser.add_argument("--zmq-info-addr", dest="info")
    parser.add_argument("--zmq-publish-console")
    parser.add_argument("--zmq-encoding", default="json")
    parser.add_argument("--use-ipython-kernel")
    parser.add_argument("--redis-name-prefix")
    parser.add_argument("--redis-addr")
    for flag in ("--verbose", "--quiet", "--silent"):
        parser.add_argument(flag, action="store_true")
    args, unknown = parser.parse_known_args(list(params or []))
    if unknown:
        raise UnsupportedManagerOption(
            f"start-re-manager options {unknown} have no qmagic equivalent in this plugin"
        )
    if args.zmq_encoding not in ("json", "0"):
        raise UnsupportedManagerOption(
            f"--zmq-encoding={args.zmq_encoding}: qmagic speaks JSON only"
        )
    startup_dir = args.startup_dir or get_default_startup_dir()
    if args.user_group_permissions:
        permissions = _permissions_path(args.user_group_permissions)
    else:
        candidate = Path(startup_dir) / "user_group_permissions.yaml"
        permissions = str(candidate) if candidate.is_file() else None
    env: dict[str, str] = {}
    emergency = environ.get("QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER")
    if emergency:
        env["QMAGIC_EMERGENCY_LOCK_KEY"] = emergency
    for name in ("QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER",):
        if environ.get(name):
            env[name] = environ[name]
    return KernelSpecOptions(
        startup_dir=str(startup_dir),
        permissions_file=permissions,
        control_address=_loopback(args.control) if args.control else CONTROL_ADDRESS,
        info_address=_loopback(args.info) if args.info else None,
        env=tuple(sorted(env.items())),
    )


# =========================================================================================
# one kernel
# =========================================================================================
def _isolated_env(base: Path, extra: Mapping[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("QMAGIC_NO_AUTOLOAD", "QMAGIC_EMERGENCY_LOCK_KEY", "JUPYTER_PATH",
                 "JUPYTER_PREFER_ENV_PATH", "XDG_CONFIG_HOME", "PYTEST_CURRENT_TEST",
                 "QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER", "QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER"):
        env.pop(name, None)
    for name in ("HOME", "IPYTHONDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR",
                 "JUPYTER_RUNTIME_DIR", "XDG_CONFIG_HOME"):
        path = base / name.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[name] = str(path)
    source = os.environ.get("QMAGIC_QS_SOURCE") or str(_DEFAULT_SOURCE)
    paths = [source] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    env["QMAGIC_NO_AUTOLOAD"] = "1"  # loaded explicitly with --ext=qmagic
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


#: Functions of queueserver's simulated profile that the function_execute tests call.
_LEAN_NAMES = ("function_sleep", "push_buffer_element", "pop_buffer_element", "clear_buffer",
               "_fifo_buffer")


def _is_default_startup_dir(startup_dir: str) -> bool:
    from bluesky_queueserver.manager.profile_ops import get_default_startup_dir

    return os.path.realpath(startup_dir) == os.path.realpath(get_default_startup_dir())


def lean_profile(startup_dir: str) -> bool:
    """True when ``startup_dir`` is queueserver's default profile and QMAGIC_QS_PROFILE=lean."""
    if os.environ.get("QMAGIC_QS_PROFILE", "full") != "lean":
        return False
    from bluesky_queueserver.manager.profile_ops import get_default_startup_dir

    return os.path.realpath(startup_dir) == os.path.realpath(get_default_startup_dir())


def lean_startup_code(startup_dir: str) -> str:
    """The test functions of the profile's 99-custom.py, cut out of the installed file.

    Saves the imports of bluesky, ophyd and matplotlib (about 3 of the 4 s a kernel takes
    to start with the full profile); only for tests that use no plan, device or RE.
    """
    import ast

    source = Path(startup_dir, "99-custom.py").read_text()
    tree = ast.parse(source)
    keep = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name in _LEAN_NAMES or isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id in _LEAN_NAMES for t in node.targets):
            keep.append(node)
    module = ast.Module(body=keep, type_ignores=[])
    return "import time as ttime\n\n" + ast.unparse(module) + "\n"


class QSKernel:
    """A started kernel: process, blocking client and the folders it owns."""

    def __init__(self, options: KernelSpecOptions, base: Path, state_dir: Path) -> None:
        self.options = options
        self.base = base
        self.state_dir = state_dir
        self.km: Any = None
        self.kc: Any = None

    def start(self, *, bind: bool) -> QSKernel:
        from jupyter_client import KernelManager

        env = _isolated_env(self.base, dict(self.options.env))
        env["QMAGIC_STATE_DIR"] = str(self.state_dir)
        env["TMPDIR"] = str(self.base / "tmp")
        (self.base / "tmp").mkdir(parents=True, exist_ok=True)
        startup = Path(env["IPYTHONDIR"]) / "profile_default" / "startup"
        startup.mkdir(parents=True, exist_ok=True)
        if self.options.startup_dir and lean_profile(self.options.startup_dir):
            (startup / "99-functions.py").write_text(lean_startup_code(self.options.startup_dir))
        elif self.options.startup_dir:
            for pattern in ("*.py", "*.ipy"):
                for path in glob.glob(os.path.join(self.options.startup_dir, pattern)):
                    shutil.copy(path, startup)
        argv = ["--ext=qmagic", *os.environ.get("QMAGIC_QS_KERNEL_ARGS", "").split()]
        if self.options.permissions_file:
            argv.append(f"--QMagic.user_group_permissions_file={self.options.permissions_file}")
        if bind:
            argv.append(f"--QMagic.zmq_control_address={self.options.control_address}")
        self.km = KernelManager(kernel_name="python3",
                                connection_file=str(self.base / "kernel-connection.json"))
        workdir = self.base / "work"
        workdir.mkdir(exist_ok=True)
        if self.options.startup_dir and not _is_default_startup_dir(self.options.startup_dir):
            # queueserver runs uploaded scripts with the startup dir as their root, so that
            # `from mod.x import *` finds startup_dir/mod; a kernel imports from its cwd
            workdir = Path(self.options.startup_dir)
        self.km.start_kernel(extra_arguments=argv, env=env, cwd=str(workdir))
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=START_TIMEOUT_S)
        return self

    def execute(self, code: str, timeout: float = 30.0) -> dict:
        """Run ``code`` silently; return the execute_reply content (raises on error)."""
        reply = self.kc.execute_interactive(code, silent=True, store_history=False,
                                            timeout=timeout, output_hook=lambda msg: None)
        content = reply["content"]
        if content.get("status") != "ok":
            raise RuntimeError(f"kernel refused {code!r}: {content.get('ename')}: "
                               f"{content.get('evalue')}")
        return content

    def bind(self) -> None:
        """Start the control channel of a prewarmed kernel (through qmagic's public trait)."""
        self.execute(
            "import qmagic as _qm\n"
            f"_qm.get_worker().zmq_control_address = {self.options.control_address!r}\n"
            "del _qm"
        )

    def alive(self) -> bool:
        return self.km is not None and self.km.is_alive()

    def stop(self) -> None:
        """Stop the client and the kernel process (idempotent)."""
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None
        if self.km is not None:
            try:
                if self.km.is_alive():
                    self.km.shutdown_kernel(now=True)
                self.km.cleanup_resources()
            finally:
                self.km = None


# =========================================================================================
# prewarming: one spare kernel with the default configuration
# =========================================================================================
class Spare:
    """At most one kernel started ahead, unbound; taken by the next matching request."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._kernel: QSKernel | None = None
        self._error: BaseException | None = None
        self._options: KernelSpecOptions | None = None
        self.enabled = os.environ.get("QMAGIC_QS_PREWARM", "1") != "0"

    def prepare(self, options: KernelSpecOptions) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._thread is not None:
                return
            base = Path(tempfile.mkdtemp(prefix="spare-", dir=self.root))
            kernel = QSKernel(options, base, base / "qmagic-state")
            self._options, self._kernel, self._error = options, kernel, None

            def run() -> None:
                try:
                    kernel.start(bind=False)
                except BaseException as exc:  # noqa: BLE001 - reported to the taker
                    self._error = exc

            self._thread = threading.Thread(target=run, name="qs-spare-kernel", daemon=True)
            self._thread.start()

    def take(self, options: KernelSpecOptions) -> QSKernel | None:
        """The spare kernel if it was started with ``options`` (waits for it), else None."""
        with self._lock:
            thread, kernel = self._thread, self._kernel
            if thread is None or self._options != options:
                return None
            self._thread = self._kernel = self._options = None
        thread.join(START_TIMEOUT_S + 5)
        if self._error is not None or thread.is_alive() or not kernel.alive():
            kernel.stop()
            shutil.rmtree(kernel.base, ignore_errors=True)
            return None
        return kernel

    def close(self) -> None:
        with self._lock:
            thread, kernel = self._thread, self._kernel
            self._thread = self._kernel = self._options = None
        if thread is not None:
            thread.join(START_TIMEOUT_S + 5)
            kernel.stop()
            shutil.rmtree(kernel.base, ignore_errors=True)
