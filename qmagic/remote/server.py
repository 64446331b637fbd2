"""The control channel's transport: one 0MQ REP socket served by a thread of its own.

It moves bytes only: decode each request (size limit, one frame, JSON), hand it to
:func:`qmagic.remote.dispatch.dispatch` with who sent it, encode the reply.  The serving
thread never runs user code and never waits for the kernel's main thread, so every reply
leaves within milliseconds whatever a cell is doing (queueserver's client gives up after
2 s).  Nothing a client sends stops the channel.

CurveZMQ is on when a secret key is given (``$QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER``, as
queueserver); with a client key list (:mod:`qmagic.remote.auth`) only listed clients get
through, and each request may claim only its key's user and groups.  The ZAP handler in the
channel's own 0MQ context sees every new connection (encrypted or not) and refuses it while
``max_connections`` are open (:mod:`qmagic.remote.connections`); 0MQ heartbeats close the
connections of clients gone without a word (a crashed machine, a cut network).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time
from typing import Any, Callable

import zmq

from ..errors import ControlChannelError
from ..jsonreply import LARGE_BYTES, reply_bytes
from ..texts import json_decode_error, large_request_refused
from .connections import DEFAULT_MAX_CONNECTIONS, ConnectionLimit
from .large_work import LargeBudget
from .socket_thread import PRIVATE_KEY_ENV, SocketThread, Waker, close_socket

__all__ = ["ControlServer", "DEFAULT_ADDRESS", "HANDSHAKE_MS", "PRIVATE_KEY_ENV", "hard_cap", "is_loopback",
           "server_secret_key"]

log = logging.getLogger("qmagic")

#: Address used when none is given (queueserver's port, on loopback only).
DEFAULT_ADDRESS = "tcp://127.0.0.1:60615"

_POLL_MS = 100  # how often an idle serving thread looks at the stop flag (stop() wakes it)
_HARD_CAP_MIN = 64 * 1024 * 1024  # MAXMSGSIZE floor: larger frames drop the connection
#: Requests and replies queued per client.  A client that sent requests and never read the
#: replies made the kernel hold a thousand of each (libzmq's default: gigabytes for 9 MB
#: requests, found by a hostile test).  Further requests wait in the client's connection;
#: replies beyond the bound, to a client that does not read, are dropped.  (A REP socket
#: learns late that replies were read: the serving thread makes it look before each reply,
#: else replies to clients that waited for each one were dropped, with a bound of 2 often,
#: with 16 on a loaded machine.)
_REQUESTS_PER_CLIENT = 2
_REPLIES_PER_CLIENT = 16
#: A connection that has not finished its handshake after this long is closed (libzmq's
#: default, 30 s, let idle raw connections pile up until the kernel ran out of files).
HANDSHAKE_MS = 10_000
#: A connection whose client answers no heartbeat within HEARTBEAT_TIMEOUT_MS of a ping
#: (sent every HEARTBEAT_IVL_MS) is closed: a client gone without closing frees its place.
#: Generous: libzmq counts a heartbeat answered only once a whole message has come, so a
#: request arriving slowly (10 MB at 50 kB/s: 200 s) must not be cut; a client whose
#: process ended closes its connection itself (this is for a machine or network gone).
HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS = 10_000, 300_000
_ZERO_COPY_BYTES = 64 * 1024  # replies at least this large are sent from their buffer, not copied
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")

#: ``dispatch(request, client=..., keys=..., identity=..., request_bytes=..., large_work=...)
#: -> reply dict`` (``large_work``: see :meth:`qmagic.remote.large_work.Turn.large_work`)
Dispatcher = Callable[..., dict]
#: ``refusal(head, msg) -> reply dict``: the reply to a request refused unread (``head``: its
#: first bytes), e.g. :func:`qmagic.remote.dispatch.unread_refusal`.
Refusal = Callable[[bytes, str], dict]
_HEAD_BYTES = 200  # what a refusal may read of a request refused unread


def _bare_refusal(head: bytes, msg: str) -> dict:
    return {"success": False, "msg": msg}


def hard_cap(max_message_bytes: int) -> int:
    """0MQ's MAXMSGSIZE for a request limit: far above it, so only absurd frames drop the
    connection (unread) instead of getting an error reply."""
    return max(4 * max_message_bytes, _HARD_CAP_MIN)


def is_loopback(address: str) -> bool:
    """True for ipc://, inproc:// and tcp:// addresses on the loopback interface."""
    if not address.startswith("tcp://"):
        return True
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name


