"""Tests of qmagic.store.keys: fixed key derivation, equal cost per guess, per-client
back-off, and the per-user default lock key (with the lock store as the real caller)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import qmagic.store.keys as keys
from qmagic.errors import LockRefused, StateFileError
from qmagic.store.keys import (
    SCRYPT_N,
    KeyRecord,
    Throttle,
    default_lock_key_path,
    get_default_lock_key,
    hash_key,
)
from qmagic.store.locks import LockStore

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Derivations:
    """Counts real scrypt derivations (wraps keys.derive; the real function still runs)."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        real = keys.derive

        def counting(key: str, salt: bytes) -> bytes:
            self.count += 1
            return real(key, salt)

        monkeypatch.setattr(keys, "derive", counting)

    def during(self, action) -> int:
        before = self.count
        action()
        return self.count - before


def _refused(action) -> str | None:
    try:
        action()
    except LockRefused as exc:
        return str(exc)
    return None


@pytest.fixture
def open_store(tmp_path):
    stores: list[LockStore] = []

    def make(*args, **kwargs) -> LockStore:
        stores.append(LockStore(*args, **kwargs))
        return stores[-1]

    yield make
    for s in stores:
        s.close()


# ---- records: parameters come from the code ----------------------------------------------


def test_record_round_trip_and_parameters_are_the_codes():
    record = hash_key("secret")
    doc = record.to_json()
    assert doc["algorithm"] == "scrypt" and doc["n"] == SCRYPT_N >= 2**14
    assert KeyRecord.from_json(json.loads(json.dumps(doc))) == record
    for bad in ({"n": 2**20}, {"n": 2**30}, {"r": 64}, {"p": 16}, {"n": float(SCRYPT_N)},
                {"n": True}, {"algorithm": "pbkdf2_sha256", "iterations": 10**7},
                {"salt": "00"}, {"hash": "00" * 16}, {"hash": "zz" * 32}, {"salt": 5}):
        with pytest.raises(ValueError):
            KeyRecord.from_json({**doc, **bad})
    with pytest.raises(ValueError):
        KeyRecord.from_json(None)


PLANTED = r"""
import json, resource, sys, time
from qmagic.store.locks import LockStore
from qmagic.errors import LockRefused
store = LockStore(sys.argv[1], emergency_key="EK")
doc = {"format": "qmagic-lock", "version": 1, "uid": "u", "environment": True, "queue": True,
       "user": "Mallory", "time": 1.0, "note": None,
       "key_hash": {"algorithm": "scrypt", "n": 2**20, "r": 8, "p": 1, "salt": "00" * 16,
                    "hash": "00" * 32}}
open(store.path, "w").write(json.dumps(doc))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.process_time()  # (CPU: what the guesses cost, whatever else the machine does)
for guess in ("a", "b", "c"):
    for call in (lambda: store.unlock(guess), lambda: store.info(guess), lambda: store.check(guess)):
        try:
            call()
        except LockRefused:
            pass
took = time.process_time() - start
grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"took": took, "grown_kb": grown_kb, "damaged": store.state().damaged}))
"""


