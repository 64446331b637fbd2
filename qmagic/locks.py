"""The persistent lock of the environment and the queue (queueserver ``lock`` semantics).

A :class:`LockStore` keeps one lock in ``<state_dir>/<environment_name>.lock.json``, so
every process that shares the folder sees one lock, and the lock survives restarts.  The
key is stored only as a salted scrypt hash; writes are atomic (temporary file, fsync,
``os.replace``) and serialised between processes with ``flock`` on the sidecar file
``<environment_name>.lock.json.flock``.  A damaged file counts as locked until it is
repaired or removed with ``qmagic-clear-lock``.

Noticing changes cheaply.  :meth:`LockStore.check` runs on every request, so it must not
make a system call (a syscall releases the GIL, and the submitting thread then waits for
the GIL behind the task threads).  The sidecar also holds a *generation counter*: 8 bytes
(little-endian uint64) at offset 0, created once with a random start and never replaced.
Every writer bumps it under the ``flock`` right after the ``os.replace`` of the JSON.
Readers map those 8 bytes read-only (``mmap``) and compare the counter with the one their
cached state was read at: unchanged means the cache is current, with no syscall.  Safety
nets: at most every ``_RECHECK_SECONDS`` the JSON and the sidecar are ``stat``-ed anyway
(this catches a writer that died between replace and bump, a hand-edited file, an older
qmagic that does not bump, a sidecar deleted and re-created); when the sidecar cannot be
mapped (missing, short, unreadable, a filesystem without mmap) every check ``stat``-s the
JSON as before.  An error never reads as "unlocked".  The sidecar may be deleted at any
time, but never truncated while kernels run (a truncated mapping kills the reading
process with SIGBUS).  ``mmap`` is coherent between processes of one machine only; on a
network filesystem shared by several machines the periodic ``stat`` is what notices.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import mmap
import os
import secrets
import shlex
import stat as stat_mode
import struct
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, NamedTuple

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: only the thread lock serialises writes
    fcntl = None  # type: ignore[assignment]

from .errors import LockRefused, RequestRefused, StateFileError
from .store.paths import STATE_DIR_ENV, default_state_dir, validate_environment_name

__all__ = ["EMERGENCY_KEY_ENV", "SCOPES", "STATE_DIR_ENV", "LockStore", "clear_lock_main",
           "default_lock_key_path", "default_state_dir", "get_default_lock_key"]

EMERGENCY_KEY_ENV = "QMAGIC_EMERGENCY_LOCK_KEY"
SCOPES = ("environment", "queue")
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}  # about 40 ms and 16 MiB per hash
_MAX_FILE_BYTES = 65536
_RACY_SECONDS = 1.0  # a file changed this recently may hide a rewrite from stat: re-read it
_FLOCK_TIMEOUT = 2.0
_RECHECK_SECONDS = 0.5  # stat the files at least this often even when the counter is unchanged
# (and, while the sidecar cannot be mapped, try to map it at most this often)
_GEN = struct.Struct("<Q")  # the generation counter at offset 0 of the sidecar
_unpack_gen = _GEN.unpack_from
_monotonic = time.monotonic  # vDSO clock: no syscall, keeps the GIL


def _new_uid() -> str:
    return str(uuid.uuid4())


def _int_in(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _hash_key(key: str) -> dict[str, Any]:
    """A fresh salted scrypt record of ``key``: algorithm, parameters, salt and hash."""
    record = {"algorithm": "scrypt", **_SCRYPT, "salt": secrets.token_bytes(16).hex(), "hash": "00" * 32}
    record["hash"] = _derive(key, record).hex()  # the placeholder only sets the length
    return record


def _derive(key: str, record: dict[str, Any]) -> bytes:
    salt, size = bytes.fromhex(record["salt"]), len(record["hash"]) // 2
    if record["algorithm"] == "scrypt":
        n, r, p = record["n"], record["r"], record["p"]
        return hashlib.scrypt(key.encode(), salt=salt, n=n, r=r, p=p, dklen=size,
                              maxmem=128 * r * (n + p + 2) + (1 << 20))
    return hashlib.pbkdf2_hmac("sha256", key.encode(), salt, record["iterations"], size)


def _check_record(record: Any) -> None:
    """Raise ValueError unless ``record`` is a key hash this module can verify safely."""
    if not isinstance(record, dict):
        raise ValueError("the key hash is missing")
    try:
        bytes.fromhex(record["salt"]), bytes.fromhex(record["hash"])
        ok = 32 <= len(record["hash"]) <= 128 and bool(record["salt"])
        if record["algorithm"] == "scrypt":
            n = record["n"]
            ok = ok and _int_in(n, 2, 2**20) and n & (n - 1) == 0
            ok = ok and _int_in(record["r"], 1, 32) and _int_in(record["p"], 1, 16)
        elif record["algorithm"] == "pbkdf2_sha256":
            ok = ok and _int_in(record["iterations"], 1, 10**7)
        else:
            ok = False
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("the key hash record is invalid or uses an unknown algorithm")


@dataclass(frozen=True)
class _State:
    """One snapshot of the lock file. ``problem`` set: the file is damaged (counts as locked)."""

    uid: str
    environment: bool = False
    queue: bool = False
    user: str | None = None
    time: float | None = None
    note: str | None = None
    key_hash: dict[str, Any] | None = None
    problem: str | None = None

    @property
    def locked(self) -> bool:
        return self.environment or self.queue


def _parse(raw: bytes) -> _State:
    """Decode the lock file's bytes; ValueError with a short reason when damaged."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"it is not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != "qmagic-lock":
        raise ValueError("it is not a qmagic lock file")
    if doc.get("version") != 1:
        raise ValueError(f"unknown format version {doc.get('version')!r} (written by a newer qmagic?)")
    uid, env, queue = doc.get("uid"), doc.get("environment"), doc.get("queue")
    if not isinstance(uid, str) or not uid:
        raise ValueError("its 'uid' is missing")
    if not isinstance(env, bool) or not isinstance(queue, bool):
        raise ValueError("'environment' and 'queue' must be true or false")
    if not (env or queue):
        return _State(uid=uid)
    user, stamp, note = doc.get("user"), doc.get("time"), doc.get("note")
    if not isinstance(user, str) or not user:
        raise ValueError("the user name is missing")
    if not isinstance(stamp, (int, float)) or isinstance(stamp, bool):
        raise ValueError("the lock time is missing")
    if not isinstance(note, (str, type(None))):
        raise ValueError("the note is not a string")
    _check_record(doc.get("key_hash"))
    return _State(uid, env, queue, user, float(stamp), note, doc["key_hash"])


