"""The lock of one environment (bluesky-queueserver's ``lock`` / ``unlock`` / ``lock_info``).

A :class:`LockStore` keeps the lock in ``<state_dir>/<environment_name>.lock.json``, so every
process that uses the same folder and environment name sees one lock, and the lock survives
restarts.  The key is stored only as a salted scrypt hash (:mod:`qmagic.store.keys`: fixed
parameters, equal cost for every guess, per-client back-off).  Writes are atomic
(:func:`~qmagic.store.files.replace_state_file`) and serialised between processes by
``flock`` on the sidecar ``<environment_name>.lock.json.flock`` (opened safely, never
written, never mapped) and between threads by a lock; both waits are bounded.  Every state
file is opened without following symlinks and without blocking, and must be a regular file
of the user's.  A damaged or unreadable lock file counts as locked (both scopes) until the
emergency key or ``qmagic-clear-lock`` resets it.

Noticing changes cheaply.  :meth:`LockStore.check` runs on every task submission.  A system
call there releases the GIL, and in a burst with busy task threads the submitting thread then
queues for the GIL behind them (about 25 % less throughput, measured with the engine).  So an
unchanged check makes no system call: the parsed lock is cached with the value of a
:class:`~qmagic.store.watch.ChangeSignal` and reused while the value is unchanged.  A watcher
thread per store (inotify through ctypes: IN_CLOSE_WRITE, IN_MOVED_TO/FROM, IN_CREATE,
IN_DELETE, IN_ATTRIB on the state folder, filtered by name) advances the value when the file
changes; every ``recheck_s`` it also ``lstat``-s the file and advances it when the file's
identity differs from the cached one (a change on a network filesystem made by another
machine raises no event).  This store's own writes advance it at once.  IN_MODIFY is not watched
(the experiment log writes in the same folder all the time), so a bare ``truncate(2)`` of
the lock file is seen by the ``recheck_s`` safety net.  The watcher costs one thread and two
descriptors (an inotify instance, an eventfd) per store; :meth:`LockStore.close` releases
them.  Where inotify cannot be used (not Linux, ``fs.inotify.max_user_instances`` reached,
``watch=False``), every check ``lstat``-s the file and reads it again only when its identity
changed (or it changed within the last second, when an identical identity proves nothing).

Measured with ``benchmarks/locks.py`` (Python 3.11, 2 busy cores shared with other jobs): an
unchanged check costs 150-250 ns, unlocked or locked with this kernel's remembered key (an
empty function with the same signature: 55-60 ns); the ``lstat`` fallback costs 4-7 µs.  With
two task threads spinning, the cached check keeps the share of the GIL any Python call gets,
while the ``lstat`` variant loses a further 25-80 % of its rate (each system call queues
for the GIL again).  Another process's change is seen 0.15-0.3 ms (at most 0.9 ms) after
its ``lock()`` returns: the watcher's wake-up (more while task threads hold the GIL, a few
switch intervals of 5 ms at worst).  ``strace`` counts 3 system calls for 40,000 checks (the
``lstat`` fallback: 72,000).  The previous design (a counter in the sidecar read through
``mmap``) was as cheap, but truncating the sidecar killed every reading process with
SIGBUS; nothing here is mapped.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: only the thread lock serialises writes
    fcntl = None  # type: ignore[assignment]

from ..errors import LockRefused, RequestRefused, StateFileError
from ..texts import safe_repr
from .files import (
    ensure_state_dir,
    open_state_file,
    remove_dead_replacements,
    replace_state_file,
)
from .keys import KeyChecker, KeyRecord, Throttle, hash_key, read_default_lock_key
from .lockfile import (
    MAX_NOTE_CHARS,
    LockFile,
    LockState,
    Snapshot,
    check_key,
    identity,
    note_ok,
    user_problem,
)
from .paths import validate_environment_name
from .watch import ChangeSignal, DirectoryWatcher

__all__ = ["EMERGENCY_KEY_ENVS", "SCOPES", "LockState", "LockStore", "emergency_key_from_env"]

#: Where the emergency key is read when none is given, first set wins: qmagic's variable,
#: then queueserver's.
EMERGENCY_KEY_ENVS = ("QMAGIC_EMERGENCY_LOCK_KEY", "QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER")
SCOPES = ("environment", "queue")
_MAX_TRIES = 5
_STUCK_RETRY_S = 0.1  # how long a change looks for the flock shortly after a wait ran out
_STUCK_FOR_S = 10.0  # ... within this many seconds of it (then a whole wait again)


def _take_flock(fd: int, path: Path, wait: float, stuck_at: float | None) -> tuple[str | None, float | None]:
    """Take the flock of ``fd`` within ``wait`` s: ``(None, None)``, else ``(what to say, when a
    whole wait ran out)``.  Shortly after a whole wait ran out (``stuck_at``), a look is brief
    unless the flock is seen free: behind a stopped process, requests one after another (a
    remote client's, served in turn with every other client's) each waited the whole bound."""
    start = time.monotonic()
    short = stuck_at is not None and start - stuck_at < _STUCK_FOR_S
    deadline = start + (min(wait, _STUCK_RETRY_S) if short else wait)
    while fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None, None
        except BlockingIOError:
            now = time.monotonic()
            if now > deadline:
                held = (f"still holds {path} (it held it for over {wait:g} s at an earlier try)" if short
                        else f"has held {path} for over {wait:g} s")
                return (f"Another process {held}; nothing was changed. Try again; if it persists, "
                        "look for a stopped qmagic process.", stuck_at if short else now)
            time.sleep(0.005)
    return None, None


class _Shared(ChangeSignal):
    """The change signal plus the current snapshot: what the store and its watcher share."""

    __slots__ = ("snap",)

    def __init__(self) -> None:
        super().__init__()
        self.snap: Snapshot | None = None


def emergency_key_from_env() -> str:
    """The emergency key from the first non-empty variable of :data:`EMERGENCY_KEY_ENVS`;
    "" (not set) when none is."""
    for name in EMERGENCY_KEY_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return ""


def _safety_net(path: str, shared: _Shared) -> None:
    """Watcher tick: advance the signal when the file's identity differs from the cached one."""
    snap = shared.snap
    if snap is None:
        return
    try:
        key = identity(os.lstat(path))
    except FileNotFoundError:
        key = None
    except OSError:
        key = ()
    if key != snap.key or snap.racy:
        shared.bump()


