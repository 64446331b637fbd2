"""The ZAP thread of one 0MQ context: answers every ZAP request (RFC 27) of the context's
sockets with a decision function, and reads a socket monitor between requests.

One per context: ZAP binds ``inproc://zeromq.zap.01`` in it.  A server socket with a ZAP
domain (and ``ZAP_ENFORCE_DOMAIN``) asks it about every new connection, also with the NULL
mechanism; with no thread running, such a socket refuses everyone.

The monitor (:meth:`ZapThread.watch`) is read in the same thread, drained before each
decision: libzmq emits a connection's ``EVENT_ACCEPTED`` before its ZAP request, so every
decision sees the connections accepted so far.  A decision may be put off (``decide``
returns None): the request waits, without an answer (its connection waits in its
handshake), and is decided again as monitor events come and every ``_RETRY_MS``, with the
seconds it has waited — so the socket is a ROUTER, answering requests in any order.  A monitor must never go unread while its
socket lives: libzmq's I/O thread *blocks* on a full (or closed) monitor, which freezes the
socket (measured: after ~2,000 unread events, at once with the reader closed).  Hence: the
socket's owner calls ``sock.disable_monitor()`` before closing the socket, and only then
the reader is closed (here, on the next :meth:`watch` or at :meth:`stop`); this thread
never dies of an error while it runs.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from .socket_thread import Waker

__all__ = ["ZAP_ENDPOINT", "ZapThread"]

log = logging.getLogger("qmagic")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_VERSION = b"1.0"
_DRAIN_MAX = 4096  # monitor events read at most before the next decision (libzmq holds ~2,000)
_START_TIMEOUT_S = 10.0
_RETRY_MS = 50  # how often requests put off are decided again (also on each monitor event)

#: ``decide(domain, mechanism, credentials, waited_s) -> (status code, status text, user id)``,
#: or None to put the decision off
Decide = Callable[[bytes, bytes, list, float], "tuple | None"]
#: ``on_event(event, value)``: a monitor event
OnEvent = Callable[[int, int], None]


class ZapThread:
    """Answers the ZAP requests of ``context`` with ``decide``; reads a monitor's events
    into ``on_event`` (see the module docstring).  :meth:`start` binds the ZAP endpoint
    (``zmq.ZMQError`` if another handler has it) and starts the thread; :meth:`stop` ends
    it and releases the endpoint at once."""

    def __init__(self, context: zmq.Context, decide: Decide, *, on_event: OnEvent | None = None,
                 on_watch: Callable[[], None] | None = None, name: str = "qmagic-zap") -> None:
        self._context = context
        self._decide = decide
        self._on_event = on_event
        self._on_watch = on_watch  # (called in the thread as it takes a new monitor)
        self._name = name
        self._thread: threading.Thread | None = None
        self._zap: zmq.Socket | None = None
        self._waker: Waker | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self._handoff: list = []  # [(monitor socket or None, adopted Event)]

    def start(self) -> None:
        """Bind the ZAP endpoint and start the thread (raises zmq.ZMQError)."""
        zap = self._context.socket(zmq.ROUTER)
        zap.linger = 0
        try:
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError:
            zap.close(0)
            raise
        self._zap, self._waker, self._stopping = zap, Waker(), False
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(zap, self._waker, started),
                                        name=self._name, daemon=True)
        self._thread.start()
        started.wait(_START_TIMEOUT_S)

    def stop(self) -> None:
        """End the thread: it unbinds the endpoint and closes its sockets (and the monitor
        reader: disable the monitor first)."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
        self._waker.wake()
        thread.join()
        self._thread = None

    def is_alive(self) -> bool:
        """Whether the thread runs."""
        thread = self._thread
        return bool(thread is not None and thread.is_alive())

    def watch(self, monitor: zmq.Socket | None, timeout: float = _START_TIMEOUT_S) -> bool:
        """Read ``monitor`` (a socket's ``get_monitor_socket()``) from now on, closing the
        one read so far (whose socket's monitor must be disabled); None: read none.  Returns
        once the thread reads it (so that the next ZAP request sees its events); False,
        ``monitor`` untouched, if the thread does not run."""
        if not self.is_alive():
            return False
        adopted = threading.Event()
        with self._lock:
            self._handoff.append((monitor, adopted))
        self._waker.wake()
        adopted.wait(timeout)
        return True

    # -- the thread -----------------------------------------------------------------------------
    def _run(self, zap: zmq.Socket, waker: Waker, started: threading.Event) -> None:
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        poller.register(waker, zmq.POLLIN)
        monitor: zmq.Socket | None = None
        waiting: list = []  # [(request frames, when it came)], oldest first
        started.set()
        try:
            while True:
                try:
                    poller.poll(_RETRY_MS if waiting else None)
                    waker.clear()  # (poll names a descriptor by its number: cleared each pass)
                    with self._lock:
                        handoff, self._handoff = self._handoff, []
                        stopping = self._stopping
                    for new, adopted in handoff:
                        if monitor is not None:
                            poller.unregister(monitor)
                            monitor.close(0)
                        monitor = new
                        if monitor is not None:
                            poller.register(monitor, zmq.POLLIN)
                        if self._on_watch is not None:  # (after the old monitor's last event)
                            self._on_watch()
                        adopted.set()
                    if stopping:
                        return
                    self._drain(monitor)
                    waiting = self._answer(zap, monitor, waiting)
                except Exception:  # noqa: BLE001 - the monitor must stay read (module docstring)
                    log.exception("qmagic: the ZAP handler failed on a request; it goes on")
        finally:
            if monitor is not None:
                monitor.close(0)
            try:
                zap.unbind(ZAP_ENDPOINT)  # (at once: close() frees it later, in libzmq's reaper)
            except zmq.ZMQError:
                pass
            zap.close(0)
            waker.close()

    def _drain(self, monitor: zmq.Socket | None) -> None:
        if monitor is None or self._on_event is None:
            return
        for _ in range(_DRAIN_MAX):
            try:
                frames = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                event = parse_monitor_message(frames)
                self._on_event(int(event["event"]), int(event["value"]))
            except Exception:  # noqa: BLE001 - (a malformed event, a failed count: the next one)
                log.debug("qmagic: a monitor event of the control socket was not counted", exc_info=True)

    def _answer(self, zap: zmq.Socket, monitor: zmq.Socket | None, waiting: list) -> list:
        """Decide the requests put off (oldest first), then the new ones, the monitor read
        before each; returns those put off again."""
        still: list = []
        now = time.monotonic()
        for frames, since in waiting:
            self._drain(monitor)
            if not self._reply(zap, frames, now - since):
                still.append((frames, since))
        while True:
            try:
                frames = zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return still
            self._drain(monitor)
            if not self._reply(zap, frames, 0.0):
                still.append((frames, now))

    def _reply(self, zap: zmq.Socket, frames: list, waited: float) -> bool:
        """Answer one request (``[peer, b"", version, id, domain, address, identity,
        mechanism, credentials...]``); False if its decision is put off."""
        if len(frames) < 8 or frames[1] != b"" or frames[2] != _VERSION:
            reply = (b"400", b"Invalid ZAP request", b"")
        else:
            try:
                reply = self._decide(frames[4], frames[7], frames[8:], waited)
            except Exception:  # noqa: BLE001 - refuse, say why in the log
                log.exception("qmagic: the connection check failed; the connection is refused")
                reply = (b"400", b"Internal error", b"")
            if reply is None:
                return False
        request_id = frames[3] if len(frames) > 3 else b""
        zap.send_multipart([frames[0], b"", _VERSION, request_id, *reply, b""])
        return True