class _Cache(NamedTuple):
    """The last read of the lock file: its stat key (None: missing), state, and the counter
    value read *before* the file (None: no counter mapped)."""

    key: tuple[int, int, int] | None
    state: _State
    trusted: bool  # False: modified so recently that a rewrite may not change the stat key
    gen: int | None


def _put_counter(fd: int, value: int) -> None:
    """Write the generation counter in place (offset 0), never truncating the file."""
    data = _GEN.pack(value & 0xFFFF_FFFF_FFFF_FFFF)
    if hasattr(os, "pwrite"):
        written = os.pwrite(fd, data, 0)
    else:  # pragma: no cover - not POSIX
        os.lseek(fd, 0, os.SEEK_SET)
        written = os.write(fd, data)
    if written != len(data):
        raise OSError(f"short write of the lock generation counter ({written} bytes)")


def _get_counter(fd: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, _GEN.size, 0)
    os.lseek(fd, 0, os.SEEK_SET)  # pragma: no cover - not POSIX
    return os.read(fd, _GEN.size)  # pragma: no cover


def _fsync_dir(path: Path) -> None:
    with suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LockStore:
    """The lock of one environment, shared by every process that uses the same folder.

    Methods mirror bluesky-queueserver's ``lock``/``unlock``/``lock_info`` replies
    (``{"success", "msg", "lock_info", "lock_info_uid"}``); :meth:`check` is the rule
    that environment- and queue-lockable requests call before doing anything.

    ``emergency_key`` unlocks (only unlocks) whatever key was used; ``None`` reads it from
    the environment variable ``QMAGIC_EMERGENCY_LOCK_KEY`` (empty means not set).  It is
    never written to disk.
    """

    def __init__(self, state_dir: str | os.PathLike[str], environment_name: str = "default",
                 *, emergency_key: str | None = None) -> None:
        validate_environment_name(environment_name)
        if emergency_key is None:
            emergency_key = os.environ.get(EMERGENCY_KEY_ENV, "")
        if not isinstance(emergency_key, str):
            raise TypeError(f"emergency_key must be a string or None, not {type(emergency_key).__name__}")
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
        except OSError as exc:
            raise StateFileError(f"Cannot create the qmagic state folder {str(state_dir)!r}: {exc}. "
                                 "Choose a writable folder (QMagic.state_dir).") from exc
        self.environment_name = environment_name
        self.state_dir = Path(os.path.realpath(state_dir))
        self.path = self.state_dir / f"{environment_name}.lock.json"
        # the sidecar: flock'ed by writers, and its first 8 bytes are the generation counter
        self._flock_path = self.state_dir / f"{environment_name}.lock.json.flock"
        self._emergency_key = emergency_key
        self._missing = _State(uid=str(uuid.uuid5(uuid.NAMESPACE_URL, f"qmagic-lock:{self.path}")))
        self._mutex = threading.Lock()  # guards the caches below (not taken on the fast path)
        self._writer = threading.Lock()  # serialises read-modify-write within this process
        self._cache: _Cache | None = None
        # (counter value, monotonic deadline, counter mapping, state): _current()'s fast path
        self._fast: tuple[int, float, mmap.mmap, _State] | None = None
        self._view: mmap.mmap | None = None  # the sidecar's counter, mapped read-only
        self._view_id: tuple[int, int] | None = None  # (st_dev, st_ino) of the mapped sidecar
        self._next_look = 0.0  # unmapped: monotonic time of the next attempt to map the sidecar
        self._secret = secrets.token_bytes(32)
        self._verified: dict[tuple[str, str, bytes], bool] = {}
        self._last_match: tuple[_State, str] | None = None  # see _key_matches

    def __repr__(self) -> str:
        return f"LockStore({str(self.state_dir)!r}, {self.environment_name!r})"

    # ---- public API ----------------------------------------------------------------

    def lock(self, lock_key: str, *, environment: bool | None = False, queue: bool | None = False,
             note: str | None = None, user: str | None = None) -> dict[str, Any]:
        """Lock the environment and/or the queue with ``lock_key`` (queueserver ``lock``).

        Locking again with the same key replaces scopes, note, user and time.  A scope of
        ``None`` counts as ``False`` (as a request that leaves the parameter out).
        """
        if not isinstance(user, str) or not user:
            return self._fail(f"Error: User name must be a non-empty string: user = {user!r}")
        if not isinstance(lock_key, str) or not lock_key:
            return self._fail(f"Error: Lock key must be a non-empty string: lock_key = {lock_key!r}")
        if not isinstance(note, (str, type(None))):
            return self._fail(f"Error: Note must be a string or None: note = {note!r}")
        if not all(isinstance(v, (bool, type(None))) for v in (environment, queue)):
            return self._fail("Error: Invalid option: 'environment' and 'queue' must be True or False: "
                              f"environment={environment!r} queue={queue!r}")
        environment, queue = bool(environment), bool(queue)
        if not (environment or queue):
            return self._fail("Error: Invalid option: environment and/or queue must be selected: "
                              f"environment={environment} queue={queue}")
        record = _hash_key(lock_key)
        self._remember(lock_key, record, True)
        try:
            with self._exclusive() as sidecar:
                state = self._read(fresh=True)
                if state.problem:
                    return self._fail(self._damaged_msg(state))
                if state.locked and not self._key_matches(lock_key, state):
                    return self._fail(f"Error: RE Manager was locked with a different key: \n{self._describe(state)}")
                new = _State(_new_uid(), environment, queue, user, time.time(), note, record)
                self._write(new, sidecar)
        except OSError as exc:
            return self._fail(self._write_failed_msg(exc))
        return self._reply(new)

    def unlock(self, lock_key: str) -> dict[str, Any]:
        """Unlock with the lock key or the emergency key (queueserver ``unlock``).

        Unlocking an unlocked store succeeds and changes nothing.  The emergency key also
        resets a damaged lock file.
        """
        if not isinstance(lock_key, str) or not lock_key:
            return self._fail(f"Error: Lock key must be a non-empty string: lock_key = {lock_key!r}")
        try:
            with self._exclusive() as sidecar:
                state = self._read(fresh=True)
                if not state.locked:
                    return self._reply(state)
                if not (self._is_emergency_key(lock_key)
                        or (not state.problem and self._key_matches(lock_key, state))):
                    msg = self._damaged_msg(state) if state.problem else self._invalid_key_msg(state)
                    return self._fail(msg, state)
                new = _State(_new_uid())
                self._write(new, sidecar)
        except OSError as exc:
            return self._fail(self._write_failed_msg(exc))
        return self._reply(new)

    def info(self, lock_key: str | None = None) -> dict[str, Any]:
        """The current lock (queueserver ``lock_info``); fails if ``lock_key`` is given and wrong.

        The emergency key is not accepted here.  A damaged lock file is reported as a failure
        whose ``lock_info`` shows both scopes locked.  Always looks at the file (a ``stat``),
        so even a hand edit that did not bump the generation counter shows at once.
        """
        state = self._read()
        if lock_key is not None and not isinstance(lock_key, str):
            return self._fail(f"Error: Lock key must be a non-empty string or None: lock_key = {lock_key!r}", state)
        if state.problem:
            return self._fail(self._damaged_msg(state), state)
        if lock_key is not None and state.locked and not self._key_matches(lock_key, state):
            return self._fail(self._invalid_key_msg(state), state)
        return self._reply(state)

    def check(self, lock_key: str | None, scope: str) -> None:
        """Return if a request of ``scope`` ("environment"/"queue") may run with ``lock_key``.

        Raises :class:`~qmagic.errors.LockRefused` (its text is the protocol's ``msg``) when
        that scope is locked and the key does not match, and whenever the lock file is
        damaged.  The emergency key does not pass.  Costs no system call while the lock is
        unchanged; a change made through :class:`LockStore` in any process (or by
        ``qmagic-clear-lock``) is seen by the next call, any other change of the file within
        ``_RECHECK_SECONDS``.
        """
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        if lock_key is not None and not isinstance(lock_key, str):
            raise RequestRefused(f"Error: Lock key must be a non-empty string or None: lock_key = {lock_key!r}")
        state = self._current()
        if state.problem:
            raise LockRefused(self._damaged_msg(state))
        if getattr(state, scope) and (lock_key is None or not self._key_matches(lock_key, state)):
            raise LockRefused(self._invalid_key_msg(state))

    def snapshot(self) -> tuple[dict[str, bool], str]:
        """``({"environment": bool, "queue": bool}, lock_info_uid)`` from one read, for ``status``.

        As cheap and as current as :meth:`check`; a damaged file shows both scopes locked.
        """
        state = self._current()
        return {"environment": state.environment, "queue": state.queue}, state.uid

    def scopes(self) -> dict[str, bool]:
        """``{"environment": bool, "queue": bool}`` (damaged: both True); see :meth:`snapshot`."""
        return self.snapshot()[0]

    @property
    def info_uid(self) -> str:
        """The ``lock_info_uid``: the same in every process, new after every change."""
        return self._current().uid

    def clear(self) -> dict[str, Any]:
        """Remove the lock without a key (also a damaged file); return the removed lock_info.

        Raises :class:`~qmagic.errors.StateFileError` if the file cannot be rewritten.
        """
        return self._lock_info(self._clear())

    # ---- replies and messages -------------------------------------------------------

    def _lock_info(self, state: _State) -> dict[str, Any]:
        return {
            "environment": state.environment,
            "queue": state.queue,
            "user": state.user,
            "time": state.time,
            "time_str": datetime.fromtimestamp(state.time).strftime("%m/%d/%Y %H:%M:%S") if state.time else "",
            "note": state.note,
            "emergency_lock_key_is_set": bool(self._emergency_key),
        }

    def _reply(self, state: _State) -> dict[str, Any]:
        return {"success": True, "msg": "", "lock_info": self._lock_info(state), "lock_info_uid": state.uid}

    def _fail(self, msg: str, state: _State | None = None) -> dict[str, Any]:
        return {"success": False, "msg": msg, "lock_info": self._lock_info(state) if state else {},
                "lock_info_uid": state.uid if state else None}

    def _describe(self, state: _State) -> str:
        """The queueserver's lock description; never shows the key."""
        info = self._lock_info(state)
        return (f"RE Manager is locked by {state.user} at {info['time_str']}\n"
                f"Environment is locked: {state.environment}\n"
                f"Queue is locked:       {state.queue}\n"
                f"Emergency lock key:    {'set' if self._emergency_key else 'not set'}\n"
                f"Note: {state.note or '---'}")

    def _invalid_key_msg(self, state: _State) -> str:
        return f"Error: Invalid lock key: \n{self._describe(state)}"

    def _clear_command(self) -> str:
        return (f"qmagic-clear-lock --environment {shlex.quote(self.environment_name)} "
                f"--state-dir {shlex.quote(str(self.state_dir))}")

    def _damaged_msg(self, state: _State) -> str:
        emergency = " Unlock with the emergency lock key, or if" if self._emergency_key else " If"
        return (f"Error: The lock file {self.path} cannot be used: {state.problem}. For safety the "
                f"environment and the queue count as LOCKED.{emergency} the file cannot be repaired, "
                f"remove the lock with: {self._clear_command()}")

    def _write_failed_msg(self, exc: OSError) -> str:
        if isinstance(exc, StateFileError):
            return f"Error: {exc}"
        return (f"Error: Failed to save the lock file {self.path}: {exc}. Nothing was changed; "
                "check that the folder exists and is writable.")

    # ---- keys -------------------------------------------------------------------------

    def _is_emergency_key(self, key: str) -> bool:
        return bool(self._emergency_key) and hmac.compare_digest(key.encode(), self._emergency_key.encode())

    def _remember(self, key: str, record: dict[str, Any], ok: bool) -> None:
        tag = hmac.new(self._secret, key.encode(), "sha256").digest()
        with self._mutex:
            if len(self._verified) >= 64:
                self._verified.clear()
            self._verified[(record["salt"], record["hash"], tag)] = ok

    def _key_matches(self, key: str, state: _State) -> bool:
        """Verify ``key`` against the stored hash; results are cached by a keyed digest.

        The last success is also remembered by identity (this very state object and this
        very key object: a kernel passes its remembered key object on every request), so
        the common case costs no hashing at all.
        """
        last = self._last_match
        if last is not None and last[0] is state and last[1] is key:
            return True
        record = state.key_hash
        if record is None:
            return False
        tag = hmac.new(self._secret, key.encode(), "sha256").digest()
        with self._mutex:
            known = self._verified.get((record["salt"], record["hash"], tag))
        if known is None:
            known = hmac.compare_digest(_derive(key, record), bytes.fromhex(record["hash"]))
            self._remember(key, record, known)
        if known:
            self._last_match = (state, key)
        return known

    # ---- the file -----------------------------------------------------------------------

    def _damaged(self, reason: str, st: os.stat_result | None) -> _State:
        mark = f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}" if st else "unreadable"
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"qmagic-lock-damaged:{self.path}:{mark}"))
        return _State(uid, True, True, "unknown", st.st_mtime if st else None,
                      f"The lock file cannot be used ({reason}). Run: {self._clear_command()}",
                      None, reason)

    def _current(self) -> _State:
        """The state for the hot paths: no system call while the counter is unchanged."""
        fast = self._fast
        if fast is not None and _monotonic() < fast[1] and _unpack_gen(fast[2])[0] == fast[0]:
            return fast[3]
        return self._read()

    def _read(self, fresh: bool = False) -> _State:
        """The current state from the file: reused when its stat and the counter are unchanged
        (and it is not too recent to trust the stat); ``fresh`` always reads it."""
        with self._mutex:
            self._fast = None  # until this read succeeds, callers come here
            now = _monotonic()
            if self._view is not None or now >= self._next_look:  # unmapped: retry now and then
                self._look_at_sidecar(now)
            view = self._view
            gen = _unpack_gen(view)[0] if view is not None else None  # before the file, always
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                st = None
            except OSError as exc:
                return self._damaged(f"it cannot be accessed ({exc})", None)
            key = (st.st_mtime_ns, st.st_size, st.st_ino) if st is not None else None
            cache = self._cache
            if not fresh and cache is not None and cache.key == key and cache.trusted and cache.gen == gen:
                state = cache.state
            elif st is None:
                state = self._missing
                self._cache = _Cache(None, state, True, gen)
            else:
                try:
                    with open(self.path, "rb") as f:
                        st = os.fstat(f.fileno())
                        raw = f.read(_MAX_FILE_BYTES + 1)
                except FileNotFoundError:  # deleted since the stat (writers only replace it)
                    return self._missing
                except OSError as exc:
                    return self._damaged(f"it cannot be read ({exc})", st)
                try:
                    if len(raw) > _MAX_FILE_BYTES:
                        raise ValueError("it is far too large")
                    state = _parse(raw)
                except ValueError as exc:
                    state = self._damaged(str(exc), st)
                trusted = time.time() - st.st_mtime > _RACY_SECONDS
                self._cache = _Cache((st.st_mtime_ns, st.st_size, st.st_ino), state, trusted, gen)
            if view is not None:
                self._fast = (gen, now + _RECHECK_SECONDS, view, state)
            return state

    def _look_at_sidecar(self, now: float) -> None:
        """(Re)map the sidecar's counter if it is not mapped or the file was replaced/deleted."""
        self._next_look = now + _RECHECK_SECONDS
        try:
            st = os.stat(self._flock_path)
            if (self._view is not None and (st.st_dev, st.st_ino) == self._view_id
                    and st.st_size >= _GEN.size):
                return
        except OSError:
            pass
        view, view_id = self._map_sidecar()
        if view is not None or self._view is not None:
            self._cache = None  # another counter: nothing read at the old one compares
        # an old mapping is not closed: a thread on the fast path may still read it
        self._view, self._view_id = view, view_id

    def _map_sidecar(self) -> tuple[mmap.mmap | None, tuple[int, int] | None]:
        """Map the counter read-only; (None, None) when the sidecar cannot be used."""
        flags = getattr(os, "O_NONBLOCK", 0)  # never hang on a FIFO someone put there
        try:
            fd = os.open(self._flock_path, os.O_RDWR | os.O_CREAT | flags, 0o600)
        except OSError:
            try:
                fd = os.open(self._flock_path, os.O_RDONLY | flags)
            except OSError:
                return None, None
        try:
            st = os.fstat(fd)
            if stat_mode.S_ISREG(st.st_mode) and st.st_size < _GEN.size:
                self._start_counter(fd)
                st = os.fstat(fd)
            if not stat_mode.S_ISREG(st.st_mode) or st.st_size < _GEN.size:
                return None, None
            return mmap.mmap(fd, _GEN.size, access=mmap.ACCESS_READ), (st.st_dev, st.st_ino)
        except (OSError, ValueError):
            return None, None
        finally:
            os.close(fd)

    @staticmethod
    def _start_counter(fd: int) -> None:
        """Give a new (or older qmagic's empty) sidecar a counter, unless a writer holds it."""
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return  # a writer is busy; its bump creates the counter
        try:
            if os.fstat(fd).st_size < _GEN.size:
                _put_counter(fd, secrets.randbits(64))  # random: a re-created file repeats nothing
        except OSError:
            pass  # read-only: stay with a stat per check
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)

    @staticmethod
    def _bump(sidecar: int) -> None:
        """Advance the generation counter (the caller holds the flock on ``sidecar``)."""
        with suppress(OSError):  # the JSON is written; readers' periodic stat will notice
            raw = _get_counter(sidecar)
            _put_counter(sidecar, _GEN.unpack(raw)[0] + 1 if len(raw) == _GEN.size else secrets.randbits(64))

    def _write(self, state: _State, sidecar: int) -> None:
        """Replace the lock file atomically with ``state``, then bump the counter.

        Call inside :meth:`_exclusive`; ``sidecar`` is the descriptor it yields.
        """
        doc = {"format": "qmagic-lock", "version": 1, "environment_name": self.environment_name,
               "uid": state.uid, "environment": state.environment, "queue": state.queue,
               "user": state.user, "time": state.time, "note": state.note, "key_hash": state.key_hash}
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write((json.dumps(doc, indent=2) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with suppress(OSError):
                os.unlink(tmp)
            raise
        self._bump(sidecar)  # after the replace: a reader never caches old JSON at a new count
        with self._mutex:
            self._cache = self._fast = self._last_match = None  # read our own write back
            self._next_look = 0.0  # and map the counter now if it was not there before
        _fsync_dir(self.state_dir)

    @contextmanager
    def _exclusive(self) -> Iterator[int]:
        """Hold the thread lock and the inter-process ``flock``; yield the sidecar's descriptor."""
        with self._writer:
            os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
            fd = os.open(self._flock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                deadline = time.monotonic() + _FLOCK_TIMEOUT
                while fcntl is not None:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise StateFileError(
                                f"Another process has held {self._flock_path} for over {_FLOCK_TIMEOUT} s; "
                                "nothing was changed. Try again; if it persists, look for a stopped "
                                "qmagic process.") from None
                        time.sleep(0.005)
                yield fd
            finally:
                os.close(fd)  # releases the flock

    def _clear(self) -> _State:
        """Write an unlocked state if locked or damaged; return the previous state."""
        try:
            with self._exclusive() as sidecar:
                state = self._read(fresh=True)
                if state.locked:
                    self._write(_State(_new_uid()), sidecar)
                return state
        except StateFileError:
            raise
        except OSError as exc:
            raise StateFileError(f"Cannot remove the lock in {self.path}: {exc}. Check the file and "
                                 "folder permissions, or delete the file by hand.") from exc


# ---- per-user settings ---------------------------------------------------------------


def default_lock_key_path() -> Path:
    """``$XDG_CONFIG_HOME/qmagic/default_lock_key`` (``~/.config`` when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "qmagic" / "default_lock_key"


def _read_key_file(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"Cannot read the default lock key file {path}: {exc}") from exc
    key = text.strip().splitlines()[0].strip() if text.strip() else ""
    if not key:
        raise StateFileError(f"The default lock key file {path} is empty. Delete it, or call "
                             "get_default_lock_key(new_key=True) to make a new key.")
    return key


def get_default_lock_key(new_key: bool = False) -> str:
    """This user's default lock key, created (mode 0600) on first use; ``new_key`` replaces it.

    Like bluesky-queueserver-api's ``get_default_lock_key``: the key is read from disk on
    every call, so all of a user's sessions share it.
    """
    path = default_lock_key_path()
    if not new_key:
        existing = _read_key_file(path)
        if existing is not None:
            return existing
    key = secrets.token_urlsafe(16)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".default_lock_key.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new_key:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic create-if-absent, content complete
            except FileExistsError:  # another session created it first: use theirs
                key = _read_key_file(path) or key
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return key


# ---- qmagic-clear-lock ------------------------------------------------------------------


def clear_lock_main(argv: list[str] | None = None) -> int:
    """``qmagic-clear-lock``: remove a lock whose key is lost, or a damaged lock file."""
    parser = argparse.ArgumentParser(
        prog="qmagic-clear-lock",
        description="Remove the qmagic lock of an environment without its key (also a damaged "
                    "lock file). Running kernels notice at their next check; no restart needed.")
    parser.add_argument("--environment", default="default",
                        help="environment name, as QMagic.environment_name (default: %(default)s)")
    parser.add_argument("--state-dir", default=None,
                        help=f"folder holding the lock, as QMagic.state_dir (default: ${STATE_DIR_ENV}, "
                             "else the 'qmagic' folder in the Jupyter data dir)")
    args = parser.parse_args(argv)
    state_dir = Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()
    if not state_dir.is_dir():
        print(f"Nothing to do: the state folder {state_dir} does not exist, so environment "
              f"{args.environment!r} is not locked there.")
        return 0
    try:
        store = LockStore(state_dir, args.environment, emergency_key="")
        old = store._clear()
    except (ValueError, OSError) as exc:
        print(f"qmagic-clear-lock: error: {exc}", file=sys.stderr)
        return 1
    if old.problem:
        print(f"The lock file {store.path} was damaged ({old.problem}) and counted as locked.\n"
              f"It has been reset: environment {args.environment!r} is now unlocked.")
    elif old.locked:
        info = store._lock_info(old)
        print(f"Removed the lock of environment {args.environment!r} ({store.path}):\n"
              f"  locked by:   {old.user}\n  locked at:   {info['time_str']}\n"
              f"  environment: {'locked' if old.environment else 'not locked'}\n"
              f"  queue:       {'locked' if old.queue else 'not locked'}\n"
              f"  note:        {old.note or '---'}\n"
              "Running kernels see the change at their next check; no restart is needed.")
    else:
        print(f"Nothing to do: environment {args.environment!r} is not locked ({store.path}).")
    return 0


if __name__ == "__main__":
    sys.exit(clear_lock_main())
