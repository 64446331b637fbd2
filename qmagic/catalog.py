"""What the namespace offers: the functions, plans and devices that may be named remotely.

Only the catalog's functions can run by name: callables of the namespace that the user
defined, imported or uploaded — never the shell's own hidden names (IPython's ``exit``,
``quit``, ``get_ipython``, ``In``, ``Out`` ...), never builtins (they are not in the
namespace), and names starting with ``_`` only where the permission rules allow them.
Generator functions are bluesky plans, not functions.  The catalog is rebuilt when the
namespace changes (after each cell, after a script upload); lookups between rebuilds are
dictionary reads.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import threading
import types
import uuid
from typing import Any, Callable, Mapping

from .core.memo import Memo
from .core.permissions import MAX_NAME_LENGTH, function_name_error
from .errors import RequestRefused, one_line
from .format import safe_repr

__all__ = ["Catalog", "check_name", "submit_target", "describe", "describe_plan", "describe_device", "is_plan", "plan_refusal",
           "is_coroutine_function"]


def check_name(name: Any) -> str:
    """Return ``name`` if it can name a namespace function, else raise RequestRefused.
    (The rule is the permissions' one: a Python identifier, not a keyword, at most
    :data:`MAX_NAME_LENGTH` characters.)"""
    if not isinstance(name, str) or not name:
        raise RequestRefused("Error: Incorrect request format: function name is not specified")
    if function_name_error(name) is not None:
        head = name.split("(", 1)[0].strip()
        if head != name and function_name_error(head) is None:  # a call written as the name
            raise RequestRefused(
                f"Error: Incorrect request format: {safe_repr(name, 42)} is not a function name: give "
                f"the name alone ({head!r}) and the arguments apart")
        parts = head.split(".")
        if len(parts) > 1 and all(function_name_error(p) is None for p in parts):  # motor.move
            raise RequestRefused(
                f"Error: Incorrect request format: {safe_repr(head, 42)} is not a function name: only "
                f"the namespace's own functions run by name; give it a name there first "
                f"({parts[-1]} = {head}) and run {parts[-1]!r}")
        raise RequestRefused(
            f"Error: Incorrect request format: {safe_repr(name, 42)} is not a function name: use the "
            f"name of a function of the namespace (a Python identifier of at most {MAX_NAME_LENGTH} "
            "characters)"
        )
    return name


def submit_target(target: Any) -> tuple[str, Callable[..., Any] | None]:
    """``submit()``'s target as ``(name, function)``: a namespace name (checked by
    :func:`check_name`; function None, resolved later) or a callable (named by its
    ``__name__``).  Anything else is a one-line TypeError; a coroutine or generator object
    (``acq(3)`` given for ``acq``, a plan already called) says how to pass the call, and is
    closed (no "never awaited" warning follows)."""
    if isinstance(target, str):
        return check_name(target), None
    if callable(target):
        return getattr(target, "__name__", type(target).__name__), target
    kind = ("a coroutine" if inspect.iscoroutine(target) else "a generator: a plan?"
            if inspect.isgenerator(target) else None)
    if kind is not None:
        name = getattr(target, "__name__", None)
        name = name if type(name) is str and name.isidentifier() else "f"
        with contextlib.suppress(Exception):  # (never started: its code does not run)
            target.close()
        raise one_line(TypeError(
            f"submit() got {name}(...) already called ({kind}): pass the function and its "
            f"arguments instead, submit({name}, args), not submit({name}(...))."))
    raise one_line(TypeError(f"submit() needs a function name or a callable, got {safe_repr(target, 80)}."))


_CHECKED_MAX = 10_000  # entries of Catalog._checked


#: What ``inspect`` may look into: plain functions and their wrappers.  Anything else (a
#: callable object, a network proxy) is judged by its type alone: reading an instance's
#: attributes may run its code (a proxy's ``__getattr__`` asks a remote server), and the
#: catalog runs after every cell and on the control thread.
_FUNCTION_TYPES = (types.FunctionType, types.MethodType, functools.partial,
                   types.BuiltinFunctionType, types.BuiltinMethodType)


def _is_function(obj: Any) -> bool:
    return issubclass(type(obj), _FUNCTION_TYPES)


def _is_class(obj: Any) -> bool:
    return issubclass(type(obj), type)  # (not isinstance: that reads obj.__class__)


def is_plan(obj: Any) -> bool:
    return _is_function(obj) and (inspect.isgeneratorfunction(obj) or inspect.isasyncgenfunction(obj))


def is_coroutine_function(obj: Any) -> bool:
    return _is_function(obj) and inspect.iscoroutinefunction(obj)


def _is_device(obj: Any) -> bool:
    """An ophyd or ophyd-async device (recognised by duck typing; neither is imported)."""
    cls = type(obj)
    module = getattr(cls, "__module__", "") or ""
    if not (module == "ophyd" or module.startswith(("ophyd.", "ophyd_async"))):
        return any(getattr(base, "__module__", "").startswith(("ophyd.", "ophyd_async."))
                   for base in cls.__mro__[1:])
    return not _is_class(obj)


def describe_plan(name: str, plan: Any) -> dict[str, Any]:
    """queueserver's description of a plan (``plans_existing`` format): name, module,
    description, properties and parameters (kind, default, annotation as text)."""
    out: dict[str, Any] = {"name": name, "properties": {"is_generator": True}, "parameters": []}
    module = getattr(plan, "__module__", None)
    if isinstance(module, str):
        out["module"] = module
    doc = inspect.getdoc(plan)
    if doc:
        out["description"] = doc
    try:
        parameters = inspect.signature(plan).parameters.values()
    except (TypeError, ValueError):
        parameters = ()
    for p in parameters:
        item: dict[str, Any] = {"name": p.name, "kind": {"name": p.kind.name, "value": int(p.kind)}}
        if p.default is not inspect.Parameter.empty:
            item["default"] = repr(p.default)
        if p.annotation is not inspect.Parameter.empty:
            annotation = p.annotation
            item["annotation"] = {"type": annotation if isinstance(annotation, str)
                                  else getattr(annotation, "__name__", repr(annotation))}
        out["parameters"].append(item)
    return out


def describe_device(device: Any) -> dict[str, Any]:
    """queueserver's description of a device (``devices_existing`` format; no components)."""
    cls = type(device)
    return {
        "is_readable": callable(getattr(device, "read", None)) and callable(getattr(device, "describe", None)),
        "is_movable": callable(getattr(device, "set", None)),
        "is_flyable": callable(getattr(device, "kickoff", None)) and callable(getattr(device, "complete", None)),
        "classname": cls.__name__,
        "module": cls.__module__,
    }


