"""The remote door of one worker: its control channel and info socket following the traits.

``QMagic.zmq_control_address`` starts, moves or stops the control channel;
``zmq_max_message_bytes`` applies at once, or not at all; ``zmq_info_address`` does the same for the info
socket (PUB: console output, status, task events) and ``zmq_console_all_output`` chooses
what its console carries.  :meth:`RemoteService.start` / :meth:`RemoteService.stop`
(``%control_channel``) keep the trait in step.  No IPython here: the kernel passes its
connection info (for ``config_get``) as a callable.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable, ContextManager, Mapping

from ..core.engine import CLOSED_HINT
from ..core.foreground import interrupt_after
from ..errors import ControlChannelError
from ..format import counted
from ..protocol import QueueserverProtocol, status_reply
from ..worker_state import MSG_WORKER_CLOSED
from .dispatch import dispatch, unread_refusal
from .info import InfoPublisher
from .server import DEFAULT_ADDRESS, ControlServer, hard_cap, is_loopback
from .socket_thread import keys_problem

__all__ = ["RemoteService"]

log = logging.getLogger("qmagic")

_INFO_SETTINGS = ["zmq_info_address", "zmq_console_all_output", "zmq_info_encrypted"]


def _refuse_if_closed(worker: Any, what: str) -> None:
    """A closed worker starts no socket (one already serving serves on, saying it is closed):
    one line, as its other doors refuse (ControlChannelError)."""
    if worker.closed:
        raise ControlChannelError(f"The {what} was not started: the qmagic worker was closed; {CLOSED_HINT}.")


def _client_keys(worker: Any) -> Any:
    """The client key list of ``worker``'s setting (None: no list)."""
    from .auth import ClientKeys

    return ClientKeys.from_config(worker.zmq_client_keys or None)


