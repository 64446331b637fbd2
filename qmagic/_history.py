"""The experiment log for notebook users: ``qmagic.history()`` and ``history_dataframe()``.

Thin wrappers over :mod:`qmagic.store.history` that read the log of the kernel's worker
(its ``state_dir`` and ``environment_name``) when qmagic is loaded, else the defaults
(``$QMAGIC_STATE_DIR`` or the Jupyter data dir, environment "default").
"""

from __future__ import annotations

import os
import sys
from typing import Any

from .store import history as _store

__all__ = ["history", "history_dataframe"]


def _where(state_dir: Any, environment_name: str | None) -> dict[str, Any]:
    """The log to read: ``state_dir``, ``environment_name`` and what to ``check`` if there is
    none (the kernel's own log being off is the likely reason when nothing was named)."""
    worker = None
    if "IPython" in sys.modules:  # a loaded extension can only exist under IPython
        from .ipython.extension import get_session

        session = get_session()
        worker = session.worker if session is not None else None
    check = _store.CHECK_NAMES
    if state_dir is None and worker is not None:  # (the folder its log was opened in: a
        log = worker._readable_log()  # relative QMAGIC_STATE_DIR names another after a %cd)
        state_dir = log.state_dir if log is not None else worker.state_dir
        if not worker.journal_enabled and environment_name in (None, worker.environment_name):
            check = ("this kernel's log is off (QMagic.journal_enabled = False): turn it on to keep a "
                     "record of every task")
    if environment_name is None:
        environment_name = worker.environment_name if worker is not None else "default"
    return {"state_dir": state_dir, "environment_name": environment_name, "check": check}


def history(*, state_dir: str | os.PathLike[str] | None = None,
            environment_name: str | None = None, **filters: Any) -> list[dict[str, Any]]:
    """Records of past and present tasks from the experiment log, newest first.

    Filters: ``status`` (one or several), ``user``, ``name`` (exact or a pattern like
    ``"scan_*"``), ``notebook`` (path or file name of the notebook that started them, or a
    pattern; in patterns ``*`` and ``?`` are wildcards and brackets match themselves, so
    ``"scan[2].ipynb"`` is that file),
    ``since`` / ``until`` (epoch, datetime, ISO text, ``"-2h"``, ``"-7d"``, a clock time such
    as ``"22:00"``: the latest one past, ``"today"``, ``"yesterday"``), ``uid`` (a
    prefix), ``limit`` (the newest N).  Tasks of a kernel that died while they ran read as
    failed ("kernel stopped while the task was running").  Each record has the keys of
    ``Task.to_dict()`` (``uid``, ``status`` as text, ``error``, ``result``, ``traceback``,
    times in epoch seconds, ...; a value JSON cannot store is a ``__qmagic_summary__``
    marker), plus ``journal`` (the session, host and process that logged it, ``orphaned``, ``pending``).
    Where nothing was ever logged (a mistyped ``environment_name`` or ``state_dir``, or this
    kernel's log switched off: ``QMagic.journal_enabled``), a warning says so and the list is
    empty.
    """
    return _store.history(**_where(state_dir, environment_name), **filters)


def history_dataframe(*, state_dir: str | os.PathLike[str] | None = None,
                      environment_name: str | None = None, **filters: Any) -> Any:
    """:func:`history` as a pandas DataFrame (one row per task, times as datetimes,
    ``duration_s``, provenance columns, ``orphaned``).  Needs pandas."""
    return _store.history_dataframe(**_where(state_dir, environment_name), **filters)
