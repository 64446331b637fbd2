"""Run bluesky-queueserver's own tests against a qmagic kernel instead of an RE Manager.

Load it with ``-p`` when running the tests that ship inside the installed package::

    python -m pytest -p tests.queueserver.plugin -o addopts="" -p no:cacheprovider \\
        --pyargs bluesky_queueserver.manager.tests.test_zmq_api_base -k "function_execute"

(``tests/queueserver/run_qs_tests.py`` does that with the selection of issue 16.)

What it changes -- fixtures only, never a reply:

- The manager start/stop fixtures of ``bluesky_queueserver/manager/tests/common.py``
  (``re_manager``, ``re_manager_cmd``, ``re_manager_factory``, ``re_manager_pc_copy``) are
  replaced, before the test modules import them, by fixtures of the same names and
  signatures that start a real IPython kernel (``jupyter_client.KernelManager``) with
  ``--ext=qmagic --QMagic.zmq_control_address=tcp://127.0.0.1:60615`` and stop it
  afterwards.  The object they hand out (:class:`QMagicManager`) has the methods tests call
  on ``common.ReManager``: ``start_manager``, ``stop_manager``, ``kill_manager``,
  ``check_if_stopped``, ``set_used_redis_name_prefix``.
- The kernel gets what ``start-re-manager`` would have loaded: the startup scripts of
  ``--startup-dir`` (default: queueserver's simulated profile collection) run as IPython
  startup files, and its ``user_group_permissions.yaml`` becomes
  ``QMagic.user_group_permissions_file``.  ``QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER`` becomes
  qmagic's emergency key; ``QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER`` reaches the kernel as is.
- Every kernel gets its own HOME, IPYTHONDIR, JUPYTER_{CONFIG,DATA,RUNTIME}_DIR and
  QMAGIC_STATE_DIR under pytest's temporary folder.  ``cleanup=True`` (the default of
  ``ReManager``, which then clears its Redis keys) starts from an empty state folder;
  ``cleanup=False`` keeps it, so a lock survives ``stop_manager`` / ``start_manager``.
- ``PATH`` starts with this interpreter's folder, so the CLI tests find ``qserver``.
- ``USE_IPYKERNEL`` is set to ``1``: qmagic *is* an IPython kernel, so the tests take the
  branches of queueserver's IPython-kernel worker mode (``--use-ipython-kernel=ON``).
- To save time, the next kernel with the default configuration is started in the
  background while a test runs (its control channel is bound only when a test takes it).

Not reproduced (tests that need them fail with a clear reason): ``--zmq-encoding`` other
than json, the startup options other than ``--startup-dir`` and ``--user-group-permissions``,
Redis options (accepted, ignored).  ``_reset_queue_mode`` (``queue_mode_set``) is not sent:
qmagic has no plan queue.

Settings (environment variables read by the plugin):

- ``QMAGIC_QS_SOURCE``: folder holding the ``qmagic`` package to test (default: this
  repository).
- ``QMAGIC_QS_PREWARM=0``: no background start of the next kernel.
- ``QMAGIC_QS_PROFILE=lean``: instead of the whole default profile (bluesky, ophyd,
  matplotlib, RE: ~4 s per kernel), only its test functions (function_sleep,
  push/pop/clear_buffer), cut out of the installed 99-custom.py at run time.  For the
  selections that need no plan, device or Run Engine.
- ``QMAGIC_QS_KERNEL_ARGS``: extra kernel arguments, split on spaces (e.g. a trait that
  makes the kernel start with its environment closed, as an RE Manager does).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import netns  # noqa: E402
from qs_kernels import (
    CONTROL_ADDRESS,
    KernelSpecOptions,
    QSKernel,
    Spare,
    UnsupportedManagerOption,
    parse_manager_params,
)

__all__ = ["CONTROL_ADDRESS", "KernelSpecOptions", "QMagicManager", "parse_manager_params"]

_IDLE_TIMEOUT_S = 30.0  # common.py waits 10 s for an RE Manager; a loaded CI machine needs more
_IDLE_POLL_S = 0.05
_SPARE: Spare | None = None


# =========================================================================================
# the replacement of common.ReManager
# =========================================================================================
class QMagicManager:
    """A qmagic kernel standing in for ``common.ReManager`` (same methods and arguments)."""

    def __init__(self, params: list[str] | None = None, *, root: Path, stdout: Any = None,
                 stderr: Any = None, set_redis_name_prefix: bool = True) -> None:
        self.root = root
        self.base = Path(tempfile.mkdtemp(prefix="qmagic-manager-", dir=root))
        self.state_dir = self.base / "qmagic-state"
        self.kernel: QSKernel | None = None
        self.options: KernelSpecOptions | None = None
        self.start_manager(params)

    # -- the ReManager interface -------------------------------------------------------
    def set_used_redis_name_prefix(self, redis_name_prefix: str) -> None:
        """Accepted for compatibility: there is no Redis."""

    def start_manager(self, params: list[str] | None = None, *, stdout: Any = None,
                      stderr: Any = None, set_redis_name_prefix: bool = True,
                      cleanup: bool = True) -> None:
        """Start the kernel (``cleanup``: with an empty state folder, as Redis is cleared)."""
        if self.kernel is not None:
            return
        if params is not None or self.options is None:
            self.options = parse_manager_params(params, os.environ)
        if cleanup:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        kernel = None
        if cleanup and _SPARE is not None:
            kernel = _SPARE.take(self.options)
        if kernel is not None:
            # the spare has its own (empty) state folder; use it as ours
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self.state_dir = kernel.state_dir
            self.kernel = kernel
            try:
                kernel.bind()
            except BaseException:
                self.kernel = None
                kernel.stop()
                raise
        else:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            kernel_base = Path(tempfile.mkdtemp(prefix="kernel-", dir=self.base))
            self.kernel = QSKernel(self.options, kernel_base, self.state_dir).start(bind=True)
        if _SPARE is not None:
            _SPARE.prepare(parse_manager_params([], {}))

    def check_if_stopped(self, timeout: float = 5) -> bool:
        """True when the kernel process has ended."""
        if self.kernel is None:
            return True
        deadline = time.monotonic() + timeout
        while self.kernel.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        self._forget_kernel()
        return True

    def stop_manager(self, timeout: float = 10, cleanup: bool = True) -> None:
        """Stop the kernel; ``cleanup`` also forgets the state folder (lock, journal)."""
        self._forget_kernel()
        if cleanup:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def kill_manager(self, timeout: float = 10) -> None:
        """Stop the kernel at once (the same as :meth:`stop_manager` for a kernel)."""
        self.stop_manager(timeout)

    # -- helpers -------------------------------------------------------------------------
    def _forget_kernel(self) -> None:
        kernel, self.kernel = self.kernel, None
        if kernel is not None:
            kernel.stop()
            if kernel.base != self.base and kernel.base.parent == self.root:
                # a former spare: its folders go when it stops, except the state folder
                # when it is still ours (cleanup=False keeps it for the next start)
                for child in kernel.base.iterdir():
                    if child != self.state_dir:
                        shutil.rmtree(child, ignore_errors=True)

    def close(self) -> None:
        """Stop everything and remove the folders."""
        self.stop_manager(cleanup=True)
        shutil.rmtree(self.base, ignore_errors=True)
        if self.state_dir.parent != self.base:
            shutil.rmtree(self.state_dir.parent, ignore_errors=True)


def _wait_until_idle() -> bool:
    """Poll ``status`` (queueserver's own request helper) until the kernel answers idle; as
    ``common.wait_for_condition`` does, but every 50 ms instead of every 500 ms."""
    from bluesky_queueserver.manager.tests import common

    deadline = time.monotonic() + _IDLE_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if common.condition_manager_idle(common.get_manager_status()):
                return True
        except TimeoutError:  # (no reply yet: the channel is being bound)
            pass
        time.sleep(_IDLE_POLL_S)  # polling a condition (idle), bounded by the deadline
    return False


# =========================================================================================
# the fixtures (same names and call forms as in common.py)
# =========================================================================================
@pytest.fixture(scope="session")
def _qmagic_qs_root(tmp_path_factory) -> Iterator[Path]:
    global _SPARE
    root = tmp_path_factory.mktemp("qmagic-qs")
    _SPARE = Spare(root)
    _SPARE.prepare(parse_manager_params([], {}))
    yield root
    _SPARE.close()
    _SPARE = None
    shutil.rmtree(root, ignore_errors=True)


def _start(params: list[str] | None, root: Path) -> QMagicManager:
    try:
        manager = QMagicManager(params, root=root)
    except UnsupportedManagerOption as exc:
        pytest.fail(f"qmagic plugin: {exc}", pytrace=False)
    if not _wait_until_idle():
        manager.close()
        raise TimeoutError("Timeout: the qmagic kernel did not answer 'status' as idle.")
    return manager


@pytest.fixture
def re_manager_cmd(_qmagic_qs_root):
    """Replacement of common.re_manager_cmd: ``re_manager_cmd(params)`` starts a qmagic kernel."""
    holder: dict[str, QMagicManager | None] = {"re": None}

    def _close() -> None:
        if holder["re"] is not None:
            holder["re"].close()
            holder["re"] = None

    def create_re_manager(params=None, *, stdout=sys.stdout, stderr=sys.stdout,
                          set_redis_name_prefix=True):
        _close()
        holder["re"] = _start(list(params or []), _qmagic_qs_root)
        return holder["re"]

    yield create_re_manager
    _close()


@pytest.fixture
def re_manager_factory(_qmagic_qs_root):
    """Replacement of common.re_manager_factory (a generator factory, as in common.py)."""

    def _factory(params=None, copy_pc_tmp_path=None):
        from bluesky_queueserver.manager.tests.common import (
            copy_default_profile_collection,
        )

        pc_path = None
        params = list(params or [])
        if copy_pc_tmp_path:
            pc_path = copy_default_profile_collection(copy_pc_tmp_path)
            params += ["--startup-dir", pc_path]
        manager = _start(params, _qmagic_qs_root)
        try:
            yield (manager, pc_path) if pc_path else manager
        finally:
            manager.close()

    return _factory


@pytest.fixture
def re_manager(re_manager_factory):
    """Replacement of common.re_manager: a qmagic kernel with the default profile."""
    yield from re_manager_factory()


@pytest.fixture
def re_manager_pc_copy(re_manager_factory, tmp_path):
    """Replacement of common.re_manager_pc_copy: a kernel started from a copied profile."""
    yield from re_manager_factory(copy_pc_tmp_path=tmp_path)


_REPLACED = ("re_manager", "re_manager_cmd", "re_manager_factory", "re_manager_pc_copy")


def pytest_configure(config: pytest.Config) -> None:
    """Replace the fixtures in ``common`` before the test modules import them."""
    if os.environ.get(netns.ENV_FLAG):  # started in a network namespace of its own
        netns.loopback_up()
    os.environ["USE_IPYKERNEL"] = "1"
    # The CLI tests run `qserver`, `qserver-zmq-keys`... from PATH: use this interpreter's.
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    from bluesky_queueserver.manager.tests import common

    module = sys.modules[__name__]
    for name in _REPLACED:
        setattr(common, name, getattr(module, name))
    config.addinivalue_line("markers", "qmagic_qs: queueserver test run against qmagic")
