"""One folder for everything a test session writes, removed at the end; a check of what was left.

``tests/conftest.py`` starts a :class:`SessionSandbox` in ``pytest_configure`` (before any
test, kernel, JupyterLab server or browser starts) and ends it in ``pytest_sessionfinish``.

While it runs, ``HOME``, ``IPYTHONDIR``, ``XDG_{CONFIG,CACHE,DATA,STATE,RUNTIME}_HOME/DIR``,
``JUPYTER_{CONFIG,DATA,RUNTIME}_DIR``, ``QMAGIC_STATE_DIR`` and ``TMPDIR`` (also
``tempfile.tempdir`` and pytest's ``--basetemp``) point into one folder
``$TMPDIR/qmagic-tests-XXXXXXXX``; every process the tests start inherits them.

The folder holds a lock file (``flock``) for the session's life.  A session that was killed
cannot remove its folder; the next session that starts removes every ``qmagic-tests-*``
folder whose lock nobody holds any more (and those without a lock file older than an hour).

At the end it checks, then removes the folder:

- **inside the folder** (certainly this session's doing, so always a failure): files left in
  the session's ``TMPDIR`` (a tutorial's scratch folder that outlived its kernel, a temporary
  file nobody removed), kernel connection files left in ``JUPYTER_RUNTIME_DIR``, and
  processes still running with this session's environment (a kernel, a server or a browser
  nobody stopped: they are listed, then killed);
- **outside** (``/tmp``, the real home folder, the checkout): what is new since the session
  started.  Another program on the machine may have made it, so by default this fails only
  under CI (``CI`` set) and is a warning elsewhere; ``--leak-check=fail`` makes it fail,
  ``--leak-check=off`` skips it, and ``QMAGIC_TEST_LEAK_IGNORE`` (glob patterns separated by
  spaces, matched against full paths) names what other programs are known to write.
"""

from __future__ import annotations

import fcntl
import fnmatch
import os
import shutil
import signal
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

__all__ = ["LeakReport", "SessionSandbox", "remove_stale_sandboxes", "snapshot"]

PREFIX = "qmagic-tests-"
LOCK_NAME = ".session.lock"
#: A session folder without a lock file is left alone this long (it may be starting).
UNLOCKED_GRACE_S = 3600.0

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Folders of the checkout that are the suite's business or the developer's, not leaks:
#: byte code, the virtual environments, git, pytest's cache and the screenshots folder.
CHECKOUT_SKIP = {".git", "__pycache__", ".pytest_cache", "test-artifacts"}
#: How deep the home folder is compared (~/.cache/jedi, ~/.local/share/jupyter/qmagic).
HOME_DEPTH = 4
#: Seconds to wait for processes that clean up after a killed kernel (the tutorials' scratch
#: folder watcher) before what they should remove counts as left behind.
CLEANUP_GRACE = 10.0


def snapshot(root: Path, depth: int, skip: set[str] = frozenset(), skip_prefix: tuple[str, ...] = ()) -> set[str]:
    """Paths under ``root`` down to ``depth`` levels (symlinks not followed); ``skip`` names
    and names starting with ``skip_prefix`` are not entered nor listed."""
    found: set[str] = set()

    def walk(folder: Path, level: int) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            if entry.name in skip or entry.name.startswith(skip_prefix):
                continue
            found.add(entry.path)
            if level < depth:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        walk(Path(entry.path), level + 1)
                except OSError:
                    pass

    walk(root, 1)
    return found


def _checkout_snapshot() -> set[str]:
    return snapshot(REPO_ROOT, 12, CHECKOUT_SKIP, (".venv",))


@dataclass
class LeakReport:
    """What a session left: ``inside`` is certain, ``outside`` may be another program's."""

    inside: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)


