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

The bytes those messages carry have one budget for the whole process too (a
:class:`~qmagic.panels.view.DataBudget` of :data:`TOTAL_BYTES_S`): five panels of a hundred
running rows each sent 1 MB/s, each within its own budget.  An application is charged the
bytes it sent (:func:`~qmagic.panels.view.count_sent`); while the bucket is in debt, a view
waits, except one that borrows, down to a bounded debt (a final state, a click's answer, a
view sending less than half its fair share, the budget divided by the views that want
updates, or one that waited a second).  Views that may go together go in the order of their
recent bytes per second, the least first: a busy panel does not hold up a lock panel, and
busy panels take turns.  A lone panel is as fast as before (it sends half the budget).

Views read the current task state when applied (events only say "look again"), so the
state shown after the last application is exact however many events were coalesced.

A view with nothing pending and no period (a finished task's row once it has shown its
final state) *rests*: the pump thread no longer looks at it on each pass, and a row of a
finished task no longer follows the task's events (it has none left).  Anything that can
still change it wakes it (a click on Details, a message, a text made late, ``flush()``); it
rests again afterwards.  A view whose comm the frontend closed is closed with its widgets
(:meth:`Pump.forget_closed`).  Two thousand finished rows cost the thread nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..core.status import FINISHED_VALUES
from . import render
from .view import (
    PERIODIC_S,
    TOKEN_CAPACITY,
    TOTAL_BYTES_S,
    TOTAL_MSGS_HZ,
    UNLIMITED,
    DataBudget,
    PanelView,
    bytes_sent,
)

if TYPE_CHECKING:  # pragma: no cover
    from ..core.events import Subscription
    from ..core.task import Task
    from .subshell import SubshellRouter

log = logging.getLogger("qmagic")

__all__ = ["PanelView", "Pump", "get_pump", "current_pump", "get_router", "shutdown", "PERIODIC_S",
           "TOKEN_CAPACITY", "UNLIMITED", "TOTAL_MSGS_HZ", "TOTAL_BYTES_S"]

