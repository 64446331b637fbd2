"""The lock panel (what ``%lock_info`` shows): the lock when its cell ran and now, with
Lock and Unlock controls."""

from __future__ import annotations

import logging
import time
from typing import Any

import ipywidgets as W

from .. import format as fmt
from . import render, styles
from .base import PanelBase, failed_line, set_traits
from .pump import get_pump

__all__ = ["LockPanel"]

log = logging.getLogger("qmagic")

#: How this panel takes a key (the end of a refusal's "give the key" hint).
_GIVE_KEY = "type the key in the Key field"


def _failed(what: str, exc: BaseException, instead: str) -> str:
    return failed_line(what, exc, instead, _GIVE_KEY)


class LockPanel(PanelBase, W.VBox):
    """The environment's lock: what it was when the panel's cell ran, and live now.

    A notebook run from top to bottom may change the lock after this panel's cell: the
    panel then shows both truths, clearly labelled — "When this cell ran (time): Locked by
    Alice ..." (fixed; also the panel's ``text/plain``) above "Now (live) — changed since
    this cell ran" (follows changes made anywhere, magics, remote clients, other kernels,
    within about a second).  While nothing changed, only the live state shows.

    The live state shows, per scope, locked or unlocked; who locked, since when, the note;
    whether an emergency unlock key is set and whether this kernel holds the key.  The key
    field is a password field; left empty, Lock and Unlock use the key this kernel
    remembers (or the user's default key for a first lock).  Every refusal (wrong key,
    locked by another key, nothing selected, no key held) is the worker's message, shown
    in the panel as one line (:func:`qmagic.format.refusal_line`).
    """

    def __init__(self, worker: Any) -> None:
        self._qm_init_base(worker)
        own = self._qm_own
        self._state_now, self._problem = self._read()
        #: The lock when the panel was made (its cell ran), and when that was.
        self._state_then, self._problem_then, self._then_at = self._state_now, self._problem, time.time()
        self._text = self._plain(self._state_then, self._problem_then)
        self._sig: tuple | None = None
        self._clear_key = False
        #: The lock's uid when the message line was written (under the message lock): a
        #: message about an earlier lock ("locked by Alice: the key given is ...") is
        #: cleared once the lock changed, never left beside a live state it contradicts.
        self._said_at: str | None = None
        self._then = own(W.HTML(value="", layout=own(W.Layout(display="none", margin="0")),
                                _dom_classes=("qmagic-lock-then-box",)))
        self._state = own(W.HTML(value="", layout=own(W.Layout(margin="0 0 6px 0")),
                                 _dom_classes=("qmagic-lock-state-box",)))
        small = own(W.Layout(width="auto", margin="0 8px 0 0"))
        self._key = own(W.Password(
            value="", placeholder="key (empty: this kernel's key)", description="Key",
            style={"description_width": "32px"},
            layout=own(W.Layout(width="260px", margin="0 8px 0 0")),
            _dom_classes=("qmagic-lock-key",),
        ), interactive=True)
        self._note = own(W.Text(
            value="", placeholder="note (what you are doing)", description="Note",
            style={"description_width": "40px"},
            layout=own(W.Layout(width="300px", margin="0 8px 0 0")),
            _dom_classes=("qmagic-lock-note",),
        ), interactive=True)
        self._environment = own(W.Checkbox(value=True, description="environment", indent=False,
                                           layout=small, _dom_classes=("qmagic-lock-environment",)),
                                interactive=True)
        self._queue = own(W.Checkbox(value=False, description="queue", indent=False, layout=small,
                                     _dom_classes=("qmagic-lock-queue",)), interactive=True)
        button_layout = own(W.Layout(width="84px", margin="0 6px 0 0"))
        self._lock_button = own(W.Button(description="Lock", icon="lock", layout=button_layout,
                                         tooltip="Lock the selected scopes with the key",
                                         _dom_classes=("qmagic-lock-button",)), interactive=True)
        self._unlock_button = own(W.Button(description="Unlock", icon="unlock", layout=button_layout,
                                           tooltip="Unlock with the lock key or the emergency key",
                                           _dom_classes=("qmagic-unlock-button",)), interactive=True)
        self._lock_button.on_click(lambda _b: self._on_lock())
        self._unlock_button.on_click(lambda _b: self._on_unlock())
        self._message = own(W.HTML(value="", layout=own(W.Layout(margin="4px 0 0 0")),
                                   _dom_classes=("qmagic-lock-message",)))
        row1 = own(W.HBox((self._key, self._note), layout=own(W.Layout(align_items="center", margin="0 0 4px 0"))))
        row2 = own(W.HBox((self._environment, self._queue, self._lock_button, self._unlock_button),
                          layout=own(W.Layout(align_items="center"))))
        title = own(W.HTML(value='<span class="qm-title">qmagic lock</span>'))
        W.VBox.__init__(
            self,
            children=(self._qm_style_widget(), title, self._then, self._state, row1, row2, self._message),
            layout=W.Layout(border=f"1px solid {styles.BORDER2}", padding="6px", width="auto"),
            _dom_classes=(styles.PANEL_CLASS, "qmagic-lock-panel"),
        )
        self._qm_opened()
        self._draw()
        get_pump().register(self, events=False)

    # -- reading the lock ----------------------------------------------------------------------
    def _read(self) -> tuple[Any, str]:
        """(the current LockState or None, a problem to show or "")."""
        try:
            return self.worker.current_lock(), ""  # (no system call while the file is unchanged)
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return None, _failed("read the lock", exc, "qmagic.get_worker().lock_state()")

    @staticmethod
    def _plain(state: Any, problem: str) -> str:
        return fmt.lock_text(state.to_lock_info()) if state is not None else problem

    @property
    def lock_info(self) -> dict[str, Any]:
        """queueserver's ``lock_info`` dict of the state shown now ({} if it could not be read)."""
        return self._state_now.to_lock_info() if self._state_now is not None else {}

    @property
    def changed(self) -> bool:
        """True when the lock differs from what it was when this panel's cell ran."""
        then, now = self._state_then, self._state_now
        return (then.uid if then is not None else None) != (now.uid if now is not None else None)

    # -- clicks (any thread) --------------------------------------------------------------------
    def _on_lock(self) -> None:
        environment, queue = bool(self._environment.value), bool(self._queue.value)
        try:
            state = self.worker.lock(self._key.value or None, environment=environment, queue=queue,
                             note=self._note.value or None, origin="panel")
        except Exception as exc:  # noqa: BLE001 - shown, never silent
            self._say(_failed("lock", exc, "%lock"), "error", getattr(exc, "state", None))
        else:
            scopes = " and ".join(s for s, on in (("environment", environment), ("queue", queue)) if on)
            self._clear_key = True
            self._say(f"Locked: {scopes}.", "ok", state)
        self._qm_poke(flag="lock")

    def _on_unlock(self) -> None:
        try:
            state, released = self.worker.release_lock(self._key.value or None, origin="panel")
        except Exception as exc:  # noqa: BLE001 - shown, never silent
            self._say(_failed("unlock", exc, "%unlock"), "error", getattr(exc, "state", None))
        else:
            self._clear_key = True
            self._say("Unlocked." if released else "Not locked.", "ok", state)
        self._qm_poke(flag="lock")

    def _say(self, text: str, kind: str, state: Any) -> None:
        """The message line for a click, about ``state`` (the lock the worker answered
        about; None: the lock as it is now)."""
        if state is None:
            state = self._read()[0]
        with self._qm_message_lock:
            self._qm_message_state = (text, kind)
            self._said_at = state.uid if state is not None else None
        self._qm_poke(flag="message")

    def _forget_stale_message(self) -> None:
        """Clear the message line when it was about a lock that has changed since."""
        now = self._state_now.uid if self._state_now is not None else None
        with self._qm_message_lock:
            if self._qm_message_state[0] and self._said_at is not None and self._said_at != now:
                self._qm_message_state, self._said_at = ("", "info"), None

    # -- pump side --------------------------------------------------------------------------------
    def _draw(self) -> int:
        now = self._state_now
        holds = bool(self.worker.holds_lock_key)
        sig = (now, self._problem, holds, self._state_then, self._problem_then)
        if sig == self._sig:
            return 0
        self._sig = sig
        changed = self.changed
        sent = set_traits(self._state, value=render.lock_html(now, holds, self._problem, changed))
        if changed:
            sent += set_traits(self._then, value=render.lock_then_html(self._state_then, self._then_at,
                                                                        self._problem_then))
        sent += set_traits(self._then.layout, display="" if changed else "none")
        return sent

    def _qm_apply(self, dirty: set[str], flags: set[str], periodic: bool, budget: int) -> int:
        if periodic or flags & {"lock", "poke", "force"}:
            self._state_now, self._problem = self._read()
            self._forget_stale_message()
        sent = self._draw()
        if self._clear_key:
            self._clear_key = False
            sent += set_traits(self._key, value="")
        sent += set_traits(self._message, value=self._qm_message_html())
        return sent

    def _qm_close_widgets(self) -> None:
        pass

    def text(self) -> str:
        """Deterministic text of the lock when this panel's cell ran (no key, no time)."""
        return self._text