class LockStore:
    """The lock of one environment, shared by every process that uses the same folder.

    ``emergency_key`` unlocks (only unlocks) whatever key was used, also a damaged file;
    ``None`` reads ``$QMAGIC_EMERGENCY_LOCK_KEY``, else queueserver's
    ``$QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER`` ("" means not set).  It is never written.
    ``throttle`` slows down repeated wrong keys per client (default: 3 free, then 1 s
    doubling up to 300 s).  ``watch`` False (or no inotify): every check ``lstat``-s.
    Call :meth:`close` (or use ``with``) to stop the watcher thread.
    """

    def __init__(self, state_dir: str | os.PathLike[str], environment_name: str = "default", *,
                 emergency_key: str | None = None, throttle: Throttle | None = None,
                 watch: bool = True, recheck_s: float = 0.5, flock_timeout_s: float = 2.0) -> None:
        validate_environment_name(environment_name)
        if emergency_key is None:
            emergency_key = emergency_key_from_env()
        if not isinstance(emergency_key, str):
            raise TypeError(f"emergency_key must be a string or None, not {type(emergency_key).__name__}")
        self.environment_name = environment_name
        self.state_dir = Path(os.path.realpath(ensure_state_dir(state_dir)))
        self._keys = KeyChecker(emergency_key, throttle or Throttle())
        self._file = LockFile(self.state_dir, environment_name, self._keys.emergency_key_set)
        self.path = self._file.path
        self._flock_path = self.state_dir / f"{environment_name}.lock.json.flock"
        self._flock_timeout_s = flock_timeout_s
        self._flock_stuck_at: float | None = None  # when a whole wait for the flock ran out
        self._emergency_set = self._keys.emergency_key_set
        self._writing = threading.Lock()
        self._shared = _Shared()
        self._watcher: DirectoryWatcher | None = None
        if watch:
            watcher = DirectoryWatcher(self.state_dir, [self.path.name], self._shared,
                                       recheck_s=recheck_s,
                                       tick=lambda p=str(self.path), s=self._shared: _safety_net(p, s))
            if watcher.start():
                self._watcher = watcher
                self._finalizer = weakref.finalize(self, watcher.stop)

    def __repr__(self) -> str:
        return f"LockStore({str(self.state_dir)!r}, {self.environment_name!r})"

    def __enter__(self) -> LockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def watching(self) -> bool:
        """True while changes are noticed without a system call per check."""
        return self._shared.live

    def close(self) -> None:
        """Stop the watcher thread and release its descriptors (idempotent).

        The store keeps working afterwards, with an ``lstat`` per check.
        """
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            self._finalizer.detach()
            watcher.stop()

    # ---- reading ---------------------------------------------------------------------

    def state(self) -> LockState:
        """The current lock; no system call while it is unchanged."""
        shared = self._shared
        snap = shared.snap
        if snap is None or snap.gen != shared.gen:
            snap = self._refresh()
        return snap.state

    def check(self, key: str | None, scope: str = "environment", *, client: str | None = None) -> None:
        """Return if a request of ``scope`` ("environment"/"queue") may run with ``key``.

        Raises :class:`~qmagic.errors.LockRefused` (``str()`` is the protocol's ``msg``) when
        that scope is locked and ``key`` does not open it, when ``client`` is in back-off,
        and whenever the lock file is damaged.  The emergency key does not pass here.
        """
        shared = self._shared
        snap = shared.snap
        if snap is None or snap.gen != shared.gen:
            snap = self._refresh()
        if scope == "environment":
            open_ = snap.environment_open
        elif scope == "queue":
            open_ = snap.queue_open
        else:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        if key is not None and key.__class__ is not str and not isinstance(key, str):
            check_key(key, allow_none=True)  # refuses it (a str costs no call here)
        if open_ or (key is snap.verified and key is not None
                     and (client is None or not self._keys.throttle.active)):
            return
        state = snap.state
        if state.damaged is not None:
            raise LockRefused(state.damaged)
        if key is None:
            raise LockRefused(self._file.invalid_key_msg(state))
        check_key(key, allow_none=True)  # the length, before a key derivation
        if not self._keys.matches(key, snap.record, client=client):
            raise LockRefused(self._file.invalid_key_msg(state))
        snap.verified = key

    def info(self, key: str | None = None, *, client: str | None = None) -> LockState:
        """The current lock, read from the file now (queueserver ``lock_info``).

        Raises :class:`~qmagic.errors.LockRefused` if ``key`` is given, the lock is healthy
        and locked, and ``key`` does not open it (the emergency key does not).
        """
        check_key(key, allow_none=True)
        snap = self._refresh()
        state = snap.state
        if key is None or not state.locked or state.damaged is not None:
            return state
        if not self._keys.matches(key, snap.record, client=client):
            raise LockRefused(self._file.invalid_key_msg(state))
        return state

    def opens_with_default_key(self) -> bool:
        """True when the lock is healthy and locked, and this user's default lock key (if
        there is one) opens it.  The key is qmagic's own try: it never counts as wrong."""
        snap = self._refresh()
        state, record = snap.state, snap.record
        if not state.locked or state.damaged is not None or record is None:
            return False
        try:
            key = read_default_lock_key()
        except StateFileError:
            return False
        return key is not None and self._keys.matches(key, record, counted=False)

    # ---- changing --------------------------------------------------------------------

    def lock(self, key: str, *, environment: bool | None = False, queue: bool | None = False,
             note: str | None = None, user: str | None, client: str | None = None) -> LockState:
        """Lock the environment and/or the queue with ``key``; return the new state.

        Locking again with the same key replaces scopes, note, user and time (new uid) and
        keeps the key's stored hash (no new derivation: a client that locks again and again
        costs no key hashing).  A scope of ``None`` counts as False.  Raises RequestRefused
        for invalid arguments, LockRefused when locked with another key (or damaged),
        StateFileError when the file cannot be written (nothing changed).
        """
        problem = user_problem(user)
        if problem is not None:
            raise RequestRefused(f"Error: User name {problem}")
        check_key(key, new=True)
        if not note_ok(note):
            raise RequestRefused(f"Error: Note must be a string or None (at most {MAX_NOTE_CHARS} "
                                 f"characters, without lone surrogates): note = {safe_repr(note, 80)}")
        if not all(isinstance(v, (bool, type(None))) for v in (environment, queue)):
            raise RequestRefused("Error: Invalid option: 'environment' and 'queue' must be True or False: "
                                 f"environment={safe_repr(environment, 80)} queue={safe_repr(queue, 80)}")
        environment, queue = bool(environment), bool(queue)
        if not (environment or queue):
            raise RequestRefused("Error: Invalid option: environment and/or queue must be selected: "
                                 f"environment={environment} queue={queue}")
        records: list[KeyRecord] = []

        def verify(snap: Snapshot) -> None:
            self._refuse_relock(key, snap, client)
            if not records:  # (locked: this key was just found to open snap.record)
                records.append(snap.record if snap.state.locked and snap.record is not None
                               else hash_key(key))

        def change(now: Snapshot) -> LockState:
            new = LockState(str(uuid.uuid4()), environment, queue, user, time.time(), note,
                            self._emergency_set)
            self._write(new, records[0])
            return new

        new = self._change(self._refresh(), verify, change)
        self._keys.remember(key, records[0])
        return new

    def unlock(self, key: str, *, client: str | None = None) -> LockState:
        """Unlock with the lock key or the emergency key; return the new state.

        Unlocking an unlocked store succeeds and changes nothing.  The emergency key also
        resets a damaged lock file.  :meth:`release` also says whether it released a lock.
        """
        return self.release(key, client=client)[0]

    def release(self, key: str, *, client: str | None = None) -> tuple[LockState, bool]:
        """:meth:`unlock`: (the new state, True if this call released a lock; False when it
        found none, e.g. another process unlocked first)."""
        check_key(key)
        pre = self._refresh()
        if not pre.state.locked:
            return pre.state, False
        released: list[bool] = []

        def verify(snap: Snapshot) -> None:
            if snap.state.locked:
                self._refuse_unlock(key, snap, client)

        def change(now: Snapshot) -> LockState:
            if not now.state.locked:
                return now.state
            new = LockState(str(uuid.uuid4()), emergency_key_set=self._emergency_set)
            self._write(new, None)
            released.append(True)
            return new

        return self._change(pre, verify, change), bool(released)

    def clear(self) -> LockState:
        """Remove the lock without a key (also a damaged file); return the previous state.

        Raises :class:`~qmagic.errors.StateFileError` if the file cannot be rewritten.
        """
        with self._exclusive():
            snap = self._refresh()
            if snap.state.locked:
                self._write(LockState(str(uuid.uuid4()), emergency_key_set=self._emergency_set), None)
            return snap.state

    def _change(self, snap: Snapshot, verify: Callable[[Snapshot], None],
                change: Callable[[Snapshot], LockState]) -> LockState:
        """``verify`` the key against ``snap`` outside the locks (a key derivation takes tens
        of milliseconds), then, holding them, ``change`` the file if it still holds ``snap``."""
        for _ in range(_MAX_TRIES):
            verify(snap)
            with self._exclusive():
                now = self._refresh()
                if now.state.uid == snap.state.uid:
                    return change(now)
            snap = now
        raise StateFileError(f"The lock changed {_MAX_TRIES} times while this request was being "
                             "checked; nothing was changed. Try again.")

    def _refuse_relock(self, key: str, snap: Snapshot, client: str | None) -> None:
        state = snap.state
        if state.damaged is not None:
            raise LockRefused(state.damaged)
        if state.locked and not self._keys.matches(key, snap.record, client=client):
            raise LockRefused(self._file.different_key_msg(state))

    def _refuse_unlock(self, key: str, snap: Snapshot, client: str | None) -> None:
        if snap.state.damaged is not None and not self._emergency_set:
            raise LockRefused(snap.state.damaged)  # (no key opens it: nothing to guess, no wrong key)
        if not self._keys.matches(key, snap.record, client=client, emergency=True):
            state = snap.state
            raise LockRefused(state.damaged if state.damaged is not None else self._file.invalid_key_msg(state))

    # ---- the file ------------------------------------------------------------------------

    def _refresh(self) -> Snapshot:
        """Look at the file now (one ``lstat``, a read if it changed); publish the result."""
        shared = self._shared
        snap = self._file.look(shared.token(), shared.snap)  # token first: see ChangeSignal
        shared.snap = snap
        return snap

    def _write(self, state: LockState, record: KeyRecord | None) -> None:
        """Replace the lock file atomically with ``state`` (inside :meth:`_exclusive`)."""
        data = self._file.encode(state, record)
        remove_dead_replacements(self.path)  # (no other write is under way: see _exclusive)
        try:
            replace_state_file(self.path, data)
        except OSError as exc:
            if self.path.is_dir() and not self.path.is_symlink():  # (no file can replace it)
                raise StateFileError(f"Failed to save the lock file {self.path}: a folder of that name "
                                     "is in its place. Nothing was changed; remove that folder, then "
                                     "try again.") from exc
            why = exc.strerror if exc.filename and exc.strerror else exc  # (not our temporary file's name)
            raise StateFileError(f"Failed to save the lock file {self.path}: {why}. Nothing was "
                                 "changed; check that the folder exists and is writable.") from exc
        finally:
            self._shared.bump()  # this process reads its own write back at the next check

    @contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the thread lock and the inter-process ``flock`` (both waits bounded)."""
        wait = self._flock_timeout_s
        if not self._writing.acquire(timeout=wait):
            raise StateFileError(f"Another change of the lock in this process has taken over {wait:g} s; "
                                 "nothing was changed. Try again.")
        try:
            ensure_state_dir(self.state_dir)  # deleted meanwhile (a cleanup): made again
            fd = open_state_file(self._flock_path, os.O_RDWR | os.O_CREAT)
            try:
                problem, self._flock_stuck_at = _take_flock(fd, self._flock_path, wait, self._flock_stuck_at)
                if problem is not None:
                    raise StateFileError(problem)
                yield
            finally:
                os.close(fd)  # releases the flock
        finally:
            self._writing.release()