def server_secret_key(secret_key: str | None = None) -> str | None:
    """The CurveZMQ secret key to use (the argument, else the environment), or None."""
    key = secret_key if secret_key is not None else os.environ.get(PRIVATE_KEY_ENV) or None
    if key is None:
        return None
    key = key.strip()
    if not _Z85_KEY.match(key):
        source = "secret_key" if secret_key is not None else f"${PRIVATE_KEY_ENV}"
        raise ControlChannelError(
            f"The CurveZMQ secret key in {source} is not a z85 key of 40 characters (got "
            f"{len(key)} characters). Make a key pair with `python -c \"import zmq; "
            "print(zmq.curve_keypair())\"` (or queueserver's `qserver-zmq-keys`), give the secret "
            "key to the kernel and the public key to clients."
        )
    if not zmq.has("curve"):
        raise ControlChannelError(
            "CurveZMQ was requested but this pyzmq/libzmq has no CURVE support: unset "
            f"{PRIVATE_KEY_ENV} or install a pyzmq wheel built with libsodium."
        )
    return key


class _StatusJSON:
    """Encodes status replies, reusing the JSON of everything but ``time`` while unchanged
    (clients poll status; between changes only its ``time`` differs).  Serving thread only."""

    def __init__(self) -> None:
        self._last: dict | None = None
        self._body = b""

    def encode(self, status: dict) -> bytes:
        rest = dict(status)
        stamp = rest.pop("time")
        if rest != self._last or not rest:
            body = json.dumps(rest).encode("utf-8")
            self._last, self._body = rest, (b", " + body[1:] if rest else b"}")
        return b'{"time": ' + json.dumps(stamp).encode("utf-8") + self._body


def failure_text() -> str:
    """The reply's message when qmagic itself failed on a request (a bug, or a parameter of
    a kind nothing checked): that the kernel is fine, what to do, and where the details are
    (the kernel's log has the traceback; the reply shows no internals)."""
    return ("Error: qmagic could not process this request (an unexpected error; the kernel's "
            "log has the details). The kernel is fine: check the request's parameters and try "
            "again.")


