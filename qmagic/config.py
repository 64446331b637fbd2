"""The ``QMagic`` configurable: every qmagic setting, as traitlets traits.

Set them in an IPython profile (``c.QMagic.max_background_tasks = 8``), on the kernel
command line (``--QMagic.max_background_tasks=8``) or on a live worker
(``get_worker().max_background_tasks = 8``).  :class:`qmagic.Worker` *is* a ``QMagic``, so
the ``QMagic`` config section reaches it.
"""

from __future__ import annotations

from traitlets import Bool, Dict, Float, Int, TraitError, Unicode, validate
from traitlets.config import Configurable

__all__ = ["QMagic", "MIN_TASK_RETENTION_S"]

#: Queueserver clients rely on results staying at least this long after a task ends.
MIN_TASK_RETENTION_S = 120.0


class QMagic(Configurable):
    """All qmagic settings (the ``QMagic`` config section)."""

    # -- engine ------------------------------------------------------------------------
    max_background_tasks = Int(
        32, help="How many background tasks may run at once; further tasks wait as 'queued'."
    ).tag(config=True)
    max_queued_tasks = Int(
        1000, help="How many background tasks may wait as 'queued'; further requests are refused."
    ).tag(config=True)
    task_retention_s = Float(
        600.0,
        help="Seconds a finished task stays available to task_status/task_result "
        f"(at least {MIN_TASK_RETENTION_S:.0f}, as queueserver clients expect).",
    ).tag(config=True)
    max_finished_tasks = Int(
        1000, help="At most this many finished tasks are kept in memory (oldest leave first)."
    ).tag(config=True)
    task_output_limit = Int(
        100_000,
        help="Characters of captured output (and of captured log text) kept per task; "
        "the oldest text is dropped first, with a marker.",
    ).tag(config=True)
    cancel_grace_s = Float(
        2.0,
        help="Seconds a forced cancel waits for a task to stop cooperatively before raising "
        "TaskCancelled inside the task's thread.",
    ).tag(config=True)
    default_user = Unicode("qmagic user", help="User name of requests that do not name one.").tag(
        config=True
    )
    default_user_group = Unicode(
        "primary", help="User group of requests that do not name one."
    ).tag(config=True)

    # -- permissions -------------------------------------------------------------------
    user_group_permissions = Dict(
        None,
        allow_none=True,
        help="User group permissions in queueserver's format "
        "({'user_groups': {GROUP: {'allowed_functions': [...], 'forbidden_functions': [...]}}}). "
        "Empty (the default): the rules of user_group_permissions_file, or if that is not set "
        "either, every group may call any namespace callable whose name does not start with '_'.",
    ).tag(config=True)
    user_group_permissions_file = Unicode(
        None,
        allow_none=True,
        help="YAML file with user group permissions (queueserver's format). "
        "Used when user_group_permissions is not set.",
    ).tag(config=True)

    # -- persistent state (locks, journal) ----------------------------------------------
    state_dir = Unicode(
        None,
        allow_none=True,
        help="Folder for the lock and the task journal. None: $QMAGIC_STATE_DIR, else a "
        "'qmagic' folder in the Jupyter data dir.",
    ).tag(config=True)
    environment_name = Unicode(
        "default",
        help="Name of the environment: kernels with the same name share one lock and one journal.",
    ).tag(config=True)
    emergency_lock_key = Unicode(
        None,
        allow_none=True,
        help="Emergency key accepted by unlock only (else $QMAGIC_EMERGENCY_LOCK_KEY). "
        "Never stored on disk.",
    ).tag(config=True)
    journal_enabled = Bool(
        True, help="Append every task's record to the persistent journal (the experiment log)."
    ).tag(config=True)
    journal_max_bytes = Int(
        50_000_000,
        help="Size of the task journal (all its files) that is kept at least; older files "
        "beyond it are deleted. The active file is rotated at a quarter of this.",
    ).tag(config=True)
    journal_max_age_s = Float(
        30 * 86400.0,
        help="Journal files last written longer ago than this many seconds are deleted. A "
        "record is kept while it is younger than this and within journal_max_bytes; "
        "unfinished tasks are always kept.",
    ).tag(config=True)
    journal_fsync = Bool(
        False,
        help="fsync the journal after every line (task start and end): records survive a "
        "power loss, at the cost of a disk flush per line (milliseconds instead of ~10 us).",
    ).tag(config=True)
    journal_summary_chars = Int(
        2000,
        help="Characters of repr() kept in the journal for an argument or result that JSON "
        "cannot store (a marker says it was cut).",
    ).tag(config=True)

    # -- remote control channel -----------------------------------------------------------
    zmq_control_address = Unicode(
        None,
        allow_none=True,
        help="Address of the 0MQ control channel (e.g. tcp://127.0.0.1:60615). None: off.",
    ).tag(config=True)
    zmq_max_message_bytes = Int(
        10_000_000, help="Largest request the control channel accepts, in bytes."
    ).tag(config=True)

    # -- panels ---------------------------------------------------------------------------
    panel_max_rows = Int(
        200, help="A task panel shows at most this many tasks (newest first) and counts the rest."
    ).tag(config=True)
    panel_update_hz = Float(
        10.0, help="Most widget updates per second a panel sends (changes are coalesced)."
    ).tag(config=True)
    panel_cancel_subshell = Bool(
        True,
        help="Handle clicks on panel buttons (Cancel, Lock, ...) in a kernel subshell of "
        "qmagic's own, so they work while a cell blocks the main thread (ipykernel >= 7.4; "
        "ignored otherwise). False: clicks wait for the running cell; use ■ to interrupt.",
    ).tag(config=True)

    @validate("task_retention_s")
    def _check_retention(self, proposal):
        value = proposal["value"]
        if value < MIN_TASK_RETENTION_S:
            raise TraitError(
                f"task_retention_s must be at least {MIN_TASK_RETENTION_S:.0f} s "
                f"(got {value}): queueserver clients read results up to 120 s after a task ends."
            )
        return value

    @validate(
        "max_background_tasks",
        "max_queued_tasks",
        "max_finished_tasks",
        "task_output_limit",
        "journal_max_bytes",
        "journal_summary_chars",
    )
    def _check_positive(self, proposal):
        if proposal["value"] < 1:
            raise TraitError(
                f"{proposal['trait'].name} must be at least 1 (got {proposal['value']})."
            )
        return proposal["value"]

    @validate("user_group_permissions")
    def _check_permissions(self, proposal):
        value = proposal["value"]
        if value:
            from .permissions import Permissions

            try:
                Permissions(value)
            except ValueError as exc:
                raise TraitError(f"Invalid user_group_permissions: {exc}") from None
        return value

    @validate("journal_max_age_s")
    def _check_age(self, proposal):
        if proposal["value"] <= 0:
            raise TraitError(f"journal_max_age_s must be > 0 (got {proposal['value']}).")
        return proposal["value"]

    @validate("cancel_grace_s")
    def _check_grace(self, proposal):
        if proposal["value"] < 0:
            raise TraitError(f"cancel_grace_s must be >= 0 (got {proposal['value']}).")
        return proposal["value"]