class SessionSandbox:
    """The session folder: per-user locations pointed into it, removed by :meth:`finish`."""

    #: environment variable -> sub-folder of the session folder
    FOLDERS: ClassVar[dict[str, str]] = {
        "HOME": "home",
        "IPYTHONDIR": "ipython",
        "XDG_CONFIG_HOME": "xdg-config",
        "XDG_CACHE_HOME": "xdg-cache",
        "XDG_DATA_HOME": "xdg-data",
        "XDG_STATE_HOME": "xdg-state",
        "XDG_RUNTIME_DIR": "xdg-runtime",
        "JUPYTER_CONFIG_DIR": "jupyter-config",
        "JUPYTER_DATA_DIR": "jupyter-data",
        "JUPYTER_RUNTIME_DIR": "jupyter-runtime",
        "QMAGIC_STATE_DIR": "qmagic-state",
        "TMPDIR": "tmp",
        # Hypothesis's example database and caches (else ./.hypothesis in the checkout)
        "HYPOTHESIS_STORAGE_DIRECTORY": "hypothesis",
    }

    #: set in the environment of every process of the session (finds leftover processes)
    MARKER = "QMAGIC_TEST_SESSION"

    def __init__(self, cleanup_grace: float = CLEANUP_GRACE) -> None:
        self.cleanup_grace = cleanup_grace
        self.outer_tmp = Path(tempfile.gettempdir())
        self.real_home = Path(os.path.expanduser("~"))
        self.root: Path | None = None
        self._saved_env: dict[str, str | None] = {}
        self._saved_tempdir: str | None = None
        self._before: dict[str, set[str]] = {}
        self._lock_fd: int | None = None
        #: names of the folders of dead sessions removed by :meth:`start`
        self.removed_stale: list[str] = []

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> Path:
        """Remove the folders of dead sessions, snapshot the outside, make the session folder
        (locked) and point the environment into it."""
        self.removed_stale = remove_stale_sandboxes(self.outer_tmp)
        self._before = self._outside()
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.outer_tmp))
        self._lock_fd = _hold_lock(self.root)
        for name, sub in self.FOLDERS.items():
            path = self.root / sub
            path.mkdir(mode=0o700)
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = str(path)
        self._saved_env[self.MARKER] = os.environ.get(self.MARKER)
        os.environ[self.MARKER] = str(self.root)
        self._saved_tempdir = tempfile.tempdir
        tempfile.tempdir = str(self.root / "tmp")
        return self.root

    @property
    def basetemp(self) -> Path:
        """The folder to give pytest as ``--basetemp`` (created by pytest)."""
        assert self.root is not None
        return self.root / "pytest"

    def finish(self, *, check_outside: bool) -> LeakReport:
        """Check what was left, remove the session folder, restore the environment."""
        assert self.root is not None
        report = LeakReport(inside=self._inside())
        _remove_tree(self.root)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        tempfile.tempdir = self._saved_tempdir
        if check_outside:
            report.outside = self._new_outside()
        self.root = None
        return report

    # -- what was left -----------------------------------------------------------------------
    def _inside(self) -> list[str]:
        """Leftovers in the session's TMPDIR and kernel connection files (waits a little for
        watchers that remove a killed kernel's scratch folder)."""
        assert self.root is not None
        tmp, runtime = self.root / "tmp", self.root / "jupyter-runtime"

        def left() -> list[str]:
            paths = [str(p) for p in tmp.iterdir()]
            paths += [str(p) for p in runtime.glob("kernel-*.json")]
            paths += [f"process {pid}: {cmd}" for pid, cmd in self._processes()]
            return sorted(paths)

        deadline = time.monotonic() + self.cleanup_grace
        found = left()
        while found and time.monotonic() < deadline:
            time.sleep(0.1)  # polling a condition (all gone), bounded by the grace
            found = left()
        for pid, _cmd in self._processes():  # stop them: they would outlive the session
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return found

    def _processes(self) -> list[tuple[int, str]]:
        """Processes other than this one whose environment carries this session's marker."""
        marker = f"{self.MARKER}={self.root}".encode()
        found = []
        proc = Path("/proc")
        if not proc.is_dir():  # pragma: no cover - not Linux: no process check
            return found
        for entry in proc.iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
                if marker not in environ.split(b"\0"):
                    continue
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z":  # a zombie is already dead; its parent reaps it
                found.append((int(entry.name), cmd.strip()[:200]))
        return found

    def _outside(self) -> dict[str, set[str]]:
        return {
            "tmp": snapshot(self.outer_tmp, 1),
            "home": snapshot(self.real_home, HOME_DEPTH),
            "checkout": _checkout_snapshot(),
        }

    def _new_outside(self) -> list[str]:
        ignore = os.environ.get("QMAGIC_TEST_LEAK_IGNORE", "").split()
        # other test sessions' folders (running at the same time) check themselves
        ignore.append(str(self.outer_tmp / "qmagic-tests-*"))
        after = self._outside()
        new: list[str] = []
        for key, paths in after.items():
            for path in sorted(paths - self._before.get(key, set())):
                if not any(fnmatch.fnmatch(path, pattern) for pattern in ignore):
                    new.append(path)
        # a folder that is new is listed once, not with everything inside it
        return [p for p in new if not any(p.startswith(q + os.sep) for q in new)]


def _hold_lock(root: Path) -> int:
    """Lock ``root``'s lock file for as long as the returned descriptor is open.  Made under
    a temporary name and renamed once locked: a lock file that can be locked is never a
    session that is only starting."""
    tmp = root / (LOCK_NAME + ".new")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(tmp, root / LOCK_NAME)
    return fd


def _lock_is_free(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False  # gone meanwhile: its session is ending by itself
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def remove_stale_sandboxes(outer: Path) -> list[str]:
    """Remove the session folders in ``outer`` that no live session holds (sessions that
    were killed); returns their names."""
    removed = []
    for entry in sorted(outer.glob(PREFIX + "*")):
        try:
            if entry.is_symlink() or not entry.is_dir():
                continue
            lock = entry / LOCK_NAME
            if lock.exists():
                if not _lock_is_free(lock):
                    continue  # a session that runs now
            elif time.time() - entry.stat().st_mtime < UNLOCKED_GRACE_S:
                continue  # starting right now, or not ours to judge yet
        except OSError:
            continue
        _remove_tree(entry)
        removed.append(entry.name)
    return removed


def _remove_tree(root: Path) -> None:
    """Remove ``root`` even where a test left a folder without write permission."""
    for folder, dirs, _files in os.walk(root):
        for name in dirs:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                try:
                    os.chmod(path, stat.S_IRWXU)
                except OSError:
                    pass
    shutil.rmtree(root, ignore_errors=True)
