"""Running an uploaded script in the namespace: all or nothing; scripts never wait for each other.

If the script raises, every name it added, changed or removed is restored, so the namespace
is exactly as before (objects it mutated in place cannot be restored).  On success the
names it added, changed and removed are reported.

Scripts never wait for each other: a background script runs while a foreground one does, as
in queueserver, so a script that never ends (``time.sleep(3600)``) stalls no later upload
and hangs no cell.  (Two scripts failing at the same moment may each restore the names the
other changed: run scripts that change the same names one after the other.)
"""

from __future__ import annotations

import linecache
import re
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

    def run(self, script: str, *, name: str, keep: tuple[str, ...] = ()) -> dict[str, list[str]]:
        """Execute ``script``; returns {"added", "changed", "removed"} name lists.

        Raises what the script raised, the namespace restored.  Names in ``keep`` are put
        back as they were even when the script succeeds (queueserver's ``update_re=False``
        keeps ``RE`` and ``db``).
        """
        filename = "<script>" if name == DEFAULT_SCRIPT_NAME else f"<script {name}>"
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
        for key in keep:
            if key in before:
                ns[key] = before[key]
        added = sorted(k for k in ns if k not in before and k != "__builtins__")
        removed = sorted(k for k in before if k not in ns)
        changed = sorted(k for k in before if k in ns and ns[k] is not before[k])
        return {"added": added, "changed": changed, "removed": removed}
