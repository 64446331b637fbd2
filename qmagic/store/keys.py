"""Lock keys: how they are hashed and verified, who may guess how often, the per-user key.

Hashing.  A lock key is stored only as a salted scrypt hash.  The key-derivation parameters
(``SCRYPT_N``, ``SCRYPT_R``, ``SCRYPT_P``: about 30 ms and 16 MiB per derivation) are
constants of this module: a key record read from disk carries only a salt and a digest, and
a record that names other parameters is refused as damaged (a planted ``n=2**20`` must not
make a wrong-key check cost seconds and hundreds of megabytes).

Same cost for every guess.  :meth:`KeyChecker.matches` performs exactly one derivation per
attempt that is not already in the cache, whether the presented key is checked against a
healthy record, against no record (a damaged lock file: a fixed dummy salt is used) or also
against the emergency key (compared by keyed HMAC, in constant time).  So guessing the
emergency key is no faster than guessing the lock key, and a damaged file does not make
guessing faster.

Cache.  Verified results are cached by ``HMAC(per-process secret, key)`` with the record, so
the kernel's own remembered key costs nothing on every request.  A cached result never
bypasses a client's back-off (see below), except for the kernel's own callers.

Throttling.  :class:`Throttle` counts wrong keys per client (the remote door passes the
authenticated user or peer address; ``None`` is this kernel).  After ``free_failures``
wrong keys a client is refused at once, without any key check, for a back-off that doubles
with every further wrong key (``base_s``, ``2*base_s``, ... up to ``max_s``); other clients
are not affected, and nothing sleeps: the caller's thread is never blocked.  A correct key
clears the client's record.  While a remote client is in back-off *every* key it presents is
refused, even a correct one, otherwise a cached correct key would answer guesses without
limit.  The kernel's own callers (``client=None``) are slowed down too, but a key this kernel
already verified still passes during its back-off: code in the kernel can read the key file
anyway, and refusing it would only stop the kernel's own tasks.

The per-user default key (:func:`get_default_lock_key`) lives in
``$XDG_CONFIG_HOME/qmagic/default_lock_key`` and is opened like every state file (no
symlinks, no FIFOs, owned by the user).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LockRefused, StateFileError
from .files import fsync_dir, read_state_file, replace_state_file

__all__ = [
    "KeyChecker",
    "KeyRecord",
    "Throttle",
    "default_lock_key_path",
    "derive",
    "get_default_lock_key",
    "hash_key",
    "read_default_lock_key",
]

#: scrypt parameters: fixed by the code, never read from a file.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
HASH_BYTES = 32
SALT_BYTES = 16
_MAXMEM = 128 * SCRYPT_R * (SCRYPT_N + SCRYPT_P + 2) + (1 << 20)
_CACHE_SIZE = 256
_MAX_CLIENTS = 4096


def _key_bytes(key: str) -> bytes:
    # surrogatepass: a lone surrogate in a presented key is just a wrong key, never a crash
    return key.encode("utf-8", "surrogatepass")


def derive(key: str, salt: bytes) -> bytes:
    """The scrypt digest of ``key`` with ``salt`` and this module's fixed parameters."""
    return hashlib.scrypt(_key_bytes(key), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                          dklen=HASH_BYTES, maxmem=_MAXMEM)


@dataclass(frozen=True)
class KeyRecord:
    """A stored lock key: salt and scrypt digest (the parameters are the module's)."""

    salt: bytes
    digest: bytes

    def to_json(self) -> dict[str, Any]:
        """The record as written in the lock file (the parameters are written for people
        and older readers; they are never read back as settings)."""
        return {"algorithm": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                "salt": self.salt.hex(), "hash": self.digest.hex()}

    @classmethod
    def from_json(cls, doc: Any) -> KeyRecord:
        """Parse a record; ValueError unless it uses exactly this module's scrypt parameters."""
        if not isinstance(doc, dict):
            raise ValueError("the key hash is missing")
        fixed = {"algorithm": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}
        for name, value in fixed.items():
            got = doc.get(name)
            if type(got) is not type(value) or got != value:
                raise ValueError("its key hash uses an algorithm or parameters this qmagic does "
                                 "not accept")
        salt, digest = doc.get("salt"), doc.get("hash")
        try:
            salt_b = bytes.fromhex(salt) if isinstance(salt, str) and len(salt) <= 128 else b""
            digest_b = bytes.fromhex(digest) if isinstance(digest, str) and len(digest) <= 128 else b""
        except ValueError:
            salt_b = digest_b = b""
        if not SALT_BYTES <= len(salt_b) <= 64 or len(digest_b) != HASH_BYTES:
            raise ValueError("its key hash is malformed")
        return cls(salt_b, digest_b)


