"""Importing the JSON-lines journal of qmagic 0.1 into the SQLite experiment log, once.

The earlier journal was ``<env>.journal.jsonl`` plus rotated ``<env>.journal.<N>.jsonl``
(higher N newer), one line per event::

    {"v": 1, "event": "queued"|"start"|"end"|"carry", "time": <epoch>,
     "writer": {"host", "pid", "boot", "start", "session"}, "task": {<record>}}

The latest line of each task wins.  Its orphan rule is kept: a task whose latest line is
not "end" and whose writer is gone (same host and the pid dead, a zombie, reused by another
process, or the machine rebooted since) is failed with
:data:`~qmagic.store.records.ORPHAN_REASON`, ended when its writer was last seen.  Tasks of
writers that may still run (another host, or alive) are imported as they are, under a
session ``legacy-<writer session>`` whose host, pid and start are kept: the periodic scan
for dead sessions checks those with the same rule.  After the import (one transaction) the
files are renamed to ``*.imported``.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import socket
import sqlite3
from pathlib import Path
from typing import Any

import orjson

from ..errors import StateFileError
from .database import (
    mark_orphans,
    rows_from_lines,
    transaction,
    upsert_session,
    write_rows,
)
from .files import read_state_file
from .records import FINAL_STATUSES, RANKS, RecordEncoder

__all__ = ["import_legacy", "legacy_files", "legacy_writer_alive"]

_log = logging.getLogger(__name__)
_MAX_FILE = 1 << 30


def legacy_files(state_dir: Path, env: str) -> list[Path]:
    """The earlier journal's files, oldest first."""
    pattern = re.compile(re.escape(env) + r"\.journal\.(\d+)\.jsonl")
    try:
        names = os.listdir(state_dir)
    except OSError:
        return []
    found = sorted((int(m.group(1)), state_dir / n) for n in names if (m := pattern.fullmatch(n)))
    files = [p for _, p in found]
    active = state_dir / f"{env}.journal.jsonl"
    return files + [active] if active.name in names else files


@functools.lru_cache(maxsize=1)
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def legacy_writer_alive(writer: Any) -> bool | None:
    """Is the process that wrote a legacy line still running?  None when it cannot be told
    (another host, no pid, not Linux)."""
    if not isinstance(writer, dict) or writer.get("host") != socket.gethostname():
        return None
    if writer.get("boot") and _boot_id() and writer["boot"] != _boot_id():
        return False
    pid = writer.get("pid")
    if type(pid) is not int or pid <= 0 or os.name != "posix":
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        state, start = fields[0].decode(), int(fields[19])
    except FileNotFoundError:
        return False
    except (OSError, IndexError, ValueError):
        return None
    return not (state in ("Z", "X") or (writer.get("start") is not None and start != writer["start"]))


def _parse(raw: bytes, encoder: RecordEncoder) -> dict[str, Any] | None:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:  # the json module accepts lone surrogate escapes (\\udcxx) that orjson refuses
            obj = json.loads(raw)
        except ValueError:
            return None
        if isinstance(obj, dict) and isinstance(obj.get("task"), dict):
            obj["task"] = encoder.clean(obj["task"])
    if not isinstance(obj, dict) or obj.get("event") not in ("queued", "start", "end"):
        return None
    task = obj.get("task")
    if not isinstance(task, dict) or not isinstance(task.get("uid"), str) or task.get("status") not in RANKS:
        return None
    return obj


