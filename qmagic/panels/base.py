"""What every panel widget shares: owned widgets, comm routing, messages, close, text/plain."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any, Callable

import ipywidgets as W

from .. import format as fmt
from ..errors import RequestRefused, StateFileError
from . import render, styles
from .pump import PanelView, current_pump, get_router
from .view import ENVELOPE_BYTES, count_sent

log = logging.getLogger("qmagic")

__all__ = ["PanelBase", "set_traits", "failed_line", "MESSAGE_CHARS", "STARVE_LIMIT"]

#: Applications in a row that deferred work may wait before it gets a message anyway.
STARVE_LIMIT = 3


#: A message is charged one more update per this many characters of text it carries:
#: the rate limits bound the data a panel sends, not only its messages (one segment of a
#: hundred running rows, ~55 kB, ten times a second was 550 kB/s).  The bytes of every
#: panel together have a budget of their own (:data:`~qmagic.panels.view.TOTAL_BYTES_S`).
MESSAGE_CHARS = 16_384


def _state_bytes(state: dict[str, Any]) -> int:
    """About the bytes of a message carrying ``state`` (its envelope included)."""
    size = ENVELOPE_BYTES
    for name, value in state.items():
        size += len(name) + 4
        if isinstance(value, str):
            size += len(json.dumps(value, ensure_ascii=False))
        elif isinstance(value, (tuple, list)):  # (children: "IPY_MODEL_" and a model id each)
            size += 2 + 46 * len(value)
        else:
            size += 16
    return size


def set_traits(widget: W.Widget, **traits: Any) -> int:
    """Assign the traits that differ inside ``hold_sync()``; returns what the message costs
    in updates: 0 (none sent), else 1 plus one per :data:`MESSAGE_CHARS` of text in it.
    Its bytes count against the process's data budget (:func:`~qmagic.panels.view.count_sent`)."""
    changed = {k: v for k, v in traits.items() if getattr(widget, k) != v}
    if not changed:
        return 0
    with widget.hold_sync():
        for name, value in changed.items():
            setattr(widget, name, value)
    count_sent(_state_bytes(changed))
    return 1 + sum(len(v) for v in changed.values() if isinstance(v, str)) // MESSAGE_CHARS


def failed_line(what: str, exc: BaseException, instead: str, give_key: str) -> str:
    """One line for ``what`` (a click, a read) that raised ``exc``, shown in a panel.

    A refusal or a state-file problem is the worker's own text as one line (it says what to
    do; ``give_key`` says how to give a lock key from this panel); anything else is logged
    with its traceback, and the line says how to see it (``instead``: the same in a cell).
    """
    if isinstance(exc, (RequestRefused, StateFileError)):
        return fmt.refusal_line(exc, give_key)
    log.error("qmagic: a panel could not %s", what, exc_info=exc)
    return (f"Could not {what}: an unexpected error (logged by the kernel). Try again; if it "
            f"persists, run {instead} in a cell to see the error.")