class RemoteService:
    """Owns the control channel of ``worker`` (see the module docstring)."""

    def __init__(self, worker: Any, connection_info: Callable[[], dict] | None = None) -> None:
        self.worker = worker
        self.protocol = QueueserverProtocol(worker, connection_info)
        self.server: ControlServer | None = None
        self.info: InfoPublisher | None = None
        #: The address of the last channel started (``start()`` without address reuses it).
        self.last_address: str | None = None
        self._lock = threading.RLock()
        self._syncing = False
        worker.observe(self._on_address, names="zmq_control_address")
        worker.observe(self._on_limit, names="zmq_max_message_bytes")
        worker.observe(self._on_info, names=_INFO_SETTINGS)
        worker.observe(self._on_keys, names="zmq_client_keys")
        worker.observe(self._on_max_connections, names="zmq_max_connections")
        if worker.zmq_control_address:
            try:
                self.start(worker.zmq_control_address)
            except ControlChannelError as exc:
                log.error("qmagic: the control channel is off. %s", exc)
        if worker.zmq_info_address:
            try:
                self.start_info(worker.zmq_info_address)
            except ControlChannelError as exc:
                log.error("qmagic: the info socket is off. %s", exc)

    def _dispatch(self, request: Any, **who: Any) -> dict:
        return dispatch(self.protocol, request, **who)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self, address: str | None = None, *, again: bool = False) -> ControlServer:
        """Start (or move to a new address) the channel; the trait follows.  ``again``:
        start it again even where it already serves (new client keys).

        Raises :class:`qmagic.ControlChannelError` on failure: an address or keys it cannot
        use change nothing (a running channel serves on); a bind that fails leaves nothing
        running (the message then says that the channel that served is off).  ■
        while the old channel stops and the new one starts is held until the new one
        serves (or failed), then raised: never a channel off while the trait names it, or a
        new one left serving unknown to qmagic."""
        with self._lock, interrupt_after():
            return self._start(address, again)

    def _start(self, address: str | None, again: bool) -> ControlServer:
        """:meth:`start`, with the lock held and ■ held by the caller."""
        address = address or self.worker.zmq_control_address or self.last_address or DEFAULT_ADDRESS
        current = self.server
        if not again and current is not None and current.running and address in (
                current.requested_address, current.address):
            return current
        try:
            if not again:  # (new keys for one that serves: not a new door)
                _refuse_if_closed(self.worker, "control channel")  # (as every door of a closed worker)
            server = self._new_server(address)  # (checked before the running one stops)
        except ControlChannelError:  # (an address or keys it cannot use: nothing changes)
            running = current is not None and current.running
            self._set_quietly("zmq_control_address", self.last_address if running else None)
            raise
        was = current.address if current is not None and current.running else None
        self._stop_server()
        try:
            server.start()
        except ControlChannelError as exc:
            self._set_quietly("zmq_control_address", None)
            if was is None:
                raise
            raise ControlChannelError(f"{exc} The control channel that served on {was} is off now: "
                                      f"start it again with %control_channel start {was}") from None
        self.server = server
        if address.endswith((":*", ":0")):
            address = server.address  # keep the port the system chose
        self.last_address = address
        self._set_quietly("zmq_control_address", address)
        return server

    def _new_server(self, address: str) -> ControlServer:
        """A channel for ``address`` with the settings in force, not started (raises
        ControlChannelError for an address or keys it cannot use)."""
        return ControlServer(self._dispatch, address, max_message_bytes=self.worker.zmq_max_message_bytes,
                             client_keys=_client_keys(self.worker), refusal=unread_refusal,
                             max_connections=self.worker.zmq_max_connections)

    def stop(self) -> bool:
        """Stop the channel; False if it was not running."""
        with self._lock:
            was_running = self._stop_server()
            self._set_quietly("zmq_control_address", None)
            return was_running

    def _stop_server(self) -> bool:
        server, self.server = self.server, None
        if server is None:
            return False
        running = server.running
        server.stop()
        return running

    def start_info(self, address: str | None = None) -> InfoPublisher:
        """Start (or move) the info socket; raises ControlChannelError on failure (■ as in
        :meth:`start`)."""
        _refuse_if_closed(self.worker, "info socket")
        with self._lock, interrupt_after():
            return self._start_info(address)

    def _start_info(self, address: str | None) -> InfoPublisher:
        """:meth:`start_info`, with the lock held and ■ held by the caller."""
        address = address or self.worker.zmq_info_address
        encrypted = self.worker.zmq_info_encrypted  # (checked before the running one stops:)
        publisher = InfoPublisher(self.worker, address, lambda: status_reply(self.worker),
                                  all_output=self.worker.zmq_console_all_output, encrypted=encrypted,
                                  client_keys=_client_keys(self.worker) if encrypted else None,
                                  max_connections=self.worker.zmq_max_connections)
        self.stop_info()
        publisher.start()
        self.info = publisher
        return publisher

    def stop_info(self) -> bool:
        """Stop the info socket; False if it was not running."""
        with self._lock:
            publisher, self.info = self.info, None
        if publisher is None:
            return False
        publisher.stop()
        return True

    def _on_info(self, change: Mapping[str, Any]) -> None:
        name, info = change["name"], self.info
        if self._syncing or (name == "zmq_console_all_output" and info is None):
            return
        if name == "zmq_console_all_output":
            info.all_output = bool(change["new"])
            return
        running = info is not None and info.running  # (encryption is set as the socket is made)
        address = change["new"] if name == "zmq_info_address" else info.address if running else None
        if address is None:
            self.stop_info()
            return
        try:
            self.start_info(address)
        except ControlChannelError:  # the settings say what runs: the old socket (a new
            running = self.info is not None and self.info.running  # one refused unbound)
            old = change["old"] if name == "zmq_info_address" else address
            self._set_quietly("zmq_info_address", old if running else None)
            if name == "zmq_info_encrypted" and running:
                self._set_quietly(name, change["old"])
            raise

    def close(self) -> None:
        """Stop the channel and the info socket and stop following the traits (the traits
        keep their values, so a new service starts them again)."""
        for handler, names in ((self._on_address, "zmq_control_address"),
                               (self._on_limit, "zmq_max_message_bytes"),
                               (self._on_info, _INFO_SETTINGS),
                               (self._on_keys, "zmq_client_keys"),
                               (self._on_max_connections, "zmq_max_connections")):
            try:
                self.worker.unobserve(handler, names=names)
            except ValueError:
                pass
        with self._lock:
            self._stop_server()
        self.stop_info()

    # -- traits ---------------------------------------------------------------------------------
    def _set_quietly(self, name: str, value: Any) -> None:
        """Set the worker's trait ``name`` to what runs, without reacting to the change."""
        if getattr(self.worker, name) == value:
            return
        self._syncing = True
        try:
            setattr(self.worker, name, value)
        finally:
            self._syncing = False

    def _on_address(self, change: Mapping[str, Any]) -> None:
        if self._syncing:
            return
        if change["new"] is None:
            self.stop()
        else:
            self.start(change["new"])  # errors reach whoever set the trait

    def _on_keys(self, change: Mapping[str, Any]) -> None:
        """A new client key list applies at once: a key taken out of it is refused from the
        next message on.  A list turned on or off starts the channel and the info socket
        again.  A list that cannot be read or used is refused (ControlChannelError) and the
        setting keeps its old value: nothing changes."""
        if self._syncing:
            return
        with self._lock, interrupt_after():  # (■ in a restart: the other restarts too)
            server = self.server if self.server is not None and self.server.running else None
            info = self.info if self.info is not None and self.info.running else None
            info = info if info is not None and info.encrypted else None  # (keys: not for a plain one)
            try:
                keys = _client_keys(self.worker)
                for sock in (server, info):
                    problem = keys_problem(keys, curve=sock.curve) if sock is not None else None
                    if problem:
                        raise ControlChannelError(problem)
            except ControlChannelError:
                self._set_quietly("zmq_client_keys", change["old"])
                raise
            failed: ControlChannelError | None = None
            if server is not None and not server.replace_client_keys(keys):
                try:
                    self._start(self.last_address, again=True)
                except ControlChannelError as exc:  # (the channel is off: the streams still
                    failed = exc  # take the new list, or stay open to clients it shuts out)
            if info is not None and not info.replace_client_keys(keys):
                self._start_info(info.address)
            if failed is not None:
                raise failed

    def _on_max_connections(self, change: Mapping[str, Any]) -> None:
        """The connection limit applies to the next connection (open ones stay), on the
        control channel and the info socket alike (each counts its own)."""
        for sock in (self.server, self.info):
            if sock is not None:
                sock.max_connections = change["new"]

    def _on_limit(self, change: Mapping[str, Any]) -> None:
        """The request limit applies at once; when 0MQ's hard cap for it changes (a socket's
        own, set as it is made), the channel starts again with the new one.  All or nothing:
        if it cannot (keys that no longer read, its port taken meanwhile), the setting keeps
        its old value, the channel serves on with it (the old socket, or a new one with the
        old cap) and ControlChannelError says what happened.  ■ is the worker's setting rule
        (``_apply_setting``): before the change the setting goes back; from the old socket's
        close to the new one's bind it is held and delivered once the channel serves again
        (the change stands): never a channel off while ``zmq_control_address`` names it."""
        self.worker._apply_setting(change, functools.partial(self._apply_limit, change))

    def _apply_limit(self, change: Mapping[str, Any], commit: Callable[[], ContextManager[None]]) -> None:
        if self._syncing:
            return
        with self._lock:
            server = self.server
            if server is None:
                return
            if not server.running or server.socket_cap == hard_cap(change["new"]):
                with commit():
                    server.max_message_bytes = change["new"]
                return
            address = self.last_address or server.address
            try:
                replacement = self._new_server(address)  # (checked before the old one stops)
            except ControlChannelError as exc:
                self._limit_refused(address, change["old"], exc)
            with commit():
                try:
                    self._stop_server()
                    self.server = replacement.start()
                except ControlChannelError as exc:
                    self._limit_refused(address, change["old"], exc)

    def _limit_refused(self, address: str, old: int, exc: ControlChannelError) -> None:
        """The setting back to ``old``, and the one line for a limit that could not apply:
        the channel serves on with ``old`` (started again with it if it had stopped), or it
        is off."""
        self._set_quietly("zmq_max_message_bytes", old)
        kept = f"QMagic.zmq_max_message_bytes stays {old}"
        if self.server is None:
            try:
                self.start(address)
            except ControlChannelError as again:
                raise ControlChannelError(
                    f"The control channel is off and {kept}: it could not start again on {address} "
                    f"({str(again).rstrip('.')}). Start it with %control_channel start ADDRESS."
                ) from None
        raise ControlChannelError(
            f"{kept} and the control channel serves on with it on {address}: the new limit needs "
            f"the channel started again, which failed ({str(exc).rstrip('.')}). Set the limit again "
            "once that is fixed."
        ) from None

    # -- text for %control_channel ------------------------------------------------------------------
    def describe(self) -> str:
        """A few lines: address, encryption, counters, warnings, how a client connects."""
        return _describe_channel(self.server, self.info, self.worker)


