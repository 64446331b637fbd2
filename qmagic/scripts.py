"""Running an uploaded script in the namespace: all or nothing; scripts never wait for each other.

If the script raises, every name it added, changed or removed is restored, so the namespace
is as before (objects it mutated in place cannot be restored); what cells or other tasks set
meanwhile is left alone: the script's module-level writes are recorded as they happen
(:class:`_Writes`, ``exec``'s locals) and a name is put back only while it still holds what
the script stored; names bound through ``global`` statements are judged by their values
(:func:`_binding_names`); a star import, or
code that reaches the namespace itself in the usual ways — ``globals()``, ``vars()``,
``locals()``, ``exec``, ``eval``, a ``__dict__``, ``__globals__``, ``sys._getframe`` — makes
every name the script's, even when it only reads; a name built at run time,
``getattr(builtins, "glo" + "bals")``, is beyond what can be seen).  On success the names it
added, changed and removed are reported.

A script may ``await`` at its top level, as a notebook cell may: it is then compiled as a
coroutine (``ast.PyCF_ALLOW_TOP_LEVEL_AWAIT``, as IPython does for cells) that the task
awaits on the coroutine tasks' event loop, all or nothing as well.

Scripts never wait for each other: a background script runs while a foreground one does, as
in queueserver, so a script that never ends (``time.sleep(3600)``) stalls no later upload
and hangs no cell.  (Two scripts failing at the same moment may each restore the names the
other changed: run scripts that change the same names one after the other.)
"""

from __future__ import annotations

import ast
import dis
import inspect
import linecache
import re
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from types import CodeType
from typing import Any

from .core.jobs import own_code_ended
from .errors import RequestRefused, one_line

__all__ = ["ScriptRunner", "check_script_name", "check_script_text", "script_name_of_file", "DEFAULT_SCRIPT_NAME",
           "MSG_IPYTHON_LINE"]

DEFAULT_SCRIPT_NAME = "script"
_NAME_MAX = 100
_NAME = re.compile(rf"[\w.\-]{{1,{_NAME_MAX}}}\Z")
_NOT_IN_NAME = re.compile(r"[^\w.\-]")
_MISSING = object()
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_script_name(name: Any) -> str:
    """A script's display name: letters, digits, ``_ . -`` (e.g. a file name), <= 100 chars."""
    if name is None:
        return DEFAULT_SCRIPT_NAME
    if not isinstance(name, str) or not _NAME.match(name):
        raise RequestRefused(
            f"Error: Invalid script name {name!r}: use letters, digits, '_', '.' or '-' "
            f"(at most {_NAME_MAX} characters), e.g. --name calibration."
        )
    return name


def check_script_text(script: Any) -> None:
    """A script is Python code as a str: anything else is one line (bytes: decode them first);
    so is a lone surrogate in it (a remote client's JSON ``\\ud800``, bytes decoded with
    ``surrogateescape``), which Python cannot compile: refused before any task exists."""
    if not isinstance(script, str):
        hint = " (decode it first)." if isinstance(script, bytes) else "."
        raise one_line(TypeError(f"run_script() needs the script's Python code as a str, got "
                                 f"{type(script).__name__}{hint}"))
    bad = _LONE_SURROGATE.search(script)
    if bad is not None:
        line = script.count("\n", 0, bad.start()) + 1
        raise RequestRefused(
            f"Error: The script is not valid text: line {line} holds a lone surrogate "
            f"({ascii(bad.group())[1:-1]}), which Python cannot compile; send it as UTF-8 text "
            "(bytes decoded with errors='surrogateescape' make such characters).")


def script_name_of_file(file_name: str) -> str:
    """A script's name from its file name, as :func:`check_script_name` accepts it: characters
    a name may not hold become ``_`` (``setup script.py`` -> ``setup_script.py``), at most
    100 of them."""
    return _NOT_IN_NAME.sub("_", file_name)[:_NAME_MAX] or DEFAULT_SCRIPT_NAME


