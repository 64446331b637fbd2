"""A private network namespace for queueserver's tests (their helpers hard-code 127.0.0.1:60615).

In its own network namespace (``unshare -n``; ``unshare -r -n`` for a user who is not root,
where the system allows it) the selection's kernels and clients have a loopback interface
of their own: port 60615 there is not the port 60615 of the rest of the test suite, so the
selection can run while the other tests run (tests/conftest.py starts it in the background).

- :func:`command_prefix` -- the ``unshare`` words that work on this machine (probed once by
  running a real command in a new namespace), or ``None`` (then the selection runs alone,
  in the suite's own namespace, as before);
- :func:`loopback_up` -- brings ``lo`` up in the new namespace (it starts down); the plugin
  calls it first thing when ``QMAGIC_QS_NETNS`` is set.
"""

from __future__ import annotations

import fcntl
import functools
import os
import shutil
import socket
import struct
import subprocess
import sys

__all__ = ["ENV_FLAG", "command_prefix", "loopback_up"]

#: set in the environment of a selection started in its own namespace
ENV_FLAG = "QMAGIC_QS_NETNS"

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = "16sH14s"  # struct ifreq: the name, then ifr_flags (padded to the union's size)


def loopback_up() -> None:
    """Bring the loopback interface of this process's network namespace up."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack(_IFREQ, b"lo", 0, bytes(14))
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        if not flags & _IFF_UP:
            fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP, bytes(14)))


_PROBE = (
    "import socket, sys\n"
    f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
    "import netns\n"
    "netns.loopback_up()\n"
    "server = socket.create_server(('127.0.0.1', 0))\n"
    "socket.create_connection(server.getsockname(), timeout=5).close()\n"
)


@functools.cache
def command_prefix() -> tuple[str, ...] | None:
    """``("unshare", "-n")`` or ``("unshare", "-r", "-n")`` if a process started with it
    gets a working loopback of its own here; ``None`` otherwise."""
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return None
    prefix = (unshare, "-n") if os.geteuid() == 0 else (unshare, "-r", "-n")
    try:
        done = subprocess.run([*prefix, sys.executable, "-c", _PROBE], capture_output=True,
                              timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return prefix if done.returncode == 0 else None
