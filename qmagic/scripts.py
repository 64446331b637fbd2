"""Running an uploaded script in the namespace: all or nothing, one at a time.

If the script raises, every name it added, changed or removed is restored, so the namespace
is exactly as before (objects it mutated in place cannot be restored).  On success the
names it added, changed and removed are reported.

Scripts run one at a time.  A script requested while another one runs is refused at once
with a message that names the running script and how to stop it — nothing ever waits for
a script that may never end (``time.sleep(3600)`` in a background upload must not stall
every later upload or hang a cell).
"""

from __future__ import annotations

import linecache
import re
import threading
from typing import Any

from .errors import RequestRefused

__all__ = ["ScriptRunner", "check_script_name", "DEFAULT_SCRIPT_NAME"]

DEFAULT_SCRIPT_NAME = "script"
_NAME = re.compile(r"[\w.\-]{1,100}\Z")
_MISSING = object()


def check_script_name(name: Any) -> str:
    """A script's display name: letters, digits, ``_ . -`` (e.g. a file name), <= 100 chars."""
    if name is None:
        return DEFAULT_SCRIPT_NAME
    if not isinstance(name, str) or not _NAME.match(name):
        raise RequestRefused(
            f"Error: Invalid script name {name!r}: use letters, digits, '_', '.' or '-' "
            "(at most 100 characters), e.g. --name calibration."
        )
    return name


class ScriptRunner:
    """Executes scripts in ``namespace`` (see the module docstring)."""

    def __init__(self, namespace: dict) -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._running: tuple[str, str] | None = None  # (name, task uid) of the running script

    def check_free(self) -> None:
        """Raise RequestRefused (at once) while a script runs."""
        running = self._running
        if running is not None:
            raise RequestRefused(self._busy_msg(running))

    @staticmethod
    def _busy_msg(running: tuple[str, str]) -> str:
        name, uid = running
        return (
            f"Error: Failed to start the task: the script {name!r} (task {uid[:8]}) is still "
            f"running. Wait for it to end, or stop it with %task_cancel {uid[:8]} "
            f"(remotely: kernel_interrupt, or wait), then upload again."
        )

    def run(self, script: str, *, name: str, uid: str) -> dict[str, list[str]]:
        """Execute ``script``; returns {"added", "changed", "removed"} name lists.

        Raises what the script raised (the namespace restored), or RequestRefused at once
        when another script is running.
        """
        if not self._lock.acquire(blocking=False):
            raise RequestRefused(self._busy_msg(self._running or (name, uid)))
        try:
            self._running = (name, uid)
            return self._exec(script, name, uid)
        finally:
            self._running = None
            self._lock.release()

    def _exec(self, script: str, name: str, uid: str) -> dict[str, list[str]]:
        filename = f"<script {name}>"
        linecache.cache[filename] = (len(script), None, script.splitlines(True), filename)
        ns = self.namespace
        before = dict(ns)
        try:
            code = compile(script, filename, "exec")
            exec(code, ns)  # noqa: S102 - running the user's script is the purpose
        except BaseException:
            for key in [k for k in ns if k not in before]:
                del ns[key]
            for key, value in before.items():
                if ns.get(key, _MISSING) is not value:
                    ns[key] = value
            raise
        added = sorted(k for k in ns if k not in before and k != "__builtins__")
        removed = sorted(k for k in before if k not in ns)
        changed = sorted(k for k in before if k in ns and ns[k] is not before[k])
        return {"added": added, "changed": changed, "removed": removed}
