"""Tests of qmagic.store.locks: the environment lock shared by processes, its file, its
change watcher, hostile files in the state folder, and qmagic-clear-lock."""

from __future__ import annotations

import json
import gc
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from qmagic.errors import LockRefused, RequestRefused, StateFileError
from qmagic.store.clear_lock import clear_lock_main
from qmagic.store.locks import LockState, LockStore
from qmagic.store.watch import inotify_available

from polling import eventually

REPO = Path(__file__).resolve().parents[1]
INFO_KEYS = {"environment", "queue", "user", "time", "time_str", "note", "emergency_lock_key_is_set"}
needs_inotify = pytest.mark.skipif(not inotify_available(), reason="needs Linux inotify")


@pytest.fixture
def stores():
    """Makes LockStores that are closed after the test."""
    made: list[LockStore] = []

    def make(*args, **kwargs) -> LockStore:
        made.append(LockStore(*args, **kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


@pytest.fixture
def store(tmp_path, stores):
    return stores(tmp_path / "state", "default")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def _refused(store: LockStore, key: str | None = None, scope: str = "environment") -> bool:
    try:
        store.check(key, scope)
    except LockRefused:
        return True
    return False


def _message(action) -> str:
    with pytest.raises(RequestRefused) as err:
        action()
    return str(err.value)


def _in_thread(func, timeout: float = 10.0):
    """Run ``func`` in a daemon thread; fail if it does not finish within ``timeout``."""
    result: list = []

    def run() -> None:
        try:
            result.append(("ok", func()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{func} still blocked after {timeout} s"
    kind, value = result[0]
    if kind == "error":
        raise value
    return value


def _write_by_hand(target: Path, data: bytes) -> None:
    """Replace ``target`` the way another program would."""
    tmp = target.with_name("by-hand.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _locked_bytes(tmp_path: Path, user: str = "Hand") -> bytes:
    """A valid locked file's bytes, made by a store in another folder."""
    with LockStore(tmp_path / f"donor-{user}", watch=False) as donor:
        donor.lock("k", environment=True, user=user)
        return donor.path.read_bytes()


# ---- the key and the file ------------------------------------------------------------------


def test_key_is_stored_only_as_a_salted_slow_hash(store):
    key = "s3cret-Key-that-must-not-leak"
    store.lock(key, environment=True, user="Alice")
    text = store.path.read_text()
    assert key not in text
    record = json.loads(text)["key_hash"]
    assert record["algorithm"] == "scrypt" and record["n"] >= 2**14
    store.check(key)
    with pytest.raises(LockRefused):
        store.check(key + "x")
    store.lock(key, environment=True, queue=True, user="Alice")  # locking again keeps the hash
    assert json.loads(store.path.read_text())["key_hash"] == record and store.state().queue
    store.unlock(key)
    store.lock(key, environment=True, user="Alice")  # a new lock gets a fresh salt
    assert json.loads(store.path.read_text())["key_hash"]["salt"] != record["salt"]


def test_locking_again_and_again_costs_no_key_hashing(store, monkeypatch):
    """Each lock hashed the key anew (~60 ms of the control channel's one thread): 80
    clients locking again and again made every other client's request wait seconds (found
    by a hostile test).  Locking again with the key that holds the lock keeps its hash."""
    import qmagic.store.keys as keys

    store.lock("k", environment=True, user="Alice", client="peer:a")
    derived = []
    real = keys.derive
    monkeypatch.setattr(keys, "derive", lambda key, salt: derived.append(key) or real(key, salt))
    for i in range(20):
        state = store.lock("k", environment=True, queue=bool(i % 2), note=f"n{i}", user="Alice",
                           client="peer:a")
        assert state.note == f"n{i}" and state.queue == bool(i % 2)
    assert derived == []
    with pytest.raises(LockRefused):  # another key still cannot take the lock over
        store.lock("other", environment=True, user="Mallory", client="peer:b")
    store.check("k")


def test_first_verification_in_a_fresh_store_is_fast(store, stores):
    store.lock("k", environment=True, user="Alice")
    other = stores(store.state_dir)  # nothing cached
    start = time.thread_time()  # (this thread's CPU: the derivation runs here, in C)
    other.check("k")
    assert time.thread_time() - start < 0.5  # ~30-60 ms of CPU; one derivation, not several


def test_writes_are_atomic_and_leave_no_temporary_files(store):
    for i in range(5):
        new = store.lock("k", environment=True, queue=bool(i % 2), note=f"n{i}", user="A")
        doc = json.loads(store.path.read_text())
        assert doc["note"] == f"n{i}" and doc["uid"] == new.uid == store.state().uid
        store.unlock("k")
    assert sorted(p.name for p in store.state_dir.iterdir()) == ["default.lock.json", "default.lock.json.flock"]
    assert json.loads(store.path.read_text())["environment"] is False
    assert store._flock_path.stat().st_size == 0  # the sidecar is never written


def test_failed_write_changes_nothing_and_says_so(store, monkeypatch):
    store.lock("k", environment=True, user="Alice")
    before = store.path.read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(StateFileError) as err:
        store.unlock("k")
    assert "No space left on device" in str(err.value) and str(store.path) in str(err.value)
    monkeypatch.undo()
    assert store.path.read_bytes() == before and store.state().environment
    assert [p for p in store.state_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_missing_file_is_unlocked_with_a_uid_all_processes_share(tmp_path, stores):
    a, b = stores(tmp_path, "env1"), stores(tmp_path, "env1")
    assert a.state().uid == b.state().uid == stores(str(tmp_path) + "/", "env1").state().uid
    assert a.state().uid != stores(tmp_path, "env2").state().uid
    assert not a.state().locked
    a.check(None, "environment")
    a.check("anything", "queue")
    info = a.info().to_lock_info()
    assert set(info) == INFO_KEYS and info["time_str"] == "" and info["time"] is None
    assert not a.path.exists() and list(tmp_path.iterdir()) == []  # reading never writes


def test_state_dir_is_created_and_names_are_validated(tmp_path, stores):
    s = stores(tmp_path / "a" / "b", "x")
    assert s.state_dir.is_dir() and s.path == s.state_dir / "x.lock.json"
    for name in ["", ".", "..", "a/b", "a\\b", "nul\0", "x" * 151, "é" * 76, "lone\ud800"]:
        with pytest.raises(ValueError, match="Invalid environment name"):
            LockStore(tmp_path, name)


# ---- damaged files ---------------------------------------------------------------------------

_LOCKED = {"format": "qmagic-lock", "version": 1, "uid": "u", "environment": True, "queue": False,
           "user": "A", "time": 1.0, "note": None,
           "key_hash": {"algorithm": "scrypt", "n": 2**14, "r": 8, "p": 1, "salt": "00" * 16,
                        "hash": "00" * 32}}
DAMAGED = {
    "garbage": b"\x00\xffnot json",
    "truncated": b'{"format": "qmagic-lock", "version": 1, "uid": "x", "environ',
    "not ours": b'{"hello": "world"}',
    "future version": json.dumps({"format": "qmagic-lock", "version": 99, "uid": "u"}).encode(),
    "locked without hash": json.dumps({**_LOCKED, "key_hash": None}).encode(),
    "absurd scrypt cost": json.dumps({**_LOCKED, "key_hash": {**_LOCKED["key_hash"], "n": 2**30}}).encode(),
    "pbkdf2 record": json.dumps({**_LOCKED, "key_hash": {"algorithm": "pbkdf2_sha256", "iterations": 10**7,
                                                         "salt": "00" * 16, "hash": "00" * 32}}).encode(),
    "infinite time": json.dumps({**_LOCKED, "time": float("inf")}).encode(),
    "huge time": json.dumps({**_LOCKED, "time": 1e300}).encode(),
    "lone surrogate": json.dumps({**_LOCKED, "user": "\udc80"}).encode(),
    "long user": json.dumps({**_LOCKED, "user": "u" * 5000}).encode(),
    "long note": json.dumps({**_LOCKED, "note": "n" * 20000}).encode(),
    "deep nesting": b"[" * 30000 + b"]" * 30000,
    "too large": b" " * 70000 + b"{}",
    "empty": b"",
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_file_counts_as_locked_and_clear_fixes_it(tmp_path, stores, content):
    store = stores(tmp_path, "bench 2")
    store.path.write_bytes(content)
    state = store.state()
    assert state.environment and state.queue and state.damaged
    for scope in ("environment", "queue"):
        with pytest.raises(LockRefused) as err:
            store.check("any key", scope)
    msg = str(err.value)
    assert msg == state.damaged and str(store.path) in msg and "LOCKED" in msg
    assert f"qmagic-clear-lock --environment 'bench 2' --state-dir {store.state_dir}" in msg
    info = store.info().to_lock_info()
    assert info["environment"] and info["queue"] and info["time_str"]
    assert store.state().uid == stores(tmp_path, "bench 2").state().uid  # processes agree
    with pytest.raises(LockRefused):
        store.lock("k", environment=True, user="A")
    with pytest.raises(LockRefused):
        store.unlock("k")
    assert store.path.read_bytes() == content  # nothing silently overwritten
    removed = store.clear()
    assert removed.environment and removed.queue and removed.damaged
    assert not store.state().locked
    store.check(None)
    store.lock("k", environment=True, user="A")


def test_a_damaged_file_says_what_is_wrong_in_it(tmp_path, stores):
    """A hand-edited lock file whose user name had 5,000 characters read "the user name is
    missing" (found by a hostile test)."""
    for i, (content, says) in enumerate((
            (DAMAGED["long user"], "the user name must be text of at most"),
            (DAMAGED["long note"], "the note is longer than 10000 characters"),
            (json.dumps({**_LOCKED, "user": ""}).encode(), "the user name is missing"),
            (json.dumps({**_LOCKED, "note": 3}).encode(), "the note is not a string"))):
        store = stores(tmp_path / str(i), "bench")  # (a file of its own: no rewrite to notice)
        store.path.write_bytes(content)
        assert says in store.state().damaged, (says, store.state().damaged)


def test_a_folder_at_the_lock_path_counts_as_locked(store):
    store.path.mkdir()
    with pytest.raises(LockRefused, match="cannot be read"):
        store.check(None, "queue")
    with pytest.raises(StateFileError, match="Failed to save the lock file") as info:
        store.clear()  # cannot replace a folder: says so, changes nothing
    assert store.path.is_dir()
    # what to do (qmagic-clear-lock prints it), not the name of a temporary file
    assert "a folder of that name is in its place" in str(info.value) and "remove that folder" in str(info.value)
    assert ".tmp" not in str(info.value)


def test_unlocking_a_damaged_file_again_and_again_keeps_saying_what_to_do(tmp_path, stores):
    """Without an emergency key no key opens a damaged file: trying one is no wrong key. (The
    fourth %unlock said "Too many wrong lock keys" instead of how to clear the file, and the
    back-off then refused the right key of the next lock.)"""
    store = stores(tmp_path)
    store.path.write_text("garbage")
    for _ in range(6):
        with pytest.raises(LockRefused) as err:
            store.unlock("my-key", client="remote")
        assert str(err.value) == store.state().damaged and "qmagic-clear-lock" in str(err.value)
    store.clear()
    store.lock("k1", environment=True, user="Other")
    assert not store.unlock("k1", client="remote").locked


def test_emergency_key_resets_a_damaged_file(tmp_path, stores):
    store = stores(tmp_path, emergency_key="EMERGENCY")
    store.path.write_text("{")
    with pytest.raises(LockRefused, match="Unlock with the emergency lock key"):
        store.check("EMERGENCY")
    assert not store.unlock("EMERGENCY").locked
    store.check(None)


# ---- rules and protocol texts ------------------------------------------------------------


def test_invalid_lock_key_text_is_exactly_the_protocols(store, stores):
    store.lock("k", environment=True, note="Changing samples", user="Alice")
    doc = json.loads(store.path.read_text())
    doc["time"] = datetime(2026, 11, 21, 15, 10, 12).timestamp()  # local time, like queueserver
    _write_by_hand(store.path, json.dumps(doc).encode())
    expected = ("Error: Invalid lock key: \nRE Manager is locked by Alice at 11/21/2026 15:10:12\n"
                "Environment is locked: True\nQueue is locked:       False\n"
                "Emergency lock key:    not set\nNote: Changing samples")
    for key in ("wrong", None):
        with pytest.raises(LockRefused) as err:
            store.check(key)
        assert str(err.value) == expected
        assert isinstance(err.value, RequestRefused) and isinstance(err.value, PermissionError)
    store.check(None, "queue")  # the queue is not locked
    with_ek = stores(store.state_dir, emergency_key="ek")
    store.lock("k", environment=True, queue=True, user="Bob")
    with pytest.raises(LockRefused) as err:
        with_ek.check("wrong", "queue")
    assert str(err.value).endswith("Queue is locked:       True\nEmergency lock key:    set\nNote: ---")


def test_lock_state_and_lock_info_have_the_protocol_shape(store):
    new = store.lock("k", environment=True, queue=False, note="n", user="Alice")
    assert isinstance(new, LockState)
    info = new.to_lock_info()
    assert set(info) == INFO_KEYS
    assert (info["environment"], info["queue"], info["user"], info["note"]) == (True, False, "Alice", "n")
    assert abs(info["time"] - time.time()) < 60
    assert info["time_str"] == datetime.fromtimestamp(info["time"]).strftime("%m/%d/%Y %H:%M:%S")
    assert info["emergency_lock_key_is_set"] is False
    assert new == store.state() == store.info()
    with pytest.raises(AttributeError):
        new.user = "Eve"  # frozen


@pytest.mark.parametrize("kwargs, text", [
    ({"lock_key": "k", "environment": True, "user": None},
     "Error: User name must be a non-empty string: user = None"),
    ({"lock_key": "k", "environment": True, "user": ""}, "Error: User name must be a non-empty string"),
    ({"lock_key": "", "environment": True, "user": "A"},
     "Error: Lock key must be a non-empty string: lock_key = ''"),
    ({"lock_key": None, "queue": True, "user": "A"}, "Error: Lock key must be a non-empty string"),
    ({"lock_key": "k" * 1025, "queue": True, "user": "A"}, "Error: Lock key must be a non-empty string"),
    ({"lock_key": "\udc80", "queue": True, "user": "A"}, "Error: Lock key must be a non-empty string"),
    ({"lock_key": "k", "queue": True, "user": "A", "note": 5}, "Error: Note must be a string or None"),
    ({"lock_key": "k", "queue": True, "user": "A", "note": "n" * 10001}, "Error: Note must be a string"),
    ({"lock_key": "k", "queue": True, "user": "A", "note": "\udc80"},  # (it said "a string" of a str)
     "Error: Note must be a string or None (at most 10000 characters, without lone surrogates): note = '\\udc80'"),
    ({"lock_key": "k", "user": "A"},
     "Error: Invalid option: environment and/or queue must be selected: environment=False queue=False"),
    ({"lock_key": "k", "user": "A", "environment": None, "queue": None},
     "Error: Invalid option: environment and/or queue must be selected: environment=False queue=False"),
    ({"lock_key": "k", "user": "A", "environment": "yes"},
     "Error: Invalid option: 'environment' and 'queue' must be True or False: environment='yes'"),
])
def test_invalid_lock_requests_are_refused(store, kwargs, text):
    key = kwargs.pop("lock_key")
    msg = _message(lambda: store.lock(key, **kwargs))
    assert msg.startswith(text) and len(msg) < 300
    assert not store.state().locked and not store.path.exists()


def test_relock_with_same_key_replaces_everything_and_other_keys_are_refused(store):
    first = store.lock("k", environment=True, queue=None, note="one", user="Alice")
    assert first.queue is False
    second = store.lock("k", queue=True, note="two", user="Bob")
    assert second.uid != first.uid
    assert (second.environment, second.queue, second.note, second.user) == (False, True, "two", "Bob")
    assert second.time >= first.time
    with pytest.raises(LockRefused) as err:
        store.lock("other", environment=True, user="Eve")
    assert str(err.value).startswith("Error: RE Manager was locked with a different key: \n"
                                     "RE Manager is locked by Bob at ")
    assert store.state() == second  # a refusal changes nothing


def test_uid_changes_on_every_change_only(store):
    uids = [store.state().uid]
    for action in (lambda: store.lock("k", environment=True, user="A"),
                   lambda: store.lock("k", environment=True, user="A"),
                   lambda: store.unlock("k"),
                   lambda: store.lock("k", queue=True, user="A"),
                   lambda: store.clear()):
        action()
        uids.append(store.state().uid)
    assert len(set(uids)) == len(uids)
    assert store.unlock("whatever").uid == uids[-1] == store.state().uid  # unlocked: no change
    assert store.clear().locked is False and store.state().uid == uids[-1]


def test_unlock_needs_the_key(store):
    store.lock("k", environment=True, queue=True, user="Alice")
    msg = _message(lambda: store.unlock("wrong"))
    assert msg.startswith("Error: Invalid lock key: \nRE Manager is locked by Alice")
    assert _message(lambda: store.unlock("")) == "Error: Lock key must be a non-empty string: lock_key = ''"
    assert _message(lambda: store.unlock(None)).startswith("Error: Lock key must be a non-empty string")
    assert not store.unlock("k").locked and not store.state().locked


def test_info_with_a_key_validates_it(store):
    store.info("anything")  # unlocked: any key is fine
    store.lock("k", queue=True, user="Alice")
    assert store.info("k").queue and store.info(None).queue
    assert _message(lambda: store.info("wrong")).startswith("Error: Invalid lock key: \n")
    assert "non-empty string or None" in _message(lambda: store.info(5))


def test_check_respects_scopes_and_validates_arguments(store):
    store.lock("k", queue=True, user="Alice")
    store.check(None, "environment")
    store.check("wrong", "environment")
    store.check("k", "queue")
    with pytest.raises(LockRefused):
        store.check("wrong", "queue")
    assert "non-empty string or None" in _message(lambda: store.check(123, "queue"))
    assert "non-empty string or None" in _message(lambda: store.check(b"k", "environment"))
    with pytest.raises(ValueError):
        store.check("k", "everything")
    store.check("\udc80", "environment")  # a lone surrogate is text like any other: unlocked scope
    with pytest.raises(LockRefused):
        store.check("\udc80", "queue")  # ...and a wrong key, never a crash


def test_a_too_long_key_is_refused_with_the_length_rule(store):
    """A key over 1024 characters is refused with the whole rule, in every call that needs it."""
    long = "k" * 1025
    assert _message(lambda: store.lock(long, queue=True, user="A")).startswith(
        "Error: Lock key must be a non-empty string of at most 1024 characters that encodes as "
        "UTF-8: lock_key = 'kkk")
    assert _message(lambda: store.lock("\udc80", queue=True, user="A")).startswith(
        "Error: Lock key must be a non-empty string of at most 1024 characters that encodes as UTF-8")
    assert _message(lambda: store.info(long)).startswith(
        "Error: Lock key must be a string of at most 1024 characters or None: lock_key = 'kkk")
    store.check(long, "queue")  # unlocked: the key is not looked at (as queueserver)
    store.lock("k", queue=True, user="Alice")
    assert _message(lambda: store.check(long, "queue")).startswith(
        "Error: Lock key must be a string of at most 1024 characters or None: ")
    assert _message(lambda: store.unlock(long)).startswith(
        "Error: Lock key must be a non-empty string of at most 1024 characters: ")
    assert all(len(_message(f)) < 200 for f in (lambda: store.info(long), lambda: store.unlock(long)))
    assert store.state().queue  # nothing changed


def test_emergency_key_only_unlocks(tmp_path, monkeypatch, stores):
    monkeypatch.delenv("QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER", raising=False)
    monkeypatch.setenv("QMAGIC_EMERGENCY_LOCK_KEY", "EK")
    store = stores(tmp_path)
    store.lock("k", environment=True, queue=True, user="Alice")
    assert store.info().to_lock_info()["emergency_lock_key_is_set"] is True
    with pytest.raises(LockRefused, match="Emergency lock key:    set"):
        store.check("EK")
    with pytest.raises(LockRefused):
        store.info("EK")
    with pytest.raises(LockRefused):
        store.lock("EK", environment=True, user="Bob")
    with pytest.raises(LockRefused):
        stores(tmp_path, emergency_key="").unlock("EK")  # "" = not set
    assert not store.unlock("EK").locked
    monkeypatch.setenv("QMAGIC_EMERGENCY_LOCK_KEY", "")
    assert stores(tmp_path).info().emergency_key_set is False
    with pytest.raises(TypeError):
        LockStore(tmp_path, emergency_key=5)


def test_the_emergency_key_falls_back_to_queueservers_variable(tmp_path, monkeypatch, stores):
    """LockStore(emergency_key=None) reads $QMAGIC_EMERGENCY_LOCK_KEY, else queueserver's
    $QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER; qmagic's variable wins when both are set."""
    monkeypatch.delenv("QMAGIC_EMERGENCY_LOCK_KEY", raising=False)
    monkeypatch.setenv("QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER", "QS-EK")
    store = stores(tmp_path)
    assert store.lock("k", environment=True, user="Alice").emergency_key_set
    assert not store.unlock("QS-EK").locked
    monkeypatch.setenv("QMAGIC_EMERGENCY_LOCK_KEY", "QM-EK")
    store = stores(tmp_path)
    store.lock("k", environment=True, user="Alice")
    with pytest.raises(LockRefused):
        store.unlock("QS-EK")
    assert not store.unlock("QM-EK").locked
    assert stores(tmp_path, emergency_key="").info().emergency_key_set is False  # given: no variable


# ---- sharing between stores, threads and processes -------------------------------------------


def test_two_stores_on_one_folder_see_one_lock(tmp_path, stores):
    a, b = stores(tmp_path), stores(tmp_path, watch=False)
    b.check(None)  # b caches the unlocked state
    a.lock("ka", environment=True, user="Alice")
    with pytest.raises(LockRefused, match="locked by Alice"):
        b.check(None)
    assert b.state().uid == a.state().uid
    with pytest.raises(LockRefused):
        b.lock("kb", environment=True, user="Bob")
    b.check("ka")
    a.unlock("ka")
    b.check(None)
    eventually(lambda: not _refused(a), what="a's own unlock")
    assert b.state().uid == a.state().uid


CHILD = r"""
import json, sys
from qmagic.store.locks import LockStore
from qmagic.errors import LockRefused, StateFileError
store = LockStore(sys.argv[1], recheck_s=float(sys.argv[2]), watch=sys.argv[3] == "watch")
print("ready" if store.watching else "ready (no inotify)", flush=True)
for line in sys.stdin:
    cmd, _, key = line.strip().partition(" ")
    try:
        if cmd == "check":
            store.check(key or None)
            print("allowed", flush=True)
        elif cmd == "lock":
            print(json.dumps(store.lock(key, environment=True, user="Child").to_lock_info()), flush=True)
        elif cmd == "unlock":
            print(json.dumps(store.unlock(key).to_lock_info()), flush=True)
        elif cmd == "uid":
            print(store.state().uid, flush=True)
    except (LockRefused, StateFileError) as exc:
        print("refused " + json.dumps(str(exc)), flush=True)
store.close()
"""


class Child:
    """A second process with its own LockStore on ``state_dir``, driven line by line."""

    def __init__(self, state_dir: Path, recheck_s: float = 0.5, watch: bool = True) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(state_dir), str(recheck_s),
                                      "watch" if watch else "stat"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=_child_env())
        self.ready = self.proc.stdout.readline().strip()
        assert self.ready.startswith("ready"), self.ready

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the child process died"
        return answer.strip()

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)


@needs_inotify
def test_another_process_lock_is_seen_at_once_by_the_watcher(tmp_path, stores):
    # the safety net is an hour away: only the inotify watcher can reveal the changes
    store = stores(tmp_path, recheck_s=3600.0)
    assert store.watching
    child = Child(tmp_path, 3600.0)
    latencies = []
    try:
        for round_ in range(5):
            store.check(None)
            store.check(None)  # served from the cache
            assert json.loads(child.ask(f"lock child-{round_}"))["user"] == "Child"
            latencies.append(eventually(lambda: _refused(store), timeout=5, what="the child's lock"))
            with pytest.raises(LockRefused, match="locked by Child"):
                store.check(None)
            assert store.state().uid == child.ask("uid")
            store.check(f"child-{round_}")
            child.ask(f"unlock child-{round_}")
            latencies.append(eventually(lambda: not _refused(store), timeout=5, what="the unlock"))
        # and the other way round
        assert child.ask("check") == "allowed"
        store.lock("parent", environment=True, user="Parent")
        answer = child.ask("check")
        waited = 0
        while answer == "allowed" and waited < 5000:  # the child's watcher wakes within ms
            time.sleep(0.001)
            waited += 1
            answer = child.ask("check")
        assert answer.startswith("refused ") and "locked by Parent" in answer
        assert child.ask("check parent") == "allowed"
        assert clear_lock_main(["--state-dir", str(tmp_path)]) == 0  # the tool, as a writer
        answer = child.ask("check")
        while answer != "allowed" and waited < 5000:
            time.sleep(0.001)
            waited += 1
            answer = child.ask("check")
        assert answer == "allowed"
    finally:
        assert child.close() == 0
    assert max(latencies) < 1.0, latencies  # typically well under a millisecond


def test_a_running_second_process_without_watcher_sees_every_change(tmp_path, stores):
    store = stores(tmp_path, watch=False)
    child = Child(tmp_path, watch=False)
    try:
        assert child.ask("check") == "allowed"
        assert child.ask("uid") == store.state().uid
        store.lock("parent-key", environment=True, note="from parent", user="Parent")
        assert "locked by Parent" in child.ask("check")  # the parent wrote before answering
        assert child.ask("check parent-key") == "allowed"
        assert child.ask("uid") == store.state().uid
        assert child.ask("lock child-key").startswith("refused ")
        store.unlock("parent-key")
        assert json.loads(child.ask("lock child-key"))["user"] == "Child"
        with pytest.raises(LockRefused, match="locked by Child"):
            store.check("parent-key")  # a store without watcher looks at the file every time
        store.check("child-key")
    finally:
        assert child.close() == 0


@pytest.mark.parametrize("shared", [True, False], ids=["one store", "one store per thread"])
def test_concurrent_locks_with_different_keys_have_one_winner(tmp_path, stores, shared):
    n = 6
    made = [stores(tmp_path)] * n if shared else [stores(tmp_path) for _ in range(n)]
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def attempt(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            results[i] = made[i].lock(f"key-{i}", environment=True, user=f"user{i}", client=f"c{i}")
        except LockRefused as exc:
            results[i] = exc

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [i for i, r in enumerate(results) if isinstance(r, LockState)]
    assert len(winners) == 1
    (w,) = winners
    for i, result in enumerate(results):
        if i != w:
            assert str(result).startswith("Error: RE Manager was locked with a different key")
    fresh = stores(tmp_path)
    fresh.check(f"key-{w}")
    assert fresh.info().user == f"user{w}"


def test_writers_wait_for_the_inter_process_flock(tmp_path, stores):
    import fcntl

    store = stores(tmp_path)
    other_lock = _locked_bytes(tmp_path, "Other")
    done = threading.Event()
    result: list = []

    def lock_k2() -> None:
        try:
            result.append(store.lock("k2", environment=True, user="Me"))
        except LockRefused as exc:
            result.append(exc)
        done.set()

    with open(store.path.with_name(store.path.name + ".flock"), "a") as sidecar:
        fcntl.flock(sidecar, fcntl.LOCK_EX)  # as another process in the middle of a write
        threading.Thread(target=lock_k2, daemon=True).start()
        assert not done.wait(0.3), "lock() did not wait for the flock"
        _write_by_hand(store.path, other_lock)  # the other process's write lands
        fcntl.flock(sidecar, fcntl.LOCK_UN)
    assert done.wait(10)
    assert isinstance(result[0], LockRefused) and "locked by Other" in str(result[0])


def test_a_stuck_flock_gives_a_clear_failure_within_the_bound(tmp_path, stores):
    import fcntl

    store = stores(tmp_path, flock_timeout_s=0.2)
    with open(store.path.with_name(store.path.name + ".flock"), "a") as sidecar:
        fcntl.flock(sidecar, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(StateFileError, match="Another process has held"):
            store.lock("k", environment=True, user="Me")
        assert time.monotonic() - start < 2.0
    assert not store.state().locked


def test_behind_a_stuck_flock_only_the_first_change_waits_the_whole_bound(tmp_path, stores, monkeypatch):
    """A stopped process holding the flock: each change one after another (a remote client's
    are served in turn) waited the whole bound, so eight clients held up a status for 14 s.
    After one wait ran out the next ones look briefly for 10 s, or until the flock is seen free."""
    from types import SimpleNamespace

    from qmagic.store import locks

    clock, tries, held = [0.0], [], [True]

    def flock(fd, op):  # (a clock of our own: no timing in the test)
        tries.append(clock[0])
        if held[0] and op & locks.fcntl.LOCK_NB:
            raise BlockingIOError

    def sleep(s):
        clock[0] += s

    store = stores(tmp_path, flock_timeout_s=2.0)
    monkeypatch.setattr(locks, "fcntl", SimpleNamespace(flock=flock, LOCK_EX=2, LOCK_NB=4, LOCK_UN=8))
    monkeypatch.setattr(locks, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=sleep, time=time.time))

    def waited() -> float:
        tries.clear()
        with pytest.raises(StateFileError, match="Another process (has held|still holds) .* for over 2 s"):
            store.lock("k", environment=True, user="Me")
        return tries[-1] - tries[0]

    assert waited() >= 2.0
    assert waited() <= 0.2 and waited() <= 0.2
    clock[0] += 11.0  # (long after the whole wait ran out: another holder may have it briefly)
    assert waited() >= 2.0  # ... so a whole wait again (a reviewer: a 0.5 s holder was refused)
    assert waited() <= 0.2
    held[0] = False
    store.lock("k", environment=True, user="Me")  # free again: the next stuck wait is whole
    store.unlock("k")
    held[0] = True
    assert waited() >= 2.0


def test_the_temporary_file_of_a_write_killed_before_its_rename_is_removed(tmp_path, stores):
    """A process killed between writing its new lock file and renaming it (2 of 15 SIGKILLs of
    a kernel locking and unlocking) left ``.default.lock.json.XXXXXXXX.tmp`` for good; the
    next change removes it (holding the flock: no other write is under way)."""
    store = stores(tmp_path)
    dead = tmp_path / f".{store.path.name}.0es__bt5.tmp"
    dead.write_text("{}")
    other = tmp_path / ".default.x.lock.json.kvfuah0j.tmp"  # another environment's
    other.write_text("{}")
    store.lock("k", environment=True, user="Me")
    assert not dead.exists() and other.exists()
    assert store.state().locked


def test_info_always_looks_at_the_file_and_sees_racy_rewrites(tmp_path, stores):
    store = stores(tmp_path, watch=False)
    store.lock("k", environment=True, note="AAAA", user="Alice")
    path, st = store.path, os.stat(store.path)
    assert store.info().note == "AAAA"

    def rewrite_in_place(old: str, new: str, mtime_ns: int) -> None:
        text = path.read_text().replace(old, new)
        with open(path, "r+") as f:  # same inode, same size
            f.write(text)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    rewrite_in_place('"AAAA"', '"BBBB"', st.st_mtime_ns)
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)
    assert store.info().note == "BBBB"
    old = time.time_ns() - 10 * 10**9
    rewrite_in_place('"BBBB"', '"CCCC"', old)  # an old mtime, but the ctime tells
    assert store.info().note == "CCCC"


# ---- the hot path: no system call while nothing changed ------------------------------------


class SyscallCounter:
    """Counts the file system calls the lock store can make from Python."""

    NAMES = ("stat", "lstat", "open", "fstat", "read", "scandir", "listdir")

    def __init__(self, monkeypatch) -> None:
        import builtins

        self.calls: list[str] = []
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self._counting(name, getattr(os, name)))
        monkeypatch.setattr(builtins, "open", self._counting("builtins.open", builtins.open))

    def _counting(self, name, func):
        def wrapper(*args, **kwargs):
            self.calls.append(name)
            return func(*args, **kwargs)
        return wrapper


@needs_inotify
@pytest.mark.parametrize("state", ["no lock file", "unlocked", "locked, right key",
                                   "locked, remote client", "damaged"])
def test_unchanged_check_makes_no_system_call(tmp_path, stores, monkeypatch, state):
    with LockStore(tmp_path, watch=False) as setup:  # before the watcher: no event pending
        if state == "unlocked":
            setup.lock("k", environment=True, user="A")
            setup.unlock("k")
        elif state.startswith("locked"):
            setup.lock("k", environment=True, user="A")
        elif state == "damaged":
            setup.path.write_text("{")
    store = stores(tmp_path, recheck_s=3600.0)
    client = "tcp://10.0.0.7" if state == "locked, remote client" else None
    key = "k" if state.startswith("locked") else None
    expect_refused = state == "damaged"
    assert _refused(store, key) is expect_refused  # the first check reads the file
    if client is not None:
        store.check(key, client=client)
    counter = SyscallCounter(monkeypatch)
    for _ in range(2000):
        try:
            store.check(key, client=client)
            assert not expect_refused
        except LockRefused:
            assert expect_refused
        assert store.state().environment is (state in ("damaged",) or state.startswith("locked"))
    assert counter.calls == []


STRACED = r"""
import sys
from qmagic.store.locks import LockStore
store = LockStore(sys.argv[1], watch=sys.argv[2] == "watch", recheck_s=3600.0)
store.lock("k", environment=True, user="A")
store.check("k")
sys.stdout.write("go\n"); sys.stdout.flush()
for _ in range(int(sys.argv[3])):
    store.check("k")
    store.check(None, "queue")
sys.stdout.write("done\n"); sys.stdout.flush()
store.close()
"""


def _syscalls(tmp_path: Path, modes: tuple[str, ...], n: int) -> list[int]:
    """System calls made by every thread of a child while it runs ``2 * n`` checks (between
    its "go" and "done" lines: start-up and shutdown vary with the machine's load), one
    child per mode, run side by side (each traced on its own: neither sees the other)."""
    runs = []
    try:
        for mode in modes:
            out = tmp_path / f"strace-{mode}-{n}.txt"
            args = ["strace", "-f", "-qq", "-o", str(out), sys.executable, "-c", STRACED,
                    str(tmp_path / mode), mode, str(n)]
            runs.append((args, subprocess.Popen(args, stdout=subprocess.PIPE,
                                                stderr=subprocess.PIPE, env=_child_env()), out))
        counts = []
        for args, proc, out in runs:
            stdout, stderr = proc.communicate(timeout=120)
            if proc.returncode:
                raise subprocess.CalledProcessError(proc.returncode, args, stdout, stderr)
            lines = [line for line in out.read_text().splitlines() if "resumed>" not in line]
            out.unlink()
            start = next(i for i, line in enumerate(lines) if 'write(1, "go\\n"' in line)
            end = next(i for i, line in enumerate(lines) if 'write(1, "done\\n"' in line)
            counts.append(end - start - 1)
    finally:
        for _, proc, _ in runs:
            if proc.poll() is None:  # (a timeout, or the other child failed)
                proc.kill()
            if not proc.stdout.closed:  # (not read: the other child failed first)
                proc.communicate()
    return counts


@needs_inotify
@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
def test_unchanged_checks_make_no_system_call_counted_by_strace(tmp_path):
    """The real count, from the kernel's side (the monkeypatch test above sees Python only).
    (1,000 rounds: the fallback's system calls under strace cost seconds; 2,000 checks that
    make fewer than 50 system calls say the same as 40,000.)"""
    n = 1000
    try:
        watched, stat_each = _syscalls(tmp_path, ("watch", "stat"), n)
    except subprocess.CalledProcessError as exc:  # ptrace not permitted here
        pytest.skip(f"strace cannot run here: {exc.stderr[-200:]!r}")
    assert watched < 50, watched  # 2,000 checks (and the window around them)
    assert stat_each >= n, stat_each  # the same test sees the system calls of the fallback


@needs_inotify
def test_the_safety_net_sees_changes_that_raise_no_watched_event(tmp_path, stores):
    store = stores(tmp_path, recheck_s=0.05)
    store.lock("k", environment=True, user="A")
    store.check("k")
    os.truncate(store.path, 0)  # IN_MODIFY only: not watched on purpose
    eventually(lambda: _refused(store, "k"), timeout=10, what="the truncated (damaged) file")
    assert "not valid JSON" in store.state().damaged


@needs_inotify
@pytest.mark.parametrize("how", ["deleted", "moved away"])
def test_a_lost_state_folder_is_watched_again_when_it_is_back(tmp_path, stores, how):
    folder = tmp_path / "state"
    store = stores(folder, recheck_s=0.05)
    store.check(None)
    if how == "deleted":
        shutil.rmtree(folder)
    else:
        folder.rename(tmp_path / "elsewhere")
    eventually(lambda: not store.watching, what="the watcher to notice the folder is gone")
    if how == "moved away":  # what happens in the old folder is not this store's concern
        with LockStore(tmp_path / "elsewhere", watch=False) as writer:
            writer.lock("other", environment=True, user="Elsewhere")
        store.check(None)
        folder.mkdir(mode=0o700)
        with LockStore(folder, watch=False) as writer:
            writer.lock("k", environment=True, user="Writer")
    else:
        store.lock("k", environment=True, user="Writer")  # the store makes the folder again
    assert _refused(store)  # not watched meanwhile: every check looks at the file
    eventually(lambda: store.watching, what="the folder to be watched again")
    store.check("k")
    with LockStore(folder, watch=False) as writer:
        writer.unlock("k")
    eventually(lambda: not _refused(store), timeout=5, what="the unlock")


def test_a_store_without_watcher_sees_hand_written_changes_at_the_next_check(tmp_path, stores):
    store = stores(tmp_path / "state", watch=False)
    assert not store.watching
    store.check(None)
    _write_by_hand(store.path, _locked_bytes(tmp_path))
    with pytest.raises(LockRefused, match="locked by Hand"):
        store.check(None)
    store.path.unlink()
    store.check(None)


def test_threads_checking_while_another_process_writes_never_see_a_foreign_lock(tmp_path, stores):
    store = stores(tmp_path)
    child = Child(tmp_path, 3600.0)
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer() -> None:
        while not stop.is_set():
            try:
                store.check("child-key")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            assert json.loads(child.ask("lock child-key"))["user"] == "Child"
            eventually(lambda: _refused(store), timeout=5, what="the child's lock")
            child.ask("unlock child-key")
            eventually(lambda: not _refused(store), timeout=5, what="the child's unlock")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert child.close() == 0
    assert errors == []


def test_fork_child_without_the_watcher_thread_still_sees_changes(tmp_path, stores):
    if not hasattr(os, "fork"):
        pytest.skip("needs fork")
    store = stores(tmp_path)
    store.check(None)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no watcher thread was inherited
        code = 1
        try:
            os.write(ready_w, b"r")
            os.read(go_r, 1)
            code = 0 if (not store.watching and _refused(store)) else 2
        finally:
            os._exit(code)
    os.read(ready_r, 1)
    with LockStore(tmp_path, watch=False) as writer:
        writer.lock("k", environment=True, user="Parent")
    os.write(go_w, b"g")
    _, status = os.waitpid(pid, 0)
    for fd in (ready_r, ready_w, go_r, go_w):
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


# ---- hostile files in the state folder (issue 14, item 5) -----------------------------------


def test_a_fifo_at_the_lock_path_never_hangs_and_counts_as_locked(store):
    os.mkfifo(store.path)
    with pytest.raises(LockRefused, match="not a regular file"):
        _in_thread(lambda: store.check(None))
    assert _in_thread(store.state).damaged
    assert _in_thread(store.info).damaged
    with pytest.raises(LockRefused):
        _in_thread(lambda: store.lock("k", environment=True, user="A"))
    with pytest.raises(LockRefused):
        _in_thread(lambda: store.unlock("k"))
    assert stat.S_ISFIFO(os.lstat(store.path).st_mode)
    assert _in_thread(store.clear).damaged  # clear replaces the FIFO by a regular file
    assert not _in_thread(store.state).locked


def test_a_fifo_at_the_sidecar_never_hangs(store):
    os.mkfifo(store._flock_path)
    with pytest.raises(StateFileError, match="not a regular file"):
        _in_thread(lambda: store.lock("k", environment=True, user="A"))
    _in_thread(lambda: store.check(None))  # reading never touches the sidecar
    assert not store.path.exists()


def test_a_symlink_at_the_lock_path_is_never_followed(tmp_path, store):
    victim = tmp_path / "victim.json"
    with LockStore(tmp_path / "other", watch=False) as other:  # a valid, UNLOCKED lock file
        other.lock("k", environment=True, user="V")
        other.unlock("k")
        victim.write_bytes(other.path.read_bytes())
    before = victim.read_bytes()
    store.path.symlink_to(victim)
    with pytest.raises(LockRefused, match="symbolic link"):
        store.check(None)  # followed, it would read "unlocked"
    assert store.state().damaged and store.info().damaged
    for action in (lambda: store.lock("k", environment=True, user="A"), lambda: store.unlock("k")):
        with pytest.raises(LockRefused):
            action()
    store.clear()  # replaces the link itself
    assert not store.path.is_symlink()
    store.lock("k", environment=True, user="A")
    store.unlock("k")
    assert victim.read_bytes() == before


def test_a_symlink_at_the_sidecar_is_never_followed(tmp_path, store):
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious bytes that must stay as they are")
    store._flock_path.symlink_to(victim)
    for action in (lambda: store.lock("k", environment=True, user="A"), store.clear):
        with pytest.raises(StateFileError, match="symbolic link"):
            action()
    store.check(None)
    assert victim.read_bytes() == b"precious bytes that must stay as they are"
    dangling = tmp_path / "not-there"
    store._flock_path.unlink()
    store._flock_path.symlink_to(dangling)
    with pytest.raises(StateFileError):
        store.lock("k", environment=True, user="A")
    assert not dangling.exists()  # O_CREAT never created the link's target


TRUNCATOR = r"""
import sys, threading
from qmagic.store.locks import LockStore
from qmagic.errors import LockRefused, StateFileError
store = LockStore(sys.argv[1], recheck_s=0.01)
store.lock("k", environment=True, user="A")
stop = threading.Event()
counts = {"checks": 0, "writes": 0}
def hammer():
    while not stop.is_set():
        try:
            store.check("k"); store.state(); store.info()
        except LockRefused:
            pass
        counts["checks"] += 1
def writer():
    while not stop.is_set():
        try:
            store.clear(); store.lock("k", environment=True, user="A")
        except (LockRefused, StateFileError):
            pass
        counts["writes"] += 1
threads = [threading.Thread(target=hammer) for _ in range(3)] + [threading.Thread(target=writer)]
for t in threads: t.start()
print("ready", flush=True)
sys.stdin.readline()
stop.set()
for t in threads: t.join()
store.close()
print(counts["checks"], counts["writes"], flush=True)
"""


def test_truncating_every_kept_file_while_checks_run_never_crashes(tmp_path):
    """The old sidecar was mapped: truncating it killed the reader with SIGBUS."""
    child = subprocess.Popen([sys.executable, "-c", TRUNCATOR, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
    try:
        assert child.stdout.readline().strip() == "ready"
        kept = [tmp_path / "default.lock.json", tmp_path / "default.lock.json.flock"]
        locked = _locked_bytes(tmp_path)
        for i in range(300):
            for path in kept:
                try:
                    os.truncate(path, 0)
                    with open(path, "r+b") as f:
                        f.write(b"\0" * 5)
                        f.truncate(2)
                except OSError:  # replaced meanwhile
                    pass
            if i % 30 == 0:
                _write_by_hand(kept[0], locked)
        out, err = child.communicate("stop\n", timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    assert child.returncode == 0, (child.returncode, err[-2000:])  # SIGBUS would be -7
    checks, writes = map(int, out.split())
    assert checks > 0 and writes > 0
    assert all(p.name.startswith("default.lock.json") or p.name.startswith("donor") for p in tmp_path.iterdir())


# ---- resources (issue 14, item 6) --------------------------------------------------------


def _resources(folder: Path) -> dict:
    """What a LockStore could leak: descriptors (inotify, eventfd, files in ``folder``),
    mappings of files in ``folder``, threads."""
    ours = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the descriptor of the listing itself, closed meanwhile
            continue
        if "inotify" in target or "eventfd" in target or str(folder) in target:
            ours[fd] = target
    maps = Path("/proc/self/maps").read_text().splitlines()
    return {"fds": ours, "all_fds": len(os.listdir("/proc/self/fd")), "maps": len(maps),
            "mapped": [line for line in maps if str(folder) in line],
            "threads": {t for t in threading.enumerate() if t.name == "qmagic-state-watch"},
            "all_threads": set(threading.enumerate())}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_close_releases_every_descriptor_thread_and_mapping(tmp_path):
    folder = tmp_path / "state"

    def cycle(i: int, probe: bool = False) -> None:
        if probe:
            empty = _resources(folder)
        store = LockStore(folder, emergency_key="EK")
        if probe:  # the watcher's two descriptors (inotify, eventfd): what close() must release
            opened = len(_resources(folder)["fds"]) - len(empty["fds"])
            assert opened == (2 if store.watching else 0)
        store.check(None)
        if i % 10 == 0:
            store.lock("k", environment=True, user="A")
            store.check("k")
            store.unlock("EK")
        store.state()
        store.info()
        assert store.watching == inotify_available()
        store.close()
        store.close()  # idempotent

    for i in range(3):
        cycle(i)  # warm-up: imports, thread stacks, malloc arenas
    gc.collect()  # (earlier tests' objects close their own descriptors now, not meanwhile)
    before = _resources(folder)
    for i in range(50):
        cycle(i, probe=i == 1)
    after = _resources(folder)
    # no inotify, eventfd or state file left open (one of an earlier test's objects may close)
    assert after["fds"].items() <= before["fds"].items(), (before["fds"], after["fds"])
    assert after["threads"] == before["threads"] == set()
    assert after["mapped"] == before["mapped"] == []  # nothing in the state folder is mapped
    # the whole process (slack: malloc may map or unmap an arena meanwhile)
    assert after["all_fds"] <= before["all_fds"], (before["all_fds"], after["all_fds"])
    assert after["maps"] <= before["maps"] + 4, (before["maps"], after["maps"])
    assert after["all_threads"] <= before["all_threads"]


def test_a_closed_store_keeps_working_without_its_watcher(tmp_path, stores):
    store = stores(tmp_path)
    store.close()
    assert not store.watching
    with LockStore(tmp_path, watch=False) as writer:
        writer.lock("k", environment=True, user="W")
    assert _refused(store)


def test_a_forgotten_store_stops_its_watcher_when_collected(tmp_path):
    import gc

    before = set(threading.enumerate())
    store = LockStore(tmp_path)
    assert len(set(threading.enumerate()) - before) == (1 if store.watching else 0)
    del store
    gc.collect()
    eventually(lambda: set(threading.enumerate()) <= before, timeout=10, what="the watcher to stop")


# ---- qmagic-clear-lock -----------------------------------------------------------------------


def test_clear_lock_cli_prints_and_removes_the_lock(tmp_path, capsys, stores):
    running = stores(tmp_path, "lab")  # stands for a running kernel
    running.lock("secret-key-123", environment=True, note="Changing samples", user="Alice")
    record = json.loads(running.path.read_text())["key_hash"]
    assert clear_lock_main(["--environment", "lab", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Alice" in out and "Changing samples" in out and "environment: locked" in out
    assert "queue:       not locked" in out
    assert "secret-key-123" not in out and record["hash"] not in out and record["salt"] not in out
    eventually(lambda: not _refused(running), timeout=5, what="the running store to notice")
    assert clear_lock_main(["--environment", "lab", "--state-dir", str(tmp_path)]) == 0
    assert "Nothing to do: environment 'lab' is not locked" in capsys.readouterr().out


def test_clear_lock_cli_resets_a_damaged_file(tmp_path, capsys, stores):
    store = stores(tmp_path)
    store.path.write_text("{broken")
    assert clear_lock_main(["--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "was damaged" in out and "not valid JSON" in out and "now unlocked" in out
    eventually(lambda: not _refused(store), timeout=5, what="the reset")


def test_clear_lock_cli_errors_and_defaults(tmp_path, capsys, monkeypatch):
    assert clear_lock_main(["--state-dir", str(tmp_path / "missing")]) == 0
    assert "does not exist" in capsys.readouterr().out
    assert not (tmp_path / "missing").exists()
    assert clear_lock_main(["--environment", "a/b", "--state-dir", str(tmp_path)]) == 1
    assert "Invalid environment name" in capsys.readouterr().err
    (tmp_path / "default.lock.json.flock").symlink_to(tmp_path / "elsewhere")
    assert clear_lock_main(["--state-dir", str(tmp_path)]) == 1
    assert "symbolic link" in capsys.readouterr().err
    (tmp_path / "default.lock.json.flock").unlink()
    monkeypatch.setenv("QMAGIC_STATE_DIR", str(tmp_path))
    with LockStore(tmp_path, watch=False) as s:
        s.lock("k", queue=True, user="Zed")
    assert clear_lock_main([]) == 0
    assert "Zed" in capsys.readouterr().out


def test_clear_lock_cli_defaults_to_the_jupyter_data_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("QMAGIC_STATE_DIR", raising=False)
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jd"))
    with LockStore(tmp_path / "jd" / "qmagic", watch=False) as s:
        s.lock("k", environment=True, user="Jay")
    assert clear_lock_main([]) == 0
    assert "Jay" in capsys.readouterr().out


def test_clear_lock_cli_as_a_separate_process(tmp_path, stores):
    store = stores(tmp_path, "b1")
    store.lock("k", environment=True, queue=True, user="Alice")
    script = "import sys; from qmagic.store.clear_lock import clear_lock_main; sys.exit(clear_lock_main())"
    done = subprocess.run([sys.executable, "-c", script, "--environment", "b1", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, env=_child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Removed the lock of environment 'b1'" in done.stdout
    eventually(lambda: not _refused(store, None, "queue"), timeout=5, what="the removal")
    done = subprocess.run([sys.executable, "-m", "qmagic.store.clear_lock", "--help"], capture_output=True,
                          text=True, env=_child_env(), timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and "qmagic-clear-lock" in done.stdout


def test_trying_the_default_key_never_counts_as_a_wrong_key(store, tmp_path, monkeypatch):
    """``%unlock`` without a key asks whether your default key opens the lock (to say so):
    that try must never count towards the back-off of wrong keys."""
    from qmagic.store.keys import get_default_lock_key

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert store.opens_with_default_key() is False  # not locked (and no default key made)
    assert not (tmp_path / "xdg").exists()
    store.lock("another-key", environment=True, user="Alice")
    get_default_lock_key()
    for _ in range(10):
        assert store.opens_with_default_key() is False
    assert not store._keys.throttle.active
    store.unlock("another-key")
    store.lock(get_default_lock_key(), environment=True, user="Alice")
    assert store.opens_with_default_key() is True


def test_a_state_folder_from_the_environment_that_is_not_utf8_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    """``$QMAGIC_STATE_DIR`` holding a byte UTF-8 cannot read (Python gives ``\\udcff``) is
    refused as ``QMagic.state_dir`` is: one line, before any file is made.  It raised a bare
    UnicodeEncodeError from deep in the lock store (qmagic.Worker(), %load_ext qmagic) and
    tracebacks in qmagic-history and qmagic-clear-lock, after making the folder."""
    import qmagic
    from qmagic.store.clear_lock import clear_lock_main
    from qmagic.store.history import history_main
    from qmagic.store.paths import STATE_DIR_ENV, default_state_dir

    bad = str(tmp_path / "st\udcff")
    monkeypatch.setenv(STATE_DIR_ENV, bad)
    want = f"${STATE_DIR_ENV} must be a folder's path in UTF-8 text"
    with pytest.raises(ValueError, match=want.replace("$", r"\$")) as info:
        default_state_dir()
    assert "\n" not in str(info.value) and f"'{tmp_path}/st\\udcff' is not" in str(info.value)
    with pytest.raises(ValueError, match=want.replace("$", r"\$")):
        qmagic.Worker({})
    with pytest.raises(SystemExit):
        history_main([])
    assert want in capsys.readouterr().err
    assert clear_lock_main([]) == 1
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # (refused before anything was made)
