"""The remote control channel: bluesky-queueserver's 0MQ protocol, served by this kernel.

A :class:`ControlChannel` owns one ``zmq.REP`` socket and the thread that serves it, so a
``bluesky_queueserver_api.zmq.REManagerAPI`` can drive the worker directly: no RE Manager,
no Redis, no extra process.  The channel is a protocol adapter only: it checks the shape of
each request (method, parameter names, required parameters) and calls the same
:class:`qmagic.Worker` method as the magics and the Python API, with ``origin="remote"``
(and ``strict_json=True`` for ``function_execute``), so every rule — lock, permissions,
foreground/idle, JSON results — is implemented once, in the worker.

The serving thread never runs user code and never waits for the kernel's main thread:
foreground requests are handed to the worker's foreground runner and answered at once with
a task uid, so every reply leaves within milliseconds whatever a cell is doing.  Malformed
input (not JSON, not an object, wrong types, oversized frames) gets an error reply; nothing
a client sends stops the channel.

:func:`attach` / :func:`detach` connect a channel to a kernel: the ``%control_channel``
magic, the ``QMagic.zmq_control_address`` trait and the kernel's connection info for
``config_get``.  This module imports IPython only inside those functions.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

import zmq

from .errors import ControlChannelError, RequestRefused

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .worker import Worker

__all__ = [
    "ControlChannel",
    "DEFAULT_ADDRESS",
    "PRIVATE_KEY_ENV",
    "METHODS",
    "attach",
    "detach",
    "get_channel",
    "kernel_connection_info",
]

log = logging.getLogger("qmagic")

#: Address used by ``%control_channel start`` when none is given or configured
#: (queueserver's port, on loopback only).
DEFAULT_ADDRESS = "tcp://127.0.0.1:60615"
#: Environment variable with the server's CurveZMQ secret key (same name as queueserver).
PRIVATE_KEY_ENV = "QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER"

_POLL_MS = 100  # how often the serving thread looks at the stop flag
_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
_HARD_CAP_MIN = 64 * 1024 * 1024  # MAXMSGSIZE floor: larger frames drop the connection
_Z85_KEY = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


# =========================================================================================
# the methods
# =========================================================================================
class _Refused(Exception):
    """A request refused by the adapter itself (missing parameter...); str is the msg."""


@dataclass(frozen=True)
class _Method:
    handler: Callable[["ControlChannel", dict], dict]
    #: Supported parameter names; None: parameters are ignored (status/ping, as queueserver).
    params: tuple[str, ...] | None
    #: The method's other reply keys, set on an error reply.
    error_keys: Mapping[str, Any] = field(default_factory=dict)


def _required(params: dict, name: str, msg: str) -> Any:
    if params.get(name) is None:
        raise _Refused(msg)
    return params[name]


def _status(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.status()


def _function_execute(ch: "ControlChannel", p: dict) -> dict:
    item = p.get("item")
    try:
        _required(p, "item", "Error: Incorrect request format: request contains no item info")
        _required(p, "user_group", "Error: Incorrect request format: user group is not specified")
        _required(p, "user", "Error: Incorrect request format: user name is not specified")
    except _Refused as exc:
        return {"success": False, "msg": str(exc), "item": item, "task_uid": None}
    return ch.worker.function_execute(
        item,
        run_in_background=bool(p.get("run_in_background", False)),
        user=p["user"],
        user_group=p["user_group"],
        lock_key=p.get("lock_key"),
        strict_json=True,
        origin="remote",
    )


def _script_upload(ch: "ControlChannel", p: dict) -> dict:
    script = _required(p, "script", "Error: Required 'script' parameter is is missing in API call.")
    if not isinstance(script, str):
        raise _Refused("Error: Type of the 'script' parameter in API call is incorrect.")
    return ch.worker.script_upload(
        script,
        update_lists=bool(p.get("update_lists", True)),
        update_re=bool(p.get("update_re", False)),
        run_in_background=bool(p.get("run_in_background", False)),
        lock_key=p.get("lock_key"),
        origin="remote",
    )


_NO_TASK_UID = "Error: Required 'task_uid' parameter is missing in the API call."


def _task_status(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.task_status(_required(p, "task_uid", _NO_TASK_UID))


def _task_result(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.task_result(_required(p, "task_uid", _NO_TASK_UID))


def _lock(ch: "ControlChannel", p: dict) -> dict:
    if "user" not in p:
        raise _Refused("Error: User name is not specified: 'user' is a required parameter")
    if "lock_key" not in p:
        raise _Refused("Error: Lock key is not specified: 'lock_key' is a required parameter")
    return ch.worker.lock(
        p["lock_key"],
        environment=p.get("environment", False),
        queue=p.get("queue", False),
        note=p.get("note"),
        user=p["user"],
        origin="remote",
    )


def _unlock(ch: "ControlChannel", p: dict) -> dict:
    if "lock_key" not in p:
        raise _Refused("Error: Request contains no lock key: 'lock_key' parameter is required")
    return ch.worker.unlock(p["lock_key"], origin="remote")


def _lock_info(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.lock_info(p.get("lock_key"), origin="remote")


def _kernel_interrupt(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.kernel_interrupt(
        interrupt_task=bool(p.get("interrupt_task", False)),
        interrupt_plan=bool(p.get("interrupt_plan", False)),
        lock_key=p.get("lock_key"),
        origin="remote",
    )


def _permissions_get(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.permissions_get()


def _permissions_set(ch: "ControlChannel", p: dict) -> dict:
    if "user_group_permissions" not in p:
        raise _Refused("Error: Parameter 'user_group_permissions' is missing")
    reply = ch.worker.permissions_set(
        p["user_group_permissions"], lock_key=p.get("lock_key"), origin="remote"
    )
    if not reply.get("success") and not str(reply.get("msg", "")).startswith("Error"):
        reply = {**reply, "msg": f"Error: {reply.get('msg')}"}
    return reply


def _permissions_reload(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.permissions_reload(lock_key=p.get("lock_key"), origin="remote")


def _history_clear(ch: "ControlChannel", p: dict) -> dict:
    if p.get("size") is not None or p.get("item_uid") is not None:
        raise _Refused(
            "Error: qmagic cannot trim its task history to a size or an item: call history_clear "
            "without 'size' and 'item_uid' to forget every finished task (the journal keeps them)."
        )
    return ch.worker.history_clear(lock_key=p.get("lock_key"), origin="remote")


def _config_get(ch: "ControlChannel", p: dict) -> dict:
    return {"success": True, "msg": "", "config": {"ip_connect_info": ch.get_connection_info()}}


def _environment_open(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.environment_open(lock_key=p.get("lock_key"), origin="remote")


def _environment_close(ch: "ControlChannel", p: dict) -> dict:
    return ch.worker.environment_close(lock_key=p.get("lock_key"), origin="remote")


_LOCK_KEYS = {"lock_info": {}, "lock_info_uid": None}

#: Every method the channel serves: name -> supported parameters and handler.
METHODS: dict[str, _Method] = {
    "status": _Method(_status, None),
    "ping": _Method(_status, None),
    "function_execute": _Method(
        _function_execute,
        ("item", "user_group", "user", "run_in_background", "lock_key"),
        {"item": None, "task_uid": None},
    ),
    "script_upload": _Method(
        _script_upload,
        ("script", "update_lists", "update_re", "run_in_background", "lock_key"),
        {"task_uid": None},
    ),
    "task_status": _Method(_task_status, ("task_uid",), {"task_uid": None, "status": None}),
    "task_result": _Method(
        _task_result, ("task_uid",), {"task_uid": None, "status": None, "result": None}
    ),
    "lock": _Method(_lock, ("lock_key", "note", "environment", "queue", "user"), _LOCK_KEYS),
    "unlock": _Method(_unlock, ("lock_key",), _LOCK_KEYS),
    "lock_info": _Method(_lock_info, ("lock_key",), _LOCK_KEYS),
    "kernel_interrupt": _Method(
        _kernel_interrupt, ("lock_key", "interrupt_task", "interrupt_plan")
    ),
    "permissions_get": _Method(_permissions_get, (), {"user_group_permissions": {}}),
    "permissions_set": _Method(_permissions_set, ("user_group_permissions", "lock_key")),
    "permissions_reload": _Method(
        _permissions_reload, ("restore_plans_devices", "restore_permissions", "lock_key")
    ),
    "config_get": _Method(_config_get, (), {"config": {}}),
    "environment_open": _Method(_environment_open, ("lock_key",)),
    "environment_close": _Method(_environment_close, ("lock_key",)),
    "history_clear": _Method(_history_clear, ("lock_key", "size", "item_uid")),
}


def _unsupported_msg(names: list[str], supported: tuple[str, ...]) -> str:
    shown = f"{names[0]!r}" if len(names) == 1 else f"{names}"
    return (
        f"Error: API request contains unsupported parameters: {shown}. "
        f"Supported parameters: {list(supported)}"
    )


# =========================================================================================
# kernel connection info (config_get)
# =========================================================================================
def kernel_connection_info() -> dict[str, Any]:
    """This process's Jupyter kernel connection info (JSON-ready), or ``{}`` outside a kernel.

    Read from the running ``IPKernelApp`` (ipykernel is never imported here: outside a
    kernel the answer is ``{}``); the HMAC ``key`` is returned as text, as queueserver does.
    """
    app_module = sys.modules.get("ipykernel.kernelapp")
    if app_module is None:
        return {}
    try:
        app_class = app_module.IPKernelApp
        if not app_class.initialized():
            return {}
        app = app_class.instance()
        info = dict(app.get_connection_info())
    except Exception:  # noqa: BLE001 - fall back to the connection file
        info = {}
        try:
            path = app_module.IPKernelApp.instance().abs_connection_file
            with open(path, encoding="utf-8") as fh:
                info = json.load(fh)
        except Exception:  # noqa: BLE001
            return {}
    key = info.get("key")
    if isinstance(key, bytes):
        info["key"] = key.decode("utf-8", "replace")
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, type(None)))}


# =========================================================================================
# the channel
# =========================================================================================
def _is_loopback(address: str) -> bool:
    if not address.startswith("tcp://"):
        return True  # ipc:// and inproc:// are local by nature
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a host name


def _server_secret_key(secret_key: str | None) -> str | None:
    key = secret_key if secret_key is not None else os.environ.get(PRIVATE_KEY_ENV) or None
    if key is None:
        return None
    key = key.strip()
    if not _Z85_KEY.match(key):
        source = "secret_key" if secret_key is not None else f"${PRIVATE_KEY_ENV}"
        raise ControlChannelError(
            f"The CurveZMQ secret key in {source} is not a z85 key of 40 characters "
            f"(got {len(key)} characters). Make a key pair with "
            "`python -c \"import zmq; print(zmq.curve_keypair())\"` (or queueserver's "
            "`qserver-zmq-keys`), give the secret key to the kernel and the public key to clients."
        )
    if not zmq.has("curve"):
        raise ControlChannelError(
            "CurveZMQ was requested but this pyzmq/libzmq has no CURVE support: "
            f"unset {PRIVATE_KEY_ENV} or install a pyzmq wheel built with libsodium."
        )
    return key


class _StatusJSON:
    """Encodes status replies, reusing the JSON of everything but ``time`` while it is unchanged.

    Status is the most frequent request (clients poll it); between state changes only its
    ``time`` differs, so the rest is encoded once per change (the status round trip is
    measured against a bare 0MQ echo: see benchmarks/remote.py).  Serving thread only.
    """

    def __init__(self) -> None:
        self._last: dict | None = None
        self._body = b""

    def encode(self, status: dict) -> bytes:
        rest = dict(status)
        stamp = rest.pop("time")
        if rest != self._last or not rest:
            body = json.dumps(rest).encode("utf-8")
            self._last, self._body = rest, b", " + body[1:] if rest else b"}"
        return b'{"time": ' + json.dumps(stamp).encode("utf-8") + self._body


class ControlChannel:
    """Serves bluesky-queueserver's 0MQ control protocol for ``worker`` at ``address``.

    ``ControlChannel(worker, "tcp://127.0.0.1:60615", max_message_bytes=10_000_000)``;
    ``start()`` binds (errors raise :class:`qmagic.ControlChannelError`) and starts the
    serving thread; ``stop()`` closes the socket and its 0MQ context.  ``address`` may end
    in ``:*`` or ``:0`` for a free port: :attr:`address` then tells the bound endpoint.

    CurveZMQ is on when ``secret_key`` (z85, 40 characters) is given or
    ``$QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER`` is set; clients pass the matching public key
    (``REManagerAPI(zmq_public_key=...)``); a client with a wrong key gets no reply.
    """

    def __init__(
        self,
        worker: "Worker",
        address: str,
        *,
        max_message_bytes: int = 10_000_000,
        secret_key: str | None = None,
    ) -> None:
        if not isinstance(address, str) or "://" not in address:
            raise ControlChannelError(
                f"Invalid control channel address {address!r}: use a 0MQ endpoint such as "
                f"{DEFAULT_ADDRESS!r}."
            )
        if not isinstance(max_message_bytes, int) or max_message_bytes < 1:
            raise ControlChannelError(
                f"max_message_bytes must be a positive integer (got {max_message_bytes!r})."
            )
        self.worker = worker
        #: The address asked for (the bound endpoint is :attr:`address`).
        self.requested_address = address
        #: Largest request accepted, in bytes; larger ones get an error reply.
        self.max_message_bytes = max_message_bytes
        #: Kernel connection info returned by ``config_get``; None: read it from the kernel.
        self.connection_info: dict[str, Any] | None = None
        self._secret_key = _server_secret_key(secret_key)
        self._endpoint: str | None = None
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._state_lock = threading.Lock()
        self._started_at: float | None = None
        self._requests = 0
        self._errors = 0
        self._malformed = 0
        self._last_error: str | None = None
        self._status_json = _StatusJSON()

    # -- properties -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """True while the serving thread is up."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stop_event.is_set()

    @property
    def address(self) -> str:
        """The bound endpoint while running (the real port for ``:*``), else the requested one."""
        return self._endpoint if self._endpoint and self.running else self.requested_address

    @property
    def curve(self) -> bool:
        """True when CurveZMQ encryption is on."""
        return self._secret_key is not None

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: requests served, error replies, malformed requests, last error text."""
        return {
            "requests": self._requests,
            "errors": self._errors,
            "malformed": self._malformed,
            "last_error": self._last_error,
            "started_at": self._started_at,
        }

    def describe(self) -> str:
        """One paragraph for ``%control_channel status``."""
        if not self.running:
            return (
                f"Control channel: off (last address {self.requested_address}). "
                "Start it with %control_channel start [ADDRESS]."
            )
        uptime = time.time() - (self._started_at or time.time())
        lines = [
            f"Control channel: serving bluesky-queueserver clients on {self.address}",
            f"  encryption: {'CurveZMQ' if self.curve else 'none'}; "
            f"largest request: {self.max_message_bytes} bytes",
            f"  up {uptime:.0f} s; {self._requests} requests, {self._errors} error replies, "
            f"{self._malformed} malformed",
        ]
        if not _is_loopback(self.requested_address) and not self.curve:
            lines.append(
                "  WARNING: reachable from other machines without encryption: anyone who can "
                "reach this port can run code in this kernel."
            )
        if self._last_error:
            lines.append(f"  last error: {self._last_error}")
        lines.append(
            f"  client: REManagerAPI(zmq_control_addr={self._client_address()!r}"
            + (", zmq_public_key=<server public key>)" if self.curve else ")")
        )
        return "\n".join(lines)

    def _client_address(self) -> str:
        address = self.address
        if address.startswith("tcp://0.0.0.0:") or address.startswith("tcp://*:"):
            return "tcp://localhost:" + address.rsplit(":", 1)[1]
        return address

    def get_connection_info(self) -> dict[str, Any]:
        """The kernel connection info for ``config_get`` ({} outside a kernel)."""
        if self.connection_info is not None:
            return dict(self.connection_info)
        return kernel_connection_info()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<qmagic.ControlChannel {self.address} {state}{' curve' if self.curve else ''}>"

    # -- start / stop ---------------------------------------------------------------------
    def start(self) -> "ControlChannel":
        """Bind and start serving; returns self.  Raises ControlChannelError on failure."""
        with self._state_lock:
            if self.running:
                return self
            self._stop_event = threading.Event()
            ready = threading.Event()
            outcome: dict[str, Any] = {}
            thread = threading.Thread(
                target=self._serve,
                args=(self._stop_event, ready, outcome),
                name="qmagic-control",
                daemon=True,
            )
            thread.start()
            if not ready.wait(_START_TIMEOUT_S):
                self._stop_event.set()
                raise ControlChannelError(
                    f"The control channel did not start within {_START_TIMEOUT_S:.0f} s "
                    f"on {self.requested_address}."
                )
            if "error" in outcome:
                thread.join(_STOP_TIMEOUT_S)
                raise ControlChannelError(outcome["error"])
            self._thread = thread
            self._endpoint = outcome.get("endpoint")
            self._started_at = time.time()
        if not _is_loopback(self.requested_address):
            log.warning(
                "qmagic: the control channel listens on %s (not loopback)%s",
                self.address,
                ""
                if self.curve
                else " WITHOUT encryption: anyone who can reach it can run code here",
            )
        log.info("qmagic: control channel serving on %s", self.address)
        return self

    def stop(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        """Stop serving and close the socket and its context (idempotent)."""
        with self._state_lock:
            thread, self._thread = self._thread, None
            self._stop_event.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "qmagic: the control channel thread did not stop within %.1f s", timeout
                )

    def __enter__(self) -> "ControlChannel":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- the serving thread ---------------------------------------------------------------
    def _new_socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.REP)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, _POLL_MS)  # the loop looks at the stop flag this often
        # A hard cap far above the configured limit, so that only absurd frames (which
        # would cost that much memory) drop the connection; others get an error reply.
        sock.setsockopt(zmq.MAXMSGSIZE, max(4 * self.max_message_bytes, _HARD_CAP_MIN))
        if self._secret_key is not None:
            sock.setsockopt(zmq.CURVE_SERVER, 1)
            sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key.encode("ascii"))
        return sock

    def _open_socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = self._new_socket(ctx)
        try:
            sock.bind(self.requested_address)
        except zmq.ZMQError:
            sock.close(0)
            raise
        return sock

    def _serve(self, stop: threading.Event, ready: threading.Event, outcome: dict) -> None:
        ctx = zmq.Context()
        sock: zmq.Socket | None = None
        try:
            try:
                sock = self._open_socket(ctx)
                outcome["endpoint"] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            except zmq.ZMQError as exc:
                outcome["error"] = self._bind_error(exc)
                return
            except Exception as exc:  # noqa: BLE001
                outcome["error"] = f"The control channel could not start: {exc}"
                return
            finally:
                ready.set()
            while not stop.is_set():
                try:
                    # recv with a timeout (RCVTIMEO) rather than poll + recv: one call
                    # per request, with the GIL released while waiting.
                    frames = [sock.recv()]
                    while sock.getsockopt(zmq.RCVMORE):
                        frames.append(sock.recv())
                except zmq.Again:
                    continue
                except zmq.ZMQError as exc:
                    sock = self._recover(ctx, sock, exc, stop)
                    continue
                reply = self._reply_bytes(frames)
                try:
                    sock.send(reply)
                except zmq.ZMQError as exc:
                    sock = self._recover(ctx, sock, exc, stop)
        except BaseException:  # noqa: BLE001 - never let the thread die with a traceback
            log.exception("qmagic: the control channel stopped on an unexpected error")
        finally:
            if sock is not None:
                sock.close(0)
            ctx.term()

    def _recover(
        self, ctx: zmq.Context, sock: zmq.Socket, exc: zmq.ZMQError, stop: threading.Event
    ) -> zmq.Socket:
        """A socket error (should not happen): rebuild the socket on the same endpoint."""
        self._last_error = f"0MQ error: {exc}"
        log.warning("qmagic: control channel socket error (%s); rebuilding the socket", exc)
        sock.close(0)
        endpoint = self._endpoint or self.requested_address
        while not stop.is_set():
            new = self._new_socket(ctx)
            try:
                new.bind(endpoint)
                return new
            except zmq.ZMQError:
                new.close(0)
                stop.wait(0.1)
        return ctx.socket(zmq.REP)  # stopping: a dummy that the loop will close

    def _bind_error(self, exc: zmq.ZMQError) -> str:
        address = self.requested_address
        if exc.errno == zmq.EADDRINUSE:
            return (
                f"Cannot start the control channel on {address}: the address is already in use "
                "(another kernel or a queueserver RE Manager listens there). Choose another "
                "port: %control_channel start tcp://127.0.0.1:PORT, or stop the other program."
            )
        return (
            f"Cannot start the control channel on {address}: {exc}. Use a 0MQ endpoint such as "
            f"{DEFAULT_ADDRESS!r} (a local address and a free port)."
        )

    # -- one request ----------------------------------------------------------------------
    def _reply_bytes(self, frames: list) -> bytes:
        """Decode, dispatch and encode one request; never raises."""
        self._requests += 1
        try:
            reply = self._handle_frames(frames)
        except BaseException as exc:  # noqa: BLE001 - a bug must not cost the client its reply
            log.exception("qmagic: control channel failed to process a request")
            reply = {
                "success": False,
                "msg": f"Error: qmagic failed to process the request ({type(exc).__name__}: "
                f"{exc}). The kernel is fine; please report this as a qmagic bug.",
            }
        if not isinstance(reply, dict):
            reply = {"success": False, "msg": f"Error: qmagic produced an invalid reply: {reply!r}"}
        if reply.get("success") is False:
            self._errors += 1
            self._last_error = str(reply.get("msg", ""))[:300]
        try:
            if "success" not in reply and "time" in reply:
                return self._status_json.encode(reply)
            return json.dumps(reply).encode("utf-8")
        except Exception as exc:  # noqa: BLE001 - e.g. a value JSON cannot encode
            self._errors += 1
            return json.dumps(
                {
                    "success": False,
                    "msg": f"Error: qmagic could not encode its reply as JSON ({exc}).",
                }
            ).encode("utf-8")

    def _malformed_reply(self, msg: str) -> dict:
        self._malformed += 1
        return {"success": False, "msg": msg}

    def _handle_frames(self, frames: list) -> dict:
        size = sum(len(f) for f in frames)
        if size > self.max_message_bytes:
            return self._malformed_reply(
                f"Error: The request is too large: {size} bytes, the limit is "
                f"{self.max_message_bytes} (QMagic.zmq_max_message_bytes). Send less data per "
                "request (e.g. pass file names instead of data, split long scripts)."
            )
        if len(frames) != 1:
            return self._malformed_reply(
                f"Error: Invalid request format: expected one message frame with a JSON object, "
                f"got {len(frames)} frames."
            )
        raw = frames[0]
        try:
            request = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            preview = raw[:80].decode("utf-8", "replace")
            return self._malformed_reply(
                f"Failed to decode the request: it is not valid JSON ({exc}): {preview!r}"
            )
        return self.handle(request)

    def handle(self, request: Any) -> dict:
        """Process one decoded request ``{"method": str, "params": dict}``; returns the reply.

        This is the whole protocol without the transport (the serving thread calls it for
        each message).  Never raises for bad input: errors are ``{"success": False, "msg"}``.
        """
        if not isinstance(request, dict):
            return self._malformed_reply(
                f"Incorrect request type: {type(request).__name__}. Dictionary is expected "
                "(a JSON object {\"method\": ..., \"params\": {...}})."
            )
        if "method" not in request:
            return self._malformed_reply(
                f"Invalid request format: method is not specified: {_short(request)}"
            )
        extra = [key for key in request if key not in ("method", "params")]
        if extra:
            return self._malformed_reply(
                f"Request contains unexpected keys {extra}. Allowed keys: ('method', 'params')"
            )
        name = request["method"]
        spec = METHODS.get(name) if isinstance(name, str) else None
        if spec is None:
            return {"success": False, "msg": f"Unknown method {name!r}"}
        params = request.get("params")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            return self._malformed_reply(
                f"Error: Incorrect request format: 'params' must be a dictionary (JSON object), "
                f"got {type(params).__name__}"
            )
        if spec.params is not None:
            unsupported = [key for key in params if key not in spec.params]
            if unsupported:
                msg = _unsupported_msg(unsupported, spec.params)
                return {"success": False, "msg": msg, **spec.error_keys}
        try:
            return spec.handler(self, params)
        except (_Refused, RequestRefused) as exc:
            return {"success": False, "msg": str(exc), **spec.error_keys}
        except Exception as exc:  # noqa: BLE001 - e.g. a wrong parameter type deep inside
            log.warning("qmagic: control request %r failed", name, exc_info=True)
            return {
                "success": False,
                "msg": f"Error: {type(exc).__name__}: {exc}",
                **spec.error_keys,
            }


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# =========================================================================================
# kernel integration: the magic and the trait
# =========================================================================================
class _Attachment:
    """The control channel of one worker in one shell: trait, magic and channel together."""

    def __init__(self, shell: Any, worker: "Worker", connection_info: dict | None) -> None:
        self.shell = shell
        self.worker = worker
        self.connection_info = connection_info
        self.channel: ControlChannel | None = None
        #: The address of the last channel started (``%control_channel start`` reuses it).
        self.last_address: str | None = None
        self._lock = threading.RLock()
        self._syncing = False

    # -- channel lifecycle ----------------------------------------------------------------
    def start(self, address: str | None = None) -> ControlChannel:
        """Start (or restart on a new address) the channel; the trait follows."""
        with self._lock:
            address = (
                address or self.worker.zmq_control_address or self.last_address or DEFAULT_ADDRESS
            )
            current = self.channel
            if current is not None and current.running and address in (
                current.requested_address,
                current.address,
            ):
                return current
            self._stop_channel()
            try:
                channel = ControlChannel(
                    self.worker, address, max_message_bytes=self.worker.zmq_max_message_bytes
                )
                channel.connection_info = self.connection_info
                channel.start()
            except ControlChannelError:
                self._set_trait(None)
                raise
            self.channel = channel
            if address.endswith((":*", ":0")):
                address = channel.address  # keep the port the system chose
            self.last_address = address
            self._set_trait(address)
            return channel

    def stop(self) -> bool:
        """Stop the channel; False if it was not running."""
        with self._lock:
            was_running = self._stop_channel()
            self._set_trait(None)
            return was_running

    def _stop_channel(self) -> bool:
        channel, self.channel = self.channel, None
        if channel is None:
            return False
        running = channel.running
        channel.stop()
        return running

    def _set_trait(self, value: str | None) -> None:
        if self.worker.zmq_control_address == value:
            return
        self._syncing = True
        try:
            self.worker.zmq_control_address = value
        finally:
            self._syncing = False

    # -- trait observers ------------------------------------------------------------------
    def on_address(self, change: Mapping[str, Any]) -> None:
        if self._syncing:
            return
        if change["new"] is None:
            self.stop()
        else:
            self.start(change["new"])  # errors reach whoever set the trait

    def on_limit(self, change: Mapping[str, Any]) -> None:
        channel = self.channel
        if channel is not None:
            channel.max_message_bytes = change["new"]

    def describe(self) -> str:
        channel = self.channel
        if channel is None or not channel.running:
            return (
                "Control channel: off. Start it with %control_channel start [ADDRESS] "
                f"(default {DEFAULT_ADDRESS}), or set QMagic.zmq_control_address."
            )
        return channel.describe()


_ATTACHED: "weakref.WeakKeyDictionary[Any, _Attachment]" = weakref.WeakKeyDictionary()
_MAGIC_NAME = "control_channel"


def get_channel(worker: "Worker") -> ControlChannel | None:
    """The running control channel attached to ``worker`` (None when off or not attached)."""
    attachment = _ATTACHED.get(worker)
    if attachment is None or attachment.channel is None or not attachment.channel.running:
        return None
    return attachment.channel


def _make_magic(attachment: _Attachment) -> Callable[[str], None]:
    from IPython.core.error import UsageError
    from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

    @magic_arguments()
    @argument(
        "action",
        nargs="?",
        default="status",
        choices=["start", "stop", "status"],
        help="start: serve queueserver clients; stop: close the channel; "
        "status (default): show address, encryption and counters.",
    )
    @argument(
        "address",
        nargs="?",
        default=None,
        help="0MQ address for start, e.g. tcp://127.0.0.1:60615 (default: "
        "QMagic.zmq_control_address, else tcp://127.0.0.1:60615). Use a loopback address "
        "unless CurveZMQ is on ($QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER).",
    )
    def control_channel(line: str = "") -> None:
        """Let bluesky-queueserver clients (REManagerAPI) drive this kernel over 0MQ.

        The kernel answers queueserver's control protocol (status, function_execute,
        script_upload, task_status, task_result, lock/unlock, kernel_interrupt, ...) on a
        thread of its own, so replies come back at once even while a cell runs.
        Foreground requests run on the kernel's main thread when it is idle and are refused
        while a cell runs; background requests are accepted at any time.

        Client side::

            from bluesky_queueserver_api.zmq import REManagerAPI
            RM = REManagerAPI(zmq_control_addr="tcp://127.0.0.1:60615")
            RM.status()

        Examples::

            %control_channel start
            %control_channel start tcp://127.0.0.1:60700
            %control_channel status
            %control_channel stop
        """
        args = parse_argstring(control_channel, line)
        if args.action != "start" and args.address is not None:
            raise UsageError(f"%control_channel {args.action} takes no address.")
        if args.action == "start":
            try:
                attachment.start(args.address)
            except ControlChannelError as exc:
                raise UsageError(str(exc)) from None
            print(attachment.describe())
        elif args.action == "stop":
            if attachment.stop():
                print("Control channel stopped.")
            else:
                print("Control channel was not running.")
        else:
            print(attachment.describe())

    return control_channel


def attach(shell: Any, worker: "Worker", *, connection_info: dict | None = None) -> None:
    """Connect the control channel to a kernel (called by ``%load_ext qmagic``).

    Registers the ``%control_channel`` line magic on ``shell`` (if not None), follows the
    worker's ``zmq_control_address`` / ``zmq_max_message_bytes`` traits, and starts the
    channel when an address is configured.  A failure to bind is reported on stderr and
    leaves the channel off (the extension still loads).  ``connection_info`` overrides
    the kernel connection info returned by ``config_get`` (default: read from the kernel).
    """
    detach(shell, worker)
    attachment = _Attachment(shell, worker, connection_info)
    _ATTACHED[worker] = attachment
    worker.observe(attachment.on_address, names="zmq_control_address")
    worker.observe(attachment.on_limit, names="zmq_max_message_bytes")
    if shell is not None:
        shell.register_magic_function(_make_magic(attachment), "line", _MAGIC_NAME)
    if worker.zmq_control_address:
        try:
            attachment.start(worker.zmq_control_address)
        except ControlChannelError as exc:
            log.error("qmagic: %s", exc)
            print(f"qmagic: the control channel is off. {exc}", file=sys.stderr)


def detach(shell: Any, worker: "Worker") -> None:
    """Undo :func:`attach`: stop the channel, stop following the traits, remove the magic.

    The worker's ``zmq_control_address`` keeps its value, so a later :func:`attach`
    starts the channel again.
    """
    attachment = _ATTACHED.pop(worker, None)
    if attachment is not None:
        for handler, name in (
            (attachment.on_address, "zmq_control_address"),
            (attachment.on_limit, "zmq_max_message_bytes"),
        ):
            try:
                worker.unobserve(handler, names=name)
            except ValueError:
                pass
        attachment._stop_channel()
    if shell is not None:
        magics = shell.magics_manager.magics.get("line", {})
        magics.pop(_MAGIC_NAME, None)
        user_magics = getattr(shell.magics_manager, "user_magics", None)
        if user_magics is not None and _MAGIC_NAME in vars(user_magics):
            delattr(user_magics, _MAGIC_NAME)