class Pump:
    """One writer thread for every panel of the process (see the module docstring)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        #: views the thread looks at on each pass
        self._views: tuple[PanelView, ...] = ()
        #: id(view) -> a resting view (see the module docstring): woken by kick(view)
        self._resting: dict[int, PanelView] = {}
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
        #: The bytes all views send together (only the pump thread charges it), and each
        #: wanting view's fair share of it (bytes per second).
        self.data = DataBudget()
        self.share_bytes_s = self.data.rate

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
            view._qm_follows = None
            view._qm_resting = False
            self._views = self._views + (view,)
            if events and task is not None:
                key: Any = task.uid
                self._by_uid[key] = self._by_uid.get(key, ()) + (view,)
                view._qm_follows = (self._by_uid, key)
                if key not in self._subs:
                    subscribe = lambda: task.subscribe(self._task_callback(task.uid))
            elif events and worker is not None:
                key = id(worker)
                self._all[key] = self._all.get(key, ()) + (view,)
                view._qm_follows = (self._all, key)
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
        wake = [view for view in views if view._qm_touch(task_uid, final=final)]
        if wake:
            self.kick(*wake)

    def _unfollow(self, view: PanelView) -> Any:
        """End ``view``'s place in the event tables (pump's lock held); returns the
        subscription to end (outside the lock), if no view follows its key any more."""
        follows, view._qm_follows = getattr(view, "_qm_follows", None), None
        if follows is None:
            return None
        table, key = follows
        if key in table:
            table[key] = tuple(v for v in table[key] if v is not view)
            if not table[key]:
                del table[key]
                return self._subs.pop(key, None)
        return None

    def unregister(self, view: PanelView) -> None:
        """Stop following ``view`` (its widgets are not closed here)."""
        with self._cond:
            self._views = tuple(v for v in self._views if v is not view)
            self._resting.pop(id(view), None)
            view._qm_resting = False
            sub = self._unfollow(view)
        _end(sub)

    def views(self, worker: Any = None) -> list[PanelView]:
        """Registered views, resting ones too (of ``worker`` only, if given)."""
        with self._cond:
            every = self._views + tuple(self._resting.values())
        return [v for v in every if worker is None or v.worker is worker]

    def awake(self) -> list[PanelView]:
        """The views the pump thread looks at on each pass (the others rest)."""
        return list(self._views)

    def kick(self, *views: PanelView) -> None:
        """Wake the pump thread to look at its views now (and at ``views`` if they rest)."""
        with self._cond:
            for view in views:
                if self._resting.pop(id(view), None) is not None:
                    view._qm_resting = False
                    self._views = self._views + (view,)
            self._kicked = True
            self._cond.notify()

    def _rest(self, views: list[PanelView]) -> None:
        """Let ``views`` rest (pump thread): those with nothing pending leave the pass, and a
        row of a finished task its subscription (the task sends no more events)."""
        subs = []
        with self._cond:
            for view in views:
                with view._qm_state:  # (a touch after this sees _qm_resting and wakes it)
                    if (view._qm_dirty or view._qm_flags or view._qm_force or view._qm_waiters
                            or view._qm_closed):
                        continue
                    view._qm_resting = True
                    view._qm_data_waiting = None  # (woken later, it has not waited meanwhile)
                self._views = tuple(v for v in self._views if v is not view)
                self._resting[id(view)] = view
                follows = view._qm_follows
                if follows is not None and follows[0] is self._by_uid:
                    sub = self._subs.get(follows[1])
                    task = getattr(sub, "task", None)
                    if task is not None and task.done():
                        subs.append(self._unfollow(view))
        for sub in subs:
            _end(sub)

    def forget_closed(self, views: list[PanelView]) -> None:
        """Close the views whose own comm was closed (by the frontend, or by ``Widget.close``
        past the view's ``close()``): they and their widgets leave (pump thread)."""
        for view in views:
            if not view._qm_closed and view._qm_comm_gone():
                try:
                    view.close()
                except Exception:  # noqa: BLE001 - it leaves all the same
                    log.debug("qmagic: closing a panel whose comm was closed failed", exc_info=True)
                    self.unregister(view)

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
        data_before = bytes_sent()
        try:
            with view._qm_apply_lock:
                if not view._qm_closed:
                    sent = view._qm_apply(dirty, flags, periodic, budget)
        except Exception as exc:  # noqa: BLE001 - one broken panel must not stop the others
            view._qm_report_error(exc)
        finally:
            # charged when its messages left, at the end: a slow application (a hundred new
            # rows and their buttons) was charged at its start, and the next one's messages
            # followed its own sooner than 1/hz (its time to refill was spent building rows)
            end = time.monotonic()
            view._qm_tokens = max(tokens - sent, -view._qm_hz())  # (a second's debt at most)
            size = bytes_sent() - data_before
            self.data.charge(size, end)
            view._qm_sent_data(size, end)
            view._qm_token_time = view._qm_last_apply = end
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
            resting: list[PanelView] = []
            gone: list[PanelView] = []
            ready: list[PanelView] = []
            for view in views:
                if view._qm_comm_gone():
                    gone.append(view)
                    continue
                due = view._qm_due(now)
                if due is not None and due <= now:
                    ready.append(view)
                elif due is not None:
                    wake = min(wake, due)
                    wanting += 1
                else:
                    resting.append(view)
            # the least busy first: while data is short, busy panels take turns after the others
            ready.sort(key=lambda v: v._qm_data_rate(now))
            for view in ready:
                wait = self._data_wait(view, time.monotonic())
                if wait <= 0.0:
                    self.apply_view(view, now)
                    due = view._qm_due(time.monotonic())
                else:
                    due = time.monotonic() + wait
                if due is not None:
                    wake = min(wake, due)
                    wanting += 1
                else:
                    resting.append(view)
            self.share_hz = TOTAL_MSGS_HZ / max(1, wanting)
            self.share_bytes_s = self.data.rate / max(1, wanting)
            if gone:
                self.forget_closed(gone)
            if resting:
                self._rest(resting)
            with self._cond:
                while not self._kicked and not self._stopping:
                    left = wake - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)

    def _data_wait(self, view: PanelView, now: float) -> float:
        """Seconds ``view`` waits for the data budget (0: it may go now; a flush never waits)."""
        if view._qm_force:
            return 0.0
        wait = self.data.wait(now, view._qm_borrows(now, self.share_bytes_s))
        if wait > 0.0 and view._qm_data_waiting is None:
            view._qm_data_waiting = now
        return wait

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
            _end(sub)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)


class _Pending:
    """Stands for a subscription being made (outside the pump's lock)."""


_PENDING = _Pending()


def _end(sub: Any) -> None:
    """End a subscription (nothing for None or one still being made)."""
    if sub is not None and not isinstance(sub, _Pending):
        sub.unsubscribe()


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