def _describe_channel(server: ControlServer | None, info: InfoPublisher | None, worker: Any) -> str:
    """The text of :meth:`RemoteService.describe`."""
    closed = f"\n  {MSG_WORKER_CLOSED}" if worker.closed else ""
    if server is None or not server.running:
        return ("Control channel: off. Start it with %control_channel start [ADDRESS] "
                f"(default {DEFAULT_ADDRESS}), or set QMagic.zmq_control_address." + closed)
    lines = [
        f"Control channel: serving bluesky-queueserver clients on {server.address}",
        f"  encryption: {'CurveZMQ' if server.curve else 'none'}; largest request: "
        f"{server.max_message_bytes} bytes",
        f"  up {server.uptime:.0f} s; {counted(server.requests, 'request')}, "
        f"{counted(server.errors, 'error reply', 'error replies')}, {server.malformed} malformed",
    ]
    lines.append(server.connections.describe())
    if server.refused_busy:
        lines.append(f"  {server.refused_busy} large requests refused while large work "
                     "used half of the channel's time (clients were told to ask again)")
    if not is_loopback(server.requested_address) and not server.curve:
        lines.append("  WARNING: reachable from other machines without encryption: anyone who "
                     "can reach this port can run code in this kernel.")
    if closed:  # (clients are told so: status says the environment is closed)
        lines.append(closed.lstrip("\n"))
    if server.last_error:
        lines.append(f"  last error: {server.last_error}")
    if info is not None:
        lines += info.describe()
    note = worker.log_note()
    if note:
        lines.append(f"  {note}")
    address = server.address
    if address.startswith(("tcp://0.0.0.0:", "tcp://*:")):
        address = "tcp://localhost:" + address.rsplit(":", 1)[1]
    lines.append(f"  client: REManagerAPI(zmq_control_addr={address!r}"
                 + (", zmq_public_key=<server public key>)" if server.curve else ")"))
    return "\n".join(lines)
