"""The ``QMagic`` configurable: every qmagic setting, as a traitlets trait.

Set them in an IPython profile (``c.QMagic.max_background_tasks = 8``), on the kernel
command line (``--QMagic.max_background_tasks=8``) or on a live worker
(``get_worker().max_background_tasks = 8``).  :class:`qmagic.Worker` *is* a ``QMagic``, so
the ``QMagic`` config section reaches it; each component reads its settings from the
worker (nothing is copied by hand).  Bounds are declared with ``min=`` / ``max=``.
"""

from __future__ import annotations

import difflib
import math
from typing import Any

from traitlets import Bool, Dict, Enum, Float, Int, TraitError, Unicode, Union, validate
from traitlets.config import Configurable

from .core.loops import LOOP_POLICIES
from .core.permissions import DEFAULT_MATCH_TIMEOUT
from .store.lockfile import user_problem
from .store.paths import not_utf8

__all__ = ["QMagic", "MIN_TASK_RETENTION_S", "closest_setting", "no_such_setting"]

#: Queueserver clients rely on results staying at least this long after a task ends.
MIN_TASK_RETENTION_S = 120.0


def closest_setting(name: str, cutoff: float = 0.6) -> str | None:
    """The setting whose name is closest to ``name`` (a misspelling of it), or None."""
    close = difflib.get_close_matches(name, QMagic.class_trait_names(config=True), 1, cutoff)
    return close[0] if close else None


def no_such_setting(owner: str, name: str, meant: str | None) -> str:
    """The one line refusing ``name``, which is no setting (one text for every door)."""
    hint = f"did you mean {meant!r}? " if meant else ""
    return f"{owner} has no setting {name!r}: {hint}the settings are listed by qmagic.QMagic.class_get_help()."


def _put_back(target: Any, before: Any, section: str, keys: list[str]) -> None:
    """``keys`` of ``section`` in the configuration ``target`` as they are in ``before`` (a
    key ``before`` lacks is taken out)."""
    if section not in target:
        return
    was = before[section] if section in before else {}
    for key in keys:
        if key in was:
            target[section][key] = was[key]
        else:
            target[section].pop(key, None)


class Number(Float):
    """A float setting within its bounds, never NaN (which no ``min=``/``max=`` refuses)."""

    def validate(self, obj, value):
        value = super().validate(obj, value)
        if math.isnan(value):
            self.error(obj, value, info="a number")
        return value


