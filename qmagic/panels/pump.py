"""The panel pump: the one thread that writes widget state, at a bounded rate.

Worker events arrive on the worker's event thread (100 000 per second in a storm).  The
pump's subscription callbacks only mark the interested views dirty (a set add under a
small lock): a panel of every task follows the worker (``worker.subscribe``), a single
task's row follows that task only (``task.subscribe``).  One pump thread per process applies
pending changes view by view.

Each view has a message budget: a token bucket filled at ``worker.panel_update_hz`` tokens
per second (at most :data:`TOKEN_CAPACITY` kept).  An application needs one token, and at
most ``panel_update_hz`` applications run per second.  A view spends its tokens first on
what must change together (the table HTML with the counts, and the button column when rows
come, go or move), then on what may wait for the next token (a finished row's Cancel
button, an expanded row's output, closing widgets; they get a message anyway after a few
applications without one).  A task reaching its final state may borrow a token, so it is
shown at the next tick (within about ``1/panel_update_hz`` seconds) and the applications
after it wait for the bucket to refill.  So a view sends about ``panel_update_hz`` update
messages per second however many events arrive; and all views of the process together about
:data:`TOTAL_MSGS_HZ` at most: with more views than that allows (sixty live task rows), each
gets its share (the Jupyter server drops IOPub traffic above 1,000 messages per second, and
every panel then freezes).

Views read the current task state when applied (events only say "look again"), so the
state shown after the last application is exact however many events were coalesced.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..core.status import FINISHED_VALUES
from . import render

if TYPE_CHECKING:  # pragma: no cover
    from ..core.events import Subscription
    from ..core.task import Task
    from .subshell import SubshellRouter

log = logging.getLogger("qmagic")

__all__ = ["PanelView", "Pump", "get_pump", "current_pump", "get_router", "shutdown"]

#: Seconds between applications of a view without events (elapsed time, membership, lock).
PERIODIC_S = 1.0
#: Most update-message tokens a view saves up (its largest burst).
TOKEN_CAPACITY = 1.0
#: Budget of a forced application (``flush()``): everything pending is applied.
UNLIMITED = 1_000_000
#: Update messages per second that all views of the process send together at most: each
#: view's rate (and its period) is ``panel_update_hz`` or its share of this, the lesser.
TOTAL_MSGS_HZ = 200.0


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
        return was_clean or (final and not was_urgent)

    def _qm_poke(self, uid: str | None = None, *, final: bool = False, flag: str | None = None) -> None:
        """``_qm_touch`` and wake the pump (for clicks and other rare changes)."""
        self._qm_touch(uid, final=final, flag=flag or "poke")
        with self._qm_state:
            self._qm_urgent = True
        pump = self._qm_pump
        if pump is not None:
            pump.kick()

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
        pump.kick()
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
        # a final state may borrow one token: it is shown at the next tick, and the
        # applications after it wait for the bucket to refill
        need = 0.0 if urgent else 1.0
        tokens = self._qm_refill(now)
        if tokens < need:
            want = max(want, now + (need - tokens) / hz)
        return want

    def _qm_period(self) -> float | None:
        """Seconds between applications without events (None: only on events)."""
        return PERIODIC_S

    def _qm_apply(self, dirty: set[str], flags: set[str], periodic: bool, budget: int) -> int:
        """Write pending changes; spend at most about ``budget`` messages on what can wait.

        ``flags`` holds "force" for a :meth:`flush` (look at everything again)."""
        raise NotImplementedError

    def _qm_close_widgets(self) -> None:
        raise NotImplementedError

    def _qm_report_error(self, exc: BaseException) -> None:
        """Show an error of the pump itself in the panel (never silent)."""
        log.error("qmagic: panel update failed", exc_info=exc)


class Pump:
    """One writer thread for every panel of the process (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._views: tuple[PanelView, ...] = ()
        #: id(worker) -> views that follow every task of that worker
        self._all: dict[int, tuple[PanelView, ...]] = {}
        #: task uid -> views that follow that task only
        self._by_uid: dict[str, tuple[PanelView, ...]] = {}
        #: id(worker) or task uid -> the event subscription that feeds those views
        self._subs: dict[Any, Subscription] = {}
        self._kicked = False
        self._stopping = False
        self.thread: threading.Thread | None = None
        #: Messages per second each view may send now: TOTAL_MSGS_HZ shared by the views that
        #: want applications (counted at each look; only the pump thread writes it).
        self.share_hz = TOTAL_MSGS_HZ

    # -- registration ------------------------------------------------------------------------
    def register(self, view: PanelView, task: Task | None = None, *, events: bool = True) -> None:
        """Follow ``view``: every task of its worker (``task`` None) or that one task.

        ``events=False``: no events at all (the view updates on its period and on pokes).
        """
        worker = view.worker
        subscribe: Callable[[], Subscription] | None = None
        with self._cond:
            if self._stopping:
                raise RuntimeError("the qmagic panel pump was stopped (extension unloaded)")
            view._qm_pump = self
            view._qm_uid = task.uid if task is not None else None
            self._views = self._views + (view,)
            if events and task is not None:
                key: Any = task.uid
                self._by_uid[key] = self._by_uid.get(key, ()) + (view,)
                if key not in self._subs:
                    subscribe = lambda: task.subscribe(self._task_callback(task.uid))
            elif events and worker is not None:
                key = id(worker)
                self._all[key] = self._all.get(key, ()) + (view,)
                if key not in self._subs:
                    subscribe = lambda: worker.subscribe(self._worker_callback(key))
            if subscribe is not None:
                self._subs[key] = _PENDING
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="qmagic-panels", daemon=True)
                self.thread.start()
            self._kicked = True
            self._cond.notify()
        if subscribe is not None:  # outside the pump's lock: subscribing takes the task's lock
            sub = subscribe()
            with self._cond:
                if self._subs.get(key) is _PENDING:
                    self._subs[key] = sub
                    sub = None
            if sub is not None:  # the views left meanwhile
                sub.unsubscribe()

    def _worker_callback(self, key: int) -> Callable[..., None]:
        def on_event(task_uid: str, **event: Any) -> None:
            self._touch(self._all.get(key, ()), task_uid, event)

        return on_event

    def _task_callback(self, uid: str) -> Callable[..., None]:
        def on_event(task_uid: str, **event: Any) -> None:
            self._touch(self._by_uid.get(uid, ()), task_uid, event)

        return on_event

    def _touch(self, views: tuple[PanelView, ...], task_uid: str, event: dict) -> None:
        final = event.get("status") in FINISHED_VALUES
        wake = False
        for view in views:
            if view._qm_touch(task_uid, final=final):
                wake = True
        if wake:
            self.kick()

    def unregister(self, view: PanelView) -> None:
        """Stop following ``view`` (its widgets are not closed here)."""
        worker = view.worker
        sub = None
        with self._cond:
            self._views = tuple(v for v in self._views if v is not view)
            uid = getattr(view, "_qm_uid", None)
            table, key = (self._by_uid, uid) if uid is not None else (self._all, id(worker))
            if key in table:
                table[key] = tuple(v for v in table[key] if v is not view)
                if not table[key]:
                    del table[key]
                    sub = self._subs.pop(key, None)
        if isinstance(sub, _Pending) or sub is None:
            return
        sub.unsubscribe()

    def views(self, worker: Any = None) -> list[PanelView]:
        """Registered views (of ``worker`` only, if given)."""
        return [v for v in self._views if worker is None or v.worker is worker]

    def kick(self) -> None:
        """Wake the pump thread to look at its views now."""
        with self._cond:
            self._kicked = True
            self._cond.notify()

    # -- the thread --------------------------------------------------------------------------
    def apply_view(self, view: PanelView, now: float) -> None:
        """Apply one view's pending changes (pump thread only)."""
        with view._qm_state:
            dirty, view._qm_dirty = view._qm_dirty, set()
            flags, view._qm_flags = view._qm_flags, set()
            view._qm_urgent = False
            forced, view._qm_force = view._qm_force, False
            waiters, view._qm_waiters = view._qm_waiters, []
        if forced:
            flags.add("force")
        period = view._qm_period()
        periodic = period is not None and now - view._qm_last_periodic >= period * 0.95
        tokens = view._qm_refill(now)
        budget = UNLIMITED if forced else max(1, int(tokens))
        sent = 0
        try:
            with view._qm_apply_lock:
                if not view._qm_closed:
                    sent = view._qm_apply(dirty, flags, periodic, budget)
        except Exception as exc:  # noqa: BLE001 - one broken panel must not stop the others
            view._qm_report_error(exc)
        finally:
            view._qm_tokens = tokens - sent
            view._qm_token_time = now
            view._qm_last_apply = now
            if periodic:
                view._qm_last_periodic = now
            for event in waiters:
                event.set()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                self._kicked = False
                views = self._views
            now = time.monotonic()
            wake = now + PERIODIC_S
            wanting = 0
            for view in views:
                due = view._qm_due(now)
                if due is not None and due <= now:
                    self.apply_view(view, now)
                    due = view._qm_due(time.monotonic())
                if due is not None:
                    wake = min(wake, due)
                    wanting += 1
            self.share_hz = TOTAL_MSGS_HZ / max(1, wanting)
            with self._cond:
                while not self._kicked and not self._stopping:
                    left = wake - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)

    def close_views(self, worker: Any = None) -> int:
        """Close (widgets and comms) every view of ``worker`` (all views if None)."""
        closed = 0
        for view in self.views(worker):
            try:
                view.close()
            except Exception:  # noqa: BLE001 - keep closing the others
                log.exception("qmagic: closing a panel failed")
            closed += 1
        return closed

    def stop(self, timeout: float = 5.0) -> None:
        """Close every view, end the subscriptions and the thread."""
        self.close_views()
        with self._cond:
            self._stopping = True
            subs, self._subs = list(self._subs.values()), {}
            thread = self.thread
            self._cond.notify_all()
        for sub in subs:
            if not isinstance(sub, _Pending):
                sub.unsubscribe()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


