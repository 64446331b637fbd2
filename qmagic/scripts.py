"""Running an uploaded script in the namespace: all or nothing; scripts never wait for each other.

If the script raises, every name it added, changed or removed is restored, so the namespace
is as before (objects it mutated in place cannot be restored); names it cannot bind — what
cells or other tasks set meanwhile — are left alone (:func:`bound_names`; a star import, or
code that reaches the namespace itself in the usual ways — ``globals()``, ``vars()``,
``locals()``, ``exec``, ``eval``, a ``__dict__``, ``__globals__``, ``sys._getframe`` — makes
every name the script's, even when it only reads; a name built at run time,
``getattr(builtins, "glo" + "bals")``, is beyond what can be seen).  On success the names it
added, changed and removed are reported.

Scripts never wait for each other: a background script runs while a foreground one does, as
in queueserver, so a script that never ends (``time.sleep(3600)``) stalls no later upload
and hangs no cell.  (Two scripts failing at the same moment may each restore the names the
other changed: run scripts that change the same names one after the other.)
"""

from __future__ import annotations

import dis
import linecache
import re
from types import CodeType
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


_BINDING_OPS = {"STORE_NAME", "DELETE_NAME", "STORE_GLOBAL", "DELETE_GLOBAL"}
#: Names through which code can bind any name of the namespace (``globals()["x"] = 1``,
#: ``builtins.exec``, ``sys._getframe().f_globals``, ``func.__globals__``).
_DYNAMIC_NAMES = {"globals", "vars", "locals", "exec", "eval"}
_DYNAMIC_ATTRS = _DYNAMIC_NAMES | {"__dict__", "__globals__", "f_globals", "f_locals", "_getframe"}


def bound_names(code: CodeType) -> set[str] | None:
    """The namespace names a script's code can bind or delete: its module-level assignments,
    definitions and imports, and ``global`` statements in its functions.  None when any name
    may change: a star import, or code that reaches the namespace dict itself."""
    names: set[str] = set()
    stack = [code]
    while stack:
        co = stack.pop()
        for ins in dis.get_instructions(co):
            if ins.opname in _BINDING_OPS:
                names.add(ins.argval)
            elif ((ins.opname in ("LOAD_NAME", "LOAD_GLOBAL") and ins.argval in _DYNAMIC_NAMES)
                  or (ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM")
                      and ins.argval in _DYNAMIC_ATTRS)):
                return None
            elif ins.opname == "IMPORT_STAR" or (ins.opname == "CALL_INTRINSIC_1"
                                                 and "IMPORT_STAR" in str(ins.argrepr)):
                return None
        stack.extend(c for c in co.co_consts if isinstance(c, CodeType))
    return names


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
        code = compile(script, filename, "exec")  # a SyntaxError changes nothing
        names = bound_names(code)  # None: a star import, any name may change
        before = dict(ns) if names is None else {k: ns[k] for k in names if k in ns}
        kept = {k: ns.get(k, _MISSING) for k in keep}  # (however the script reaches them)
        touched = (lambda: set(ns) | set(before)) if names is None else (lambda: names)
        try:
            exec(code, ns)  # noqa: S102 - running the user's script is the purpose
        except BaseException:
            for key in touched():  # only what the script can bind: others' work stays
                old = before.get(key, _MISSING)
                if old is _MISSING:
                    ns.pop(key, None)
                elif ns.get(key, _MISSING) is not old:
                    ns[key] = old
            raise
        for key, old in kept.items():
            if names is not None and key not in names:
                continue  # the script cannot have bound it: a cell's change meanwhile stays
            if old is _MISSING:
                ns.pop(key, None)
            else:
                ns[key] = old
        keys = touched() - {"__builtins__"}
        added = sorted(k for k in keys if k in ns and k not in before)
        removed = sorted(k for k in keys if k in before and k not in ns)
        changed = sorted(k for k in keys if k in before and k in ns and ns[k] is not before[k])
        return {"added": added, "changed": changed, "removed": removed}
