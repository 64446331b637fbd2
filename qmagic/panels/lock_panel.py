"""The lock panel (what ``%lock_info`` shows): state per scope, Lock and Unlock controls."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from . import render
from .base import PanelBase, set_traits
from .pump import get_pump

__all__ = ["LockPanel"]


class LockPanel(PanelBase, W.VBox):
    """Live lock state of the worker's environment and queue, with Lock / Unlock controls.

    Shows, per scope, locked or unlocked; who locked, since when, the note; whether an
    emergency unlock key is set and whether this kernel holds the key.  The key field is a
    password field; left empty, Lock and Unlock use the key this kernel remembers (or the
    user's default key for a first lock).  Every refusal (wrong key, locked by another key,
    nothing selected) is shown in the panel.  The state follows changes made anywhere
    (magics, remote clients, other kernels) within about a second.
    """

    def __init__(self, worker: Any) -> None:
        self._qm_init_base(worker)
        own = self._qm_own
        self._reply: dict[str, Any] = self._read()
        self._sig: tuple | None = None
        self._clear_key = False
        self._state = own(W.HTML(value=self._state_html(), layout=own(W.Layout(margin="0 0 6px 0")),
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
        title = own(W.HTML(value='<span style="font-weight:600;font-size:13px">qmagic lock</span>'))
        W.VBox.__init__(
            self,
            children=(title, self._state, row1, row2, self._message),
            layout=W.Layout(border="1px solid rgba(128,128,128,0.35)", padding="6px", width="auto"),
            _dom_classes=("qmagic-lock-panel",),
        )
        self._qm_own(self.layout)
        get_pump().register(self, events=False)

    # -- reading the lock ----------------------------------------------------------------------
    def _read(self) -> dict[str, Any]:
        try:
            return self.worker.lock_info(origin="panel")
        except Exception as exc:  # noqa: BLE001 - shown in the panel
            return {"success": False, "msg": f"Could not read the lock: {type(exc).__name__}: {exc}",
                    "lock_info": {}, "lock_info_uid": None}

    def _holds_key(self) -> bool:
        return bool(getattr(self.worker, "remembered_lock_key", False))

    def _state_html(self) -> str:
        return render.lock_html(self._reply, self._holds_key())

    @property
    def lock_info(self) -> dict[str, Any]:
        """The last lock_info reply shown."""
        return dict(self._reply)

    # -- clicks (any thread) --------------------------------------------------------------------
    def _on_lock(self) -> None:
        key = self._key.value or None
        note = self._note.value or None
        environment, queue = bool(self._environment.value), bool(self._queue.value)
        try:
            if not (environment or queue):
                reply = {"success": False, "msg": "Select what to lock: environment, queue or both."}
            else:
                reply = self.worker.lock(key, environment=environment, queue=queue, note=note, origin="panel")
        except Exception as exc:  # noqa: BLE001 - shown, never silent
            reply = {"success": False, "msg": f"Could not lock: {type(exc).__name__}: {exc}"}
        if reply.get("success"):
            scopes = " and ".join(s for s, on in (("environment", environment), ("queue", queue)) if on)
            self._clear_key = True
            self._qm_set_message(f"Locked: {scopes}.", "ok")
        else:
            self._qm_set_message(str(reply.get("msg") or "Lock refused."), "error")
        self._qm_poke(flag="lock")

    def _on_unlock(self) -> None:
        key = self._key.value or None
        try:
            if key is None and not self._holds_key():
                reply = {"success": False, "msg": (
                    "Type the lock key (or the emergency key) to unlock: this kernel does not "
                    "hold the key of the current lock.")}
            else:
                reply = self.worker.unlock(key, origin="panel")
        except Exception as exc:  # noqa: BLE001 - shown, never silent
            reply = {"success": False, "msg": f"Could not unlock: {type(exc).__name__}: {exc}"}
        if reply.get("success"):
            self._clear_key = True
            self._qm_set_message("Unlocked.", "ok")
        else:
            self._qm_set_message(str(reply.get("msg") or "Unlock refused."), "error")
        self._qm_poke(flag="lock")

    # -- pump side --------------------------------------------------------------------------------
    def _qm_apply(self, dirty: set[str], flags: set[str], periodic: bool, budget: int) -> int:
        sent = 0
        if periodic or "lock" in flags or "poke" in flags:
            self._reply = self._read()
        sig = (self._reply.get("lock_info_uid"), self._reply.get("success"), self._reply.get("msg"),
               self._holds_key(), repr(self._reply.get("lock_info")))
        if sig != self._sig:
            self._sig = sig
            sent += set_traits(self._state, value=self._state_html())
        if self._clear_key:
            self._clear_key = False
            sent += set_traits(self._key, value="")
        sent += set_traits(self._message, value=self._qm_message_html())
        return sent

    def _qm_close_widgets(self) -> None:
        pass

    def text(self) -> str:
        """Deterministic text of the lock (no key, no time)."""
        return render.lock_plain_text(self._read())