def hash_key(key: str) -> KeyRecord:
    """A fresh salted record of ``key`` (one derivation)."""
    salt = secrets.token_bytes(SALT_BYTES)
    return KeyRecord(salt, derive(key, salt))


class Throttle:
    """Per-client exponential back-off after repeated wrong keys (thread-safe, never sleeps).

    ``clock`` is a monotonic clock in seconds (injectable for tests and benchmarks).
    """

    def __init__(self, free_failures: int = 3, base_s: float = 1.0, max_s: float = 300.0,
                 *, clock: Callable[[], float] = time.monotonic) -> None:
        if free_failures < 0 or not base_s > 0 or max_s < base_s:
            raise ValueError("throttle settings need free_failures >= 0 and 0 < base_s <= max_s")
        self.free_failures, self.base_s, self.max_s = free_failures, base_s, max_s
        self._clock = clock
        self._lock = threading.Lock()
        # client -> [wrong keys in a row, blocked until, time of the last wrong key]
        self._clients: OrderedDict[Any, list[float]] = OrderedDict()

    @property
    def active(self) -> bool:
        """True while any client has a record (the hot path skips the lookup otherwise)."""
        return bool(self._clients)

    def wait_s(self, client: Any) -> float:
        """Seconds ``client`` must still wait before a key of its is checked (0: none)."""
        if not self._clients:
            return 0.0
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                return 0.0
            now = self._clock()
            if now - entry[2] > self.max_s:  # quiet for long enough: forgiven
                del self._clients[client]
                return 0.0
            return max(0.0, entry[1] - now)

    def failed(self, client: Any) -> float:
        """Record a wrong key from ``client``; return the back-off it now has (0: none yet)."""
        with self._lock:
            now = self._clock()
            entry = self._clients.pop(client, None)
            if entry is None or now - entry[2] > self.max_s:
                entry = [0, 0.0, now]
            entry[0] += 1
            entry[2] = now
            extra = entry[0] - self.free_failures
            wait = min(self.base_s * 2 ** min(extra - 1, 64), self.max_s) if extra > 0 else 0.0
            entry[1] = now + wait
            self._clients[client] = entry
            while len(self._clients) > _MAX_CLIENTS:
                self._clients.popitem(last=False)
            return wait

    def succeeded(self, client: Any) -> None:
        """A correct key from ``client``: forget its wrong ones."""
        if self._clients:
            with self._lock:
                self._clients.pop(client, None)


def throttled_text(client: Any, wait_s: float) -> str:
    """The refusal shown to a client in back-off."""
    who = "this kernel" if client is None else "this client"
    shared = (" Clients without a client key are told apart by address only: those on one "
              "machine share this wait." if isinstance(client, str) and client.startswith("peer:") else "")
    return (f"Error: Too many wrong lock keys from {who}: wait {math.ceil(wait_s * 10) / 10:.1f} s "
            f"before trying again (each further wrong key doubles the wait).{shared}")


