"""The bound on how many connections the control channel holds open (and the info socket:
its subscribers, each holding up to 16 MiB that it has not read, :mod:`.pub_socket`; a
limit of its own, the same machinery in its own 0MQ context).

Each connection may hold a few requests in the kernel's memory (0MQ's queues, each request
up to the socket's size cap): without a bound on connections, a program that opened
thousands of them could make the kernel run out of memory (measured: 100 clients x 3 x 9 MB
took 1.6 GB).  The channel's ZAP handler (:class:`qmagic.remote.auth.CurveAuthenticator`)
asks :meth:`ConnectionLimit.admit` for every connection that passed the key check, and
refuses it while ``limit`` connections are open (``QMagic.zmq_max_connections``).

What is open is learnt from the control socket's monitor: ``EVENT_ACCEPTED`` and
``EVENT_DISCONNECTED`` name each connection by its descriptor (exact).  libzmq does not say
which connection a ZAP request or a finished handshake belongs to, so the admitted
connections are bounded from above, never under-counted:

- a connection open longer than the handshake timeout finished its handshake (libzmq drops
  it otherwise), so it was admitted ("old");
- a younger admitted connection had its admission within that time, and is one of the young
  connections other than the one being decided;

hence ``admitted open <= old + min(young - 1, recent admissions)``, exact for connections
older than the handshake timeout.  Young connections that are not admitted (closing, or
still in their handshake) may make it too high: at the limit, unless the old connections
alone fill it, a decision is put off (the connection waits in its handshake) until the
count falls below the limit — most often milliseconds, as closing connections report —
or ``PATIENCE_S`` passed: then it is refused.  Memory: one entry per open connection, one per admission kept
(at most ``limit``), and the young ones' accept times (compacted).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

import zmq

__all__ = ["ConnectionLimit", "DEFAULT_MAX_CONNECTIONS", "MONITOR_EVENTS"]

log = logging.getLogger("qmagic")

#: QMagic.zmq_max_connections's default: queueserver's clients hold one connection each.
DEFAULT_MAX_CONNECTIONS = 64
#: The monitor events counted (the others are not needed: fewer events, less to read).
MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_SETTLE_MARGIN_S = 2.0  # beyond the handshake timeout (libzmq's timers, a busy I/O thread)
#: How long a connection at the limit may wait for the count to fall before it is refused
#: (well within the handshake timeout).
PATIENCE_S = 2.0


class ConnectionLimit:
    """Counts the connections of one socket (the control channel's, the info socket's) and
    decides admissions (see the module docstring).  Thread-safe: the ZAP thread feeds and
    asks it, others read its counters."""

    def __init__(self, limit: int, handshake_s: float, *, what: str = "control channel",
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._what = what  # (named in the warning)
        self._clock = clock
        self._settle = handshake_s + _SETTLE_MARGIN_S
        self._limit = int(limit)
        self._open: dict[int, list] = {}  # descriptor -> [accepted at, old?]
        self._young: deque[tuple[float, int]] = deque()  # (accepted at, descriptor), oldest first
        self._young_count = 0
        self._old_count = 0
        self._admitted: deque[float] = deque(maxlen=self._limit)  # when, the last admissions
        #: Connections refused because ``limit`` were open.
        self.refused = 0
        self._warned = False

    # -- the setting ------------------------------------------------------------------------
    @property
    def limit(self) -> int:
        """Most connections open at once; a change applies to the next connection (open
        ones beyond a lowered limit stay until they close)."""
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        with self._lock:
            self._limit = int(value)
            self._admitted = deque(self._admitted, maxlen=self._limit)

    # -- what the monitor says ----------------------------------------------------------------
    def reset(self) -> None:
        """A new socket: nothing open (the old socket's connections closed with it)."""
        with self._lock:
            self._open.clear()
            self._young.clear()
            self._young_count = self._old_count = 0
            self._admitted.clear()

    def event(self, event: int, fd: int) -> None:
        """A monitor event of the socket (others than accepted/disconnected are ignored)."""
        with self._lock:
            if event == zmq.EVENT_ACCEPTED:
                self._close(fd)  # (a descriptor reused: its old connection is gone)
                now = self._clock()
                self._open[fd] = [now, False]
                self._young.append((now, fd))
                self._young_count += 1
                if len(self._young) > 2 * self._young_count + 1024:
                    self._young = deque((entry[0], d) for d, entry in self._open.items() if not entry[1])
            elif event == zmq.EVENT_DISCONNECTED:
                self._close(fd)

    def _close(self, fd: int) -> None:
        entry = self._open.pop(fd, None)
        if entry is None:
            return
        if entry[1]:
            self._old_count -= 1
        else:
            self._young_count -= 1

    def _age(self, now: float) -> float:
        """Move the connections older than the handshake timeout to the old ones; returns
        the cut-off time."""
        cutoff = now - self._settle
        young = self._young
        while young and young[0][0] <= cutoff:
            accepted, fd = young.popleft()
            entry = self._open.get(fd)
            if entry is not None and entry[0] == accepted and not entry[1]:
                entry[1] = True
                self._young_count -= 1
                self._old_count += 1
        admitted = self._admitted
        while admitted and admitted[0] <= cutoff:
            admitted.popleft()
        return cutoff

    def _held(self, deciding: bool) -> int:
        self._age(self._clock())
        young = self._young_count - (1 if deciding else 0)
        return self._old_count + max(0, min(young, len(self._admitted)))

    # -- decisions and counters ---------------------------------------------------------------------
    @property
    def held(self) -> int:
        """The connections open that passed the checks (an upper bound, see the module
        docstring)."""
        with self._lock:
            return self._held(False)

    def describe(self) -> str:
        """Its line in ``%control_channel``."""
        with self._lock:
            held, limit, refused = self._held(False), self._limit, self.refused
        line = f"  {held} connection{'' if held == 1 else 's'} open, at most {limit} (QMagic.zmq_max_connections)"
        if refused:
            line += f"; {refused} attempt{'' if refused == 1 else 's'} to connect refused at the limit"
        return line

    def admit(self, waited: float = 0.0) -> bool | None:
        """Whether one more connection may open (the ZAP thread, for a connection that passed
        every other check and has waited ``waited`` seconds); None: ask again later (see the
        module docstring).  A refusal is counted, and said once in the log."""
        with self._lock:
            held = self._held(True)
            if held < self._limit:
                self._admitted.append(self._clock())
                return True
            if self._old_count < self._limit and waited < PATIENCE_S:
                return None
            self.refused += 1
            warn, self._warned = not self._warned, True
        if warn:
            log.warning("qmagic: the %s refused a connection: %d are open, the most allowed; it "
                        "refuses new ones until some close (raise QMagic.zmq_max_connections or "
                        "find the program opening them)", self._what, held)
        return False
