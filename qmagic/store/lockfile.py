"""The lock file: its format, reading it safely, and the texts that describe a lock.

``<state_dir>/<environment_name>.lock.json`` is a small JSON document::

    {"format": "qmagic-lock", "version": 1, "environment_name": ..., "uid": ...,
     "environment": bool, "queue": bool, "user": str|null, "time": float|null,
     "note": str|null, "key_hash": {"algorithm": "scrypt", "n", "r", "p", "salt", "hash"}|null}

Anything else (not JSON, too large, too deep, wrong types, impossible times, text that is not
valid Unicode, a key hash with other parameters) makes the file *damaged*: it then counts as
locked, in both scopes, with a message that says how to reset it.  The file is opened with
:func:`~qmagic.store.files.open_state_file` (no symlink followed, no blocking on a FIFO, a
regular file of the user's); a path that cannot be opened that way is damaged too.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import stat as stat_mode
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import RequestRefused, StateFileError
from ..texts import safe_repr
from .files import open_state_file, read_fd
from .keys import KeyRecord

__all__ = ["MAX_KEY_CHARS", "MAX_NOTE_CHARS", "MAX_USER_CHARS", "LockFile", "LockState", "Snapshot",
           "check_key"]

#: Longest lock key accepted (characters): bounds what a key check hashes.
MAX_KEY_CHARS = 1024
MAX_USER_CHARS = 1000
#: What a user name must be, for messages.
USER_RULE = f"text of at most {MAX_USER_CHARS} characters without lone surrogates"
MAX_NOTE_CHARS = 10000
MAX_FILE_BYTES = 65536
RACY_SECONDS = 1.0  # a file changed this recently may hide a rewrite from its identity
_MAX_TIME = 1e11  # lock times beyond the year 5000 are not ours


@dataclass(frozen=True)
class LockState:
    """One immutable snapshot of the lock.

    ``uid`` changes on every lock/unlock (queueserver's ``lock_info_uid``; the same in every
    process).  ``damaged`` is None, or the message that explains why the lock file cannot
    be used and how to reset it; a damaged lock counts as locked (both scopes).
    """

    uid: str
    environment: bool = False
    queue: bool = False
    user: str | None = None
    time: float | None = None
    note: str | None = None
    emergency_key_set: bool = False
    damaged: str | None = None

    @property
    def locked(self) -> bool:
        """True when either scope is locked (always for a damaged file)."""
        return self.environment or self.queue

    @property
    def time_str(self) -> str:
        """The lock time as queueserver shows it (``%m/%d/%Y %H:%M:%S``, local), or ""."""
        if self.time is None:
            return ""
        try:
            return datetime.fromtimestamp(self.time).strftime("%m/%d/%Y %H:%M:%S")
        except (OverflowError, OSError, ValueError):
            return ""

    def to_lock_info(self) -> dict[str, Any]:
        """queueserver's ``lock_info`` dict."""
        return {"environment": self.environment, "queue": self.queue, "user": self.user,
                "time": self.time, "time_str": self.time_str, "note": self.note,
                "emergency_lock_key_is_set": self.emergency_key_set}


class Snapshot:
    """A parsed read of the lock file, valid while ``gen`` equals the change signal's value.

    ``environment_open`` / ``queue_open``: that scope passes without a key (not locked, not
    damaged); ``verified``: the key object last found to open ``record`` -- for the hot path.
    """

    __slots__ = ("gen", "key", "racy", "state", "record", "environment_open", "queue_open", "verified")

    def __init__(self, gen: int, key: tuple[int, ...] | None, racy: bool, state: LockState,
                 record: KeyRecord | None) -> None:
        self.gen = gen
        self.key = key  # identity of the file read (None: missing or unknown)
        self.racy = racy  # changed so recently that an unchanged identity proves nothing
        self.state = state
        self.record = record
        healthy = state.damaged is None
        self.environment_open = healthy and not state.environment
        self.queue_open = healthy and not state.queue
        self.verified: str | None = None  # the last key found to open ``record`` (this kernel's)

    def again(self, gen: int) -> Snapshot:
        """The same read, valid for ``gen``."""
        snap = Snapshot(gen, self.key, self.racy, self.state, self.record)
        snap.verified = self.verified
        return snap