class _Pending:
    """Stands for a subscription being made (outside the pump's lock)."""


_PENDING = _Pending()


# -- process-wide machinery ------------------------------------------------------------------
_lock = threading.Lock()
_pump: Pump | None = None
_router: SubshellRouter | None = None
_router_checked = False


def _texts_free() -> None:
    """A value's code that a panel's text gave up on has returned (on the panels' deadline
    thread): the views make their rows again (those made with a fallback change)."""
    pump = _pump
    if pump is not None:
        for view in pump.views():
            view._qm_poke(flag="texts")


render.when_texts_free(_texts_free)


def get_pump() -> Pump:
    """The process's pump (created on first use; its thread starts with the first view)."""
    global _pump
    with _lock:
        if _pump is None:
            _pump = Pump()
        return _pump


def current_pump() -> Pump | None:
    """The pump if one exists (does not create one)."""
    return _pump


def get_router() -> SubshellRouter | None:
    """The subshell router of the running kernel, or None where routing is not supported."""
    global _router, _router_checked
    with _lock:
        if not _router_checked:
            _router_checked = True
            from .subshell import SubshellRouter

            try:
                from IPython import get_ipython

                shell = get_ipython()
            except Exception:  # noqa: BLE001
                shell = None
            _router = SubshellRouter.for_shell(shell) if shell is not None else None
        return _router


def shutdown(timeout: float = 5.0) -> None:
    """Stop the pump (closing every view) and delete the panel subshell."""
    global _pump, _router, _router_checked
    with _lock:
        pump, _pump = _pump, None
        router, _router = _router, None
        _router_checked = False
    if pump is not None:
        pump.stop(timeout)
    if router is not None:
        router.stop(timeout)
