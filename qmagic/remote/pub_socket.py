"""The info socket's publishing end: bound with limits, and what its subscribers hold, counted.

0MQ keeps what a subscriber sends in the kernel's memory for as long as it stays connected,
with no limit of its own: one subscription of 300 MB grew the kernel by 2 GB, and 300,000
subscriptions grew it to 3.9 GB in 20 s (hostile tests).  So the socket refuses a message
over :data:`SUBSCRIBER_MAX_BYTES` (the connection drops unread), and it is an XPUB, which
passes the topics subscribed up to the publishing thread: :func:`too_many_topics` tells it
when subscribers hold more than :data:`MAX_TOPICS`, or send what no subscriber sends; the
publisher then makes the socket again at its address (:class:`Renewals`), as it does when a
client key is taken out of the list (0MQ checks a key only at the handshake).

What the kernel holds for a subscriber that does not read is bounded in bytes: 0MQ queues up
to :data:`SUBSCRIBER_HWM` messages per subscriber (its high-water mark counts messages),
and no message is longer than :data:`MESSAGE_MAX_BYTES` (console text goes out in pieces of
at most :data:`CONSOLE_MESSAGE_BYTES` of JSON: :func:`pieces`); worst case per subscriber,
``SUBSCRIBER_HWM * MESSAGE_MAX_BYTES`` = 16 MiB (plus the system's socket buffers; 1 GiB for
the 64 subscribers ``QMagic.zmq_max_connections`` lets in).  A
message is shared by the subscribers it is queued for (measured: 50 subscribers that stopped
reading together held what one holds); ``QMagic.zmq_max_connections`` bounds how many
subscribers hold messages of their own (ones that stopped reading at different times).
Before, each held up to 10,000 messages of up to 100,000 characters (1.2 MB of JSON for
characters JSON escapes): a subscriber that stopped reading while a task printed 50 MB of
non-ASCII text grew the kernel by 290 MB, and up to 12 GB.

This module does not import IPython or ipywidgets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Callable, Iterable

import zmq

from .server import HANDSHAKE_MS, HEARTBEAT_IVL_MS, HEARTBEAT_TIMEOUT_MS
from .socket_thread import close_socket

__all__ = ["CONSOLE_MESSAGE_BYTES", "MAX_TOPICS", "MESSAGE_MAX_BYTES", "NOTES_PER_WAKE", "SUBSCRIBER_HWM",
           "SUBSCRIBER_MAX_BYTES", "Renewals", "bound", "pieces", "too_many_topics"]

log = logging.getLogger("qmagic")

#: The longest message a subscriber may send (its subscriptions; the CurveZMQ handshake's
#: take a few hundred bytes): a longer one drops its connection unread.  0MQ's PUB kept
#: each subscription whole, however long: one of 300 MB grew the kernel by 2 GB (found by
#: a hostile test).
SUBSCRIBER_MAX_BYTES = 1024
#: The most topics subscribers may hold at once.  0MQ keeps every subscription in memory
#: while its subscriber is connected (about 13 kB for one of 320 bytes): a client making
#: 300,000 of them grew the kernel to 3.9 GB in 20 s (a hostile test).  Past this many the
#: socket is made again at the same address, which drops every connection (a subscriber
#: reconnects and subscribes again on its own; queueserver's clients use two topics).
MAX_TOPICS = 256
#: Messages 0MQ queues for one subscriber (its high-water mark); more are dropped for it.
SUBSCRIBER_HWM = 256  # (8 MB of console text in pieces of 32 kB: a burst reaches a slow reader whole)
#: The longest message sent (bytes of its JSON): one a task made longer (a huge progress
#: text of characters JSON escapes) is not sent (said in the debug log).
MESSAGE_MAX_BYTES = 64 * 1024
#: Console text goes out in messages of at most this much JSON text (bytes): a burst of
#: prints fills few messages, and no message comes near :data:`MESSAGE_MAX_BYTES`.
CONSOLE_MESSAGE_BYTES = MESSAGE_MAX_BYTES // 2
#: Subscriptions read at one look (the publishing thread looks every 0.1 s at least).
NOTES_PER_WAKE = 4 * MAX_TOPICS
#: A renewal is said as a warning at most this often (else in the debug log).
_RENEWAL_WARN_S = 60.0
_REBIND_ATTEMPTS = 50  # every 20 ms: the port is let go by 0MQ's own thread


def bound(ctx: zmq.Context, address: str, secure: Callable[[zmq.Socket], None]) -> zmq.Socket:
    """The publishing socket, made secure (and watched: its connections counted) by
    ``secure``, bound at ``address`` (raises, leaving none, on failure; close it with
    :func:`~.socket_thread.close_socket`): an XPUB, which passes each new topic subscribed
    (and each topic no one holds any more) up to the publishing thread, which counts them
    (:func:`too_many_topics`)."""
    sock = ctx.socket(zmq.XPUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, SUBSCRIBER_HWM)
        sock.setsockopt(zmq.MAXMSGSIZE, SUBSCRIBER_MAX_BYTES)
        sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)  # (as the control channel's; heartbeats:
        sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)  # a subscriber gone without a
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)  # word frees its place)
        secure(sock)
        sock.bind(address)
    except BaseException:
        close_socket(sock)
        raise
    return sock


def pieces(texts: Iterable[str], limit: int = CONSOLE_MESSAGE_BYTES) -> list[str]:
    """``texts`` in order, joined into as few messages as hold at most ``limit`` bytes of
    JSON each (as ``json.dumps`` writes a string: an upper bound of what is sent); a text
    longer than that is cut into pieces.  A write per message made a burst of prints many
    thousands of messages, which a subscriber that did not read them at once lost silently
    (a PUB drops at its high-water mark)."""
    messages: list[str] = []
    group: list[str] = []
    size = 0
    for text in texts:
        start, step = 0, limit  # (characters tried at once: a piece is cut until its JSON fits)
        while start < len(text):
            piece = text[start:start + step]
            cost = len(json.dumps(piece)) - 2
            if cost > limit and len(piece) > 1:
                step = max(1, len(piece) * limit // cost)
                continue
            if group and size + cost > limit:
                messages.append("".join(group))
                group, size = [], 0
            group.append(piece)
            size += cost
            start += len(piece)
    if group:
        messages.append("".join(group))
    return messages


def too_many_topics(sock: zmq.Socket, topics: set[bytes], *, greet: bytes | None = None) -> bool:
    """Read the subscriptions waiting on ``sock`` into ``topics`` (the topics held now: 0MQ
    passes up a topic's first subscription and the cancel of its last subscriber only).
    True past :data:`MAX_TOPICS`, and for what no subscriber sends: a message that is no
    subscription, or more than :data:`NOTES_PER_WAKE` since the last look (a flood kept
    the publishing thread reading while nothing was published).

    When topic ``greet`` gets its first subscriber, an empty message (``"msg": ""``) is sent
    on it: bluesky-httpserver's console buffer answers ``/api/console_output_update`` with
    nothing for as long as it holds no message (the first ``last_msg_uid`` it hands out is in
    no buffer), so its HTTP console monitor lost the first output of a kernel that had printed
    nothing since the gateway started (an RE Manager fills that buffer with its log lines)."""
    def held() -> bool:
        return greet is not None and any(greet.startswith(topic) for topic in topics)

    before = held()
    if _read_topics(sock, topics):
        return True
    if not before and held():
        payload = json.dumps({"time": time.time(), "msg": ""}).encode("utf-8")
        try:
            sock.send_multipart([greet, payload], flags=zmq.NOBLOCK)
        except zmq.Again:  # (no subscriber reads yet: nothing is lost)
            pass
    return False


def _read_topics(sock: zmq.Socket, topics: set[bytes]) -> bool:
    """:func:`too_many_topics`' reading of the subscriptions."""
    for _ in range(NOTES_PER_WAKE):
        try:
            note = sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return len(topics) > MAX_TOPICS
        if note[:1] == b"\x01":
            topics.add(note[1:])
        elif note[:1] == b"\x00":
            topics.discard(note[1:])
        else:
            return True
    return True


class Renewals:
    """Makes the socket again (the publishing thread's), and counts how often it had to."""

    def __init__(self) -> None:
        self.count = 0  #: times a client's subscriptions made it
        self._warned_at = -_RENEWAL_WARN_S

    def renew(self, ctx: zmq.Context, sock: zmq.Socket, address: str, secure: Callable[[zmq.Socket], None],
              stop: threading.Event, revoked: bool = False) -> zmq.Socket | None:
        """A new socket bound at ``address`` (the endpoint bound first) in place of ``sock``
        (closed: every subscriber's connection drops; ``revoked``: because a client key was
        taken out of the list, else a client's subscriptions); None if the address cannot be
        bound again within a second, or the publisher stops meanwhile (said in the log)."""
        if revoked:
            log.info("qmagic: a client key was taken out of the list: every subscriber of the info "
                     "socket (%s) was disconnected (listed ones reconnect on their own).", address)
        else:
            self.count += 1
            now = time.monotonic()
            warn = now >= self._warned_at + _RENEWAL_WARN_S
            if warn:
                self._warned_at = now
            (log.warning if warn else log.debug)(
                "qmagic: a client of the info socket (%s) subscribed to more than %d topics, or sent "
                "what no subscriber sends; every subscriber was disconnected (they reconnect on their "
                "own; %d times so far).", address, MAX_TOPICS, self.count)
        with contextlib.suppress(zmq.ZMQError):
            sock.unbind(address)
        close_socket(sock)  # (its monitor first: qmagic.remote.zap)
        error = None
        for _ in range(_REBIND_ATTEMPTS):  # (0MQ lets go of the port in its own thread)
            try:
                return bound(ctx, address, secure)
            except zmq.ZMQError as exc:
                error = exc
                if exc.errno != zmq.EADDRINUSE:
                    break
            if stop.wait(0.02):
                return None
        log.error("qmagic: the info socket is off: it could not be opened again at %s (%s). To start it "
                  "again, set QMagic.zmq_info_address to None and back, or to another address.", address, error)
        return None