def identity(st: os.stat_result) -> tuple[int, ...]:
    """What tells two versions of a file apart without reading it."""
    return (st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _racy(st: os.stat_result) -> bool:
    return time.time() - max(st.st_mtime, st.st_ctime) < RACY_SECONDS


def text_ok(value: Any, limit: int) -> bool:
    """A non-empty str of at most ``limit`` characters that encodes as UTF-8."""
    if not isinstance(value, str) or not value or len(value) > limit:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def user_problem(user: Any) -> str | None:
    """What is wrong with ``user`` as a user name (stored in the log and the lock, shown
    everywhere): "must be ...: user = ...", or None if it is fine.  One rule for every door;
    each door puts its protocol's words before it."""
    if text_ok(user, MAX_USER_CHARS):
        return None
    rule = USER_RULE if isinstance(user, str) and user else "a non-empty string"
    return f"must be {rule}: user = {safe_repr(user, 80)}"


def note_ok(note: Any) -> bool:
    """None, "" or valid text of at most MAX_NOTE_CHARS characters."""
    return note is None or note == "" or text_ok(note, MAX_NOTE_CHARS)


def check_key(key: Any, *, allow_none: bool = False, new: bool = False) -> None:
    """Refuse a lock key that breaks the rules, with :class:`~qmagic.errors.RequestRefused`.

    A lock key is a ``str`` of at most :data:`MAX_KEY_CHARS` characters; it must not be
    empty unless ``allow_none`` (a key presented with a request, where ``None`` means no key
    and "" opens nothing); a ``new`` key (one that locks) must also encode as UTF-8.  The
    type and emptiness refusals are queueserver's own texts (its remote replies must match);
    the length and encoding rules are qmagic's, and their text states the whole rule.
    """
    if key is None and allow_none:
        return
    if not isinstance(key, str) or not (key or allow_none):
        rule = "a non-empty string or None" if allow_none else "a non-empty string"
        raise RequestRefused(f"Error: Lock key must be {rule}: lock_key = {safe_repr(key, 80)}")
    if len(key) > MAX_KEY_CHARS or (new and not text_ok(key, MAX_KEY_CHARS)):
        rule = f"{'a' if allow_none else 'a non-empty'} string of at most {MAX_KEY_CHARS} characters"
        rule += " that encodes as UTF-8" if new else ""
        rule += " or None" if allow_none else ""
        raise RequestRefused(f"Error: Lock key must be {rule}: lock_key = {safe_repr(key, 80)}")


def _problem(st: os.stat_result) -> str:
    """Why a path that open_state_file refused cannot be the lock file."""
    if stat_mode.S_ISLNK(st.st_mode):
        return "it is a symbolic link (qmagic never follows links in its state folder)"
    if not stat_mode.S_ISREG(st.st_mode):
        return "it is not a regular file (it cannot be read)"
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return "it belongs to another user"
    return "it cannot be opened"


class LockFile:
    """Reads, parses and encodes one environment's lock file; builds its messages."""

    def __init__(self, state_dir: Path, environment_name: str, emergency_key_set: bool) -> None:
        self.environment_name = environment_name
        self.state_dir = state_dir
        self.path = state_dir / f"{environment_name}.lock.json"
        self.emergency_key_set = emergency_key_set
        self.missing = LockState(str(uuid.uuid5(uuid.NAMESPACE_URL, f"qmagic-lock:{self.path}")),
                                 emergency_key_set=emergency_key_set)

    # ---- texts ---------------------------------------------------------------------------

    def clear_command(self) -> str:
        """The shell command that removes this lock without its key."""
        return (f"qmagic-clear-lock --environment {shlex.quote(self.environment_name)} "
                f"--state-dir {shlex.quote(str(self.state_dir))}")

    def describe(self, state: LockState) -> str:
        """queueserver's lock description; never shows the key."""
        return (f"RE Manager is locked by {state.user} at {state.time_str}\n"
                f"Environment is locked: {state.environment}\n"
                f"Queue is locked:       {state.queue}\n"
                f"Emergency lock key:    {'set' if self.emergency_key_set else 'not set'}\n"
                f"Note: {state.note or '---'}")

    def invalid_key_msg(self, state: LockState) -> str:
        """The protocol's refusal of a wrong (or missing) key."""
        return f"Error: Invalid lock key: \n{self.describe(state)}"

    def different_key_msg(self, state: LockState) -> str:
        """The protocol's refusal of a lock with another key."""
        return f"Error: RE Manager was locked with a different key: \n{self.describe(state)}"

    def damaged(self, reason: str, st: os.stat_result | None) -> LockState:
        """The state of an unusable lock file: locked, both scopes, with the reset advice."""
        mark = f"{st.st_mtime_ns}:{st.st_size}:{st.st_ino}:{st.st_mode}" if st else "unreadable"
        uid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"qmagic-lock-damaged:{self.path}:{mark}"))
        emergency = " Unlock with the emergency lock key, or if" if self.emergency_key_set else " If"
        msg = (f"Error: The lock file {self.path} cannot be used: {reason}. For safety the "
               f"environment and the queue count as LOCKED.{emergency} the file cannot be repaired, "
               f"remove the lock with: {self.clear_command()}")
        note = f"The lock file cannot be used: {reason}."
        return LockState(uid, True, True, "unknown", st.st_mtime if st else None, note,
                         self.emergency_key_set, msg)

    # ---- reading -------------------------------------------------------------------------

    def look(self, token: int, old: Snapshot | None) -> Snapshot:
        """One ``lstat``; ``old`` is reused (tagged ``token``) if the file is unchanged, else
        the file is read again."""
        try:
            st: os.stat_result | None = os.lstat(self.path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            return Snapshot(token, None, True, self.damaged(f"it cannot be accessed ({exc.strerror})", None), None)
        key = identity(st) if st is not None else None
        if old is not None and old.key == key and not old.racy:
            return old.again(token)
        if st is None:
            return Snapshot(token, None, False, self.missing, None)
        return self._read(token, st)

    def _read(self, token: int, lst: os.stat_result) -> Snapshot:
        try:
            fd = open_state_file(self.path, os.O_RDONLY)
        except FileNotFoundError:  # deleted since the lstat
            return Snapshot(token, None, True, self.missing, None)
        except StateFileError:
            return Snapshot(token, identity(lst), _racy(lst), self.damaged(_problem(lst), lst), None)
        try:
            st = os.fstat(fd)
            data = read_fd(fd, MAX_FILE_BYTES + 1)
        except OSError as exc:
            return Snapshot(token, None, True, self.damaged(f"it cannot be read ({exc.strerror})", lst), None)
        finally:
            os.close(fd)
        try:
            if len(data) > MAX_FILE_BYTES:
                raise ValueError("it is far too large")
            state, record = self.parse(data)
        except ValueError as exc:
            state, record = self.damaged(str(exc), st), None
        return Snapshot(token, identity(st), _racy(st), state, record)

    def parse(self, raw: bytes) -> tuple[LockState, KeyRecord | None]:
        """Decode the lock file; ValueError with a short reason when it is damaged."""
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise ValueError(f"it is not valid JSON ({str(exc)[:100]})") from None
        if not isinstance(doc, dict) or doc.get("format") != "qmagic-lock":
            raise ValueError("it is not a qmagic lock file")
        if doc.get("version") != 1:
            raise ValueError(f"unknown format version {safe_repr(doc.get('version'), 80)} (written by a newer qmagic?)")
        uid, env, queue = doc.get("uid"), doc.get("environment"), doc.get("queue")
        if not text_ok(uid, 200):
            raise ValueError("its 'uid' is missing")
        if not isinstance(env, bool) or not isinstance(queue, bool):
            raise ValueError("'environment' and 'queue' must be true or false")
        if not (env or queue):
            return LockState(uid, emergency_key_set=self.emergency_key_set), None
        user, stamp, note = doc.get("user"), doc.get("time"), doc.get("note")
        if not text_ok(user, MAX_USER_CHARS):
            raise ValueError("the user name is missing" if not user else f"the user name {user_problem(user)}")
        if not note_ok(note):
            raise ValueError("the note is not a string" if not isinstance(note, str)
                             else f"the note is longer than {MAX_NOTE_CHARS} characters or not valid text")
        if (not isinstance(stamp, (int, float)) or isinstance(stamp, bool)
                or not math.isfinite(stamp) or not 0 <= stamp < _MAX_TIME):
            raise ValueError("the lock time is missing or impossible")
        record = KeyRecord.from_json(doc.get("key_hash"))
        return LockState(uid, env, queue, user, float(stamp), note, self.emergency_key_set), record

    def encode(self, state: LockState, record: KeyRecord | None) -> bytes:
        """The file's bytes for ``state`` (UTF-8 JSON)."""
        doc = {"format": "qmagic-lock", "version": 1, "environment_name": self.environment_name,
               "uid": state.uid, "environment": state.environment, "queue": state.queue,
               "user": state.user, "time": state.time, "note": state.note,
               "key_hash": record.to_json() if record is not None else None}
        return (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