#: Names through which code can bind any name of the namespace (``globals()["x"] = 1``,
#: ``builtins.exec``, ``sys._getframe().f_globals``, ``func.__globals__``).
_DYNAMIC_NAMES = {"globals", "vars", "locals", "exec", "eval"}
_DYNAMIC_ATTRS = _DYNAMIC_NAMES | {"__dict__", "__globals__", "f_globals", "f_locals", "_getframe"}


def _binding_names(code: CodeType) -> tuple[set[str], set[str]] | None:
    """The namespace names a script's code can bind or delete: (names bound by the module's
    own code — assignments, definitions, imports —, names bound through ``global``
    statements in its functions).  None when any name may change: a star import, or code
    that reaches the namespace dict itself."""
    local: set[str] = set()
    global_: set[str] = set()
    stack = [(code, True)]
    while stack:
        co, top = stack.pop()
        for ins in dis.get_instructions(co):
            if ins.opname in ("STORE_NAME", "DELETE_NAME"):
                if top:
                    local.add(ins.argval)  # (in a class body: the class's own namespace)
            elif ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL"):
                global_.add(ins.argval)
            elif ((ins.opname in ("LOAD_NAME", "LOAD_GLOBAL") and ins.argval in _DYNAMIC_NAMES)
                  or (ins.opname in ("LOAD_ATTR", "LOAD_METHOD", "IMPORT_FROM")
                      and ins.argval in _DYNAMIC_ATTRS)):
                return None
            elif ins.opname == "IMPORT_STAR" or (ins.opname == "CALL_INTRINSIC_1"
                                                 and "IMPORT_STAR" in str(ins.argrepr)):
                return None
        stack.extend((c, False) for c in co.co_consts if isinstance(c, CodeType))
    return local, global_


class _Writes(MutableMapping):
    """The module-level namespace of a running script (``exec``'s locals): a view of the
    namespace in which every name the script stores or deletes is remembered with the object
    it stored and what the name held just before, so a failure undoes exactly the script's
    own writes — never what a cell set meanwhile.  (A mapping: tracebacks and debuggers read
    a frame's locals as one.)"""

    def __init__(self, ns: dict) -> None:
        self.ns = ns
        self.before: dict[str, Any] = {}  # name -> what it held before the script's first write
        self.last: dict[str, Any] = {}  # name -> the object the script stored last (or _MISSING)

    def __getitem__(self, name: str) -> Any:
        return self.ns[name]

    def __setitem__(self, name: str, value: Any) -> None:
        self.before.setdefault(name, self.ns.get(name, _MISSING))
        self.ns[name] = value
        self.last[name] = value

    def __delitem__(self, name: str) -> None:
        self.before.setdefault(name, self.ns.get(name, _MISSING))
        del self.ns[name]  # (KeyError: Python raises NameError, as for any del)
        self.last[name] = _MISSING

    def __iter__(self) -> Iterator[str]:
        return iter(self.ns)

    def __len__(self) -> int:
        return len(self.ns)

    def undo(self) -> None:
        """Put back every name whose value is still the script's own."""
        for name, mine in self.last.items():
            now = self.ns.get(name, _MISSING)
            if now is mine:  # (a cell's value meanwhile stays)
                old = self.before[name]
                if old is _MISSING:
                    self.ns.pop(name, None)
                else:
                    self.ns[name] = old


#: Said under a script's SyntaxError at a ``%magic`` or ``!command`` line.
MSG_IPYTHON_LINE = ("A script is plain Python: IPython's %magic and !command lines do not run in it "
                    "(run them in a cell).")


