"""The info socket: bluesky-queueserver's live streams, published by this kernel.

One publishing socket (queueserver's default port is 60625; qmagic binds loopback; an XPUB
where queueserver has a PUB, so that this kernel bounds what subscribers hold: :mod:`.pub_socket`),
two topics, each message two frames ``[topic, JSON payload]`` with the payload
``{"time": <epoch s>, "msg": ...}``, as queueserver's ``output_streaming.py``:

- ``QS_Console``: text a remote operator would see on the worker's console — what tasks and
  uploaded scripts print, and the threads they start (:func:`qmagic.core.capture.work_of`);
  a failed task's error line (task_result's ``msg``) and traceback, as a queueserver
  worker logs them (``QMagic.zmq_console_all_output``: everything the kernel prints).
- ``QS_Info``: ``{"status": {...the status reply...}}`` about once a second and on every
  change (at once after a task event or a print, else within :data:`_STATUS_CHECK_S`); and, beyond queueserver, ``{"task": {...}}`` for task events (queued,
  running, progress, result or error, final status), coalesced to at most
  :data:`TASK_EVENTS_HZ` per second per task, the final state always sent.

Subscribers: ``REManagerAPI.console_monitor`` and ``system_info_monitor``,
``qserver-console-monitor``, bluesky-httpserver's ``/api/console_output`` and websockets.  Producers
(any thread) only note what is new and wake the publishing thread (one wake-up waits at a
time); one thread owns the socket.  Memory stays bounded whatever the producers do: task
events merge per task; one write longer than :data:`CONSOLE_CHUNK_CHARS` is cut to its
tail, after a marker as a task's own output has (``[... N earlier characters dropped:
the text was too long to send whole ...]``); console text waiting to be sent is kept
up to :data:`CONSOLE_BACKLOG_CHARS`, the oldest dropped first with a note saying how much,
and goes out joined, in messages of a bounded size (:func:`.pub_socket.pieces`).  What
0MQ holds for a subscriber that does not read is bounded too (16 MiB at worst:
:mod:`.pub_socket`), and so is the number of subscribers (``QMagic.zmq_max_connections``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from typing import Any, Callable

import zmq

from .. import format as fmt
from .. import probe
from ..core import capture
from ..core.status import FINISHED_VALUES, TaskStatus
from ..errors import TaskNotFound
from ..jsonreply import json_text
from ..protocol import failure_message, not_started_message
from ..texts import valid_unicode
from .connections import DEFAULT_MAX_CONNECTIONS, ConnectionLimit
from .pub_socket import (
    MAX_TOPICS,
    MESSAGE_MAX_BYTES,
    Renewals,
    bound,
    pieces,
    too_many_topics,
)
from .server import HANDSHAKE_MS, is_loopback, server_secret_key
from .socket_thread import SocketThread, close_socket

__all__ = ["InfoPublisher", "CONSOLE_BACKLOG_CHARS", "CONSOLE_CHUNK_CHARS", "DEFAULT_INFO_ADDRESS", "FINAL_LINGER_S",
           "STATUS_PERIOD_S", "TOPIC_CONSOLE", "TOPIC_INFO", "TASK_EVENTS_HZ"]

log = logging.getLogger("qmagic")

DEFAULT_INFO_ADDRESS = "tcp://127.0.0.1:60625"
TOPIC_CONSOLE = b"QS_Console"
TOPIC_INFO = b"QS_Info"
#: Most task event messages per second per task (the final state is always sent).
TASK_EVENTS_HZ = 10.0
#: Console text kept while it waits to be sent (characters); older text is dropped first.
CONSOLE_BACKLOG_CHARS = 1_000_000
#: Longest text of one write sent whole (characters); a longer one is cut to its tail, so
#: one huge print neither fills the backlog nor pushes out the lines before it.
CONSOLE_CHUNK_CHARS = CONSOLE_BACKLOG_CHARS // 10
#: Longest wait, as the info socket stops (the kernel exits, qmagic is unloaded, the
#: address changes), for its last messages to reach the subscribers (0MQ's linger): the
#: final states of the tasks the exit cancelled, the last lines they printed.  Before,
#: 0MQ dropped what it had not written yet.  A subscriber that does not read costs this
#: much at most.
FINAL_LINGER_S = 0.5
#: Seconds between statuses sent unchanged (a subscriber that joined receives one within
#: this; read when an info socket is made).
STATUS_PERIOD_S = 1.0
#: How often the status is compared with the last one sent, and sent when it changed (a
#: status reply takes some 20 microseconds); queueserver publishes on every change
_STATUS_CHECK_S = 0.1


#: task descriptions the publisher keeps at most (a task's is dropped when it ends)
_INFOS_KEPT = 10_000
#: Longest text of a value JSON cannot write (a progress value: see _described)
_VALUE_CHARS = 2000


#: The info socket's deadline thread for texts of values: one stuck there never makes the
#: control channel's reads (``qmagic-probe``) give up, nor the other way round.
_TEXTS = probe.Prober("qmagic-info-text")


def _described(value: Any) -> str:
    """``json``'s ``default``: the text of a value JSON cannot write (a numpy integer or array,
    an object reported as progress), made with a deadline: its ``str()`` is its own code, and
    a ``__str__`` that blocked (a device asked for its reading) held this thread, and with it
    every status, task and console message, for as long as it blocked."""
    return _TEXTS.text(lambda: fmt.printable(value, _VALUE_CHARS, lines=True), (value,))


def _progress_data(progress: Any) -> dict[str, Any]:
    """A task's progress as data JSON writes without code of its values' own: numbers as
    numbers (a float or int subclass as the built-in number), plain values as they are, any
    other value its text, made with the deadline (json asks a dict subclass for its items)."""
    def plain(value: Any) -> Any:
        cls = type(value)
        if cls in probe.PLAIN_TYPES:
            return value
        if issubclass(cls, float):
            return float.__float__(value)
        if issubclass(cls, int):
            return int.__index__(value)
        if probe.numpy_number(value):
            return value.item()  # (numpy's own code: a Python bool, int, float or complex)
        return value if probe.read_at_once((value,)) else _described(value)

    message = progress.message
    if message is not None and len(message) > _VALUE_CHARS:  # (each message's size is bounded)
        message = message[:_VALUE_CHARS] + "..."
    return {"value": plain(progress.value), "total": plain(progress.total), "message": message}


class InfoPublisher(SocketThread):
    """Publishes console text, status and task events on ``address`` (module docstring).

    ``status`` returns the current status dict; ``worker`` gives the task events.  With
    CurveZMQ on (``secret_key`` or the environment) it is encrypted and admits only
    ``client_keys``'s clients when given; ``encrypted=False`` publishes unencrypted whatever
    the key, as queueserver's publisher does (its subscribers set no keys).
    """

    what = "info socket"
    thread_name = "qmagic-info"

    def __init__(self, worker: Any, address: str, status: Callable[[], dict], *,
                 all_output: bool = False, secret_key: str | None = None, client_keys: Any = None,
                 encrypted: bool = True, status_period: float | None = None,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        super().__init__(address, DEFAULT_INFO_ADDRESS, "zmq_info_address",
                         secret_key=server_secret_key(secret_key) if encrypted else None,
                         client_keys=client_keys if encrypted else None,
                         connections=ConnectionLimit(max_connections, HANDSHAKE_MS / 1000, what=self.what))
        #: False: published unencrypted whatever the key (QMagic.zmq_info_encrypted), as queueserver's.
        self.encrypted = encrypted
        self.worker = worker
        self.all_output = all_output
        self.status_period = STATUS_PERIOD_S if status_period is None else status_period
        self._status = status
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # wake-ups (None: stop)
        self._subscription: Any = None
        self._tasks: dict[str, dict] = {}  # task uid -> pending event state (coalesced)
        self._infos: dict[str, dict] = {}  # task uid -> name, call, user... (until it ends)
        self._sent_at: dict[str, float] = {}
        self._pending_lock = threading.Lock()  # the pending state below, and the wake-up flag
        self._console: deque[str] = deque()  # console text waiting to be sent
        self._console_chars = 0
        self._console_dropped = 0  # characters dropped since the last send
        self._wake_pending = False
        self.messages = 0
        self._renewals = Renewals()  # (the socket made again: a client's subscriptions, a key revoked)

    # -- start / stop (see SocketThread) ----------------------------------------------------------
    def _started(self) -> None:
        capture.add_listener(self._on_output)
        self._subscription = self.worker.subscribe(self._on_event)
        if not is_loopback(self.requested_address) and self._secret_key is None:
            log.warning("qmagic: the info socket publishes on %s without encryption", self.address)

    def _stopping(self) -> None:
        capture.remove_listener(self._on_output)
        if self._subscription is not None:
            self._subscription.unsubscribe()
            self._subscription = None

    def _wake(self) -> None:
        self._queue.put(None)

    def _revoked(self) -> None:
        self._queue.put("revoked")  # (the thread makes the socket again)

    # -- producers (any thread) -----------------------------------------------------------------
    def _on_output(self, task: Any, text: str) -> None:
        """Queue console text (any thread); the oldest queued text goes first when too much waits."""
        if task is None and not self.all_output:
            return
        if len(text) > CONSOLE_CHUNK_CHARS:  # (a task's output buffer's marker, with the reason)
            text = (f"[... {len(text) - CONSOLE_CHUNK_CHARS} earlier characters dropped: the text "
                    f"was too long to send whole ...]\n{text[-CONSOLE_CHUNK_CHARS:]}")
        with self._pending_lock:
            self._console.append(text)
            self._console_chars += len(text)
            while self._console_chars > CONSOLE_BACKLOG_CHARS and len(self._console) > 1:
                old = self._console.popleft()
                self._console_chars -= len(old)
                self._console_dropped += len(old)
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            self._queue.put("new")

    def _task(self, uid: str) -> Any:
        """The task in this kernel's memory, or None."""
        try:
            return self.worker.get_task(uid)
        except TaskNotFound:
            return None

    def _on_event(self, task_uid: str, **event: Any) -> None:
        """Worker events: merge into the task's pending state; wake the thread.  The texts
        that run the task's own code (its arguments' and result's repr, its error's str) are
        made before the lock: every print of every task takes it (_on_output), and a slow or
        blocking repr must never hold them up; and with a deadline
        (:meth:`qmagic.probe.Prober.text`): this thread delivers every task's events."""
        info = self._infos.get(task_uid)
        if info is None:
            if len(self._infos) >= _INFOS_KEPT:  # (tasks whose end it never saw: made again if needed)
                self._infos.clear()
            info = self._infos[task_uid] = self._task_info(task_uid)
        texts: dict[str, Any] = {}
        status = event.get("status")
        if status in FINISHED_VALUES:  # the final message: the whole end state, progress too
            self._infos.pop(task_uid, None)
            task = self._task(task_uid)
            progress = task.progress if task is not None else None
            if progress is not None:
                texts["final_progress"] = progress  # (as data when sent: _publish_tasks)
            if status != TaskStatus.COMPLETED.value and task is not None:  # as a queueserver
                record = task.to_dict()  # worker logs a function stopped by an exception
                if status == TaskStatus.CANCELLED.value and record.get("started_at") is None:
                    # (cancelled in the queue: it never ran; one that failed to start failed)
                    self._on_output(task, f"{not_started_message(record)}\n")
                else:
                    line, tb = failure_message(record, TaskStatus(status)), record.get("traceback")
                    self._on_output(task, f"{line}:\n{tb}\n" if tb else f"{line}\n")
        if event.get("progress") is not None:
            texts["progress"] = event["progress"]
        if "result" in event:
            result = event["result"]
            texts["result"] = _TEXTS.text(lambda: fmt.safe_repr(result, 200), (result,))
        if "error" in event:
            error = event["error"]
            text = _TEXTS.text(lambda: fmt.first_line(error, 200), (error,), "") or type(error).__name__
            texts["error"] = valid_unicode(text)  # (str(exc) may hold a file name)
        with self._pending_lock:
            state = self._tasks.get(task_uid)
            if state is None:
                state = self._tasks[task_uid] = {"task_uid": task_uid, **info}
            if status is not None:
                state["status"] = status
                if "final_progress" in texts and "progress" not in state:
                    state["progress"] = texts["final_progress"]
            if "progress" in texts:
                state["progress"] = texts["progress"]
            for key in ("result", "error"):
                if key in texts:
                    state[key] = texts[key]
            wake, self._wake_pending = not self._wake_pending, True
        if wake:
            self._queue.put("new")

    def _task_info(self, task_uid: str) -> dict[str, Any]:
        """What task messages say of a task besides its state (made once per task)."""
        task = self._task(task_uid)
        if task is None:
            return {}
        call = _TEXTS.text(lambda: task.call_text(80), (*task.args, *task.kwargs.values()), f"{task.name}(...)")
        return {"name": task.name, "call": call, "user": task.user,
                "background": task.background, "origin": task.origin}

    # -- the publishing thread ---------------------------------------------------------------------
    @property
    def renewals(self) -> int:
        """Times the socket was made again to drop a client (:mod:`.pub_socket`)."""
        return self._renewals.count

    def describe(self) -> list[str]:
        """Its lines in ``%control_channel``: the address, and how often the socket was made
        again; or that it is off (it could not be bound again: the log says why)."""
        if not self.running:
            return ["  info socket: off (see the kernel's log); to start it again, set "
                    "QMagic.zmq_info_address to None and back"]
        plain = "" if self.encrypted else " (not encrypted: QMagic.zmq_info_encrypted is False)"
        lines = [f"  info socket (console output, status, task events): {self.address}{plain}"]
        lines.append(f"  info socket:{self.connections.describe()[1:]}")
        if self.renewals:
            lines.append(f"  info socket made again {fmt.counted(self.renewals, 'time')}: a client subscribed "
                         f"to more than {MAX_TOPICS} topics, or sent what no subscriber sends")
        return lines

    def _run(self, stop: threading.Event, ready: threading.Event, outcome: dict) -> None:
        ctx = zmq.Context()
        sock: zmq.Socket | None = None
        auth = None
        try:
            auth = self._authenticator(ctx)  # only listed clients (with keys), so many at most
            sock = bound(ctx, self.requested_address, self._secured)
            outcome["endpoint"] = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        except Exception as exc:  # noqa: BLE001 - reported to start(), nothing left running
            outcome["error"] = (f"Cannot start the info socket on {self.requested_address}: {exc}. "
                                "Choose another address (QMagic.zmq_info_address).")
            if auth is not None:
                auth.stop()
            ctx.term()
            ready.set()
            return
        ready.set()
        topics: set[bytes] = set()
        last_status: dict | None = None
        next_status = next_check = 0.0
        linger_ms = 0
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_status:
                    last_status = self._publish_status(sock, last_status, force=True)
                    next_status = now + self.status_period
                    next_check = now + _STATUS_CHECK_S
                elif now >= next_check:  # (a lock, the environment, a cell: no event says so)
                    last_status = self._publish_status(sock, last_status, force=False)
                    next_check = now + _STATUS_CHECK_S
                due = min(next_status, next_check, self._next_task_due(now))
                wait = max(0.0, due - time.monotonic())
                try:
                    item = self._queue.get(timeout=wait)
                except queue.Empty:
                    item = "tick"
                if item is None:
                    break
                if item == "revoked" or too_many_topics(sock, topics, greet=TOPIC_CONSOLE):
                    sock = self._renewals.renew(ctx, sock, outcome["endpoint"], self._secured, stop,
                                                item == "revoked")
                    topics.clear()
                    if sock is None:
                        break
                if item == "new":
                    self._publish_console(sock)
                    last_status = self._publish_status(sock, last_status, force=False)
                self._publish_tasks(sock, time.monotonic())
            if sock is not None:  # stopping: what waits goes out (task states not yet due too,
                self._publish_console(sock)  # a changed status), and 0MQ gets time to send it
                self._publish_tasks(sock, float("inf"))
                self._publish_status(sock, last_status, force=False)
                linger_ms = int(FINAL_LINGER_S * 1000)
        except Exception:  # noqa: BLE001 - never let the thread die with a traceback
            log.exception("qmagic: the info socket stopped on an unexpected error")
        finally:
            if sock is not None:
                close_socket(sock, linger_ms)
            if auth is not None:
                auth.stop()
            ctx.term()  # (waits up to the linger)

    def _secured(self, sock: zmq.Socket) -> None:
        self._secure(sock)
        self._watch(sock)

    def _publish_console(self, sock: zmq.Socket) -> None:
        """Send the console text that waits (after a note of what was dropped, if any)."""
        with self._pending_lock:
            self._wake_pending = False  # (from here on, new text wakes the thread again)
            texts, self._console = self._console, deque()
            dropped, self._console_chars, self._console_dropped = self._console_dropped, 0, 0
        if dropped:
            texts.appendleft(f"\n[qmagic: {dropped} characters of console output were dropped: "
                             "they came faster than they could be sent]\n")
        for text in pieces(texts):
            self._send(sock, TOPIC_CONSOLE, text)  # (lone surrogates: see _send)

    def _send(self, sock: zmq.Socket, topic: bytes, msg: Any) -> None:
        # Strict JSON: a lone surrogate (a print, an error or a progress message naming a
        # file that is not UTF-8) made subscribers that pass it on as UTF-8 fail
        # (bluesky-httpserver's replies and websockets: 500 until it scrolled out), as did NaN.
        try:
            payload, _ = json_text({"time": time.time(), "msg": msg}, default=_described)
        except Exception:  # noqa: BLE001 - a value JSON cannot write (one that holds itself,
            # nested too deep): its text goes out, the stream goes on
            text = _TEXTS.text(lambda: fmt.safe_repr(msg, CONSOLE_CHUNK_CHARS), (msg,))
            payload, _ = json_text({"time": time.time(), "msg": text})
        data = payload.encode("utf-8")
        if len(data) > MESSAGE_MAX_BYTES:  # (a task's texts of absurd size: see pub_socket)
            log.debug("qmagic: an info socket message of %d bytes was not sent (the most: %d)",
                      len(data), MESSAGE_MAX_BYTES)
            return
        try:
            sock.send_multipart([topic, data], flags=zmq.NOBLOCK)
            self.messages += 1
        except zmq.Again:  # a slow subscriber: PUB drops, as queueserver's does
            pass

    def _publish_status(self, sock: zmq.Socket, last: dict | None, *, force: bool) -> dict | None:
        try:
            status = self._status()
        except Exception:  # noqa: BLE001 - a broken status must not stop the stream
            log.debug("qmagic: status for the info socket failed", exc_info=True)
            return last
        key = {k: v for k, v in status.items() if k != "time"}
        if force or key != last:
            self._send(sock, TOPIC_INFO, {"status": status})
        return key

    def _next_task_due(self, now: float) -> float:
        with self._pending_lock:
            if not self._tasks:
                return now + self.status_period
            return min(self._sent_at.get(uid, 0.0) + 1.0 / TASK_EVENTS_HZ for uid in self._tasks)

    def _publish_tasks(self, sock: zmq.Socket, now: float) -> None:
        due: list[dict] = []
        with self._pending_lock:
            for uid in list(self._tasks):
                state = self._tasks[uid]
                final = state.get("status") in FINISHED_VALUES
                if final or now >= self._sent_at.get(uid, 0.0) + 1.0 / TASK_EVENTS_HZ:
                    due.append(self._tasks.pop(uid))
                    if final:
                        self._sent_at.pop(uid, None)
                    else:
                        self._sent_at[uid] = now
        for state in due:  # (a progress as data here, at most TASK_EVENTS_HZ times per task: its
            # values' text may take the deadline, and the events thread feeds the panels too)
            if state.get("progress") is not None:
                state["progress"] = _progress_data(state["progress"])
            self._send(sock, TOPIC_INFO, {"task": state})
