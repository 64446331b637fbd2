"""Tests of qmagic.locks: the persistent, multi-process lock store and qmagic-clear-lock."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest

from qmagic.errors import LockRefused, RequestRefused, StateFileError
from qmagic.locks import (
    LockStore,
    clear_lock_main,
    default_lock_key_path,
    default_state_dir,
    get_default_lock_key,
)

REPO = Path(__file__).resolve().parents[1]
INFO_KEYS = {"environment", "queue", "user", "time", "time_str", "note", "emergency_lock_key_is_set"}


@pytest.fixture(autouse=True)
def _no_emergency_key_from_env(monkeypatch):
    monkeypatch.delenv("QMAGIC_EMERGENCY_LOCK_KEY", raising=False)


@pytest.fixture
def store(tmp_path):
    return LockStore(tmp_path / "state", "default")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


# ---- hashing -----------------------------------------------------------------------------


def test_key_is_stored_only_as_a_salted_slow_hash(store):
    key = "s3cret-Key-that-must-not-leak"
    assert store.lock(key, environment=True, user="Alice")["success"]
    text = store.path.read_text()
    assert key not in text
    record = json.loads(text)["key_hash"]
    assert record["algorithm"] == "scrypt"
    assert {"n", "r", "p", "salt", "hash"} <= set(record)
    assert record["n"] >= 2**14
    store.check(key, "environment")  # the hash verifies
    with pytest.raises(LockRefused):
        store.check(key + "x", "environment")
    # a second lock with the same key gets a fresh salt
    assert store.lock(key, environment=True, user="Alice")["success"]
    assert json.loads(store.path.read_text())["key_hash"]["salt"] != record["salt"]


def test_first_verification_in_a_fresh_process_is_fast(store):
    store.lock("k", environment=True, user="Alice")
    other = LockStore(store.state_dir)  # nothing cached
    start = time.perf_counter()
    other.check("k", "environment")
    assert time.perf_counter() - start < 0.5  # ~40 ms here; budget generous for loaded CI


# ---- the file ------------------------------------------------------------------------------


def test_writes_are_atomic_and_leave_no_temporary_files(store):
    for i in range(5):
        assert store.lock("k", environment=True, queue=bool(i % 2), note=f"n{i}", user="A")["success"]
        doc = json.loads(store.path.read_text())
        assert doc["note"] == f"n{i}" and doc["uid"] == store.info_uid
        assert store.unlock("k")["success"]
    assert sorted(p.name for p in store.state_dir.iterdir()) == ["default.lock.json", "default.lock.json.flock"]
    assert json.loads(store.path.read_text())["environment"] is False


def test_failed_write_changes_nothing_and_says_so(store, monkeypatch):
    store.lock("k", environment=True, user="Alice")
    before = store.path.read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", refuse)
    reply = store.unlock("k")
    assert reply == {"success": False, "lock_info": {}, "lock_info_uid": None, "msg": reply["msg"]}
    assert "No space left on device" in reply["msg"] and str(store.path) in reply["msg"]
    assert store.path.read_bytes() == before
    assert [p for p in store.state_dir.iterdir() if p.name.endswith(".tmp")] == []


def test_missing_file_is_unlocked_with_a_uid_all_processes_share(tmp_path):
    a, b = LockStore(tmp_path, "env1"), LockStore(tmp_path, "env1")
    assert a.info_uid == b.info_uid == LockStore(str(tmp_path) + "/", "env1").info_uid
    assert a.info_uid != LockStore(tmp_path, "env2").info_uid
    assert a.scopes() == {"environment": False, "queue": False}
    a.check(None, "environment")
    a.check("anything", "queue")
    reply = a.info()
    assert reply["success"] and set(reply["lock_info"]) == INFO_KEYS
    assert reply["lock_info"]["time_str"] == "" and reply["lock_info"]["time"] is None
    assert not a.path.exists()  # reading never writes


def test_state_dir_is_created(tmp_path):
    store = LockStore(tmp_path / "a" / "b", "x")
    assert store.state_dir.is_dir()
    assert store.path == store.state_dir / "x.lock.json"


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\\b", "nul\0"])
def test_environment_name_is_validated(tmp_path, name):
    with pytest.raises(ValueError, match="Invalid environment name"):
        LockStore(tmp_path, name)


# ---- damaged files -----------------------------------------------------------------------

DAMAGED = {
    "garbage": b"\x00\xffnot json",
    "truncated": b'{"format": "qmagic-lock", "version": 1, "uid": "x", "environ',
    "not ours": b'{"hello": "world"}',
    "future version": json.dumps({"format": "qmagic-lock", "version": 99, "uid": "u"}).encode(),
    "locked without hash": json.dumps({"format": "qmagic-lock", "version": 1, "uid": "u",
                                       "environment": True, "queue": False, "user": "A",
                                       "time": 1.0, "note": None, "key_hash": None}).encode(),
    "absurd scrypt cost": json.dumps({"format": "qmagic-lock", "version": 1, "uid": "u",
                                      "environment": True, "queue": False, "user": "A", "time": 1.0,
                                      "note": None, "key_hash": {"algorithm": "scrypt", "n": 2**30,
                                      "r": 8, "p": 1, "salt": "00" * 16, "hash": "00" * 32}}).encode(),
    "empty": b"",
}


@pytest.mark.parametrize("content", DAMAGED.values(), ids=DAMAGED.keys())
def test_damaged_file_counts_as_locked_and_clear_fixes_it(tmp_path, content):
    store = LockStore(tmp_path, "bench 2")
    store.path.write_bytes(content)
    assert store.scopes() == {"environment": True, "queue": True}
    for scope in ("environment", "queue"):
        with pytest.raises(LockRefused) as err:
            store.check("any key", scope)
    msg = str(err.value)
    assert str(store.path) in msg and "LOCKED" in msg
    assert f"qmagic-clear-lock --environment 'bench 2' --state-dir {store.state_dir}" in msg
    reply = store.info()
    assert not reply["success"] and reply["msg"] == msg
    assert reply["lock_info"]["environment"] and reply["lock_info"]["queue"]
    assert reply["lock_info_uid"] == LockStore(tmp_path, "bench 2").info_uid  # processes agree
    assert not store.lock("k", environment=True, user="A")["success"]
    assert not store.unlock("k")["success"]
    assert store.path.read_bytes() == content  # nothing silently overwritten
    removed = store.clear()
    assert removed["environment"] and removed["queue"]
    assert store.scopes() == {"environment": False, "queue": False}
    store.check(None, "environment")
    assert store.lock("k", environment=True, user="A")["success"]


def test_unreadable_path_counts_as_locked(tmp_path):
    store = LockStore(tmp_path)
    store.path.mkdir()  # a directory where the file should be
    with pytest.raises(LockRefused, match="cannot be read"):
        store.check(None, "queue")


def test_emergency_key_resets_a_damaged_file(tmp_path):
    store = LockStore(tmp_path, emergency_key="EMERGENCY")
    store.path.write_text("{")
    with pytest.raises(LockRefused, match="Unlock with the emergency lock key"):
        store.check("EMERGENCY", "environment")
    assert store.unlock("EMERGENCY")["success"]
    store.check(None, "environment")


# ---- rules ---------------------------------------------------------------------------------


def test_invalid_lock_key_text_is_exactly_the_protocols(store):
    assert store.lock("k", environment=True, note="Changing samples", user="Alice")["success"]
    doc = json.loads(store.path.read_text())
    doc["time"] = datetime(2026, 11, 21, 15, 10, 12).timestamp()  # local time, like queueserver
    store.path.write_text(json.dumps(doc))
    expected = ("Error: Invalid lock key: \nRE Manager is locked by Alice at 11/21/2026 15:10:12\n"
                "Environment is locked: True\nQueue is locked:       False\n"
                "Emergency lock key:    not set\nNote: Changing samples")
    with pytest.raises(LockRefused) as err:
        store.check("wrong", "environment")
    assert str(err.value) == expected
    assert isinstance(err.value, RequestRefused) and isinstance(err.value, PermissionError)
    with pytest.raises(LockRefused) as err:
        store.check(None, "environment")
    assert str(err.value) == expected
    store.check(None, "queue")  # the queue is not locked

    with_ek = LockStore(store.state_dir, emergency_key="ek")
    store.lock("k", environment=True, queue=True, user="Bob")
    with pytest.raises(LockRefused) as err:
        with_ek.check("wrong", "queue")
    assert str(err.value).endswith("Queue is locked:       True\nEmergency lock key:    set\nNote: ---")


def test_lock_replies_have_the_protocol_shape(store):
    reply = store.lock("k", environment=True, queue=False, note="n", user="Alice")
    assert set(reply) == {"success", "msg", "lock_info", "lock_info_uid"}
    assert reply["success"] and reply["msg"] == ""
    info = reply["lock_info"]
    assert set(info) == INFO_KEYS
    assert (info["environment"], info["queue"], info["user"], info["note"]) == (True, False, "Alice", "n")
    assert abs(info["time"] - time.time()) < 60
    assert info["time_str"] == datetime.fromtimestamp(info["time"]).strftime("%m/%d/%Y %H:%M:%S")
    assert info["emergency_lock_key_is_set"] is False
    assert reply["lock_info_uid"] == store.info_uid == store.info()["lock_info_uid"]


@pytest.mark.parametrize("kwargs, text", [
    ({"lock_key": "k", "environment": True}, "Error: User name must be a non-empty string: user = None"),
    ({"lock_key": "k", "environment": True, "user": ""}, "Error: User name must be a non-empty string"),
    ({"lock_key": "", "environment": True, "user": "A"}, "Error: Lock key must be a non-empty string: lock_key = ''"),
    ({"lock_key": None, "queue": True, "user": "A"}, "Error: Lock key must be a non-empty string"),
    ({"lock_key": "k", "queue": True, "user": "A", "note": 5}, "Error: Note must be a string or None"),
    ({"lock_key": "k", "user": "A"},
     "Error: Invalid option: environment and/or queue must be selected: environment=False queue=False"),
    ({"lock_key": "k", "user": "A", "environment": None, "queue": None},
     "Error: Invalid option: environment and/or queue must be selected: environment=False queue=False"),
    ({"lock_key": "k", "user": "A", "environment": "yes"}, "must be True or False"),
])
def test_invalid_lock_requests_are_refused(store, kwargs, text):
    key = kwargs.pop("lock_key")
    reply = store.lock(key, **kwargs)
    assert reply["success"] is False and text in reply["msg"]
    assert reply["lock_info"] == {} and reply["lock_info_uid"] is None
    assert store.scopes() == {"environment": False, "queue": False}


def test_relock_with_same_key_replaces_everything_and_other_keys_are_refused(store):
    first = store.lock("k", environment=True, queue=None, note="one", user="Alice")
    assert first["lock_info"]["queue"] is False
    second = store.lock("k", queue=True, note="two", user="Bob")
    assert second["success"]
    assert second["lock_info_uid"] != first["lock_info_uid"]
    info = second["lock_info"]
    assert (info["environment"], info["queue"], info["note"], info["user"]) == (False, True, "two", "Bob")
    assert info["time"] >= first["lock_info"]["time"]

    other = store.lock("other", environment=True, user="Eve")
    assert not other["success"]
    assert other["msg"].startswith("Error: RE Manager was locked with a different key: \n"
                                   "RE Manager is locked by Bob at ")
    assert other["lock_info"] == {} and other["lock_info_uid"] is None
    assert store.info_uid == second["lock_info_uid"]  # a refusal changes nothing


def test_uid_changes_on_every_change_only(store):
    uids = [store.info_uid]
    for action in (lambda: store.lock("k", environment=True, user="A"),
                   lambda: store.lock("k", environment=True, user="A"),
                   lambda: store.unlock("k"),
                   lambda: store.lock("k", queue=True, user="A"),
                   lambda: store.clear()):
        action()
        uids.append(store.info_uid)
    assert len(set(uids)) == len(uids)
    # an unlock of an unlocked store succeeds (as queueserver) and changes nothing
    reply = store.unlock("whatever")
    assert reply["success"] and reply["lock_info_uid"] == uids[-1] == store.info_uid
    assert store.clear()["environment"] is False and store.info_uid == uids[-1]


def test_unlock_needs_the_key(store):
    store.lock("k", environment=True, queue=True, user="Alice")
    reply = store.unlock("wrong")
    assert not reply["success"] and reply["msg"].startswith("Error: Invalid lock key: \nRE Manager is locked by Alice")
    assert reply["lock_info"]["environment"] and reply["lock_info_uid"] == store.info_uid
    assert store.unlock("")["msg"] == "Error: Lock key must be a non-empty string: lock_key = ''"
    assert store.unlock("k")["success"]
    assert store.scopes() == {"environment": False, "queue": False}


def test_info_with_a_key_validates_it(store):
    assert store.info("anything")["success"]  # unlocked: any key is fine
    store.lock("k", queue=True, user="Alice")
    assert store.info("k")["success"]
    assert store.info(None)["success"]
    reply = store.info("wrong")
    assert not reply["success"] and reply["msg"].startswith("Error: Invalid lock key: \n")
    assert reply["lock_info"]["queue"] is True and reply["lock_info_uid"] == store.info_uid
    assert "non-empty string or None" in store.info(5)["msg"]


def test_check_respects_scopes(store):
    store.lock("k", queue=True, user="Alice")
    store.check(None, "environment")
    store.check("wrong", "environment")
    store.check("k", "queue")
    with pytest.raises(LockRefused):
        store.check("wrong", "queue")
    with pytest.raises(RequestRefused, match="non-empty string or None"):
        store.check(123, "queue")
    with pytest.raises(ValueError):
        store.check("k", "everything")


def test_emergency_key_only_unlocks(tmp_path, monkeypatch):
    monkeypatch.setenv("QMAGIC_EMERGENCY_LOCK_KEY", "EK")
    store = LockStore(tmp_path)
    store.lock("k", environment=True, queue=True, user="Alice")
    assert store.info()["lock_info"]["emergency_lock_key_is_set"] is True
    with pytest.raises(LockRefused, match="Emergency lock key:    set"):
        store.check("EK", "environment")
    assert not store.info("EK")["success"]
    assert not store.lock("EK", environment=True, user="Bob")["success"]
    assert not LockStore(tmp_path, emergency_key="").unlock("EK")["success"]  # "" = not set
    assert store.unlock("EK")["success"]
    assert store.scopes() == {"environment": False, "queue": False}
    monkeypatch.setenv("QMAGIC_EMERGENCY_LOCK_KEY", "")
    assert LockStore(tmp_path).info()["lock_info"]["emergency_lock_key_is_set"] is False


# ---- sharing -------------------------------------------------------------------------------


def test_two_stores_on_one_folder_see_one_lock(tmp_path):
    a, b = LockStore(tmp_path), LockStore(tmp_path)
    b.check(None, "environment")  # b caches the unlocked state
    assert a.lock("ka", environment=True, user="Alice")["success"]
    with pytest.raises(LockRefused, match="locked by Alice"):
        b.check(None, "environment")
    assert b.info_uid == a.info_uid
    assert not b.lock("kb", environment=True, user="Bob")["success"]
    assert a.unlock("ka")["success"]
    b.check(None, "environment")
    assert b.info_uid == a.info_uid


CHILD = r"""
import json, sys
import qmagic.locks
from qmagic.locks import LockStore
from qmagic.errors import LockRefused
if len(sys.argv) > 2:
    qmagic.locks._RECHECK_SECONDS = float(sys.argv[2])
