"""bluesky-httpserver in front of a qmagic kernel: start and stop helpers for tests.

The minimal configuration is environment variables only (no YAML file, no database)::

    QSERVER_HTTP_SERVER_SINGLE_USER_API_KEY=<key>     # API-key authentication, one user
    QSERVER_ZMQ_CONTROL_ADDRESS=tcp://127.0.0.1:60615  # the kernel's control channel
    QSERVER_ZMQ_INFO_ADDRESS=tcp://127.0.0.1:60625     # the kernel's info (PUB) socket
    uvicorn --host 127.0.0.1 --port 60610 bluesky_httpserver.server:app

(``start-bluesky-httpserver --host 127.0.0.1 --port 60610`` reads the same variables.)
The YAML equivalent, passed with ``QSERVER_HTTP_SERVER_CONFIG=/path/config.yml``::

    authentication:
      single_user_api_key: "<key>"
    qserver_zmq_configuration:
      control_address: tcp://127.0.0.1:60615
      info_address: tcp://127.0.0.1:60625
    uvicorn:            # read by start-bluesky-httpserver only, not by `uvicorn ...:app`
      host: 127.0.0.1
      port: 60610

Clients send ``Authorization: ApiKey <key>``; without it every route answers 401.  The key
must be alphanumeric (bluesky-httpserver refuses to start otherwise: "The API key must
only contain alphanumeric characters").

:func:`start_gateway` starts uvicorn in a subprocess on a free loopback port and waits for
"Bluesky HTTP Server started successfully" in its log; :meth:`Gateway.stop` terminates it.
Used by tests/test_http_gateway.py and benchmarks/http_gateway.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Gateway", "free_port", "start_gateway"]

_READY = "Bluesky HTTP Server started successfully"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Gateway:
    """A running bluesky-httpserver process."""

    proc: subprocess.Popen
    uri: str
    api_key: str
    start_seconds: float
    log: list[str] = field(default_factory=list)
    stop_seconds: float | None = None

    def stop(self, timeout: float = 10.0) -> float:
        """Terminate uvicorn (SIGTERM, then SIGKILL after ``timeout``); returns seconds taken."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.stop_seconds = time.monotonic() - start
        return self.stop_seconds


def start_gateway(control_address: str, info_address: str, api_key: str, workdir: Path,
                  timeout: float = 60.0) -> Gateway:
    """Start bluesky-httpserver with uvicorn on a free 127.0.0.1 port; wait until it serves."""
    port = free_port()
    env = dict(os.environ)
    for name in list(env):
        if name.startswith("QSERVER_"):
            del env[name]
    env.update({
        "QSERVER_HTTP_SERVER_SINGLE_USER_API_KEY": api_key,
        "QSERVER_ZMQ_CONTROL_ADDRESS": control_address,
        "QSERVER_ZMQ_INFO_ADDRESS": info_address,
    })
    cmd = [sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port),
           "bluesky_httpserver.server:app"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    gateway = Gateway(proc, f"http://127.0.0.1:{port}", api_key, 0.0)
    ready, failed = threading.Event(), threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            gateway.log.append(line.rstrip())
            if "Application startup failed" in line:
                failed.set()
                ready.set()
            elif "Uvicorn running on" in line and any(_READY in x for x in gateway.log):
                ready.set()
        ready.set()  # process ended

    threading.Thread(target=pump, name="uvicorn-log", daemon=True).start()
    if not ready.wait(timeout) or failed.is_set() or proc.poll() is not None:
        gateway.stop()
        raise RuntimeError("bluesky-httpserver did not start:\n" + "\n".join(gateway.log[-30:]))
    gateway.start_seconds = time.monotonic() - start
    return gateway
