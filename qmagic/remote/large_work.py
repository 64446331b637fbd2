"""The share of the control channel's time that large work may take while others wait.

One thread answers every request in turn, so a request that takes long holds up every
client queued behind it.  *Large work* is a request over ``LARGE_BYTES`` (64 kB, see
:mod:`qmagic.jsonreply`; a 50,000-uid ``task_status``: ~0.2 s), a reply over
``LARGE_BYTES``, or work a method announces as large before doing it
(:meth:`Turn.large_work`: checking that the kept copy of a large result is still current,
~50 ms per million items, or making a new copy of one, ~0.5 s).  While other requests wait,
large work may take at most ``SHARE`` of the serving thread's time (with bursts of
``BURST_S``); beyond that it is refused at once and the client is told to ask again.  Ten
clients repeating large lookups made every other client wait 1-3.6 s, 150 clients asking
for a result of a million floats 4-18 s, and 50 clients asking in turn for more large
results than are kept ~10 s, past the 2 s after which queueserver's clients give up (found
by hostile tests and a reviewer).  A request nobody waited behind is always served and
owes nothing: small requests (status, a small result, starting a task) are never refused
for this.

No zmq here: the server tells which requests waited behind others.
"""

from __future__ import annotations

import time

from ..jsonreply import LARGE_BYTES

__all__ = ["BURST_S", "SHARE", "LargeBudget", "Turn"]

#: The share of the serving thread's time large work may take while others wait.
SHARE = 0.5
#: The most serving time large work may take at once while others wait (seconds).
BURST_S = 0.25


class LargeBudget:
    """The serving time large work may still take (see the module docstring): a token
    bucket in seconds, refilled at ``SHARE`` seconds per second up to ``BURST_S``, and
    full again whenever no request waits.  Serving thread only."""

    def __init__(self) -> None:
        self.allowance = BURST_S
        self._at = time.monotonic()
        #: Large work refused because large work had used its share of time.
        self.refused = 0

    def turn(self, contended: bool) -> Turn:
        """The next request's turn; ``contended``: it waited behind other clients' requests.
        A request that came while none waited finds the budget full: nobody waited behind
        the time large work took so far, so none of it is owed."""
        if not contended:
            self.allowance, self._at = BURST_S, time.monotonic()
        return Turn(self, contended)

    def admit(self) -> bool:
        """True if large work may be done now for a request others wait behind (False is
        counted in ``refused``)."""
        now = time.monotonic()
        self.allowance = min(BURST_S, self.allowance + (now - self._at) * SHARE)
        self._at = now
        if self.allowance > 0:
            return True
        self.refused += 1
        return False


class Turn:
    """One request's turn on the serving thread, as the budget sees it: whether it waited
    behind others (``contended``) and whether it did large work (``large``)."""

    def __init__(self, budget: LargeBudget, contended: bool) -> None:
        self._budget = budget
        self.contended = contended
        self.large = False
        self._started = time.monotonic()

    def large_work(self) -> bool:
        """Large work is about to be done for this request: True if it may be (always when
        nobody waited behind the request, else while large work has time left in its
        share) and its time is charged; False: the caller refuses it, saying to ask again (a
        refusal is no large work: charged, retries could keep large work refused for good)."""
        admitted = not self.contended or self._budget.admit()
        self.large = self.large or admitted
        return admitted

    def end(self, reply_bytes: int) -> None:
        """The request is answered with ``reply_bytes`` bytes: its time is charged if it was
        large work (admitted, or a large reply) that others waited behind."""
        if self.contended and (self.large or reply_bytes > LARGE_BYTES):
            self._budget.allowance -= time.monotonic() - self._started