class ControlServer(SocketThread):
    """Serves requests on ``address`` with ``dispatch`` (see the module docstring).

    ``start()`` binds (errors raise :class:`qmagic.ControlChannelError`) and starts the
    thread; ``stop()`` closes the socket and its 0MQ context.  ``address`` may end in
    ``:*`` for a free port: :attr:`address` then tells the bound endpoint.
    """

    what = "control channel"
    thread_name = "qmagic-control"

    def __init__(self, dispatch: Dispatcher, address: str, *, max_message_bytes: int = 10_000_000,
                 secret_key: str | None = None, client_keys: Any = None,
                 refusal: Refusal | None = None, max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        super().__init__(address, DEFAULT_ADDRESS, "zmq_control_address",
                         secret_key=server_secret_key(secret_key), client_keys=client_keys,
                         connections=ConnectionLimit(max_connections, HANDSHAKE_MS / 1000, what=self.what))
        self._dispatch = dispatch
        self._refusal = refusal or _bare_refusal
        #: Largest request accepted, in bytes; larger ones get an error reply (up to
        #: :attr:`socket_cap`, set as the socket is made: larger frames are dropped unread).
        self.max_message_bytes = max_message_bytes
        self.socket_cap = hard_cap(max_message_bytes)
        self._started_at: float | None = None
        self.requests = 0
        self.errors = 0
        self.malformed = 0
        self.last_error: str | None = None
        self._status_json = _StatusJSON()
        self._large = LargeBudget()  # (large work's share of time while others wait)
        self._waker: Waker | None = None  # (the serving thread's, while it runs)

    # -- state ------------------------------------------------------------------------------
    @property
    def refused_busy(self) -> int:
        """Large requests (and reads of large results) refused because large work had used
        its share of time (:mod:`qmagic.remote.large_work`)."""
        return self._large.refused

    @property
    def uptime(self) -> float:
        """Seconds since the channel started (0 when stopped)."""
        return time.time() - self._started_at if self._started_at and self.running else 0.0

    # -- start / stop -------------------------------------------------------------------------
    def _started(self) -> None:
        self._started_at = time.time()
        if not is_loopback(self.requested_address):
            log.warning("qmagic: the control channel listens on %s (not loopback)%s", self.address,
                        "" if self.curve else " WITHOUT encryption: anyone who can reach it can "
                        "run code here")

    # -- the serving thread ----------------------------------------------------------------------
    def _new_socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, _POLL_MS)
        sock.setsockopt(zmq.SNDHWM, _REPLIES_PER_CLIENT)
        sock.setsockopt(zmq.RCVHWM, _REQUESTS_PER_CLIENT)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        # A hard cap far above the configured limit: only absurd frames drop the connection.
        self.socket_cap = hard_cap(self.max_message_bytes)
        sock.setsockopt(zmq.MAXMSGSIZE, self.socket_cap)
        self._secure(sock)
        self._watch(sock)
        return sock

    def _run(self, stop: threading.Event, ready: threading.Event, outcome: dict) -> None:
        ctx = zmq.Context()
        sock: zmq.Socket | None = None
        auth = None
        self._waker = waker = Waker()
        try:
            try:
                auth = self._authenticator(ctx)
                sock = self._new_socket(ctx)
                sock.bind(self.requested_address)
                outcome["endpoint"] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            except zmq.ZMQError as exc:
                outcome["error"] = self._bind_error(exc)
                return
            except Exception as exc:  # noqa: BLE001
                outcome["error"] = f"The control channel could not start: {exc}"
                return
            finally:
                ready.set()
            waiting = True  # True: a request found at once came while the thread was busy
            last: int | None = None  # the connection of the request answered last
            while not stop.is_set():
                try:
                    if not waiting and waker in zmq.select([sock, waker], [], [], _POLL_MS / 1e3)[0]:
                        waker.clear()  # (stop() was called: the loop looks at the flag)
                        continue
                    frames = [sock.recv(zmq.NOBLOCK, copy=False)]
                    while sock.getsockopt(zmq.RCVMORE):
                        frames.append(sock.recv(copy=False))
                except zmq.Again:
                    waiting = False  # (then a wait for a request, or for stop())
                    continue
                except zmq.ZMQError as exc:
                    sock = self._recover(ctx, sock, exc, stop)
                    continue
                # A request already waiting when the last one was answered came while the
                # thread was busy: others are asking too.  Not if it is the same client's
                # (its connection): a client sends its next request once it has its reply
                # (which may be before this thread looks), and 0MQ takes waiting
                # connections in turn, so nobody else was waiting then.
                source = _connection_of(frames[0])
                contended = waiting and (source is None or source != last)
                reply = self._reply_bytes(frames, contended=contended)
                waiting, last = True, source
                try:
                    # The socket first reads what its I/O thread told it (how many replies each
                    # client has read): unasked, it does so only now and then, and a reply to a
                    # client that looks _REPLIES_PER_CLIENT behind is dropped without a word; on
                    # a loaded machine a client waiting for each reply lost one in ~1,000.
                    sock.getsockopt(zmq.EVENTS)
                    sock.send(reply, copy=len(reply) < _ZERO_COPY_BYTES)  # (a kept reply: shared)
                except zmq.ZMQError as exc:
                    sock = self._recover(ctx, sock, exc, stop)
        except BaseException:  # noqa: BLE001 - never let the thread die with a traceback
            log.exception("qmagic: the control channel stopped on an unexpected error")
        finally:
            if sock is not None:
                close_socket(sock)
            if auth is not None:
                auth.stop()
            ctx.term()
            waker.close()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker.wake()

    def _recover(self, ctx: zmq.Context, sock: zmq.Socket, exc: zmq.ZMQError,
                 stop: threading.Event) -> zmq.Socket:
        """A socket error (should not happen): rebuild the socket on the same endpoint."""
        self.last_error = f"0MQ error: {exc}"
        log.warning("qmagic: control channel socket error (%s); rebuilding the socket", exc)
        close_socket(sock)
        endpoint = self._endpoint or self.requested_address
        while not stop.is_set():
            new = self._new_socket(ctx)
            try:
                new.bind(endpoint)
                return new
            except zmq.ZMQError:
                close_socket(new)
                stop.wait(0.1)
        return ctx.socket(zmq.REP)  # stopping: a dummy that the loop will close

    def _bind_error(self, exc: zmq.ZMQError) -> str:
        address = self.requested_address
        if exc.errno == zmq.EADDRINUSE:
            return (
                f"Cannot start the control channel on {address}: the address is already in use "
                "(another kernel or a queueserver RE Manager listens there). Choose another port: "
                "%control_channel start tcp://127.0.0.1:PORT, or stop the other program."
            )
        return (f"Cannot start the control channel on {address}: {exc}. Use a 0MQ endpoint such "
                f"as {DEFAULT_ADDRESS!r} (a local address and a free port).")

    # -- one request ------------------------------------------------------------------------------
    def _reply_bytes(self, frames: list, contended: bool = False) -> bytes:
        """Decode, dispatch and encode one request; never raises.  Large work for a request
        that waited behind others (``contended``) is refused when large work used its share
        of time (:mod:`qmagic.remote.large_work`): a large request undecoded; a lone
        client's is always served."""
        self.requests += 1
        size = sum(len(f) for f in frames)
        turn = self._large.turn(contended)
        large = LARGE_BYTES < size <= self.max_message_bytes  # (larger: refused anyway)
        if large and not turn.large_work():
            reply = self._encoded(self._refused_unread(frames, large_request_refused(size)))
        else:
            reply = self._encoded(self._processed(frames, size, turn.large_work))
        turn.end(len(reply))
        return reply

    def _processed(self, frames: list, size: int, large_work: Callable[[], bool]) -> dict:
        """The reply dict of one request of ``size`` bytes (errors as replies)."""
        try:
            reply = self._handle(frames, size, large_work)
        except BaseException:  # noqa: BLE001 - a bug must not cost the client its reply
            log.exception("qmagic: control channel failed to process a request")
            reply = {"success": False, "msg": failure_text()}
        if not isinstance(reply, dict):
            reply = {"success": False, "msg": f"Error: qmagic produced an invalid reply: {reply!r}"}
        return reply

    def _encoded(self, reply: dict) -> bytes:
        """``reply`` as the bytes sent back (never raises)."""
        if reply.get("success") is False:
            self.errors += 1
            self.last_error = str(reply.get("msg", ""))[:300]
        try:
            if "success" not in reply and "time" in reply:
                return self._status_json.encode(reply)
            return reply_bytes(reply)  # (a large result's JSON made once, see qmagic.jsonreply)
        except Exception as exc:  # noqa: BLE001 - e.g. a value JSON cannot encode
            self.errors += 1
            return json.dumps({"success": False, "msg": (
                f"Error: qmagic could not encode its reply as JSON ({exc}).")}).encode("utf-8")

    def _malformed(self, msg: str) -> dict:
        self.malformed += 1
        return {"success": False, "msg": msg}

    def _refused_unread(self, frames: list, msg: str) -> dict:
        """The refusal of a request not read (its method's reply keys, see ``refusal``)."""
        head = frames[0].buffer[:_HEAD_BYTES].tobytes() if len(frames) == 1 else b""
        return self._refusal(head, msg)

    def _handle(self, frames: list, size: int, large_work: Callable[[], bool]) -> dict:
        if size > self.max_message_bytes:
            self.malformed += 1
            return self._refused_unread(frames, (
                f"Error: The request is too large: {size} bytes, the limit is "
                f"{self.max_message_bytes} (QMagic.zmq_max_message_bytes). Send less data per "
                "request (e.g. pass file names instead of data, split long scripts)."))
        if len(frames) != 1:
            return self._malformed(
                "Error: Invalid request format: expected one message frame with a JSON object, "
                f"got {len(frames)} frames.")
        frame = frames[0]
        raw = frame.bytes
        try:
            request = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            return self._malformed(f"Failed to decode the request: JSON decode error: {json_decode_error(exc)}")
        keys = self._client_keys
        identity = None
        if keys is not None:
            from .auth import identity_of

            identity = identity_of(frame, keys)
        return self._dispatch(request, client=_client_of(frame, identity), keys=keys,
                              identity=identity, request_bytes=decoded_bytes(raw),
                              large_work=large_work)


