"""What the two browser tests share: Debian's Chromium, a JupyterLab server on loopback with
isolated folders, and the folder for screenshots.

Screenshots go to ``$QMAGIC_TEST_ARTIFACTS/<test>/`` when that variable names a folder (to
look at them after the run: ``QMAGIC_TEST_ARTIFACTS=/tmp/shots python -m pytest
tests/test_panels_browser.py``); otherwise into the test session's folder, which is removed
at the end (the suite leaves no files behind).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


def require_browser(chromium: str = CHROMIUM) -> None:
    """Fail (never skip) when Chromium or Playwright is missing."""
    if not Path(chromium).exists():
        pytest.fail(f"{chromium} is missing: install Debian's chromium (apt-get install -y chromium; "
                    ".ci/run does it). The browser test must not be skipped.")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        pytest.fail(f"the playwright package is missing ({exc}): pip install playwright")


def artifacts_dir(name: str) -> Path:
    """An empty folder for this test's screenshots (see the module docstring)."""
    chosen = os.environ.get("QMAGIC_TEST_ARTIFACTS")
    if chosen:
        base = Path(chosen)
    else:
        session = os.environ.get("QMAGIC_TEST_SESSION")  # tests/session_sandbox.py
        base = Path(session) / "artifacts" if session else REPO_ROOT / "test-artifacts"
    folder = base / name
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.png"):
        old.unlink()
    return folder


@contextlib.contextmanager
def expect_timeout(ms: float):
    """Playwright's ``expect()`` timeout set to ``ms`` within the block (a process-wide
    setting: Playwright's default, 5 s, again after it, for the tests that come later)."""
    from playwright.sync_api import expect

    expect.set_options(timeout=ms)
    try:
        yield
    finally:
        expect.set_options(timeout=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lab:
    """JupyterLab on 127.0.0.1 with isolated folders, serving ``notebook`` (name -> JSON
    text).  ``autoload``: whether qmagic loads itself in the kernels (else the notebook
    loads it).  The app is exposed in the page (theme commands)."""

    def __init__(self, base: Path, notebook: tuple[str, str], *, autoload: bool) -> None:
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.notebook = notebook[0]
        self.root = base / "root"
        self.root.mkdir()
        (self.root / notebook[0]).write_text(notebook[1])
        env = dict(os.environ)
        for name in ("QMAGIC_NO_AUTOLOAD", "QMAGIC_EMERGENCY_LOCK_KEY", "JUPYTER_PATH"):
            env.pop(name, None)
        if not autoload:
            env["QMAGIC_NO_AUTOLOAD"] = "1"
        for name, sub in (("HOME", "home"), ("JUPYTER_CONFIG_DIR", "jconfig"), ("JUPYTER_DATA_DIR", "jdata"),
                          ("JUPYTER_RUNTIME_DIR", "jruntime"), ("IPYTHONDIR", "ipython"),
                          ("QMAGIC_STATE_DIR", "qmagic-state"), ("XDG_CONFIG_HOME", "xdg")):
            (base / sub).mkdir()
            env[name] = str(base / sub)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        # no news toast over the panels; every cell rendered (screenshots of the whole notebook)
        settings = base / "jconfig" / "lab" / "user-settings" / "@jupyterlab"
        for plugin, values in (("apputils-extension/notification", {"fetchNews": "false",
                                                                      "checkForUpdates": False}),
                               ("notebook-extension/tracker", {"windowingMode": "none"})):
            path = settings / f"{plugin}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(values))
        self.log_path = base / "server.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}", "--ServerApp.allow_root=True",
             f"--ServerApp.root_dir={self.root}", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.expose_app_in_browser=True"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=self.root,
        )

    @property
    def url(self) -> str:
        """The notebook's page."""
        return f"http://127.0.0.1:{self.port}/lab/tree/{self.notebook}?token={self.token}"

    def wait_ready(self, timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/api/status?token={self.token}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {self.log()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                threading.Event().wait(0.2)  # polling a server that is starting
        raise TimeoutError(f"jupyter lab did not answer within {timeout} s: {self.log()[-3000:]}")

    def start_kernel(self) -> None:
        """Start the notebook's kernel session through the REST API (as opening it would),
        so the page never asks which kernel to use."""
        body = json.dumps({"path": self.notebook, "name": self.notebook, "type": "notebook",
                           "kernel": {"name": "python3"}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/sessions?token={self.token}", data=body, method="POST",
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as reply:
            assert reply.status == 201, reply.status

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()
