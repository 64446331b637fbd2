"""The task journal: a persistent, append-only experiment log of every task.

One environment's journal is ``<state_dir>/<environment>.journal.jsonl`` plus rotated
segments ``<environment>.journal.<N>.jsonl`` (higher N is newer).  Each line is one JSON
object, written with a single ``os.write`` on an ``O_APPEND`` descriptor while holding an
exclusive ``flock`` on ``<environment>.journal.lock``::

    {"v": 1, "event": "queued"|"start"|"end", "time": <epoch s>,
     "writer": {"host", "pid", "boot", "start", "session"}, "task": {<record>}}

* Values that JSON cannot encode (or that are too large) are replaced by a summary dict
  ``{"__qmagic_summary__": "repr"|"json", "type", "repr", "truncated", "length", ...}``;
  over-long text fields (traceback, error) keep their head and tail around a marker.
* Reading folds the lines by task uid (the latest line wins).  A task whose latest line is
  not "end" and whose writing process is gone (same host; pid dead, a zombie, or reused by
  another process; or the machine rebooted) reads as ``failed`` with
  :data:`ORPHAN_REASON`; :meth:`Journal.mark_orphans` makes that permanent.
* Retention: the active file is rotated when it exceeds ``segment_bytes`` (default
  ``max_bytes // 4``); an old segment is deleted only when every record in it is outside
  the window (last written more than ``max_age_s`` ago, or at least ``max_bytes`` of newer
  journal exist).  Rotation starts the new active file with a ``"carry"`` header line and
  a copy of the latest line of every unfinished task, so a running task's record is never
  deleted (and mark_orphans finds every unfinished task in the active file).
* Readers never block writers: they read what is new since their last read (an index
  uid -> latest line) and re-read under a shared ``flock`` only if a rotation raced them.
* A line that is not valid JSON (a torn write after power loss) is skipped with a
  :class:`JournalWarning` naming the file and line number; writers start a new line first.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import logging
import os
import re
import reprlib
import socket
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: only the thread lock serialises writes
    fcntl = None  # type: ignore[assignment]
try:  # optional: encodes a task record ~10x faster than the json module
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

from .errors import StateFileError
from .store.paths import default_state_dir, validate_environment_name

__all__ = ["EVENTS", "ORPHAN_REASON", "SUMMARY_KEY", "Journal", "JournalWarning",
           "default_state_dir", "history", "history_dataframe", "history_main", "parse_time"]

EVENTS = ("queued", "start", "end")
#: ``error``/``msg`` of a task whose kernel died before the task ended.
ORPHAN_REASON = "kernel stopped while the task was running"
#: Key that marks a value the journal replaced by a summary.
SUMMARY_KEY = "__qmagic_summary__"
_WALK_ITEMS = 100  # containers up to this size are summarised item by item
_TEXT_FIELDS = frozenset({"error", "traceback", "msg", "result_repr"})
_FLOCK_TIMEOUT = 5.0
_log = logging.getLogger(__name__)
_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
_forks = [0]  # bumped in forked children: their inherited descriptors must not be used
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class JournalWarning(UserWarning):
    """A journal line was skipped, or the journal could not be written."""


# ---- process identity -------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks after boot) of a Linux process, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


@functools.lru_cache(maxsize=1)
def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _writer_alive(writer: Any) -> bool | None:
    """Is the process that wrote a line still running?  None when it cannot be told."""
    if not isinstance(writer, dict) or writer.get("host") != socket.gethostname():
        return None
    if writer.get("boot") and _boot_id() and writer["boot"] != _boot_id():
        return False  # the machine was restarted since
    pid = writer.get("pid")
    if not isinstance(pid, int) or pid <= 0 or os.name != "posix":
        return None  # (on Windows os.kill would terminate the process)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return None
    stat = _proc_stat(pid)
    if stat is not None and (stat[0] in ("Z", "X") or
                             (writer.get("start") is not None and stat[1] != writer["start"])):
        return False  # a zombie, or the pid now belongs to another process
    return True


# ---- JSON safety ------------------------------------------------------------------------
def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


class _Sanitizer:
    """Turns a task record into strict JSON, summarising what cannot (or should not) go in."""

    def __init__(self, summary_chars: int, max_value_chars: int, max_text_chars: int) -> None:
        self.summary_chars, self.max_value_chars = summary_chars, max_value_chars
        self.max_text_chars = max_text_chars
        self._fast_limit = min(max_value_chars, max_text_chars)
        self._reprlib = reprlib.Repr()
        self._reprlib.maxstring = self._reprlib.maxother = summary_chars
        self._reprlib.maxlist = self._reprlib.maxtuple = self._reprlib.maxdict = 50
        self._reprlib.maxset = self._reprlib.maxfrozenset = 50

    def task_json(self, record: Mapping[str, Any]) -> str:
        """The record as one line of strict JSON (no NaN), values made safe where needed."""
        if _orjson is not None:
            try:  # orjson writes NaN as null and datetimes as text: accept only exact round trips
                data = _orjson.dumps(record)
                if len(data) <= self._fast_limit and _orjson.loads(data) == record:
                    return data.decode()
            except Exception:  # noqa: BLE001 - anything odd takes the careful path below
                pass
        try:  # the whole record is plain JSON and small
            text = _dumps(record)
            if len(text) <= self._fast_limit:
                return text
        except (TypeError, ValueError, RecursionError):
            pass
        return _dumps({str(k): (self.text(v) if k in _TEXT_FIELDS and isinstance(v, str)
                                else self.value(v)) for k, v in record.items()})

    def text(self, s: str) -> str:
        """``s``, or its head and tail around a marker when longer than max_text_chars."""
        if len(s) <= self.max_text_chars:
            return s
        head = self.max_text_chars // 4
        tail = self.max_text_chars - head
        return (f"{s[:head]}\n... [qmagic journal: {len(s) - head - tail} characters "
                f"omitted] ...\n{s[-tail:]}")

    def value(self, v: Any, outer: tuple[int, ...] = ()) -> Any:
        """``v`` if it is small strict JSON, else its items made safe (small containers, not
        too deep, no cycles), else a summary.  ``outer``: ids of the enclosing containers."""
        try:
            text = _dumps(v)
        except (TypeError, ValueError, RecursionError):
            text = None
        if text is not None:
            return v if len(text) <= self.max_value_chars else self.summary(v, "json", text)
        if (len(outer) < 3 and id(v) not in outer and isinstance(v, (list, tuple, dict))
                and len(v) <= _WALK_ITEMS):
            inner = (*outer, id(v))
            if isinstance(v, dict):
                out: Any = {(k if isinstance(k, str) else repr(k)): self.value(x, inner)
                            for k, x in v.items()}
            else:
                out = [self.value(x, inner) for x in v]
            if len(_dumps(out)) <= self.max_value_chars:
                return out
        return self.summary(v, "repr")

    def summary(self, v: Any, kind: str, text: str | None = None) -> dict[str, Any]:
        """The marker dict standing for ``v``: kind "json" (too large) or "repr" (not JSON)."""
        items = len(v) if isinstance(v, (list, tuple, dict, set, frozenset)) else None
        big = text is None and items is not None and items > _WALK_ITEMS
        if text is None:
            try:  # reprlib keeps the repr of a huge container short (and fast)
                text = self._reprlib.repr(v) if big else repr(v)
            except Exception as exc:  # noqa: BLE001 - a broken __repr__ must not lose the record
                text = f"<{_type_name(v)} object; repr() failed: {exc!r}>"
        out = {SUMMARY_KEY: kind, "type": _type_name(v), "repr": text[: self.summary_chars],
               "truncated": big or len(text) > self.summary_chars, "length": len(text)}
        if items is not None:
            out["items"] = items
        if big:  # reprlib cut it short: the full length is unknown
            out["length"] = None
        try:
            shape, dtype = getattr(v, "shape", None), getattr(v, "dtype", None)
            if isinstance(shape, tuple) and all(isinstance(n, int) for n in shape):
                out["shape"] = list(shape)
            if dtype is not None:
                out["dtype"] = str(dtype)
        except Exception:  # noqa: BLE001
            pass
        return out


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


class _FileState:
    """How far one journal file (known by device and inode) has been read."""

    __slots__ = ("name", "offset", "lineno", "tail")

    def __init__(self, name: str) -> None:
        self.name, self.offset, self.lineno, self.tail = name, 0, 0, False


class Journal:
    """The append-only task journal of one environment (see the module docstring).

    Thread-safe, and safe to share between processes (kernels) on one machine.  Nothing is
    created on disk before the first :meth:`append` / :meth:`mark_orphans`; reads create
    nothing.  Reads raise :class:`~qmagic.errors.StateFileError` if the files are unreadable.

    ``max_bytes``: journal size (all files) that retention keeps at least; ``max_age_s``:
    segments last written longer ago are deleted; ``segment_bytes``: rotate the active file
    beyond this (default ``max_bytes // 4``); ``summary_chars``: length of the ``repr`` kept
    for a value that is not JSON; ``max_value_chars``: a JSON value longer than this is
    summarised; ``max_text_chars``: longer tracebacks/errors keep their head and tail;
    ``fsync``: fsync after every line (survives power loss; costs a disk flush per line).
    """

    def __init__(self, state_dir: str | os.PathLike[str], environment_name: str = "default", *,
                 max_bytes: int = 50_000_000, max_age_s: float = 30 * 86400,
                 summary_chars: int = 2000, fsync: bool = False, segment_bytes: int | None = None,
                 max_value_chars: int = 100_000, max_text_chars: int = 20_000) -> None:
        self.environment_name = validate_environment_name(environment_name)
        for label, limit in (("max_bytes", max_bytes), ("max_age_s", max_age_s),
                             ("summary_chars", summary_chars), ("max_value_chars", max_value_chars),
                             ("max_text_chars", max_text_chars), ("segment_bytes", segment_bytes)):
            if limit is not None and not limit > 0:
                raise ValueError(f"Journal {label} must be positive (got {limit!r}).")
        self.state_dir = Path(state_dir).expanduser()
        #: The active journal file.
        self.path = self.state_dir / f"{environment_name}.journal.jsonl"
        self._path_str = str(self.path)
        self.max_bytes, self.max_age_s, self.fsync = int(max_bytes), float(max_age_s), bool(fsync)
        self.segment_bytes = int(segment_bytes or max(1, self.max_bytes // 4))
        #: Identifies this Journal instance in the lines it writes.
        self.session = uuid.uuid4().hex
        self._lock_path = self.state_dir / f"{environment_name}.journal.lock"
        self._segment_re = re.compile(re.escape(environment_name) + r"\.journal\.(\d+)\.jsonl")
        self._sanitizer = _Sanitizer(summary_chars, max_value_chars, max_text_chars)
        self._write_lock, self._index_lock = threading.Lock(), threading.Lock()
        self._forks = _forks[0]  # the process that opened the descriptors below
        self._writer_text = ""  # JSON of this process's identity
        self._fd: int | None = None  # active file, O_APPEND
        self._fd_key: tuple[int, int] | None = None
        self._my_end: int | None = None  # file size after our last write
        self._carried = 0  # bytes copied into the active file when it was rotated in
        self._lock_fds: dict[bool, int | None] = {True: None, False: None}  # exclusive / shared
        self._retention_done = False
        self._errors, self._last_error = 0, None
        self._index: dict[str, tuple[str, bytes]] = {}  # uid -> (event, latest line)
        self._last_seen: dict[str, float] = {}  # writer session -> time of its latest line
        self._files: dict[tuple[int, int], _FileState] = {}
        self._signature: Any = None
        self._warned: set[tuple[Any, ...]] = set()

    def __repr__(self) -> str:
        return f"Journal({str(self.state_dir)!r}, {self.environment_name!r})"

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def errors(self) -> int:
        """How many appends failed (each failure is logged; the first also warns)."""
        return self._errors

    @property
    def last_error(self) -> str | None:
        """Text of the latest append failure, or None."""
        return self._last_error

    # ---- writing ------------------------------------------------------------------------
    def append(self, event: str, record: Mapping[str, Any]) -> None:
        """Append one line for a task: ``event`` is "queued", "start" or "end", ``record`` the
        task's dict (``uid`` required).  The line is on disk (page cache; fsync'ed too with
        ``fsync=True``) when this returns.  I/O trouble never raises: it is counted in
        :attr:`errors`, logged, and the first failure warns."""
        if event not in EVENTS:
            raise ValueError(f"Journal event must be one of {EVENTS}, not {event!r}.")
        if not isinstance(record, (dict, Mapping)) or not isinstance(record.get("uid"), str):
            raise ValueError("A journal record must be a mapping with a string 'uid'.")
        task_json = self._sanitizer.task_json(record)
        with self._write_lock:
            try:
                locked = self._acquire(exclusive=True)
                try:
                    self._write_locked(self._line(event, task_json), locked)
                finally:
                    if locked:
                        fcntl.flock(self._lock_fds[True], fcntl.LOCK_UN)
            except Exception as exc:  # noqa: BLE001 - the journal must never break a task
                self._failed(exc)

    def mark_orphans(self) -> int:
        """Append an "end" line (status failed, :data:`ORPHAN_REASON`) for every unfinished task
        whose writing process is gone; return how many.  Call once when a worker starts."""
        with self._write_lock:
            try:
                with self._flock(exclusive=True) as locked:
                    if not self.path.exists():
                        return 0
                    # Rotation carries unfinished tasks forward: the active file has them all.
                    latest, last_seen = self._fold(self.path)
                    lines: list[bytes] = []
                    alive: dict[Any, bool | None] = {}
                    for event, raw in latest.values():
                        rec = self._materialize(event, raw, alive, last_seen) if event != "end" else None
                        if rec is not None and rec["journal"].get("orphaned"):
                            rec.pop("journal")
                            lines.append(self._line("end", self._sanitizer.task_json(rec)))
                    if lines:
                        self._write_locked(b"".join(lines), locked)
                    return len(lines)
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)
                return 0

    def close(self) -> None:
        """Close the journal's files (a later call reopens them)."""
        with self._write_lock:
            self._close_active()
            self._close_lock_fd(True)
        with self._index_lock:
            self._close_lock_fd(False)

    def _line(self, event: str, task_json: str) -> bytes:
        if not self._writer_text:  # first use, or in a forked child
            pid = os.getpid()
            stat = _proc_stat(pid)
            self._writer_text = _dumps({"host": socket.gethostname(), "pid": pid,
                                        "boot": _boot_id(), "start": stat[1] if stat else None,
                                        "session": self.session})
        text = (f'{{"v":1,"event":"{event}","time":{time.time()!r},'
                f'"writer":{self._writer_text},"task":{task_json}}}\n')
        return text.encode("utf-8", "backslashreplace")  # lone surrogates become \\udcxx

    def _write_locked(self, data: bytes, locked: bool) -> None:
        fd, size = self._active_fd()
        rotate = size > self._carried and size + len(data) - self._carried > self.segment_bytes
        if locked and (rotate or not self._retention_done):
            self._retention_done = True
            try:
                self._rotate() if rotate else self._apply_retention()
            except OSError as exc:  # keep writing to the file we have
                _log.warning("qmagic journal rotation/retention in %s failed: %s", self.state_dir, exc)
            fd, size = self._active_fd()
        if size > 0 and size != self._my_end and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # the file ends in a torn line: do not glue onto it
        written = os.write(fd, data)
        self._my_end = size + written
        if written != len(data):
            raise OSError(f"short write to {self.path} ({written} of {len(data)} bytes)")
        if self.fsync:
            (getattr(os, "fdatasync", None) or os.fsync)(fd)

    def _active_fd(self) -> tuple[int, int]:
        """Descriptor and size of the active file (reopened if another process rotated it)."""
        if self._fd is not None:
            try:
                st = os.stat(self._path_str)
                if (st.st_dev, st.st_ino) == self._fd_key:
                    return self._fd, st.st_size
            except FileNotFoundError:
                pass
            self._close_active()  # another process rotated (or someone removed) the file
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        st = os.fstat(fd)
        self._fd, self._fd_key, self._my_end, self._carried = fd, (st.st_dev, st.st_ino), None, 0
        head = os.pread(fd, 1024, 0).split(b"\n", 1)[0]
        if head.startswith(b'{"v":1,"event":"carry"'):  # made by _rotate
            try:
                self._carried = int(json.loads(head)["carried"])
            except (ValueError, KeyError, TypeError):
                pass
        return fd, st.st_size

    def _rotate(self) -> None:
        """Active file -> next segment.  The new active file starts with a "carry" line and a
        copy of the latest line of every unfinished task (the carried bytes do not count
        towards segment_bytes).  Caller holds the exclusive flock."""
        latest, _ = self._fold(self.path)
        carry = b"".join(raw + b"\n" for event, raw in latest.values() if event != "end")
        segment = self._segment_path(max((n for n, _ in self._segments()), default=0) + 1)
        header = (f'{{"v":1,"event":"carry","time":{time.time()!r},"writer":{self._writer_text},'
                  f'"carried":{len(carry)},"previous":{_dumps(segment.name)}}}\n').encode()
        tmp = self.state_dir / f".{self.environment_name}.journal.{self.session}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, header + carry)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self.path, segment)
        os.rename(tmp, self.path)
        self._apply_retention()

    def _apply_retention(self) -> None:
        """Delete the oldest segments whose records are all outside the window."""
        try:
            newer = os.stat(self.path).st_size
        except FileNotFoundError:
            newer = 0
        segments = [(path, os.stat(path)) for _, path in self._segments()]
        newer += sum(st.st_size for _, st in segments)
        cutoff = time.time() - self.max_age_s
        for path, st in segments:  # oldest first
            newer -= st.st_size
            if st.st_mtime >= cutoff and newer < self.max_bytes:
                break
            os.unlink(path)

    def _failed(self, exc: BaseException) -> None:
        self._errors += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._close_active()
        if self._errors == 1:
            msg = (f"qmagic could not write the task journal {self.path} ({self._last_error}). "
                   "Tasks still run but are not recorded: check that the folder is writable and "
                   "the disk is not full (QMagic.state_dir, QMagic.journal_enabled).")
            _log.error(msg, exc_info=not isinstance(exc, OSError))
            warnings.warn(msg, JournalWarning, stacklevel=3)
        else:
            _log.debug("journal append failed again: %s", self._last_error)

    def _close_active(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _close_lock_fd(self, exclusive: bool) -> None:
        fd, self._lock_fds[exclusive] = self._lock_fds[exclusive], None
        if fd is not None:
            os.close(fd)

    @contextmanager
    def _flock(self, exclusive: bool) -> Iterator[bool]:
        """Hold the inter-process lock (exclusive for writers, shared for consistent reads).
        Yields False if it could not be had (no fcntl, unwritable folder, or a timeout)."""
        locked = self._acquire(exclusive)
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(self._lock_fds[exclusive], fcntl.LOCK_UN)

    def _acquire(self, exclusive: bool) -> bool:
        """Take the inter-process lock; False if it cannot be had (see :meth:`_flock`)."""
        if self._forks != _forks[0]:  # a forked child: flock is per open file description
            self._forks, self._writer_text = _forks[0], ""
            for fd in (self._fd, *self._lock_fds.values()):
                if fd is not None:
                    os.close(fd)
            self._fd, self._lock_fds = None, {True: None, False: None}
        if fcntl is None:  # pragma: no cover
            return False
        fd = self._lock_fds[exclusive]
        if fd is None:
            try:  # readers create nothing: no lock file means no writer yet
                if exclusive:
                    os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
                    fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                else:
                    fd = os.open(self._lock_path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
            self._lock_fds[exclusive] = fd
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
        deadline, delay = None, 0.0005
        while True:
            try:
                fcntl.flock(fd, op)
                return True
            except BlockingIOError:
                deadline = deadline or time.monotonic() + _FLOCK_TIMEOUT
                if time.monotonic() > deadline:
                    _log.warning("%s held by another process for over %.0f s; going on without it",
                                 self._lock_path, _FLOCK_TIMEOUT)
                    return False
                time.sleep(delay)
                delay = min(2 * delay, 0.05)
            except OSError:  # e.g. ENOLCK on a network file system
                return False

    # ---- reading ------------------------------------------------------------------------
    def _segment_path(self, number: int) -> Path:
        return self.state_dir / f"{self.environment_name}.journal.{number}.jsonl"

    def _segments(self) -> list[tuple[int, Path]]:
        try:
            names = os.listdir(self.state_dir)
        except FileNotFoundError:
            return []
        found = ((self._segment_re.fullmatch(name), name) for name in names)
        return sorted((int(m.group(1)), self.state_dir / name) for m, name in found if m)

    def _lines(self, f: Any, key: Any, state: _FileState, final: bool) -> Iterator[tuple[str, str, bytes, dict]]:
        """(uid, event, raw line, parsed) for each complete line of ``f`` after state.offset;
        advances ``state`` (``state.tail``: an unterminated last line not yet reported).
        ``final``: no writer can be mid-write, so report an unterminated last line."""
        f.seek(state.offset)
        data = f.read()
        end = data.rfind(b"\n") + 1
        for raw in data[:end].split(b"\n")[:-1]:
            state.lineno += 1
            try:
                obj = json.loads(raw)
                if obj.get("event") == "carry":  # the header of a rotated file
                    continue
                task = obj["task"]
                uid, event = task["uid"], obj["event"]
                if not isinstance(uid, str) or event not in EVENTS or not isinstance(task, dict):
                    raise ValueError
            except (ValueError, TypeError, KeyError, AttributeError):
                if raw.strip():
                    self._warn_line(key, state, state.lineno, "is not a valid journal record")
                continue
            yield uid, event, raw, obj
        state.offset += end
        tail = data[end:]
        if tail and final:
            self._warn_line(key, state, state.lineno + 1, "is incomplete (a torn write)")
            if state.name != str(self.path):  # segments never grow: step over the tail
                state.offset += len(tail)
        state.tail = bool(tail) and (key, state.lineno + 1) not in self._warned

    def _warn_line(self, key: Any, state: _FileState, lineno: int, what: str) -> None:
        if (key, lineno) not in self._warned:
            self._warned.add((key, lineno))
            warnings.warn(f"qmagic journal {state.name}, line {lineno} {what}: skipped.",
                          JournalWarning, stacklevel=4)

    def _fold(self, path: Path) -> tuple[dict[str, tuple[str, bytes]], dict[str, float]]:
        """Latest (event, line) per uid and last-seen time per writer session of one file."""
        latest: dict[str, tuple[str, bytes]] = {}
        seen: dict[str, float] = {}
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            for uid, event, raw, obj in self._lines(f, (st.st_dev, st.st_ino), _FileState(str(path)), True):
                latest[uid] = (event, raw)
                self._see(seen, obj)
        return latest, seen

    @staticmethod
    def _see(seen: dict[str, float], obj: dict) -> None:
        writer, t = obj.get("writer"), _num(obj.get("time"))
        if isinstance(writer, dict) and isinstance(writer.get("session"), str) and t is not None:
            seen[writer["session"]] = max(t, seen.get(writer["session"], t))

    def _refresh(self) -> None:
        """Bring the index up to date with the files (caller holds the index lock)."""
        try:
            st = os.stat(self.path)
            signature: Any = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            signature = None
        except OSError as exc:
            raise self._read_error(exc) from exc
        if signature is not None and signature == self._signature:
            return
        try:
            result = self._scan(final=False)  # optimistic: no lock
            if result != "ok":  # again, with writers held off (from scratch after a race)
                with self._flock(exclusive=False):
                    for _ in range(2):
                        if result == "race":
                            self._index, self._last_seen, self._files = {}, {}, {}
                        result = self._scan(final=True)
                        if result != "race":
                            break
        except OSError as exc:
            raise self._read_error(exc) from exc

    def _scan(self, final: bool) -> str:
        """Read what is new in every file, oldest first.  "race" if the files changed under us
        (another process rotated), "tail" if a file ends in an unfinished line, else "ok"."""
        files = [p for _, p in self._segments()] + [self.path]
        stats = []
        for path in files:
            try:
                stats.append((path, os.stat(path)))
            except FileNotFoundError:
                if path == self.path:
                    stats.append((path, None))
        keys = {(st.st_dev, st.st_ino) for _, st in stats if st is not None}
        if any(key not in keys for key in self._files):
            return "race"  # a file was deleted (or replaced)
        result = "ok"
        for path, st in stats:
            if st is None:
                continue
            key = (st.st_dev, st.st_ino)
            state = self._files.get(key)
            if state is None:
                state = self._files[key] = _FileState(str(path))
            elif state.name != str(path) and state.name != str(self.path):
                return "race"  # only the active file is ever renamed
            state.name = str(path)
            if st.st_size < state.offset:
                return "race"
            if st.st_size == state.offset:
                continue
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                return "race"  # deleted by a rotation since we listed it
            with f:
                fst = os.fstat(f.fileno())
                if (fst.st_dev, fst.st_ino) != key:
                    return "race"
                for uid, event, raw, obj in self._lines(f, key, state, final):
                    self._index[uid] = (event, raw)
                    self._see(self._last_seen, obj)
            if state.tail:
                result = "tail"
        try:
            now = os.stat(self.path)
            now_sig: Any = (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns)
        except FileNotFoundError:
            now_sig = None
        active = stats[-1][1] if stats and stats[-1][0] == self.path else None
        if (now_sig and now_sig[:2]) != (active and (active.st_dev, active.st_ino)):
            return "race"
        self._signature = (active.st_dev, active.st_ino, active.st_size, active.st_mtime_ns) if active else None
        return result

    def _read_error(self, exc: OSError) -> StateFileError:
        return StateFileError(f"Cannot read the task journal in {self.state_dir} ({exc}). "
                              "Check the folder's permissions (QMagic.state_dir).")

    def _materialize(self, event: str, raw: bytes, alive: dict[Any, bool | None],
                     last_seen: Mapping[str, float]) -> dict[str, Any]:
        """The task dict of a latest line, with a "journal" entry, orphans turned failed."""
        obj = json.loads(raw)
        task = dict(obj["task"])
        writer = obj.get("writer") if isinstance(obj.get("writer"), dict) else {}
        meta: dict[str, Any] = {"event": event, "time": _num(obj.get("time")), "writer": writer}
        if event != "end":
            who = tuple(writer.get(k) for k in ("host", "pid", "boot", "start"))
            if who not in alive:
                alive[who] = _writer_alive(writer)
            if alive[who] is False:
                task.update(status="failed", error=ORPHAN_REASON, msg=ORPHAN_REASON,
                            finished_at=last_seen.get(writer.get("session"), meta["time"]))
                meta["orphaned"] = True
        task["journal"] = meta
        return task

    def load(self) -> None:
        """Read what is new in the files now.  get() and records() do this themselves; call it
        early (in a background thread) so that the first lookup after a restart is fast."""
        with self._index_lock:
            self._refresh()

    def get(self, uid: str) -> dict[str, Any] | None:
        """The latest record of task ``uid`` (exact uid), or None.  Costs one ``stat`` when the
        journal did not change since the last read.  Raises StateFileError if unreadable."""
        with self._index_lock:
            self._refresh()
            entry = self._index.get(uid)
            last_seen = dict(self._last_seen) if entry and entry[0] != "end" else {}
        return None if entry is None else self._materialize(entry[0], entry[1], {}, last_seen)

    def records(self, *, status: str | Iterable[str] | None = None, user: str | None = None,
                name: str | None = None, since: Any = None, until: Any = None,
                limit: int | None = None, uid: str | None = None) -> list[dict[str, Any]]:
        """Task records, newest first (by submission time), one per task.

        ``status``: one status or several; ``user``: exact; ``name``: exact or a glob
        (``"scan_*"``); ``uid``: a uid or its prefix; ``since``/``until``: anything
        :func:`parse_time` reads — a task matches if it was active at some time in
        [since, until]; ``limit``: at most this many (the newest).
        """
        since_t, until_t = parse_time(since), parse_time(until)
        statuses = {status} if isinstance(status, str) else set(status) if status is not None else None
        with self._index_lock:
            self._refresh()
            items = list(self._index.items())
            last_seen = dict(self._last_seen)
        out, alive, now = [], {}, time.time()
        for task_uid, (event, raw) in items:
            if uid is not None and not task_uid.startswith(uid):
                continue
            rec = self._materialize(event, raw, alive, last_seen)
            if (user is not None and rec.get("user") != user) or (
                    name is not None and not fnmatch.fnmatchcase(str(rec.get("name")), name)):
                continue
            if statuses is not None and rec.get("status") not in statuses:
                continue
            begin = _sort_time(rec)
            finish = _num(rec.get("finished_at")) or (now if rec["journal"]["event"] != "end" else begin)
            if (since_t is not None and finish < since_t) or (until_t is not None and begin > until_t):
                continue
            out.append(rec)
        out.sort(key=_sort_time, reverse=True)
        return out if limit is None else out[: max(0, int(limit))]


def _sort_time(rec: Mapping[str, Any]) -> float:
    for value in (rec.get("submitted_at"), rec.get("started_at"), rec["journal"]["time"]):
        if _num(value) is not None:
            return float(value)
    return 0.0


_RELATIVE = re.compile(r"-?\s*(\d+(?:\.\d*)?)\s*(s|sec|m|min|h|d|w)", re.IGNORECASE)
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(value: Any, now: float | None = None) -> float | None:
    """Epoch seconds from None, a number (epoch), a ``datetime`` (naive = local time), an ISO
    string (``2026-11-21``, ``2026-11-21T14:30``) or a relative time (``-30m``, ``-2h``,
    ``-7d``, ``-1w``, "now").  Raises ValueError with a hint for anything else."""
    if value is None or isinstance(value, bool):
        return None if value is None else _bad_time(value)
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        text = value.strip()
        now = time.time() if now is None else now
        if text.lower() == "now":
            return now
        match = _RELATIVE.fullmatch(text)
        if match:
            return now - float(match.group(1)) * _UNITS[match.group(2).lower()]
        try:
            return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return _bad_time(value)


def _bad_time(value: Any) -> float:
    raise ValueError(f"Cannot read the time {value!r}: use an ISO date or date-time such as "
                     "2026-11-21 or 2026-11-21T14:30, or a time ago such as -30m, -2h, -7d.")


def history(*, state_dir: str | os.PathLike[str] | None = None, environment_name: str = "default",
            **filters: Any) -> list[dict[str, Any]]:
    """Task records of an environment's journal, newest first.

    ``filters`` are those of :meth:`Journal.records`: ``status``, ``user``, ``name``,
    ``since``, ``until``, ``limit``, ``uid``.  ``state_dir`` defaults to
    :func:`default_state_dir`.
    """
    with Journal(default_state_dir() if state_dir is None else state_dir, environment_name) as j:
        return j.records(**filters)


_TIME_COLUMNS = ("submitted_at", "started_at", "finished_at")
_FIRST_COLUMNS = ("uid", "name", "status", "user", "user_group", "background", "origin",
                  *_TIME_COLUMNS, "duration_s", "error")


def history_dataframe(*, state_dir: str | os.PathLike[str] | None = None,
                      environment_name: str = "default", **filters: Any) -> Any:
    """:func:`history` as a pandas DataFrame, one row per task, newest first.

    Times are local ``datetime64`` columns, ``duration_s`` is finished - started, and the
    writer's ``host``/``pid`` and an ``orphaned`` flag replace the nested "journal" entry.
    """
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("qmagic.history_dataframe() needs pandas, which is not installed: "
                          "`pip install pandas` (or `pip install qmagic[pandas]`), or use "
                          "qmagic.history() for a list of dicts.") from exc
    rows = []
    for rec in history(state_dir=state_dir, environment_name=environment_name, **filters):
        meta = rec.pop("journal")
        start, stop = _num(rec.get("started_at")), _num(rec.get("finished_at"))
        rec["duration_s"] = stop - start if start is not None and stop is not None else None
        for column in _TIME_COLUMNS:
            t = _num(rec.get(column))
            rec[column] = datetime.fromtimestamp(t) if t is not None else None
        rec.update(host=meta["writer"].get("host"), pid=meta["writer"].get("pid"),
                   orphaned=bool(meta.get("orphaned")))
        rows.append(rec)
    frame = pd.DataFrame(rows)
    columns = [c for c in _FIRST_COLUMNS if c in frame.columns or not rows]
    frame = frame.reindex(columns=columns + [c for c in frame.columns if c not in columns])
    for column in _TIME_COLUMNS:
        frame[column] = pd.to_datetime(frame[column])
    return frame


# ---- the qmagic-history command -----------------------------------------------------------
def _when(t: Any) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if _num(t) is not None else "-"


def _call_text(rec: Mapping[str, Any], width: int = 48) -> str:
    def short(v: Any) -> str:
        return v.get("repr", "?")[:20] if isinstance(v, dict) and SUMMARY_KEY in v else json.dumps(v)[:20]
    args = rec.get("args") if isinstance(rec.get("args"), list) else []
    kwargs = rec.get("kwargs") if isinstance(rec.get("kwargs"), dict) else {}
    inner = ", ".join([short(a) for a in args] + [f"{k}={short(v)}" for k, v in kwargs.items()])
    text = f"{rec.get('name')}({inner})"
    return text if len(text) <= width else text[: width - 3] + "..."


def _table(records: list[dict[str, Any]]) -> str:
    head = ("SUBMITTED", "STATUS", "DURATION", "USER", "WHERE", "CALL", "UID")
    rows, notes = [], []
    for rec in records:
        start, stop = _num(rec.get("started_at")), _num(rec.get("finished_at"))
        duration = f"{stop - start:.3f} s" if start is not None and stop is not None else "-"
        where = f"{'bg' if rec.get('background') else 'fg'}/{rec.get('origin') or '?'}"
        rows.append((_when(rec.get("submitted_at") or rec.get("started_at")), str(rec.get("status")),
                     duration, str(rec.get("user")), where, _call_text(rec), str(rec.get("uid"))))
        error = rec.get("error") if isinstance(rec.get("error"), str) else ""
        notes.append(error.strip().splitlines()[-1][:100] if error.strip() else "")
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)).rstrip()]
    for row, note in zip(rows, notes):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if note:
            lines.append(f"    error: {note}")
    return "\n".join(lines)