#: What the objects decoded from a JSON request take at most, per list, per dict and per item
#: (CPython, 64-bit): an empty list is 56 bytes, a small dict 184-232, an item a pointer plus
#: a number or a string of ~30-50 bytes (conservative: small numbers are shared).
_LIST_BYTES, _DICT_BYTES, _ITEM_BYTES = 64, 240, 48
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')  # (unrolled: linear, fast on long strings)


def decoded_bytes(raw: bytes) -> int:
    """About how much memory the objects decoded from the JSON request ``raw`` take (never
    less than its bytes): memory budgets count this, not the request's bytes (a 9 MB request
    of 3 million empty lists decodes to ~215 MB; found by a hostile test).  Lists, dicts and
    items are counted outside strings (a CSV text or a script is one string); C-level passes
    over the bytes."""
    bare = _JSON_STRING.sub(b'""', raw)
    return (len(raw) + _LIST_BYTES * bare.count(b"[") + _DICT_BYTES * bare.count(b"{")
            + _ITEM_BYTES * (bare.count(b",") + bare.count(b":")))


def _connection_of(frame: Any) -> int | None:
    """The connection (its file descriptor) a request came on, or None where 0MQ cannot
    tell (inproc)."""
    try:
        fd = frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError, TypeError):
        return None
    return fd if isinstance(fd, int) and fd >= 0 else None


def _client_of(frame: Any, identity: Any) -> str:
    """Who sent a request, for per-client throttling of wrong lock keys."""
    if identity is not None:
        return f"user:{getattr(identity, 'user', identity)}"
    try:
        peer = frame.get("Peer-Address")
    except Exception:  # noqa: BLE001 - not every transport has one
        peer = None
    return f"peer:{peer}" if peer else "peer:local"