class PanelBase(PanelView):
    """Mix-in placed before ``ipywidgets.VBox`` in every panel class."""

    def _qm_init_base(self, worker: Any) -> None:
        self._qm_init_view(worker)
        self._qm_owned: list[W.Widget] = []
        self._qm_owned_ids: set[int] = set()
        self._qm_message_state: tuple[str, str] = ("", "info")
        self._qm_message_lock = threading.Lock()

    # -- widgets this panel created ------------------------------------------------------------
    def _qm_style_widget(self) -> W.HTML:
        """A hidden ``HTML`` widget holding the panels' stylesheet: the first child of every
        panel (sent once, with the panel; its rows then carry class names only)."""
        return self._qm_own(W.HTML(value=styles.style_html(), layout=self._qm_own(W.Layout(display="none")),
                                   _dom_classes=("qmagic-style",)))

    def _qm_own(self, widget: W.Widget, *, interactive: bool = False) -> W.Widget:
        """Remember ``widget`` and its layout and style (closed with the panel); route its
        clicks if it takes input.  Its opening counts against the data budget (its text)."""
        for part in (widget, getattr(widget, "layout", None), getattr(widget, "style", None)):
            if isinstance(part, W.Widget) and id(part) not in self._qm_owned_ids:
                self._qm_owned_ids.add(id(part))
                self._qm_owned.append(part)
                value = getattr(part, "value", None)
                count_sent(_state_bytes({"value": value} if isinstance(value, str) else {}))
        if interactive:
            self._qm_route(widget)
        return widget

    def _qm_opened(self) -> None:
        """After ``VBox.__init__`` (the panel's comm is open): own its layout, and when the
        frontend closes the comm, have the pump close the panel (its widgets and its place
        in the pump: nobody sees it any more)."""
        self._qm_own(self.layout)
        comm = getattr(self, "comm", None)
        if comm is not None and hasattr(comm, "on_close"):
            comm.on_close(lambda _msg: self._qm_comm_closed())
        # ``Widget.close(panel)`` past the panel's close() drops the comm without that callback
        self.observe(lambda change: self._qm_comm_closed() if change["new"] is None else None, "comm")

    def _qm_comm_closed(self) -> None:
        """The panel's comm was closed: wake it (resting too), so the pump closes it."""
        pump = self._qm_pump
        if pump is not None and not self._qm_closed:
            pump.kick(self)

    def _qm_route(self, widget: W.Widget) -> None:
        if not bool(getattr(self.worker, "panel_cancel_subshell", True)):
            return
        router = get_router()
        if router is not None:
            router.route(widget)

    def _qm_disown(self, widget: W.Widget) -> None:
        """Close ``widget`` now (not its layout or style, which rows share)."""
        if id(widget) in self._qm_owned_ids:
            self._qm_owned_ids.discard(id(widget))
            try:
                self._qm_owned.remove(widget)
            except ValueError:
                pass
        if widget.comm is not None:
            count_sent(ENVELOPE_BYTES)
        widget.close()

    def _qm_spend(self, sent: int, budget: int, later: list[Callable[[], int]]) -> int:
        """Run deferred work while the message budget lasts; flag the rest for later.

        Work that waited :data:`STARVE_LIMIT` applications in a row gets one message even
        without budget (the token bucket then delays the next application), so a panel
        whose table changes at every tick still updates its buttons and details.
        """
        if not later:
            self._qm_starved = 0
            return sent
        allow = budget - sent
        if allow <= 0 and getattr(self, "_qm_starved", 0) >= STARVE_LIMIT:
            allow = 1
        done = 0
        for work in later:
            if allow <= 0:
                break
            spent = work()
            sent += spent
            allow -= spent
            done += 1
        if done < len(later):
            self._qm_touch(flag="deferred")
        self._qm_starved = 0 if done else getattr(self, "_qm_starved", 0) + 1
        return sent

    # -- the message line ------------------------------------------------------------------------
    def _qm_set_message(self, text: str, kind: str = "info") -> None:
        """Show ``text`` in the panel (any thread); ``kind`` "info", "ok" or "error"."""
        with self._qm_message_lock:
            self._qm_message_state = (text, kind)
        self._qm_poke(flag="message")

    @property
    def message(self) -> str:
        """The text of the panel's message line ("" when none)."""
        return self._qm_message_state[0]

    def _qm_message_html(self) -> str:
        text, kind = self._qm_message_state
        return render.message_html(text, kind)

    def _qm_report_error(self, exc: BaseException) -> None:
        """Called on the pump thread when an update failed: say so in the panel."""
        log.error("qmagic: panel update failed", exc_info=exc)
        with self._qm_message_lock:
            self._qm_message_state = (
                f"This panel could not update: {type(exc).__name__}: {exc}. "
                "It keeps trying; if this persists, display a new panel.",
                "error",
            )
        widget = getattr(self, "_message", None)
        if widget is not None and widget.comm is not None:
            try:
                set_traits(widget, value=self._qm_message_html())
                set_traits(widget.layout, display="")
            except Exception:  # noqa: BLE001 - the log has it
                pass

    # -- closing -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close this panel: stop following the worker and close every widget it created."""
        if getattr(self, "_qm_closed", True):
            if getattr(self, "comm", None) is not None:
                W.VBox.close(self)
            return
        pump = self._qm_pump or current_pump()
        if pump is not None:
            pump.unregister(self)
        with self._qm_apply_lock:
            self._qm_closed = True
            try:
                self._qm_close_widgets()
            finally:
                for widget in reversed(self._qm_owned):
                    try:
                        widget.close()
                    except Exception:  # noqa: BLE001 - keep closing the rest
                        log.debug("qmagic: closing a widget failed", exc_info=True)
                self._qm_owned.clear()
                self._qm_owned_ids.clear()
        W.VBox.close(self)
        with self._qm_state:
            waiters, self._qm_waiters = self._qm_waiters, []
        for event in waiters:
            event.set()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or the extension was unloaded)."""
        return bool(getattr(self, "_qm_closed", True))

    # -- display -----------------------------------------------------------------------------------
    def text(self) -> str:
        """The deterministic ``text/plain`` form (no uids, no clock times)."""
        raise NotImplementedError

    def _repr_mimebundle_(self, **kwargs: Any) -> dict:
        try:
            text = self.text()
        except Exception as exc:  # noqa: BLE001 - display must not fail
            text = f"<{type(self).__name__}: {exc}>"
        data: dict[str, Any] = {"text/plain": text}
        if self.comm is not None and self._view_name is not None:
            data["application/vnd.jupyter.widget-view+json"] = {
                "version_major": 2,
                "version_minor": 0,
                "model_id": self._model_id,
            }
        return data

    def __repr__(self) -> str:
        try:
            return self.text()
        except Exception:  # noqa: BLE001
            return f"<{type(self).__name__}>"