def history_main(argv: list[str] | None = None) -> int:
    """Console script ``qmagic-history``: print an environment's task journal."""
    parser = argparse.ArgumentParser(
        prog="qmagic-history",
        description="Print the task journal (experiment log) of a qmagic environment, oldest "
                    "first; --limit keeps the newest N. Unfinished tasks of kernels that died "
                    f"show as failed ('{ORPHAN_REASON}').")
    parser.add_argument("--environment", "-e", default="default", help="environment name (default: %(default)s)")
    parser.add_argument("--state-dir", help="state folder (default: $QMAGIC_STATE_DIR or <jupyter data dir>/qmagic)")
    parser.add_argument("--since", help="only tasks active since: ISO date/time, or -30m, -2h, -7d")
    parser.add_argument("--until", help="only tasks active until: same formats as --since")
    parser.add_argument("--status", action="append", help="only this status (repeatable): "
                        "queued, running, completed, failed, cancelled")
    parser.add_argument("--user", help="only tasks of this user")
    parser.add_argument("--name", help="only this function name (glob patterns allowed)")
    parser.add_argument("--uid", help="only the task with this uid (or uid prefix)")
    parser.add_argument("--limit", type=int, help="show only the newest N tasks")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # let "--since -2h" mean "--since=-2h"
        if arg in ("--since", "--until") and re.match(r"-\d", argv[i + 1]):
            argv[i:i + 2] = [f"{arg}={argv[i + 1]}", ""]
    args = parser.parse_args([a for a in argv if a])
    try:
        validate_environment_name(args.environment)
        since, until = parse_time(args.since), parse_time(args.until)
    except ValueError as exc:
        parser.error(str(exc))
    state_dir = Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()
    journal = Journal(state_dir, args.environment)
    if not journal.path.exists() and not journal._segments():
        print(f"No journal for environment {args.environment!r} in {state_dir}: nothing was "
              "recorded there yet (check --environment and --state-dir).", file=sys.stderr)
        return 0
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", JournalWarning)
            records = journal.records(status=args.status, user=args.user, name=args.name,
                                      since=since, until=until, limit=args.limit, uid=args.uid)
    except StateFileError as exc:
        print(f"qmagic-history: {exc}", file=sys.stderr)
        return 1
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    records.reverse()
    if args.json:
        for rec in records:
            print(json.dumps(rec, ensure_ascii=False))
    elif records:
        print(_table(records))
    else:
        print("No task matches.", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(history_main())
