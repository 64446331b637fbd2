"""One 0MQ socket owned by one daemon thread: the life cycle the control channel and the
info socket share.

:meth:`SocketThread.start` starts the thread, which binds and reports the bound endpoint (or
the error) before it serves; a failure raises :class:`qmagic.ControlChannelError` and leaves
nothing running.  :meth:`SocketThread.stop` asks the thread to end and joins it
(idempotent).  Subclasses implement ``_run(stop, ready, outcome)``: bind, put ``endpoint`` or
``error`` in ``outcome``, set ``ready``, then serve until ``stop`` is set.  A thread that
blocks on its socket waits on a :class:`Waker` beside it, which ``stop`` sets.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any

from ..errors import ControlChannelError

__all__ = ["PRIVATE_KEY_ENV", "SocketThread", "Waker", "close_socket", "port_is_valid"]

log = logging.getLogger("qmagic")

#: The kernel's CurveZMQ secret key (queueserver's variable).
PRIVATE_KEY_ENV = "QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


def keys_problem(client_keys: Any, *, curve: bool) -> str | None:
    """Why a socket with (or without) CurveZMQ cannot use ``client_keys``; None if it can."""
    if client_keys is not None and not curve:
        return ("QMagic.zmq_client_keys needs CurveZMQ: give the kernel a secret key "
                f"(${PRIVATE_KEY_ENV}), or unset zmq_client_keys.")
    return None


def port_is_valid(address: str) -> bool:
    """False for a ``tcp://`` endpoint whose port is not ``*`` or a number from 0 to 65535 (0
    and ``*``: any free port).  0MQ takes other numbers modulo 65536 (99999 serves 34463,
    -5 serves 65531), so they must be refused before binding.  Other transports: True."""
    scheme, _, rest = address.partition("://")
    if scheme.lower() != "tcp":
        return True
    host, sep, port = rest.rpartition(":")
    if not (sep and host):
        return False
    if port == "*":
        return True
    return port.isascii() and port.isdigit() and int(port) <= 65535


def close_socket(sock: Any, linger_ms: int = 0) -> None:
    """Close a 0MQ socket, its monitor first (a monitor left unread would block libzmq's
    I/O thread: :mod:`qmagic.remote.zap`).  ``linger_ms``: how long the context's end may
    wait for messages sent but not yet delivered (0: they are dropped)."""
    import zmq

    try:
        sock.disable_monitor()
    except zmq.ZMQError:
        pass
    sock.close(linger_ms)


class Waker:
    """A self-pipe that wakes a thread waiting on 0MQ sockets: the thread passes it to
    ``zmq.select`` with its socket (it has a ``fileno``); :meth:`wake` makes it readable from
    any thread, :meth:`clear` (in the waiting thread) drains it.  The thread that made it
    closes it; a wake after that does nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # (no wake writes to a descriptor being closed)
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        """The descriptor that becomes readable on :meth:`wake`."""
        return self._reader.fileno()

    def wake(self) -> None:
        """Make the waiting thread's ``select`` return (any thread; never blocks)."""
        with self._lock:
            if self._writer.fileno() >= 0:
                try:
                    self._writer.send(b"\0")
                except OSError:  # full: a wake is pending anyway
                    pass

    def clear(self) -> None:
        """Drain the pending wakes (the waiting thread)."""
        try:
            while self._reader.recv(4096):
                pass
        except OSError:  # (empty)
            pass

    def close(self) -> None:
        """Close both ends (the thread that made it, as it ends)."""
        with self._lock:
            self._writer.close()
        self._reader.close()