class KeyChecker:
    """Verifies keys against records and the emergency key: equal cost, cached, throttled."""

    def __init__(self, emergency_key: str, throttle: Throttle) -> None:
        self.throttle = throttle
        self._secret = secrets.token_bytes(32)
        self._dummy_salt = secrets.token_bytes(SALT_BYTES)
        self._emergency = self._tag(emergency_key) if emergency_key else None
        self._lock = threading.Lock()
        # verdicts by (salt, digest, HMAC(key)); right and wrong keys apart, so that a flood
        # of wrong guesses never evicts the kernel's own key
        self._right: dict[tuple[bytes, bytes, bytes], bool] = {}
        self._wrong: dict[tuple[bytes, bytes, bytes], bool] = {}

    @property
    def emergency_key_set(self) -> bool:
        """True when an emergency key was given."""
        return self._emergency is not None

    def _tag(self, key: str) -> bytes:
        return hmac.new(self._secret, _key_bytes(key), "sha256").digest()

    def _cached(self, key: str, record: KeyRecord) -> tuple[tuple[bytes, bytes, bytes], bool | None]:
        slot = (record.salt, record.digest, self._tag(key))
        with self._lock:
            return slot, True if slot in self._right else (False if slot in self._wrong else None)

    def _store(self, slot: tuple[bytes, bytes, bytes], ok: bool) -> None:
        with self._lock:
            cache = self._right if ok else self._wrong
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[slot] = ok

    def remember(self, key: str, record: KeyRecord) -> None:
        """``key`` is known to open ``record`` (it was just hashed into it)."""
        self._store((record.salt, record.digest, self._tag(key)), True)

    def refuse_if_throttled(self, client: Any) -> None:
        """Raise :class:`LockRefused` at once while ``client`` is in back-off."""
        wait = self.throttle.wait_s(client)
        if wait > 0:
            raise LockRefused(throttled_text(client, wait))

    def matches(self, key: str, record: KeyRecord | None, *, client: Any = None,
                emergency: bool = False, counted: bool = True) -> bool:
        """True when ``key`` opens ``record`` (or, with ``emergency``, is the emergency key).

        ``record`` None means the lock file is damaged: only the emergency key can match,
        at the same cost.  Raises :class:`LockRefused` while ``client`` is in back-off; a
        wrong key counts against ``client`` unless the same key was already found wrong.
        ``counted=False`` (a key qmagic itself tries, never a caller's): no back-off, no count.
        """
        slot, known = (None, None) if record is None else self._cached(key, record)
        if not counted:
            ok = known if known is not None else hmac.compare_digest(derive(key, record.salt), record.digest)
            self._store(slot, ok)
            return ok
        if known and client is None:  # this kernel's own verified key: no back-off (see docstring)
            self.throttle.succeeded(client)
            return True
        self.refuse_if_throttled(client)
        if known:
            self.throttle.succeeded(client)
            return True
        if known is False and not emergency:
            return False  # this very key was already found wrong: nothing new is learnt
        digest = derive(key, record.salt if record is not None else self._dummy_salt)
        ok = record is not None and hmac.compare_digest(digest, record.digest)
        if slot is not None:
            self._store(slot, ok)
        if emergency and self._emergency is not None:
            ok = hmac.compare_digest(self._tag(key), self._emergency) or ok
        if ok:
            self.throttle.succeeded(client)
        else:
            self.throttle.failed(client)
        return ok


# ---- the per-user default lock key ---------------------------------------------------------


def default_lock_key_path() -> Path:
    """``$XDG_CONFIG_HOME/qmagic/default_lock_key`` (``~/.config`` when unset)."""
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".config"
    return root / "qmagic" / "default_lock_key"


def _read_key_file(path: Path) -> str | None:
    try:
        raw = read_state_file(path, 4096)
    except StateFileError as exc:
        raise StateFileError(f"Cannot use the default lock key file: {exc}") from exc
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace").strip()
    key = text.splitlines()[0].strip() if text else ""
    if not key:
        raise StateFileError(f"The default lock key file {path} is empty. Delete it, or call "
                             "get_default_lock_key(new_key=True) to make a new key.")
    return key


def read_default_lock_key() -> str | None:
    """This user's default lock key, or None when there is none yet (none is made)."""
    return _read_key_file(default_lock_key_path())


def get_default_lock_key(new_key: bool = False) -> str:
    """This user's default lock key, created (mode 0600) on first use; ``new_key`` replaces it.

    Like bluesky-queueserver-api's ``get_default_lock_key``: the key is read from disk on
    every call, so all of a user's sessions share it.  The file is never followed through a
    symlink, and must be a regular file of the user's.
    """
    path = default_lock_key_path()
    if not new_key:
        existing = _read_key_file(path)
        if existing is not None:
            return existing
    key = secrets.token_urlsafe(16)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateFileError(f"Cannot create the folder of the default lock key {path.parent}: "
                             f"{exc}.") from exc
    if new_key:
        replace_state_file(path, (key + "\n").encode())
        return key
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".default_lock_key.", suffix=".tmp")  # 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic create-if-absent; never follows a link at ``path``
        except FileExistsError:  # another session created it first: use theirs
            key = _read_key_file(path) or key
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return key
