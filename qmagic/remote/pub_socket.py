"""The info socket's publishing end: bound with limits, and what its subscribers hold, counted.

0MQ keeps what a subscriber sends in the kernel's memory for as long as it stays connected,
with no limit of its own: one subscription of 300 MB grew the kernel by 2 GB, and 300,000
subscriptions grew it to 3.9 GB in 20 s (hostile tests).  So the socket refuses a message
over :data:`SUBSCRIBER_MAX_BYTES` (the connection drops unread), and it is an XPUB, which
passes the topics subscribed up to the publishing thread: :func:`too_many_topics` tells it
when subscribers hold more than :data:`MAX_TOPICS`, or send what no subscriber sends; the
publisher then makes the socket again at its address (:mod:`qmagic.remote.info`).

This module does not import IPython or ipywidgets.
"""

from __future__ import annotations

from typing import Callable

import zmq

__all__ = ["MAX_TOPICS", "NOTES_PER_WAKE", "SUBSCRIBER_MAX_BYTES", "bound", "too_many_topics"]

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
#: Subscriptions read at one look (the publishing thread looks every 0.1 s at least).
NOTES_PER_WAKE = 4 * MAX_TOPICS


def bound(ctx: zmq.Context, address: str, secure: Callable[[zmq.Socket], None]) -> zmq.Socket:
    """The publishing socket, made secure by ``secure``, bound at ``address`` (raises, leaving
    none, on failure): an XPUB, which passes each new topic subscribed (and each topic no
    one holds any more) up to the publishing thread, which counts them (:func:`too_many_topics`)."""
    sock = ctx.socket(zmq.XPUB)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.MAXMSGSIZE, SUBSCRIBER_MAX_BYTES)
        # (as the control channel's: raw connections that never finish a handshake are closed)
        sock.setsockopt(zmq.HANDSHAKE_IVL, 10_000)
        secure(sock)
        sock.bind(address)
    except BaseException:
        sock.close(0)
        raise
    return sock


def too_many_topics(sock: zmq.Socket, topics: set[bytes]) -> bool:
    """Read the subscriptions waiting on ``sock`` into ``topics`` (the topics held now: 0MQ
    passes up a topic's first subscription and the cancel of its last subscriber only).
    True past :data:`MAX_TOPICS`, and for what no subscriber sends: a message that is no
    subscription, or more than :data:`NOTES_PER_WAKE` since the last look (a flood kept
    the publishing thread reading while nothing was published)."""
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
