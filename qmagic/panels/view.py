"""What every panel view is to the pump: dirty marks, a message budget, flush, resting.

The pump (:mod:`qmagic.panels.pump`) applies views; this module holds the view's side of that
contract and the numbers the two share.  See the pump's docstring for the whole story.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .pump import Pump

log = logging.getLogger("qmagic")

__all__ = ["PanelView", "DataBudget", "PERIODIC_S", "TOKEN_CAPACITY", "UNLIMITED", "TOTAL_MSGS_HZ",
           "TOTAL_BYTES_S", "ENVELOPE_BYTES", "count_sent", "bytes_sent"]

#: Seconds between applications of a view without events (elapsed time, membership, lock).
PERIODIC_S = 1.0
#: Most update-message tokens a view saves up (its largest burst).
TOKEN_CAPACITY = 1.0
#: Budget of a forced application (``flush()``): everything pending is applied.
UNLIMITED = 1_000_000
#: Update messages per second that all views of the process send together at most: each
#: view's rate (and its period) is ``panel_update_hz`` or its share of this, the lesser.
TOTAL_MSGS_HZ = 200.0
#: Bytes per second that all views of the process send together (:class:`DataBudget`).  A
#: lone panel of a hundred running rows sends about 200 kB/s (``panel_update_hz`` and one
#: more update per 16 kB); five of them sent up to 1 MB/s, HTML that every browser showing
#: the notebook parses and that a remote link (a tunnel to the beamline) carries.  400 kB/s
#: leaves a lone panel as fast as it was (it sends half of it) and shares the rest among
#: several.  (The Jupyter server counts only ``stream`` output, prints, against its "IOPub
#: data rate exceeded" limit of 1 MB/s, not widget messages; their count is limited by
#: :data:`TOTAL_MSGS_HZ`.)
TOTAL_BYTES_S = 400_000.0
#: What a message costs besides its data: its header, its parent's header and its
#: signature (about 600 bytes in ipykernel 7).
ENVELOPE_BYTES = 600
#: The data budget's largest burst, in seconds of :data:`TOTAL_BYTES_S`.
DATA_BURST_S = 0.25
#: The debt a view that borrows may run the data budget into, in seconds of it: a round of
#: final states of five panels of a hundred rows is ~320 kB, and the tasks of a storm end
#: over a few ticks; two such rounds go at once, later ones take turns (with one second,
#: five such panels showed their final states 0.4-0.8 s late).
DATA_BORROW_S = 1.5
#: Seconds over which a view's recent data rate is averaged (who goes first when data is short).
DATA_RATE_S = 1.0
#: A view that waited this long for the data budget borrows (a busy panel beside others
#: whose final states keep the budget in debt is never starved).
DATA_WAIT_S = 1.0
#: The deepest debt kept, in seconds of the budget: what a flush (which never waits) or a
#: very large message sends beyond it is not paid back.
DATA_DEBT_MAX_S = 3.0

_tally = threading.local()


def count_sent(size: int) -> None:
    """Count ``size`` bytes sent by the calling thread (what a panel's message carries)."""
    _tally.bytes = getattr(_tally, "bytes", 0) + size


def bytes_sent() -> int:
    """Bytes the calling thread sent so far (see :func:`count_sent`)."""
    return getattr(_tally, "bytes", 0)


class DataBudget:
    """The bytes per second every view of the process sends together: a token bucket of
    :data:`TOTAL_BYTES_S` bytes a second (at most :data:`DATA_BURST_S` of it saved up), kept
    by the pump's thread.  An application is charged what it sent when it ends, so it may
    leave the bucket in debt; the next one waits until the debt is paid, except one that
    *borrows* (:meth:`PanelView._qm_borrows`): it goes while the debt is below
    :data:`DATA_BORROW_S`.  A debt is paid, never forgiven (down to :data:`DATA_DEBT_MAX_S`,
    which only a flush or a very large message reaches): over any time the views send the
    budget and at most that debt and a burst more."""

    def __init__(self, rate: float | None = None) -> None:
        self.rate = float(TOTAL_BYTES_S if rate is None else rate)
        self.tokens = self.rate * DATA_BURST_S
        self.time = time.monotonic()

    def level(self, now: float) -> float:
        """Bytes in the bucket at ``now`` (negative: in debt)."""
        return min(self.rate * DATA_BURST_S, self.tokens + (now - self.time) * self.rate)

    def wait(self, now: float, borrow: bool) -> float:
        """Seconds until an application may go (0: now)."""
        floor = -self.rate * DATA_BORROW_S if borrow else 0.0
        level = self.level(now)
        return 0.0 if level >= floor else (floor - level) / self.rate

    def charge(self, size: int, now: float) -> None:
        """Take ``size`` bytes sent (a flush goes whatever the debt: a few seconds' at most)."""
        self.tokens = max(self.level(now) - size, -DATA_DEBT_MAX_S * self.rate)
        self.time = now


class PanelView:
    """Mix-in of every panel widget: dirty marks, rate limiting, flush, close.

    Subclasses implement :meth:`_qm_apply` (write widget traits within a message budget;
    return the number of messages sent), :meth:`_qm_period` and :meth:`_qm_close_widgets`.
    Only the pump thread calls ``_qm_apply`` after construction.
    """

    _qm_pump: Pump | None = None
    #: Updates per second this view keeps however many views share the budget (a panel of
    #: many tasks, the lock: few of them; a task's row: as many as tasks shown).
    _qm_min_hz = 2.0

    def _qm_init_view(self, worker: Any) -> None:
        self.worker = worker
        self._qm_state = threading.Lock()
        self._qm_apply_lock = threading.RLock()
        self._qm_dirty: set[str] = set()
        self._qm_flags: set[str] = set()
        self._qm_urgent = False
        self._qm_force = False
        self._qm_waiters: list[threading.Event] = []
        self._qm_last_apply = 0.0
        self._qm_last_periodic = time.monotonic()
        self._qm_tokens = TOKEN_CAPACITY
        self._qm_token_time = time.monotonic()
        self._qm_closed = False
        #: bytes per second this view sent lately (decaying over DATA_RATE_S; pump thread)
        self._qm_rate_bytes = 0.0
        self._qm_rate_time = time.monotonic()
        self._qm_last_bytes = 0
        #: since when it has waited for the data budget (None: it does not; pump thread)
        self._qm_data_waiting: float | None = None
        #: Resting: not looked at by the pump thread until something wakes it (pump's lock).
        self._qm_resting = False

    # -- called from any thread ------------------------------------------------------------
    def _qm_touch(self, uid: str | None = None, *, final: bool = False, flag: str | None = None) -> bool:
        """Mark something to look at again; True if the pump should wake up."""
        with self._qm_state:
            was_clean = not (self._qm_dirty or self._qm_flags)
            was_urgent = self._qm_urgent
            if uid is not None:
                self._qm_dirty.add(uid)
            if flag is not None:
                self._qm_flags.add(flag)
            if final:
                self._qm_urgent = True
        return was_clean or (final and not was_urgent) or self._qm_resting

    def _qm_poke(self, uid: str | None = None, *, final: bool = False, flag: str | None = None) -> None:
        """``_qm_touch`` and wake the pump (for clicks and other rare changes)."""
        self._qm_touch(uid, final=final, flag=flag or "poke")
        with self._qm_state:
            self._qm_urgent = True
        pump = self._qm_pump
        if pump is not None:
            pump.kick(self)

    def flush(self, timeout: float = 5.0) -> bool:
        """Apply everything now (membership, every row, messages), without waiting for a tick.

        Views read the tasks' current state when applied, so after ``flush()`` the panel
        shows everything that happened before the call.  Returns False on timeout or for a
        closed panel.  Mostly for tests and scripts.
        """
        pump = self._qm_pump
        if self._qm_closed or pump is None:
            return False
        if threading.current_thread() is pump.thread:
            with self._qm_state:
                self._qm_force = True
            pump.apply_view(self, time.monotonic())
            return True
        done = threading.Event()
        with self._qm_state:
            self._qm_waiters.append(done)
            self._qm_force = True
        pump.kick(self)
        return done.wait(timeout)

    # -- pump side ---------------------------------------------------------------------------
    def _qm_hz(self) -> float:
        """This view's update rate: the setting, or its share of the process's budget."""
        try:
            hz = float(getattr(self.worker, "panel_update_hz", 10.0) or 10.0)
        except (TypeError, ValueError):
            hz = 10.0
        pump = self._qm_pump
        share = max(pump.share_hz, self._qm_min_hz) if pump is not None else hz
        return max(0.1, min(hz, share))  # (the setting stays the most, also below the floor)

    def _qm_refill(self, now: float) -> float:
        """Tokens available at ``now`` (the bucket is not changed)."""
        return min(TOKEN_CAPACITY, self._qm_tokens + (now - self._qm_token_time) * self._qm_hz())

    def _qm_data_rate(self, now: float) -> float:
        """Bytes per second this view sent lately."""
        return self._qm_rate_bytes * math.exp(-max(0.0, now - self._qm_rate_time) / DATA_RATE_S)

    def _qm_sent_data(self, size: int, now: float) -> None:
        """Count ``size`` bytes this view's application sent (pump thread)."""
        self._qm_rate_bytes = self._qm_data_rate(now) + size / DATA_RATE_S
        self._qm_rate_time = now
        self._qm_last_bytes = size
        self._qm_data_waiting = None

    def _qm_borrows(self, now: float, fair_bytes_s: float) -> bool:
        """True when this view may run the data budget into debt (:class:`DataBudget`): a
        final state or a click's answer (it goes soon), a view that sends less than half its
        fair share with its next message too (a lock panel, a row beside busy panels: it
        does not wait for their debt) or one that waited :data:`DATA_WAIT_S` already."""
        with self._qm_state:
            if self._qm_force or self._qm_urgent:
                return True
        light = self._qm_data_rate(now) + self._qm_last_bytes / DATA_RATE_S < fair_bytes_s / 2
        waiting = self._qm_data_waiting
        return light or (waiting is not None and now - waiting >= DATA_WAIT_S)

    def _qm_due(self, now: float) -> float | None:
        """Monotonic time at which this view wants its next application (None: never)."""
        with self._qm_state:
            if self._qm_force:
                return now
            pending = bool(self._qm_dirty or self._qm_flags)
            urgent = self._qm_urgent
        hz = self._qm_hz()
        if pending:
            want = self._qm_last_apply + 1.0 / hz
        else:
            period = self._qm_period()
            if period is None:
                return None
            want = self._qm_last_periodic + max(period, 1.0 / hz)
        # a final state borrows: it is shown at the next tick whatever the bucket holds (a
        # large message leaves it in debt, at most a second's worth: see Pump.apply_view),
        # and the applications after it wait for the bucket to refill
        if not urgent:
            tokens = self._qm_refill(now)
            if tokens < 1.0:
                want = max(want, now + (1.0 - tokens) / hz)
        return want

    def _qm_period(self) -> float | None:
        """Seconds between applications without events (None: only on events and pokes; a
        view without a period rests once nothing is pending: see the module docstring)."""
        return PERIODIC_S

    def _qm_comm_gone(self) -> bool:
        """True when the view's own comm was closed (by the frontend, or by
        ``Widget.close`` without the view's :meth:`close`)."""
        comm = getattr(self, "comm", None)
        return comm is None or bool(getattr(comm, "_closed", False))

    def _qm_apply(self, dirty: set[str], flags: set[str], periodic: bool, budget: int) -> int:
        """Write pending changes; spend at most about ``budget`` messages on what can wait.

        ``flags`` holds "force" for a :meth:`flush` (look at everything again)."""
        raise NotImplementedError

    def _qm_close_widgets(self) -> None:
        raise NotImplementedError

    def _qm_report_error(self, exc: BaseException) -> None:
        """Show an error of the pump itself in the panel (never silent)."""
        log.error("qmagic: panel update failed", exc_info=exc)