store = LockStore(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    cmd, _, key = line.strip().partition(" ")
    if cmd == "check":
        try:
            store.check(key or None, "environment")
            print("allowed", flush=True)
        except LockRefused as exc:
            print("refused " + json.dumps(str(exc)), flush=True)
    elif cmd == "lock":
        print(json.dumps(store.lock(key, environment=True, user="Child")), flush=True)
    elif cmd == "unlock":
        print(json.dumps(store.unlock(key)), flush=True)
    elif cmd == "uid":
        print(store.info_uid, flush=True)
"""


class Child:
    """A second process with its own LockStore on ``state_dir``, driven line by line."""

    def __init__(self, state_dir: Path, *extra: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, str(state_dir), *extra],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=_child_env())
        assert self.proc.stdout.readline().strip() == "ready"

    def ask(self, line: str) -> str:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        assert answer, "the child process died"
        return answer.strip()

    def close(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(timeout=30)


def test_a_running_second_process_sees_lock_and_unlock_without_restart(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=_child_env())

    def ask(line: str) -> str:
        child.stdin.write(line + "\n")
        child.stdin.flush()
        answer = child.stdout.readline()
        assert answer, "the child process died"
        return answer.strip()

    try:
        assert child.stdout.readline().strip() == "ready"
        store = LockStore(tmp_path)
        assert ask("check") == "allowed"
        assert ask("uid") == store.info_uid
        store.lock("parent-key", environment=True, note="from parent", user="Parent")
        answer = ask("check")
        assert answer.startswith("refused ") and "locked by Parent" in answer
        assert ask("check parent-key") == "allowed"
        assert ask("uid") == store.info_uid
        assert json.loads(ask("lock child-key"))["success"] is False
        store.unlock("parent-key")
        assert ask("check") == "allowed"
        assert json.loads(ask("lock child-key"))["success"] is True
        with pytest.raises(LockRefused, match="locked by Child"):
            store.check("parent-key", "environment")
        store.check("child-key", "environment")
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert child.returncode == 0


@pytest.mark.parametrize("shared", [True, False], ids=["one store", "one store per thread"])
def test_concurrent_locks_with_different_keys_have_one_winner(tmp_path, shared):
    n = 6
    stores = [LockStore(tmp_path)] * n if shared else [LockStore(tmp_path) for _ in range(n)]
    barrier = threading.Barrier(n)
    replies: list[dict] = [{}] * n

    def attempt(i: int) -> None:
        barrier.wait(timeout=10)
        replies[i] = stores[i].lock(f"key-{i}", environment=True, user=f"user{i}")

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    winners = [i for i, r in enumerate(replies) if r["success"]]
    assert len(winners) == 1
    (w,) = winners
    for i, reply in enumerate(replies):
        if i != w:
            assert reply["msg"].startswith("Error: RE Manager was locked with a different key")
    fresh = LockStore(tmp_path)
    fresh.check(f"key-{w}", "environment")
    assert fresh.info()["lock_info"]["user"] == f"user{w}"


def test_writers_wait_for_the_inter_process_flock(tmp_path):
    import fcntl

    store = LockStore(tmp_path)
    LockStore(tmp_path).lock("k1", environment=True, user="Other")
    other_lock = store.path.read_bytes()
    LockStore(tmp_path).unlock("k1")
    done = threading.Event()
    result: dict = {}

    def lock_k2() -> None:
        result.update(store.lock("k2", environment=True, user="Me"))
        done.set()

    with open(store.path.with_name(store.path.name + ".flock"), "a") as sidecar:
        fcntl.flock(sidecar, fcntl.LOCK_EX)  # as another process in the middle of a write
        threading.Thread(target=lock_k2).start()
        assert not done.wait(0.3), "lock() did not wait for the flock"
        tmp = store.path.with_name("other.tmp")
        tmp.write_bytes(other_lock)
        os.replace(tmp, store.path)  # the other process's write lands
        fcntl.flock(sidecar, fcntl.LOCK_UN)
    assert done.wait(10)
    assert not result["success"] and "locked by Other" in result["msg"]


def test_a_stuck_flock_gives_a_clear_failure(tmp_path, monkeypatch):
    import fcntl

    import qmagic.locks

    monkeypatch.setattr(qmagic.locks, "_FLOCK_TIMEOUT", 0.2)
    store = LockStore(tmp_path)
    with open(store.path.with_name(store.path.name + ".flock"), "a") as sidecar:
        fcntl.flock(sidecar, fcntl.LOCK_EX)
        reply = store.lock("k", environment=True, user="Me")
    assert not reply["success"] and "Another process has held" in reply["msg"]
    assert store.scopes() == {"environment": False, "queue": False}


def test_unchanged_file_costs_a_stat_but_racy_rewrites_are_seen(store):
    """info() always looks at the file (check() trusts the counter: see the tests below)."""
    store.lock("k", environment=True, note="AAAA", user="Alice")
    path, st = store.path, os.stat(store.path)
    assert store.info()["lock_info"]["note"] == "AAAA"

    def rewrite_in_place(old: str, new: str, mtime_ns: int) -> None:
        text = path.read_text().replace(old, new)
        with open(path, "r+") as f:  # same inode, same size
            f.write(text)
        os.utime(path, ns=(mtime_ns, mtime_ns))

    # modified within the last second: stat cannot tell, so the store reads again
    rewrite_in_place('"AAAA"', '"BBBB"', st.st_mtime_ns)
    after = os.stat(path)
    assert (after.st_mtime_ns, after.st_size, after.st_ino) == (st.st_mtime_ns, st.st_size, st.st_ino)
    assert store.info()["lock_info"]["note"] == "BBBB"
    # an old file whose stat is unchanged is served from the cache (a stat per info())
    old = time.time_ns() - 10 * 10**9
    os.utime(path, ns=(old, old))
    assert store.info()["lock_info"]["note"] == "BBBB"
    rewrite_in_place('"BBBB"', '"CCCC"', old)
    assert store.info()["lock_info"]["note"] == "BBBB"


# ---- the generation counter: checks without system calls ------------------------------------


def _sidecar(store: LockStore) -> Path:
    return store.path.with_name(store.path.name + ".flock")


def _counter(store: LockStore) -> int:
    raw = _sidecar(store).read_bytes()
    assert len(raw) >= 8, raw
    return int.from_bytes(raw[:8], "little")


class SyscallCounter:
    """Counts the file system calls the lock store can make (os.stat/open/fstat, open)."""

    NAMES = ("stat", "open", "fstat", "lstat")

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


def _write_by_hand(target: Path, source: Path) -> None:
    """Replace ``target`` with ``source``'s bytes the way a non-qmagic tool would (no bump)."""
    tmp = target.with_name("by-hand.tmp")
    tmp.write_bytes(source.read_bytes())
    os.replace(tmp, target)


def _eventually(condition, timeout: float = 10.0, what: str = "condition") -> float:
    """Poll ``condition()`` until true; return the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)
    return time.monotonic() - start


def _refused(store: LockStore, key: str | None = None, scope: str = "environment") -> bool:
    try:
        store.check(key, scope)
    except LockRefused:
        return True
    return False


@pytest.mark.parametrize("state", ["no lock file", "unlocked", "locked, right key", "damaged"])
def test_unchanged_lock_check_makes_no_system_call(tmp_path, monkeypatch, state):
    import qmagic.locks

    monkeypatch.setattr(qmagic.locks, "_RECHECK_SECONDS", 3600.0)
    store = LockStore(tmp_path)
    if state == "unlocked":
        store.lock("k", environment=True, user="A")
        store.unlock("k")
    elif state == "locked, right key":
        store.lock("k", environment=True, user="A")
    elif state == "damaged":
        store.path.write_text("{")
    key = "k" if state == "locked, right key" else None
    expect_refused = state == "damaged"
    assert _refused(store, key) is expect_refused  # the first check reads the file
    counter = SyscallCounter(monkeypatch)
    for _ in range(2000):
        assert _refused(store, key) is expect_refused
        assert store.snapshot()[0]["environment"] is (state in ("damaged", "locked, right key"))
    assert counter.calls == []


def test_every_write_bumps_the_counter_in_place_once(tmp_path, capsys):
    store = LockStore(tmp_path, "b", emergency_key="EK")
    store.check(None, "environment")  # a reader creates the sidecar with a random start
    inode, value = _sidecar(store).stat().st_ino, _counter(store)
    writes = [
        lambda: store.lock("k", environment=True, user="A"),
        lambda: store.lock("k", queue=True, user="A"),  # re-lock
        lambda: store.unlock("k"),
        lambda: store.lock("k", queue=True, user="A"),
        lambda: store.clear(),
        lambda: store.path.write_text("{"),  # by hand: no bump (the periodic stat sees it)
        lambda: store.unlock("EK"),  # the emergency reset of a damaged file
        lambda: store.lock("k", environment=True, user="A"),
        lambda: clear_lock_main(["--environment", "b", "--state-dir", str(tmp_path)]),
    ]
    expected = [1, 1, 1, 1, 1, 0, 1, 1, 1]
    for write, bumps in zip(writes, expected):
        write()
        assert _counter(store) == (value + bumps) % 2**64
        value = _counter(store)
    # refusals and no-ops write nothing and bump nothing
    store.lock("k", environment=True, user="A")
    value = _counter(store)
    assert not store.lock("other", environment=True, user="B")["success"]
    assert not store.unlock("wrong")["success"]
    assert _counter(store) == value
    assert _sidecar(store).stat().st_ino == inode  # never replaced
    capsys.readouterr()


def test_another_process_lock_is_seen_by_the_very_next_check(tmp_path, monkeypatch):
    import qmagic.locks

    # only the counter can reveal the change: the periodic stat is an hour away
    monkeypatch.setattr(qmagic.locks, "_RECHECK_SECONDS", 3600.0)
    store = LockStore(tmp_path)
    child = Child(tmp_path)
    try:
        for round_ in range(3):
            store.check(None, "environment")
            store.check(None, "environment")  # served from the cache
            reply = json.loads(child.ask(f"lock child-{round_}"))
            assert reply["success"], reply
            with pytest.raises(LockRefused, match="locked by Child"):
                store.check(None, "environment")
            assert store.snapshot() == ({"environment": True, "queue": False}, reply["lock_info_uid"])
            store.check(f"child-{round_}", "environment")
            assert json.loads(child.ask(f"unlock child-{round_}"))["success"]
            store.check(None, "environment")
        # the other way round: the child trusts its counter for an hour too
    finally:
        assert child.close() == 0
    child = Child(tmp_path, "3600")
    try:
        assert child.ask("check") == "allowed"
        assert child.ask("check") == "allowed"
        store.lock("parent", environment=True, user="Parent")
        assert child.ask("check").startswith("refused ")
        assert child.ask("check parent") == "allowed"
        assert clear_lock_main(["--state-dir", str(tmp_path)]) == 0  # the tool, as a writer
        assert child.ask("check") == "allowed"
    finally:
        assert child.close() == 0


def test_a_write_that_did_not_bump_is_seen_within_the_recheck_interval(tmp_path, monkeypatch):
    """A writer that died between replace and bump, a hand edit, or an older qmagic."""
    import qmagic.locks

    monkeypatch.setattr(qmagic.locks, "_RECHECK_SECONDS", 0.2)
    donor = LockStore(tmp_path / "donor")
    donor.lock("k", environment=True, user="Hand")
    locked = tmp_path / "locked.json"
    locked.write_bytes(donor.path.read_bytes())
    donor.unlock("k")
    unlocked = tmp_path / "unlocked.json"
    unlocked.write_bytes(donor.path.read_bytes())

    store = LockStore(tmp_path / "state")
    store.check(None, "environment")
    value = _counter(store)
    _write_by_hand(store.path, locked)
    took = _eventually(lambda: _refused(store), what="the hand-written lock")
    assert took < 5
    assert _counter(store) == value  # really nothing bumped
    _write_by_hand(store.path, unlocked)
    _eventually(lambda: not _refused(store), what="the hand-written unlock")
    # an error never reads as "unlocked"
    store.path.unlink()
    store.path.mkdir()
    _eventually(lambda: _refused(store), what="the unreadable lock file")
    with pytest.raises(LockRefused, match="cannot be read"):
        store.check(None, "queue")


def test_a_deleted_sidecar_is_mapped_again(tmp_path, monkeypatch):
    import qmagic.locks

    monkeypatch.setattr(qmagic.locks, "_RECHECK_SECONDS", 3600.0)
    reader, writer = LockStore(tmp_path), LockStore(tmp_path)
    reader.check(None, "environment")
    _sidecar(reader).unlink()  # e.g. someone cleaning the folder while kernels run
    assert writer.lock("k", environment=True, user="Writer")["success"]  # a new sidecar
    assert reader.info()["lock_info"]["user"] == "Writer"  # info() always looks at the files
    assert _refused(reader)
    counter = SyscallCounter(monkeypatch)
    assert _refused(reader)
    assert counter.calls == []  # back on the fast path...
    monkeypatch.undo()
    monkeypatch.setattr(qmagic.locks, "_RECHECK_SECONDS", 3600.0)
    assert writer.unlock("k")["success"]
    assert not _refused(reader)  # ...with the new sidecar's counter


def _hold_flock_on_empty_sidecar(store, stack, monkeypatch):
    import fcntl

    sidecar = stack.enter_context(open(_sidecar(store), "a"))  # an older qmagic's empty file
    fcntl.flock(sidecar, fcntl.LOCK_EX)  # a writer is busy: the reader cannot start the counter
    return lambda: fcntl.flock(sidecar, fcntl.LOCK_UN)


def _no_mmap(store, stack, monkeypatch):
    import qmagic.locks

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device (filesystem without mmap)")

    monkeypatch.setattr(qmagic.locks.mmap, "mmap", refuse)
    return lambda: None


def _sidecar_is_a_directory(store, stack, monkeypatch):
    _sidecar(store).mkdir()
    return lambda: None


@pytest.mark.parametrize("setup", [_hold_flock_on_empty_sidecar, _no_mmap, _sidecar_is_a_directory],
                         ids=["short sidecar", "no mmap", "sidecar is a directory"])
def test_without_a_usable_counter_every_check_looks_at_the_file(tmp_path, monkeypatch, setup):
    from contextlib import ExitStack

    import qmagic.locks

    monkeypatch.setattr(qmagic.locks, "_RECHECK_SECONDS", 3600.0)
    donor = LockStore(tmp_path / "donor")
    donor.lock("k", environment=True, user="Hand")
    store = LockStore(tmp_path / "state")
    with ExitStack() as stack:
        release = setup(store, stack, monkeypatch)
        store.check(None, "environment")
        _write_by_hand(store.path, donor.path)  # no bump: only a stat per check can see it
        with pytest.raises(LockRefused, match="locked by Hand"):
            store.check(None, "environment")
        store.path.unlink()
        store.check(None, "environment")
        release()
    if setup is _hold_flock_on_empty_sidecar:
        assert _sidecar(store).stat().st_size == 0  # nothing was written under a writer's flock
        assert store.lock("mine", queue=True, user="Me")["success"]  # the bump starts the counter
        assert len(_sidecar(store).read_bytes()) == 8


def test_snapshot_reads_scopes_and_uid_together(store):
    assert store.snapshot() == ({"environment": False, "queue": False}, store.info()["lock_info_uid"])
    reply = store.lock("k", queue=True, user="A")
    assert store.snapshot() == ({"environment": False, "queue": True}, reply["lock_info_uid"])
    assert store.scopes() == store.snapshot()[0] and store.info_uid == store.snapshot()[1]
    store.path.write_text("[]")
    scopes, uid = LockStore(store.state_dir).snapshot()
    assert scopes == {"environment": True, "queue": True}
    assert uid == store.info()["lock_info_uid"] != reply["lock_info_uid"]


def test_threads_checking_while_another_process_writes_never_see_a_stale_lock(tmp_path):
    store = LockStore(tmp_path)
    child = Child(tmp_path, "3600")
    stop = threading.Event()
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            while not stop.is_set():
                try:
                    store.check("child-key", "environment")
                except LockRefused as exc:  # only a damaged/foreign lock would refuse this key
                    errors.append(exc)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            assert json.loads(child.ask("lock child-key"))["success"]
            with pytest.raises(LockRefused):
                store.check(None, "environment")
            assert json.loads(child.ask("unlock child-key"))["success"]
            store.check(None, "environment")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert child.close() == 0
    assert errors == []


# ---- qmagic-clear-lock ---------------------------------------------------------------------


def test_clear_lock_cli_prints_and_removes_the_lock(tmp_path, capsys):
    running = LockStore(tmp_path, "lab")  # stands for a running kernel
    running.lock("secret-key-123", environment=True, note="Changing samples", user="Alice")
    record = json.loads(running.path.read_text())["key_hash"]
    assert clear_lock_main(["--environment", "lab", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Alice" in out and "Changing samples" in out and "environment: locked" in out
    assert "queue:       not locked" in out
    assert "secret-key-123" not in out and record["hash"] not in out and record["salt"] not in out
    running.check(None, "environment")  # noticed without restart

    assert clear_lock_main(["--environment", "lab", "--state-dir", str(tmp_path)]) == 0
    assert "Nothing to do: environment 'lab' is not locked" in capsys.readouterr().out


def test_clear_lock_cli_resets_a_damaged_file(tmp_path, capsys):
    store = LockStore(tmp_path)
    store.path.write_text("{broken")
    assert clear_lock_main(["--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "was damaged" in out and "now unlocked" in out
    store.check(None, "environment")


def test_clear_lock_cli_errors_and_defaults(tmp_path, capsys, monkeypatch):
    assert clear_lock_main(["--state-dir", str(tmp_path / "missing")]) == 0
    assert "does not exist" in capsys.readouterr().out
    assert not (tmp_path / "missing").exists()
    assert clear_lock_main(["--environment", "a/b", "--state-dir", str(tmp_path)]) == 1
    assert "Invalid environment name" in capsys.readouterr().err
    monkeypatch.setenv("QMAGIC_STATE_DIR", str(tmp_path))
    LockStore(tmp_path).lock("k", queue=True, user="Zed")
    assert clear_lock_main([]) == 0
    assert "Zed" in capsys.readouterr().out


def test_clear_lock_cli_as_a_separate_process(tmp_path):
    store = LockStore(tmp_path, "b1")
    store.lock("k", environment=True, queue=True, user="Alice")
    script = "import sys; from qmagic.locks import clear_lock_main; sys.exit(clear_lock_main())"
    done = subprocess.run([sys.executable, "-c", script, "--environment", "b1", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, env=_child_env(), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Removed the lock of environment 'b1'" in done.stdout
    store.check(None, "queue")
    done = subprocess.run([sys.executable, "-m", "qmagic.locks", "--help"], capture_output=True,
                          text=True, env=_child_env(), timeout=60, cwd=tmp_path)
    assert done.returncode == 0 and "qmagic-clear-lock" in done.stdout


# ---- per-user settings ---------------------------------------------------------------------


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
    keys: list[str] = []

    def first_use() -> None:
        barrier.wait(timeout=10)
        keys.append(get_default_lock_key())

    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(keys) == 4 and len(set(keys)) == 1


def test_default_state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QMAGIC_STATE_DIR", str(tmp_path / "s"))
    assert default_state_dir() == tmp_path / "s"
    monkeypatch.delenv("QMAGIC_STATE_DIR")
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "jd"))
    assert default_state_dir() == tmp_path / "jd" / "qmagic"