def import_legacy(conn: sqlite3.Connection, state_dir: Path, env: str, now: float) -> int:
    """Import the earlier journal's files (if any) into the database, then rename them to
    ``*.imported``; return how many tasks were imported.  Raises sqlite3.Error or OSError
    (nothing renamed then: the next open tries again)."""
    files = legacy_files(state_dir, env)
    if not files:
        return 0
    encoder = RecordEncoder()
    latest: dict[str, dict[str, Any]] = {}
    last_seen: dict[str, float] = {}
    ids: list[list[Any]] = []  # (which files these are: another process may import them too)
    for path in files:
        try:
            st = os.stat(path, follow_symlinks=False)
            data = read_state_file(path, _MAX_FILE - 1)  # (at most _MAX_FILE bytes)
        except FileNotFoundError:
            continue  # (renamed by another process that imported it)
        except StateFileError as exc:
            _log.warning("qmagic: skipped the old journal file %s: %s", path, exc)
            continue
        if data is None:
            continue
        ids.append([path.name, st.st_ino, st.st_size, st.st_mtime_ns])
        for raw in data.splitlines():
            obj = _parse(raw, encoder) if raw.strip() else None
            if obj is None:
                continue
            latest[obj["task"]["uid"]] = obj
            writer = obj.get("writer") if isinstance(obj.get("writer"), dict) else {}
            t = obj.get("time")
            if isinstance(writer.get("session"), str) and isinstance(t, (int, float)):
                last_seen[writer["session"]] = max(t, last_seen.get(writer["session"], t))
    by_session: dict[str, list[bytes]] = {}
    writers: dict[str, dict[str, Any]] = {}
    for obj in latest.values():
        writer = obj.get("writer") if isinstance(obj.get("writer"), dict) else {}
        session = f"legacy-{writer.get('session') if isinstance(writer.get('session'), str) else 'unknown'}"
        writers.setdefault(session, writer)
        task = obj["task"]
        if obj["event"] != "end" and task["status"] in FINAL_STATUSES:
            task["status"] = "running"  # (an old "start" line never carries a final status)
        line = orjson.dumps([RANKS[task["status"]], task["uid"], task])
        by_session.setdefault(session, []).append(memoryview(line).tobytes())  # (see Spool.put_slow)
    with transaction(conn):
        # Kernels opening the log at once all read the files before the first renames them:
        # the first to write imports them, the others find them in its note and only rename.
        done = conn.execute("SELECT value FROM meta WHERE key = 'legacy_import'").fetchone()
        try:
            known = (orjson.loads(done[0]).get("ids") or []) if done else []
        except (orjson.JSONDecodeError, AttributeError):
            known = []
        imported = not all(i in known for i in ids)
        for session, lines in by_session.items() if imported else ():
            rows: dict[str, tuple] = {}
            rows_from_lines(b"\n".join(lines), session, now, rows, [])
            write_rows(conn, rows.values())
            writer = writers[session]
            seen = last_seen.get(session[len("legacy-"):])
            alive = legacy_writer_alive(writer)
            upsert_session(conn, session, host=writer.get("host"), pid=writer.get("pid"),
                           last_seen=seen, state="dead" if alive is False else "legacy",
                           info={"legacy": True, "boot": writer.get("boot"), "start": writer.get("start")})
            if alive is False:
                mark_orphans(conn, session, seen)
        if imported:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('legacy_import', ?)",
                         (orjson.dumps({"time": now, "files": [p.name for p in files],
                                        "tasks": len(latest), "ids": ids}).decode(),))
    for path in files:
        target = path.with_name(path.name + ".imported")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.imported.{n}")
        try:
            os.rename(path, target)
        except FileNotFoundError:  # renamed by another process that imported it too
            pass
    if not imported:
        return 0
    _log.info("qmagic: imported %d tasks of the earlier journal (%s)", len(latest),
              ", ".join(p.name for p in files))
    return len(latest)


def check_legacy_sessions(conn: sqlite3.Connection) -> int:
    """Mark the unfinished tasks of imported writers that are gone as failed; return how
    many tasks.  (Inside the caller's transaction.)"""
    count = 0
    rows = conn.execute("SELECT session, host, pid, last_seen, info FROM sessions WHERE state = 'legacy'").fetchall()
    for session, host, pid, seen, info in rows:
        try:
            extra = orjson.loads(info) if info else {}
        except orjson.JSONDecodeError:
            extra = {}
        writer = {"host": host, "pid": pid, "boot": extra.get("boot"), "start": extra.get("start")}
        if legacy_writer_alive(writer) is False:
            count += mark_orphans(conn, session, seen)
            conn.execute("UPDATE sessions SET state = 'dead' WHERE session = ?", (session,))
    return count