class SocketThread:
    """Start/stop of a socket-owning thread (see the module docstring)."""

    #: Named in messages ("control channel").
    what = "socket"
    thread_name = "qmagic-socket"

    def __init__(self, address: Any, example: str, setting: str, *, secret_key: str | None,
                 client_keys: Any = None, connections: Any) -> None:
        if not isinstance(address, str) or "://" not in address:
            raise ControlChannelError(
                f"Invalid {self.what} address {address!r}: use a 0MQ endpoint such as "
                f"{example!r} (QMagic.{setting})."
            )
        if not port_is_valid(address):
            raise ControlChannelError(
                f"Invalid {self.what} address {address!r}: the port must be a number from 1 to "
                f"65535 (or * or 0 for any free port), e.g. {example!r}."
            )
        problem = keys_problem(client_keys, curve=secret_key is not None)
        if problem:
            raise ControlChannelError(problem)
        self.requested_address = address
        self._secret_key = secret_key
        self._client_keys = client_keys
        self._auth: Any = None  # the running ZAP handler (it decides on every connection)
        #: The bound on open connections (a :class:`~qmagic.remote.connections.ConnectionLimit`).
        self.connections = connections
        self._endpoint: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._state_lock = threading.Lock()

    @property
    def running(self) -> bool:
        """True while the thread serves."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stop.is_set()

    @property
    def address(self) -> str:
        """The bound endpoint while running (the real port for ``:*``), else the requested one."""
        return self._endpoint if self._endpoint and self.running else self.requested_address

    def start(self) -> Any:
        """Bind and start; returns self.  Raises ControlChannelError (nothing left running)."""
        with self._state_lock:
            if self.running:
                return self
            self._stop = threading.Event()
            ready = threading.Event()
            outcome: dict[str, Any] = {}
            thread = threading.Thread(target=self._run, args=(self._stop, ready, outcome),
                                      name=self.thread_name, daemon=True)
            thread.start()
            if not ready.wait(START_TIMEOUT_S):
                self._stop.set()
                raise ControlChannelError(
                    f"The {self.what} did not start within {START_TIMEOUT_S:.0f} s on "
                    f"{self.requested_address}."
                )
            if "error" in outcome:
                thread.join(STOP_TIMEOUT_S)
                raise ControlChannelError(outcome["error"])
            self._thread = thread
            self._endpoint = outcome.get("endpoint")
        self._started()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the thread and close its socket (idempotent)."""
        self._stopping()
        with self._state_lock:
            thread, self._thread = self._thread, None
            self._stop.set()
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning("qmagic: the %s thread did not stop within %.1f s", self.what, timeout)

    @property
    def max_connections(self) -> int:
        """Most connections open at once (QMagic.zmq_max_connections; a change applies to
        new connections)."""
        return self.connections.limit

    @max_connections.setter
    def max_connections(self, value: int) -> None:
        self.connections.limit = value

    @property
    def curve(self) -> bool:
        """True when CurveZMQ encryption is on."""
        return self._secret_key is not None

    # -- for subclasses ---------------------------------------------------------------------
    def _authenticator(self, ctx: Any) -> Any:
        """Start the ZAP handler of ``ctx`` (before binding: the client key list, if any, and
        the connection limit) and return it (stop it after closing the socket)."""
        from .auth import CurveAuthenticator

        auth = CurveAuthenticator(ctx, self._client_keys, limit=self.connections)
        auth.start()
        self._auth = auth
        return auth

    def _watch(self, sock: Any) -> None:
        """After :meth:`_secure`, before binding: the connection limit's count follows
        ``sock`` (close it with :func:`close_socket`)."""
        auth = self._auth
        if auth is None:
            return
        from .connections import MONITOR_EVENTS

        if not auth.watch(sock.get_monitor_socket(MONITOR_EVENTS)):
            close_socket(sock)
            raise ControlChannelError(f"The {self.what}'s connection check does not run.")

    def replace_client_keys(self, keys: Any) -> bool:
        """Use the key list ``keys`` from the next connection and the next message on (a
        client removed from it is refused at once); False, changing nothing, when a list is
        turned on or off: the socket must then start again (its security is set at bind)."""
        if (keys is None) != (self._client_keys is None):
            return False
        old, self._client_keys = self._client_keys, keys
        auth = self._auth
        if auth is not None:
            auth.keys = keys
        if old is not None and any(keys.lookup(identity.public_key) is None for identity in old):
            self._revoked()
        return True

    def _secure(self, sock: Any) -> None:
        """Before binding: CurveZMQ as configured (only listed client keys with a list), and
        the ZAP handler deciding on every connection (the connection limit)."""
        from .auth import secure_server_socket

        secure_server_socket(sock, self._secret_key)

    def _run(self, stop: threading.Event, ready: threading.Event, outcome: dict) -> None:
        raise NotImplementedError

    def _started(self) -> None:
        """After a successful start (outside the state lock)."""

    def _stopping(self) -> None:
        """Before the thread is told to stop."""

    def _wake(self) -> None:
        """Wake the thread if it may be waiting on something other than its socket."""

    def _revoked(self) -> None:
        """A key was taken out of the list (any thread).  0MQ checks a key only at the
        handshake: a socket that does not check each message (the info socket) must drop
        the connections it has (its listed clients reconnect on their own)."""