def test_planted_expensive_parameters_are_damaged_and_cheap(tmp_path):
    done = subprocess.run([sys.executable, "-c", PLANTED, str(tmp_path)], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "parameters this qmagic does not accept" in out["damaged"]
    assert out["took"] < 1.5  # CPU seconds: 3 unlock guesses at ~30 ms each, not 3 x 2 s
    assert out["grown_kb"] < 64 * 1024  # 16 MiB per derivation, not 615 MB


# ---- every guess costs one derivation ------------------------------------------------------


def test_every_key_check_costs_exactly_one_derivation(tmp_path, monkeypatch, open_store):
    store = open_store(tmp_path, emergency_key="EK", throttle=Throttle(free_failures=10**6))
    count = Derivations(monkeypatch)
    store.lock("lock-key", environment=True, user="A")
    guesses = iter(f"guess-{i}" for i in range(100))
    # a healthy lock: wrong lock keys, wrong keys at unlock, the emergency key at unlock
    assert count.during(lambda: _refused(lambda: store.check(next(guesses)))) == 1
    assert count.during(lambda: _refused(lambda: store.info(next(guesses)))) == 1
    assert count.during(lambda: _refused(lambda: store.unlock(next(guesses)))) == 1
    assert count.during(lambda: store.unlock("EK")) == 1
    # a damaged lock file: the same single derivation, on a dummy salt
    store.path.write_text("{damaged")
    assert count.during(lambda: _refused(lambda: store.unlock(next(guesses)))) == 1
    assert count.during(lambda: store.unlock("EK")) == 1
    store.path.write_text("{damaged")
    # check/info/lock of a damaged file verify nothing (and reveal nothing)
    assert count.during(lambda: _refused(lambda: store.check(next(guesses)))) == 0
    assert count.during(lambda: store.info(next(guesses))) == 0
    assert count.during(lambda: _refused(lambda: store.lock("x", queue=True, user="B"))) == 0
    store.clear()
    # this kernel's remembered key costs nothing after the lock that hashed it
    store.lock("lock-key", environment=True, user="A")
    assert count.during(lambda: [store.check("lock-key") for _ in range(100)]) == 0
    # a key already found wrong is refused without a new derivation (and without counting)
    _refused(lambda: store.check("stale"))
    assert count.during(lambda: [_refused(lambda: store.check("stale")) for _ in range(5)]) == 0


def test_guessing_costs_the_same_for_both_keys_and_file_states(tmp_path, open_store):
    store = open_store(tmp_path, emergency_key="EK", throttle=Throttle(free_failures=10**6))
    counter = iter(range(10**6))
    costs: dict[str, list[float]] = {"check, healthy": [], "unlock, healthy": [], "unlock, damaged": []}

    def guess(kind: str, call) -> None:
        start = time.thread_time()  # (the derivation runs in this thread: its CPU is the cost)
        assert _refused(lambda: call(f"g{next(counter)}")) is not None
        costs[kind].append(time.thread_time() - start)

    for _ in range(7):  # the kinds alternate, so that a busy moment slows all of them
        store.clear()
        store.lock("lock-key", environment=True, user="A")
        guess("check, healthy", store.check)
        guess("unlock, healthy", store.unlock)
        store.path.write_text("[]")
        guess("unlock, damaged", store.unlock)
    fastest = [min(values) for values in costs.values()]  # the intrinsic cost of each kind
    # the old code: 15 guesses/s healthy, 3,396/s damaged (a 200x gap)
    assert max(fastest) / min(fastest) < 3, costs
    assert min(fastest) > 0.005, costs  # each is a real scrypt, not a string compare


# ---- per-client back-off -------------------------------------------------------------------


def test_wrong_keys_are_slowed_down_per_client_without_blocking(tmp_path, monkeypatch, open_store):
    clock = FakeClock()
    store = open_store(tmp_path, throttle=Throttle(3, 1.0, 60.0, clock=clock))
    count = Derivations(monkeypatch)
    store.lock("right", environment=True, user="A")
    for i in range(4):  # three free wrong keys, the fourth starts the back-off
        assert "Invalid lock key" in _refused(lambda i=i: store.check(f"wrong{i}", client="mallory"))
    assert count.count == 1 + 4  # the lock's hash, then one per guess
    # in back-off: refused at once (no derivation: nothing slow runs), saying how long to wait
    msg = _refused(lambda: store.check("wrong-again", client="mallory"))
    assert count.count == 1 + 4
    assert msg == ("Error: Too many wrong lock keys from this client: wait 1.0 s before trying "
                   "again (each further wrong key doubles the wait).")
    # even the right key is refused to this client (else the cache would be an oracle)
    assert "Too many wrong lock keys" in _refused(lambda: store.check("right", client="mallory"))
    assert "Too many wrong lock keys" in _refused(lambda: store.unlock("right", client="mallory"))
    assert "Too many wrong lock keys" in _refused(lambda: store.info("right", client="mallory"))
    assert count.count == 5
    # other clients are not slowed down
    store.check("right", client="alice")
    assert "Invalid lock key" in _refused(lambda: store.check("nope", client="bob"))
    # the wait doubles with every further wrong key, up to the maximum
    throttle = store._keys.throttle
    waits = []
    for i in range(7):
        clock.now += throttle.wait_s("mallory")
        assert "Invalid lock key" in _refused(lambda i=i: store.check(f"more{i}", client="mallory"))
        waits.append(throttle.wait_s("mallory"))
    assert waits == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    # quiet for longer than the maximum: forgiven, three free wrong keys again
    clock.now += 61.0 + 60.0
    for i in range(3):
        assert "Invalid lock key" in _refused(lambda i=i: store.check(f"late{i}", client="mallory"))
    assert throttle.wait_s("mallory") == 0.0
    # a correct key after the wait clears the client's record
    clock.now += 60.0
    store.check("right", client="mallory")
    assert store._keys.throttle.wait_s("mallory") == 0.0
    for i in range(3):
        assert "Invalid lock key" in _refused(lambda i=i: store.check(f"again{i}", client="mallory"))


def test_this_kernel_keeps_its_own_key_while_in_back_off(tmp_path, open_store):
    clock = FakeClock()
    store = open_store(tmp_path, throttle=Throttle(0, 10.0, 60.0, clock=clock))
    store.lock("mine", environment=True, user="A")
    assert "Invalid lock key" in _refused(lambda: store.unlock("typo"))
    assert "Too many wrong lock keys from this kernel: wait 10.0 s" in _refused(lambda: store.unlock("typo2"))
    store.check("mine")  # the kernel's tasks still run with its remembered key
    store.check("mine", client="remote")  # another client is not concerned
    assert "Invalid lock key" in _refused(lambda: store.check("guess", client="remote"))
    assert "from this client: wait 10.0 s" in _refused(lambda: store.check("mine", client="remote"))
    store.check("mine")
    clock.now += 10.0
    store.check("mine", client="remote")


def test_throttle_table_is_bounded_and_thread_safe():
    throttle = Throttle(0, 1.0, 10.0)
    barrier = threading.Barrier(4)

    def flood(base: int) -> None:
        barrier.wait(timeout=10)
        for i in range(2000):
            throttle.failed(f"client-{base}-{i}")

    threads = [threading.Thread(target=flood, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(throttle._clients) <= keys._MAX_CLIENTS
    assert throttle.wait_s(next(reversed(throttle._clients))) > 0
    with pytest.raises(ValueError):
        Throttle(-1)


# ---- the per-user default lock key ---------------------------------------------------------


def test_default_lock_key_is_private_and_stable(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = default_lock_key_path()
    assert path == tmp_path / "xdg" / "qmagic" / "default_lock_key"
    key = get_default_lock_key()
    assert len(key) >= 16 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert get_default_lock_key() == key
    assert path.read_text().strip() == key
    new = get_default_lock_key(new_key=True)
    assert new != key and get_default_lock_key() == new
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["default_lock_key"]
    path.write_text("\n")
    with pytest.raises(StateFileError, match="is empty"):
        get_default_lock_key()


def test_default_lock_key_without_xdg_uses_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    key = get_default_lock_key()
    assert (tmp_path / ".config" / "qmagic" / "default_lock_key").read_text().strip() == key


def test_concurrent_first_use_of_the_default_key_agrees(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    barrier = threading.Barrier(4)
    found: list[str] = []

    def first_use() -> None:
        barrier.wait(timeout=10)
        found.append(get_default_lock_key())

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(found) == 4 and len(set(found)) == 1


def test_default_lock_key_file_is_never_followed_or_blocked_on(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = default_lock_key_path()
    path.parent.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"not a key you should use\n")
    path.symlink_to(victim)
    with pytest.raises(StateFileError, match="symbolic link"):
        get_default_lock_key()
    assert victim.read_bytes() == b"not a key you should use\n"
    new = get_default_lock_key(new_key=True)  # replaces the link itself, never the target
    assert not path.is_symlink() and path.read_text().strip() == new
    assert victim.read_bytes() == b"not a key you should use\n"
    path.unlink()
    os.mkfifo(path)
    result: list = []
    reader = threading.Thread(target=lambda: result.append(_try(get_default_lock_key)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO as the default key hung"
    assert isinstance(result[0], StateFileError) and "not a regular file" in str(result[0])


def _try(func):
    try:
        return func()
    except Exception as exc:  # noqa: BLE001 - returned to the test
        return exc


def test_the_back_off_text_says_when_clients_share_it():
    """Without client keys a remote client is known by its address only: the refusal says
    that clients on one machine share the wait (found by a hostile test)."""
    from qmagic.store.keys import throttled_text

    assert "share this wait" in throttled_text("peer:127.0.0.1", 2.0)
    assert "share this wait" not in throttled_text("user:alice", 2.0)
    assert "share this wait" not in throttled_text(None, 2.0)