class QMagic(Configurable):
    """All qmagic settings (the ``QMagic`` config section)."""

    # -- tasks -----------------------------------------------------------------------------
    max_background_tasks = Int(
        32, min=1, max=1024,
        help="How many background thread tasks may run at once; further tasks wait as 'queued'.",
    ).tag(config=True)
    max_queued_tasks = Int(
        1000, min=1, max=10_000_000,
        help="How many background tasks may wait as 'queued'; further requests are refused.",
    ).tag(config=True)
    task_retention_s = Number(
        600.0, min=MIN_TASK_RETENTION_S, max=365 * 86400.0,
        help="Seconds a finished task stays in memory for task_status/task_result "
        f"(at least {MIN_TASK_RETENTION_S:.0f}, as queueserver clients expect); the "
        "experiment log keeps it afterwards.",
    ).tag(config=True)
    max_finished_tasks = Int(
        1000, min=1, max=10_000_000,
        help="At most this many finished tasks are kept in memory (oldest leave first).",
    ).tag(config=True)
    max_finished_task_bytes = Int(
        256_000_000, min=0, max=1_000_000_000_000,
        help="Memory that the data of remote requests (function_execute arguments, "
        "script_upload scripts) held by finished tasks may take in all, counted from each "
        "request (its bytes and, conservatively, the objects decoded from it): beyond, the "
        "oldest of those tasks leave memory (the experiment log keeps them, large results as a "
        "summary); the newest always stays, so they hold at most about this plus one request.",
    ).tag(config=True)
    max_queued_task_bytes = Int(
        512_000_000, min=0, max=1_000_000_000_000,
        help="Memory that the data of remote requests (function_execute arguments, "
        "script_upload scripts) held by tasks waiting or running may take in all, counted as "
        "for max_finished_task_bytes: a remote request that sends data is refused when with it "
        "they would hold more (a request alone always passes).",
    ).tag(config=True)
    task_output_limit = Int(
        100_000, min=1, max=100_000_000,
        help="Characters of captured output (and of captured log text) kept per task; "
        "the oldest text is dropped first, with a marker.",
    ).tag(config=True)
    cancel_grace_s = Number(
        2.0, min=0.0, max=3600.0,
        help="Seconds a forced cancel (or a deadline) waits for a thread task to stop "
        "cooperatively before raising TaskCancelled inside the task's thread (a coroutine "
        "task still running then gets a second CancelledError).",
    ).tag(config=True)
    async_loop = Enum(
        LOOP_POLICIES, default_value="auto",
        help="Event loop of coroutine (async def) tasks: 'auto' = bluesky's event loop when "
        "bluesky is imported and its loop runs (where ophyd-async devices live), else a loop "
        "thread of qmagic's own; 'bluesky' = bluesky's loop only (tasks fail without it); "
        "'qmagic' = qmagic's own loop always.",
    ).tag(config=True)
    environment_open_on_load = Bool(
        True,
        help="Open the environment for remote clients when qmagic loads. False: remote tasks "
        "and scripts are refused until a client sends environment_open, as an RE Manager "
        "starts (the notebook itself works either way).",
    ).tag(config=True)
    default_user = Unicode(
        "qmagic user",
        help="User name of requests that do not name one: magics, Python calls, panels and remote "
        "script_upload (a remote function_execute must name its user and group, as queueserver's).",
    ).tag(config=True)
    default_user_group = Unicode(
        "primary", help="User group of requests that do not name one (as for default_user); a group of the "
        "permission rules (when it is not, a warning says so and such requests are refused naming this setting)."
    ).tag(config=True)

    # -- permissions -------------------------------------------------------------------------
    user_group_permissions = Dict(
        None, allow_none=True,
        help="User group permissions in queueserver's format "
        "({'user_groups': {GROUP: {'allowed_functions': [...], 'forbidden_functions': [...]}}}). "
        "Empty (the default): the rules of user_group_permissions_file, or if that is not set "
        "either, qmagic's default rules (groups root and primary; any namespace "
        "function whose name does not start with '_').",
    ).tag(config=True)
    user_group_permissions_file = Unicode(
        None, allow_none=True,
        help="YAML file with user group permissions (queueserver's format); used when "
        "user_group_permissions is not set, and read again by permissions_reload.",
    ).tag(config=True)

    permissions_match_timeout = Number(
        DEFAULT_MATCH_TIMEOUT, min=0.001, max=10.0,
        help="CPU seconds that deciding whether one function name is allowed may take; a slower "
        "decision (a pathological ':regex' pattern) refuses the call and names the pattern.",
    ).tag(config=True)

    # -- persistent state (lock, experiment log) ------------------------------------------------
    state_dir = Unicode(
        None, allow_none=True,
        help="Folder for the lock and the experiment log. None: $QMAGIC_STATE_DIR, else a "
        "'qmagic' folder in the Jupyter data dir.",
    ).tag(config=True)
    environment_name = Unicode(
        "default",
        help="Name of the environment: kernels with the same name share one lock and one "
        "experiment log.",
    ).tag(config=True)
    emergency_lock_key = Unicode(
        None, allow_none=True,
        help="Emergency key accepted by unlock only (else $QMAGIC_EMERGENCY_LOCK_KEY, else "
        "queueserver's $QSERVER_EMERGENCY_LOCK_KEY_FOR_SERVER). "
        "Never stored on disk.",
    ).tag(config=True)
    lock_wrong_keys_allowed = Int(
        3, min=0, max=1000,
        help="Wrong lock keys a client may present before each further one makes it wait "
        "(other clients are not slowed down; without client keys, clients are told apart by "
        "address only).",
    ).tag(config=True)
    lock_backoff_s = Number(
        1.0, min=0.01, max=3600.0,
        help="First wait after too many wrong lock keys from one client (at most "
        "lock_backoff_max_s); each further wrong key doubles it.",
    ).tag(config=True)
    lock_backoff_max_s = Number(
        300.0, min=1.0, max=86400.0, help="Longest wait after wrong lock keys from one client.",
    ).tag(config=True)
    lock_recheck_s = Number(
        0.5, min=0.05, max=60.0,
        help="Seconds between safety checks of the lock file (changes are normally seen at once "
        "through a file watcher; this catches network filesystems).",
    ).tag(config=True)
    journal_enabled = Bool(
        True, help="Keep the experiment log: every task's record, in a database that outlives "
        "the kernel.  Switched off while tasks run, the log still records those tasks to their "
        "end, then closes.",
    ).tag(config=True)
    journal_max_bytes = Int(
        200_000_000, min=1_000_000, max=10**15,
        help="Size of the experiment log database kept at least; beyond it the oldest finished "
        "tasks are deleted in small batches. The log is the environment's: this kernel applies "
        "it to every kernel's tasks (the smallest setting among them wins).",
    ).tag(config=True)
    journal_max_age_s = Number(
        30 * 86400.0, min=60.0, max=100 * 365 * 86400.0,
        help="Finished tasks older than this many seconds leave the experiment log "
        "(unfinished tasks are always kept), every kernel's of the environment: the smallest "
        "setting among them wins.",
    ).tag(config=True)
    journal_fsync = Bool(
        False,
        help="Make every record survive a power loss too (a disk flush per batch of records); "
        "without it records survive a crash of the kernel, not of the machine.",
    ).tag(config=True)
    journal_pending_limit = Int(
        100_000, min=100, max=100_000_000,
        help="Events (about 3 per task: queued, started, ended) the experiment log keeps in memory "
        "while it cannot write to disk (disk full, read-only folder), and as many again for "
        "tasks' ends; beyond that they are dropped and counted (see %tasks --history).",
    ).tag(config=True)
    journal_summary_chars = Int(
        2000, min=40, max=1_000_000,
        help="Characters of repr() kept in the experiment log for an argument or result that "
        "JSON cannot store (a marker says it was cut).",
    ).tag(config=True)

    # -- remote channel ------------------------------------------------------------------------------
    zmq_control_address = Unicode(
        None, allow_none=True,
        help="Address of the 0MQ control channel (e.g. tcp://127.0.0.1:60615). None: off.",
    ).tag(config=True)
    zmq_info_address = Unicode(
        None, allow_none=True,
        help="Address of the 0MQ info socket (PUB: console output and status, as queueserver's "
        "port 60625), e.g. tcp://127.0.0.1:60625. None: off.",
    ).tag(config=True)
    zmq_info_encrypted = Bool(
        True,
        help="With CurveZMQ on ($QSERVER_ZMQ_PRIVATE_KEY_FOR_SERVER), encrypt the info socket with "
        "the control channel's key too: only clients holding the server's public key (listed ones, "
        "with zmq_client_keys) receive the streams. False: publish them unencrypted, as "
        "bluesky-queueserver does, so that its own subscribers, which set no keys (bluesky-httpserver's "
        "console and status routes, qserver-console-monitor, REManagerAPI.console_monitor), receive "
        "them; anyone who can reach the address then reads console output and status.",
    ).tag(config=True)
    zmq_console_all_output = Bool(
        False,
        help="Publish everything the kernel prints on the info socket's QS_Console topic; "
        "False: only what tasks and uploaded scripts print (and the threads they start).",
    ).tag(config=True)
    zmq_max_message_bytes = Int(
        10_000_000, min=1024, max=1_000_000_000,
        help="Largest request the control channel accepts, in bytes.",
    ).tag(config=True)
    zmq_max_connections = Int(
        64, min=1, max=100_000,
        help="Most connections the control channel holds open at once (each may hold a few "
        "requests in memory), and the info socket too, counted apart (a subscriber that does not "
        "read may hold up to 16 MiB); further ones are refused until some close. queueserver's "
        "clients and the HTTP gateway hold one each. A change applies to new connections.",
    ).tag(config=True)
    zmq_client_keys = Union(
        [Dict(), Unicode()], default_value=None, allow_none=True,
        help="With CurveZMQ on: the clients allowed to connect to the control channel and the "
        "info socket, {'clients': [{'public_key': KEY, 'user': NAME, 'groups': [GROUP, ...]}, "
        "...]} or a YAML file with that mapping. A client may then claim only its own user name "
        "and groups; unknown keys are refused. None: any client with the server's public key, "
        "and user and group are the client's claims.",
    ).tag(config=True)

    # -- panels -------------------------------------------------------------------------------------
    panel_max_rows = Int(
        200, min=1, max=10_000,
        help="A task panel shows at most this many tasks (newest first) and counts the rest.",
    ).tag(config=True)
    panel_update_hz = Number(
        10.0, min=0.5, max=50.0,
        help="Most widget updates per second a panel sends (changes are coalesced).",
    ).tag(config=True)
    panel_cancel_subshell = Bool(
        True,
        help="Handle clicks on panel buttons (Cancel, Lock, ...) in a kernel subshell of "
        "qmagic's own, so they work while a cell blocks the main thread (ipykernel >= 7.4; "
        "ignored otherwise). False: clicks wait for the running cell; use ■ to interrupt.",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        # (traitlets takes an unknown keyword with a DeprecationWarning nobody sees: a typo
        # such as Worker(ns, max_background_task=8) was dropped and the default applied)
        for name in kwargs:
            if name not in ("parent", "config") and not self.has_trait(name):
                raise TypeError(no_such_setting(f"{type(self).__name__}()", name, closest_setting(name)))
        super().__init__(**kwargs)

    def update_config(self, config) -> None:
        """traitlets' ``update_config``, as IPython's ``%config QMagic.x = v`` calls it on the
        live worker.  A value refused leaves every setting as it was, and is not kept in the
        shell's configuration, which the next ``%reload_ext qmagic`` reads (kept there, it
        failed every later load): it is taken out of ``config``, which %config hands on to
        the configurables after this one, and the shell, when it took it before this one (in
        order of class names: ``TerminalInteractiveShell``, ``InteractiveShell``), gets back
        the values it had."""
        try:
            super().update_config(config)
        except Exception:
            shell_config = getattr(self.parent, "config", None)
            for section in self.section_names():
                refused = config.pop(section, None)
                if refused and shell_config is not None and shell_config is not self.config:
                    _put_back(shell_config, self.config, section, list(refused))
            raise

    @validate("default_user")
    def _check_default_user(self, proposal):
        problem = user_problem(proposal["value"])
        if problem is not None:
            raise TraitError(f"QMagic.default_user {problem}")
        return proposal["value"]

    @validate("state_dir", "user_group_permissions_file")
    def _check_path(self, proposal):
        value = proposal["value"]  # (the lock's and the log's records carry the path as UTF-8 text)
        shown = not_utf8(value) if value else None
        if shown is not None:
            raise TraitError(f"QMagic.{proposal['trait'].name} must be a path in UTF-8 text; '{shown}' is not: "
                             "choose a folder or file whose name is.")
        return value

    @validate("default_user_group")
    def _check_default_group(self, proposal):
        if not proposal["value"]:
            raise TraitError("QMagic.default_user_group must be the name of a user group, not empty.")
        return proposal["value"]

    @validate("user_group_permissions")
    def _check_permissions(self, proposal):
        value = proposal["value"]
        if value:
            from .core.permissions import Permissions

            try:
                Permissions(value)
            except ValueError as exc:
                raise TraitError(f"Invalid user_group_permissions: {exc}") from None
        return value
