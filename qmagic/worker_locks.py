"""The worker's lock: lock, unlock, read it, and check a request's key against it.  A mix-in
of :class:`qmagic.Worker` over its :class:`~qmagic.store.locks.LockStore` (``_locks``, made
and replaced by :class:`~qmagic.worker_state.StateMixin`); this kernel remembers the key it
locked with (``_remembered_key``).  The kernel's own lock changes (a cell, a click) go one
at a time under ``_key_lock`` and each sets the remembered key, so it is that of the latest
one; remote changes never take ``_key_lock`` (a remote lock never waits for a cell's key
derivation or disk) and never change what the kernel remembers.
"""

from __future__ import annotations

from typing import Any

from .core.foreground import interrupt_after
from .errors import LockRefused, RequestRefused
from .store.lockfile import check_key

__all__ = ["LockMixin"]

#: How each door gives the key an unlock without one lacked (the lock key, the default key).
_HOW_TO_GIVE_A_KEY = {
    "magic": ("%unlock --key KEY", "%unlock --default-key"),
    "panel": ("type it in the Key field", "run %unlock --default-key in a cell"),
    "python": ("unlock(lock_key=KEY)", "unlock(lock_key=qmagic.get_default_lock_key())"),
}


class LockMixin:
    """``lock``, ``unlock`` (``release_lock``), ``lock_state``, ``current_lock``,
    ``holds_lock_key`` and ``check_lock``."""

    _locks: Any
    _key_lock: Any
    _check_not_closed: Any  # (StateMixin)
    _remembered_key: str | None
    default_user: str

    def _key(self, lock_key: Any, origin: str) -> Any:
        """This kernel's remembered key stands in for a missing one, except for remote callers."""
        if lock_key is None and origin != "remote":
            return self._remembered_key
        return lock_key

    def check_lock(self, lock_key: Any = None, scope: str = "environment", *,
                   origin: str = "python", client: str | None = None) -> None:
        """Raise :class:`qmagic.LockRefused` unless ``scope`` is unlocked or the key opens it
        (the error's ``state`` is the lock that refused)."""
        try:
            self._locks.check(self._key(lock_key, origin), scope, client=client)
        except LockRefused as exc:
            exc = self._with_state(exc, lock_key)
            if origin == "handle":  # (``task.cancel()``, which takes no key: say how to give one)
                exc.give_key, origin = "give the key with qmagic.get_worker().cancel(task, lock_key=KEY)", "python"
            if lock_key is None and origin in _HOW_TO_GIVE_A_KEY and self._locks.opens_with_default_key():
                exc.default_key = _HOW_TO_GIVE_A_KEY[origin][1]  # (this kernel's own lock, of
            raise exc from None  # before a restart: say how to release it)

    def _with_state(self, exc: LockRefused, lock_key: Any = None, unlocking: bool = False) -> LockRefused:
        """``exc`` with the lock that refused as its ``state``, whether the caller gave a key
        (``lock_key``; not a remembered one) and whether it was an unlock: the doors word
        the refusal from that."""
        if getattr(exc, "state", None) is None:
            exc.state = self._locks.state()
        exc.key_given, exc.unlocking = lock_key is not None, unlocking
        return exc

    def lock(self, lock_key: str | None = None, *, environment: bool | None = None,
             queue: bool | None = None, note: str | None = None, user: str | None = None,
             origin: str = "python", client: str | None = None) -> Any:
        """Lock the environment and/or the queue with a key; returns the new LockState.

        From this kernel (not remote): neither scope given means the environment; a missing
        key means the key of this kernel's earlier lock, else
        :func:`qmagic.get_default_lock_key`; a missing user means ``QMagic.default_user``.
        The kernel remembers the key, so its own magics and Python calls keep working while
        others need it.  Refusals raise LockRefused; a closed worker refuses (RequestRefused:
        run ``%reload_ext qmagic``), as it does :meth:`unlock`.
        """
        self._check_not_closed(task=False)
        if origin != "remote" and environment is None and queue is None:
            environment = True
        # (the scopes' types are checked by the store)
        scopes = {"environment": False if environment is None else environment,
                  "queue": False if queue is None else queue}
        if origin == "remote":
            return self._locks.lock(lock_key, **scopes, note=note, user=user, client=client)
        user = self.default_user if user is None else user
        # (this kernel's own changes: one at a time, see the module doc; ■ lands after the
        # change, never inside the lock file's writing: it left temporary files behind)
        with self._key_lock, interrupt_after():
            key = self._remembered_key if lock_key is None else lock_key
            if key is None:
                from .store.keys import get_default_lock_key

                key = get_default_lock_key()
            try:
                state = self._locks.lock(key, **scopes, note=note, user=user, client=client)
            except LockRefused as exc:
                raise self._with_state(exc, lock_key) from None
            self._remembered_key = key
        return state

    def unlock(self, lock_key: str | None = None, *, origin: str = "python",
               client: str | None = None) -> Any:
        """Unlock with the lock key or the emergency key; returns the new LockState.

        Without a key, this kernel's remembered key is used; if it holds none while the
        environment is locked, the request is refused with what to do."""
        return self.release_lock(lock_key, origin=origin, client=client)[0]

    def release_lock(self, lock_key: str | None = None, *, origin: str = "python",
                     client: str | None = None) -> tuple[Any, bool]:
        """:meth:`unlock`: (the new LockState, True if this call released a lock; False when
        nothing was locked as it unlocked).  Words such as "Unlocked." come from this, never
        from a reading before the unlock: another client may lock or unlock in between."""
        self._check_not_closed(task=False)
        key = self._key(lock_key, origin)
        if origin == "remote":  # queueserver requires a key: none remembered stands in
            check_key(key)
        if key is None:
            state = self._locks.state()
            if state.environment or state.queue:
                give, default = _HOW_TO_GIVE_A_KEY.get(origin, _HOW_TO_GIVE_A_KEY["python"])
                hint = (f" It was locked with your default key: {default}"
                        if self._locks.opens_with_default_key() else "")
                raise RequestRefused(
                    "This kernel does not hold the key of the current lock: give the lock key "
                    f"or the emergency key ({give}).{hint}"
                )
            return state, False
        try:
            if origin == "remote":
                return self._locks.release(key, client=client)
            with self._key_lock, interrupt_after():
                found = self._locks.release(key, client=client)
                self._remembered_key = None
        except LockRefused as exc:
            raise self._with_state(exc, lock_key, unlocking=True) from None
        return found

    def lock_state(self, lock_key: str | None = None, *, client: str | None = None) -> Any:
        """The current LockState, read now; with ``lock_key`` given, LockRefused if it is wrong.

        No remembered key stands in for a missing one: showing the lock never fails because
        this kernel's key no longer opens it."""
        return self._locks.info(lock_key, client=client)

    def current_lock(self) -> Any:
        """The current LockState, cheaply (no system call while the lock file is unchanged;
        :meth:`lock_state` reads the file now)."""
        return self._locks.state()

    @property
    def holds_lock_key(self) -> bool:
        """True when this kernel remembers a lock key (it never shows the key)."""
        return self._remembered_key is not None