class ScriptRunner:
    """Executes scripts in ``namespace`` (see the module docstring)."""

    def __init__(self, namespace: dict) -> None:
        self.namespace = namespace

    def run(self, script: str, *, name: str, keep: tuple[str, ...] = (),
            done: Callable[[dict[str, list[str]]], None] | None = None) -> Coroutine[Any, Any, None] | None:
        """Execute ``script``; ``done`` gets the {"added", "changed", "removed"} name lists.

        Raises what the script raised, the namespace restored.  Names in ``keep`` are put
        back as they were even when the script succeeds (queueserver's ``update_re=False``
        keeps ``RE`` and ``db``).  A script with a top-level ``await`` (as a notebook cell may
        have: ``await motor.set(1)``) is compiled here (a SyntaxError changes nothing) and
        returned as a coroutine that runs it all or nothing when awaited.
        """
        filename = "<script>" if name == DEFAULT_SCRIPT_NAME else f"<script {name}>"
        linecache.cache[filename] = (len(script), None, script.splitlines(True), filename)
        try:
            code = compile(script, filename, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        except SyntaxError as exc:
            if (exc.text or "").lstrip().startswith(("%", "!")):  # a notebook cell's line pasted
                exc.add_note(MSG_IPYTHON_LINE)
            raise
        run = _Run(self.namespace, code, keep, done)
        if code.co_flags & inspect.CO_COROUTINE:
            return run.awaited()
        try:
            exec(code, *run.scopes)  # noqa: S102 - running the user's script is the purpose
        except BaseException:
            try:
                own_code_ended()  # (no ■ lands in the undo: it would leave the script's names)
            finally:
                run.undo()
            raise
        try:
            own_code_ended()  # (nor in finish: a cancelled script's names would stay)
        except BaseException:  # a ■ or forced cancel aimed at the script: it changes nothing
            run.undo()
            raise
        run.finish()
        return None


class _Run:
    """One run of a compiled script: what it may bind, what those names held before."""

    def __init__(self, ns: dict, code: CodeType, keep: tuple[str, ...],
                 done: Callable[[dict[str, list[str]]], None] | None) -> None:
        self.ns, self.code, self.done = ns, code, done
        self.found = _binding_names(code)  # None: a star import, any name may change
        self.by_global = set(ns) if self.found is None else self.found[1]  # (seen only by their values)
        self.before = {k: ns[k] for k in self.by_global if k in ns}
        self.kept = {k: ns.get(k, _MISSING) for k in keep}  # (however the script reaches them)
        self.writes = _Writes(ns)
        self.scopes: tuple[dict, ...] = (ns,) if self.found is None else (ns, self.writes)

    async def awaited(self) -> None:
        """The script with a top-level ``await``, run (on the event loop that awaits this)."""
        try:
            await eval(self.code, *self.scopes)  # noqa: S307 - running the user's script is the purpose
        except BaseException:
            self.undo()
            raise
        self.finish()

    def undo(self) -> None:
        """The script failed: every name it bound is put back (what others bound stays)."""
        ns, before = self.ns, self.before
        self.writes.undo()
        for key in (set(ns) | set(before)) if self.found is None else self.by_global:
            old = before.get(key, _MISSING)  # (what it can bind: others' work stays)
            if old is _MISSING:
                ns.pop(key, None)
            elif ns.get(key, _MISSING) is not old:
                ns[key] = old

    def finish(self) -> None:
        """The script succeeded: the kept names back, ``done`` told what changed."""
        ns = self.ns
        touched = (set(ns) | set(self.before)) if self.found is None else self.by_global | set(self.writes.last)
        before = {**self.before, **self.writes.before}
        for key, old in self.kept.items():
            if key not in touched:
                continue  # the script did not bind it: a cell's change meanwhile stays
            if old is _MISSING:
                ns.pop(key, None)
            else:
                ns[key] = old
        keys = touched - {"__builtins__"}
        added = sorted(k for k in keys if k in ns and before.get(k, _MISSING) is _MISSING)
        removed = sorted(k for k in keys if before.get(k, _MISSING) is not _MISSING and k not in ns)
        changed = sorted(k for k in keys if k in ns and before.get(k, _MISSING) is not _MISSING
                         and ns[k] is not before[k])
        if self.done is not None:
            self.done({"added": added, "changed": changed, "removed": removed})