def describe(obj: Any) -> dict[str, str]:
    """``{"signature", "doc"}`` of a callable (first doc line)."""
    try:
        signature = str(inspect.signature(obj))
    except (TypeError, ValueError):
        signature = "(...)"
    doc = (inspect.getdoc(obj) or "").strip().splitlines()
    return {"signature": signature, "doc": doc[0] if doc else ""}


def plan_refusal(name: str, obj: Any = None) -> str:
    """Why a generator function (a bluesky plan) is not run as a task, by name or as an
    object: one text for every door.  An async generator function ``obj`` is no plan either
    (the Run Engine refuses it too), so its text says what to write instead."""
    if obj is not None and _is_function(obj) and inspect.isasyncgenfunction(obj):
        return (f"{name!r} is an async generator function (it yields values), not a function: a "
                "task runs a function to its result; write an async def function that returns it.")
    return (f"{name!r} is a generator function (a bluesky plan), not a function: run it with the "
            f"Run Engine, RE({name}(...)).")


class Catalog:
    """The functions, plans and devices of one namespace (see the module docstring)."""

    def __init__(self, namespace: dict, hidden: Callable[[], Any] | None = None) -> None:
        self.namespace = namespace
        self._hidden = hidden or (lambda: ())
        self._lock = threading.Lock()
        self._functions: dict[str, Any] = {}
        self._plans: dict[str, Any] = {}
        self._devices: dict[str, Any] = {}
        #: name -> (the object that last passed :meth:`function`, whether it is a coroutine
        #: function): saves inspecting the same function on every request; an object rebound
        #: to the name is checked anew.
        self._checked: Memo[tuple[Any, bool]] = Memo(_CHECKED_MAX)  # name -> (object, async?)
        self._key: Any = None
        self._refreshes = 0  # refreshes begun (numbered under the lock)
        self._installed = 0  # the number of the refresh whose tables are in place
        #: Changes whenever the functions change.
        self.uid = str(uuid.uuid4())
        #: Changes whenever the plans change (queueserver's plans_existing_uid).
        self.plans_uid = str(uuid.uuid4())
        #: Changes whenever the devices change (devices_existing_uid).
        self.devices_uid = str(uuid.uuid4())

    def refresh(self, force: bool = False) -> bool:
        """Rebuild from the namespace if it changed (names or objects); True if it did."""
        with self._lock:  # (numbered with the read: a later number saw a newer namespace)
            self._refreshes += 1
            mine = self._refreshes
            items = list(self.namespace.items())
        key = frozenset((name, id(value)) for name, value in items)
        if not force and key == self._key:
            return False
        hidden = set(self._hidden() or ())
        functions: dict[str, Any] = {}
        plans: dict[str, Any] = {}
        devices: dict[str, Any] = {}
        for name, obj in items:
            if not isinstance(name, str) or name in hidden or name.startswith("__"):
                continue
            try:
                if is_plan(obj):
                    plans[name] = obj
                elif callable(obj) and not _is_class(obj) and not _is_device(obj):
                    functions[name] = obj
                elif _is_device(obj):
                    devices[name] = obj
            except Exception:  # noqa: BLE001 - an odd object must not break the catalog
                continue
        with self._lock:
            if mine < self._installed:  # a refresh that read the namespace later got here first
                return False
            for attr, new, old in (("uid", functions, self._functions), ("plans_uid", plans, self._plans),
                                   ("devices_uid", devices, self._devices)):
                if new.keys() != old.keys() or any(new[n] is not old.get(n) for n in new):
                    setattr(self, attr, str(uuid.uuid4()))
            self._functions, self._plans, self._devices = functions, plans, devices
            self._checked.clear()  # drop references to objects the namespace let go
            # The key last: a refresh cut short before it (■ in a remote environment_update)
            # is made again by the next one (set first, it kept the old lists for good).
            self._installed, self._key = mine, key
        return True

    def function(self, name: str, allowed: Callable[[list[str]], list[str]] | None = None) -> Any:
        """The callable named ``name``, or raise with queueserver's texts: NameError when it is
        not a function of the namespace, TypeError when it is a plan or not callable.
        ``allowed(names)``: which of the namespace's functions the caller may run; the
        NameError then names the closest of them, if one is close (a typo: ``scna``)."""
        try:
            return self.resolve(name)[0]
        except NameError as exc:
            if allowed:  # (the names as the namespace holds them now: a Worker's dict changes unseen)
                self.refresh()
            near = difflib.get_close_matches(name, allowed(list(self.functions())), 1, 0.75) if allowed else []
            if not near:
                raise
            raise NameError(f"{exc} (did you mean {near[0]!r}?)") from None

    def resolve(self, name: str) -> tuple[Any, bool]:
        """:meth:`function`'s callable and whether it is an ``async def`` function."""
        obj = self.namespace.get(name, _MISSING)
        if obj is _MISSING or name.startswith("__") or name in (self._hidden() or ()):
            raise NameError(f"Function {name!r} is not found in the worker namespace")
        checked = self._checked.get(name)
        if checked is not None and checked[0] is obj:  # this very object passed before
            return checked
        if is_plan(obj):
            raise TypeError(plan_refusal(name, obj))
        if _is_class(obj):  # (callable, but making an object is no task: it said "not callable")
            raise TypeError(f"Object {name!r} defined in worker namespace is a class, not a function: "
                            f"run a function that uses it")
        if not callable(obj):
            raise TypeError(f"Object {name!r} defined in worker namespace is not callable")
        checked = (obj, is_coroutine_function(obj))
        self._checked.put(name, checked)
        return checked

    def functions(self) -> dict[str, Any]:
        """{name: callable} of the namespace functions (a copy)."""
        with self._lock:
            return dict(self._functions)

    def plans(self) -> dict[str, Any]:
        """{name: generator function} of the namespace plans (a copy)."""
        with self._lock:
            return dict(self._plans)

    def devices(self) -> dict[str, Any]:
        """{name: device} of the namespace ophyd / ophyd-async devices (a copy)."""
        with self._lock:
            return dict(self._devices)

    def describe_functions(self, names: Mapping[str, Any] | None = None) -> dict[str, dict[str, str]]:
        """{name: {"signature", "doc"}} for the functions (sorted by name)."""
        items = self.functions() if names is None else names
        return {name: describe(items[name]) for name in sorted(items)}


_MISSING = object()
