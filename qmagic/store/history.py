"""Reading the experiment log: ``history()``, ``history_dataframe()`` and ``qmagic-history``.

Any process can read an environment's log while kernels write it.  Opening it first stores
what kernels that died left in their spools (:mod:`qmagic.store.recovery`) and imports a
journal of qmagic 0.1; a Journal open in this process on the same log answers itself, so
its newest records show too.  The text forms are those of :mod:`qmagic.format`:
``qmagic-history`` prints :func:`~qmagic.history_text.history_table` (the table ``%tasks --history``
shows: when, how long, which notebook cell ran what, e.g. ``01-getting-started.ipynb [12]``)
and :func:`~qmagic.history_text.history_csv`.

This module does not import IPython, ipykernel, ipywidgets or zmq.
"""

from __future__ import annotations

import argparse
import codecs
import heapq
import json
import os
import re
import shlex
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from ..errors import StateFileError, one_line
from ..format import cell_label, printable
from ..history_text import (
    history_csv_lines,
    history_table_lines,
    local_time,
    record_duration,
)
from .database import SCHEMA_VERSION, connect, database_path, ensure_schema
from .legacy import import_legacy, legacy_files
from .paths import default_state_dir, validate_environment_name
from .reader import Filters, LogReader, sort_time
from .records import ORPHAN_REASON, JournalWarning
from .recovery import list_sessions, recover
from .times import parse_time
from .waiting import waiting_records

__all__ = ["history", "history_dataframe", "history_main"]

_TIME_COLUMNS = ("submitted_at", "started_at", "finished_at")
_FIRST_COLUMNS = ("uid", "name", "status", "user", "user_group", "background", "origin",
                  *_TIME_COLUMNS, "duration_s", "error", "notebook", "cell_id", "execution_count",
                  "cell_hash", "cell")


def _open_journal(state_dir: Path, env: str) -> Any:
    """A Journal of this process that writes this log (its reads include what it has not
    stored yet), or None."""
    from .journal import _OPEN  # (a cycle at import time otherwise)

    path = database_path(state_dir, env)
    return next((j for j in list(_OPEN) if j.path == path), None)


def _prepare(state_dir: Path, env: str) -> tuple[Path | None, bool]:
    """Recover dead sessions, import an old journal; return the database path, or None
    when nothing was ever logged there, and whether its spools are this qmagic's to read."""
    path = database_path(state_dir, env)
    sessions = list_sessions(state_dir, env)
    legacy = legacy_files(state_dir, env)
    if not path.exists() and not sessions and not legacy:
        return None, False
    if sessions and not os.access(state_dir, os.W_OK):  # (a read-only copy: nothing is stored)
        warnings.warn(f"{state_dir} cannot be written (a read-only copy?): the tasks of kernels that stopped "
                      "are read from the spool files they left.", JournalWarning, stacklevel=3)
        return path, True
    if sessions or legacy:
        conn = None
        try:
            conn = connect(path, create=True)
            version = ensure_schema(conn)
            if version > SCHEMA_VERSION:  # (read, never written: its kernels store their own)
                warnings.warn(f"The experiment log {str(path)!r} was made by a newer qmagic (schema "
                              f"{version}); showing what it holds (upgrade qmagic to see the tasks of "
                              "its kernels that stopped).", JournalWarning, stacklevel=3)
                return path, False
            import_legacy(conn, state_dir, env, time.time())
            recover(conn, state_dir, env, None, time.time())
        except Exception as exc:  # noqa: BLE001 - read what is there
            warnings.warn(f"qmagic could not store what earlier kernels left in {state_dir} ({exc}); "
                          "showing what the experiment log holds and, from their spool files, the tasks they left.",
                          JournalWarning, stacklevel=3)
        finally:
            if conn is not None:
                conn.close()
    return path, True


#: What a history() that found no log says to check (the folder and environment it was given).
CHECK_NAMES = "check environment_name and state_dir"


def history(*, state_dir: str | os.PathLike[str] | None = None, environment_name: str = "default",
            check: str = CHECK_NAMES, **filters: Any) -> list[dict[str, Any]]:
    """Task records of an environment's experiment log, newest first.

    ``filters`` are those of :meth:`qmagic.store.journal.Journal.records`: ``status``,
    ``user``, ``name``, ``notebook``, ``since``, ``until``, ``uid``, ``limit``.
    ``state_dir`` defaults to :func:`~qmagic.store.paths.default_state_dir`.  Raises
    StateFileError when the log cannot be read, ValueError for a bad filter.  Where nothing
    was ever logged (a mistyped environment or folder), a JournalWarning says so, ending with
    ``check`` (what to do), and the list is empty.
    """
    if state_dir is not None and not isinstance(state_dir, (str, os.PathLike)):
        raise one_line(ValueError(f"state_dir must be a folder's path (text or a Path), not "
                                  f"{type(state_dir).__name__}: leave it out to read this kernel's log."))
    try:
        environment_name = validate_environment_name(environment_name)
    except ValueError as exc:
        raise one_line(exc) from None
    folder = Path(default_state_dir() if state_dir is None else state_dir).expanduser()
    found = _read(folder, environment_name, filters)
    if found is None:  # (not an empty log: a mistyped name or folder reads nothing, says so)
        warnings.warn(_no_log(environment_name, folder, check), JournalWarning, stacklevel=3)
        return []
    return found


def _no_log(env: str, folder: Path, check: str) -> str:
    return (f"No experiment log for environment {env!r} in {folder}: nothing was recorded there "
            f"yet ({check}).")


def _read(folder: Path, env: str, filters: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Records of the log (None when nothing was ever logged there)."""
    folder = folder.absolute()  # (the folder an open Journal names, if it is that log)
    chosen = Filters(**filters)  # (checked before anything is opened)
    if chosen.statuses is not None:  # (read once: a generator is empty the second time)
        filters = dict(filters, status=chosen.statuses)
    journal = _open_journal(folder, env)
    if journal is not None:
        return journal.records(**filters)
    opened = _open_reader(folder, env, chosen)
    if opened is None:
        return None
    reader, left = opened
    try:
        if not left:
            return reader.records(chosen)
        found = sorted([*reader.records(chosen, exclude=left), *left.values()], key=sort_time, reverse=True)
        return found if chosen.limit is None else found[:chosen.limit]
    finally:
        reader.close()


def _open_reader(folder: Path, env: str, chosen: Filters) -> tuple[LogReader, dict[str, dict[str, Any]]] | None:
    """The log's reader (the caller closes it) and the records :func:`_left_in_spools`;
    None when nothing was ever logged there."""
    path, ours = _prepare(folder, env)
    if path is None:
        return None
    reader = LogReader(path)
    try:
        return reader, (_left_in_spools(reader, folder, env, chosen) if ours else {})
    except BaseException:
        reader.close()
        raise


def _oldest_first(folder: Path, env: str, filters: dict[str, Any]) -> Iterable[dict[str, Any]] | None:
    """The records ``qmagic-history`` prints, oldest first (None: nothing was ever logged
    there): a ``--limit``'s newest N, else the whole log as it is read, page by page
    (bounded memory; the first lines at once, as ``| head`` wants them)."""
    folder = folder.absolute()
    chosen = Filters(**filters)
    if chosen.limit is not None or _open_journal(folder, env) is not None:
        found = _read(folder, env, filters)
        return None if found is None else found[::-1]
    opened = _open_reader(folder, env, chosen)
    return None if opened is None else _stored_and_left(opened[0], chosen, opened[1])


def _stored_and_left(reader: LogReader, chosen: Filters, left: dict[str, dict[str, Any]]
                     ) -> Iterator[dict[str, Any]]:
    """The database's records page by page and those ``left`` in spools, merged oldest first."""
    try:
        stored = (rec for page in reader.pages(chosen, exclude=left) for rec in page)
        yield from heapq.merge(stored, sorted(left.values(), key=sort_time), key=sort_time)
    finally:
        reader.close()


def _left_in_spools(reader: LogReader, folder: Path, env: str, chosen: Filters) -> dict[str, dict[str, Any]]:
    """Records that kernels which are gone left in their spools and the database does not
    hold: recovery could not store them (a read-only copy of a beamtime's folder, another
    process holding the write lock), and they are the tasks that ran when a kernel died."""
    if not any(entry.spools for entry in list_sessions(folder, env).values()):
        return {}
    now = time.time()
    found = waiting_records(reader, folder, env, "", prefix="", live=False)
    return {uid: rec for uid, rec in found.items() if chosen.match(rec, now)}


def _provenance(rec: Mapping[str, Any]) -> dict[str, Any]:
    prov = rec.get("provenance")
    return prov if isinstance(prov, dict) else {}


def history_dataframe(*, state_dir: str | os.PathLike[str] | None = None,
                      environment_name: str = "default", check: str = CHECK_NAMES,
                      **filters: Any) -> Any:
    """:func:`history` as a pandas DataFrame, one row per task, newest first.

    Times are local ``datetime64`` columns, ``duration_s`` is finished - started; the
    provenance (``notebook``, ``cell_id``, ``execution_count``, ``cell_hash`` and ``cell``
    as ``"01-getting-started.ipynb [12]"``) and the writer's ``host``, ``pid``,
    ``session`` and an ``orphaned`` flag replace the nested entries.
    """
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("qmagic.history_dataframe() needs pandas, which is not installed: "
                          "`pip install pandas` (or `pip install qmagic[pandas]`), or use "
                          "qmagic.history() for a list of dicts.") from exc
    rows = []
    for rec in history(state_dir=state_dir, environment_name=environment_name, check=check, **filters):
        meta = rec.pop("journal")
        prov = _provenance(rec)
        rec["cell"] = cell_label(prov) or "-"
        rec.pop("provenance", None)
        rec.update({k: prov.get(k) for k in ("notebook", "cell_id", "execution_count", "cell_hash")})
        rec["duration_s"] = record_duration(rec)
        for column in _TIME_COLUMNS:
            rec[column] = local_time(rec.get(column))
        rec.update(host=meta.get("host"), pid=meta.get("pid"), session=meta.get("session"),
                   orphaned=bool(meta.get("orphaned")))
        rows.append(rec)
    frame = pd.DataFrame(rows)
    columns = [c for c in _FIRST_COLUMNS if c in frame.columns or not rows]
    frame = frame.reindex(columns=columns + [c for c in frame.columns if c not in columns])
    for column in _TIME_COLUMNS:
        frame[column] = pd.to_datetime(frame[column])
    return frame


# ---- the qmagic-history command -----------------------------------------------------------------
def _limit(text: str) -> int:
    """--limit's value: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: the number of newest tasks to show (got {value})")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmagic-history",
        description="Print the experiment log of a qmagic environment, oldest first; --limit keeps "
                    "the newest N. Unfinished tasks of kernels that stopped show as failed "
                    f"('{ORPHAN_REASON}'). Exit status 1 when there is no log at all for the "
                    "environment (a mistyped --environment or --state-dir).")
    parser.add_argument("--environment", "-e", default="default", help="environment name (default: %(default)s)")
    parser.add_argument("--state-dir", help="state folder (default: $QMAGIC_STATE_DIR or <jupyter data dir>/qmagic)")
    parser.add_argument("--since", help="only tasks active since: ISO date/time, a clock time (22:00: "
                        "the latest past), today, yesterday, or -30m, -2h, -7d")
    parser.add_argument("--until", help="only tasks active until: same formats as --since")
    parser.add_argument("--status", action="append", help="only this status (repeatable): "
                        "queued, running, completed, failed, cancelled")
    parser.add_argument("--user", help="only tasks of this user")
    parser.add_argument("--name", help="only this function name; * and ? are wildcards, "
                        "brackets match themselves (quote patterns: 'scan_*')")
    parser.add_argument("--notebook", help="only tasks started from this notebook: path (a relative one, as JupyterLab "
                        "shows it, matches the end of the recorded path) or file name; "
                        "* and ? are wildcards, brackets match themselves ('scan[2].ipynb')")
    parser.add_argument("--uid", help="only the task with this uid (or uid prefix)")
    parser.add_argument("--limit", type=_limit, help="show only the newest N tasks (N >= 0)")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON object per line")
    form.add_argument("--csv", action="store_true", help="CSV with a header line")
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that Python's last flush at exit meets no closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout: nothing to flush there
        pass


def _utf8_out() -> bool:
    """Whether stdout takes any text (UTF-8); else lines are made to fit its encoding."""
    try:
        return codecs.lookup(getattr(sys.stdout, "encoding", None) or "utf-8").name == "utf-8"
    except LookupError:
        return False


def _fit_stdout() -> None:
    """A terminal without UTF-8 (LANG=en_US.ISO-8859-1, PYTHONIOENCODING=ascii) shows what it
    cannot encode as backslash escapes (``\\xfc``) instead of a UnicodeEncodeError traceback."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="backslashreplace")
        except (ValueError, OSError):  # (a stream that cannot change now: written as it is)
            pass


def history_main(argv: list[str] | None = None) -> int:
    """Console script ``qmagic-history``: print an environment's experiment log."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # let "--since -2h" mean "--since=-2h"
        if arg in ("--since", "--until") and re.match(r"-\d", argv[i + 1]):
            argv[i:i + 2] = [f"{arg}={argv[i + 1]}", ""]
    args = parser.parse_args([a for a in argv if a])
    try:
        validate_environment_name(args.environment)
        filters = {"status": args.status, "user": args.user, "name": args.name,
                   "notebook": args.notebook, "since": parse_time(args.since),
                   "until": parse_time(args.until), "uid": args.uid, "limit": args.limit}
        Filters(**filters)
        state_dir = Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()
    except ValueError as exc:
        parser.error(str(exc))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", JournalWarning)
        found: Any = None
        try:
            found = _oldest_first(state_dir, args.environment, filters)
            _say(caught)  # (before the records: what the read could not do)
            if found is None:
                print(_no_log(args.environment, state_dir, "check --environment and --state-dir"), file=sys.stderr)
                return 1
            shown = _write(args, found)
        except StateFileError as exc:
            print(f"qmagic-history: {exc}", file=sys.stderr)
            return 1
        except BrokenPipeError:  # `qmagic-history | head`: the reader took what it wanted
            _silence_stdout()
            return 0
        finally:
            if hasattr(found, "close"):  # (a generator cut short: its database connection closes now)
                found.close()
        _say(caught)  # (a record skipped on a later page)
    if not shown and not args.csv:
        print(_none_matches(args, state_dir), file=sys.stderr)
    return 0


def _say(caught: list[warnings.WarningMessage]) -> None:
    """Print the warnings caught so far, one line each, and forget them."""
    for warning in caught:
        print(f"warning: {printable(warning.message)}", file=sys.stderr)
    caught.clear()


def _write(args: argparse.Namespace, records: Iterable[dict[str, Any]]) -> int:
    """Print ``records`` as they come, in the form asked; returns how many."""
    utf8 = _utf8_out()
    if not utf8:
        _fit_stdout()
    count = 0

    def counted() -> Iterator[dict[str, Any]]:
        nonlocal count
        for rec in records:
            count += 1
            yield rec

    write = sys.stdout.write
    if args.json:  # (on a terminal without UTF-8: the same JSON, in ASCII)
        for rec in counted():
            write(orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE).decode() if utf8 else
                  json.dumps(rec, ensure_ascii=True, separators=(",", ":")) + "\n")
    elif args.csv:
        for line in history_csv_lines(counted()):
            write(line)
    else:
        encoding = getattr(sys.stdout, "encoding", None) or "utf-8"  # (escapes widen a cell: made first)
        fit = None if utf8 else lambda s: s.encode(encoding, "backslashreplace").decode(encoding)
        for line in history_table_lines(counted(), fit):
            write(line + "\n")
    sys.stdout.flush()
    return count


def _holds_tasks(folder: Path, env: str) -> bool:
    """Whether the log holds any task: one indexed row of the database (the read that found
    none stored what kernels that are gone left; no second recovery, which waits seconds for
    a kernel holding the database), else a read of the spools, as that read made."""
    reader = LogReader(database_path(folder, env))
    try:
        if reader.holds_tasks():
            return True
    finally:
        reader.close()
    if _open_journal(folder, env) is None and not any(e.spools for e in list_sessions(folder, env).values()):
        return False
    with warnings.catch_warnings():  # (said once already, by the read that found nothing)
        warnings.simplefilter("ignore")
        return bool(_read(folder, env, {"limit": 1}))


def _none_matches(args: argparse.Namespace, state_dir: Path) -> str:
    """What an empty answer means: which filters left everything out when the log holds
    tasks (``--uid abc``: no uid starts with abc), or that it holds none yet."""
    given = []
    for key in ("since", "until", "status", "user", "name", "notebook", "uid", "limit"):
        value = getattr(args, key)
        for one in value if key == "status" and value else [value]:  # (--status may be given again)
            if one is not None:
                given.append(f"--{key} {printable(shlex.quote(str(one)), 80)}")
    try:
        some = _holds_tasks(state_dir.absolute(), args.environment)
    except StateFileError:
        some = True  # (cannot tell: say only what matched)
    if not some:
        return "No task matches: the experiment log holds no task yet."
    if not given:
        return "No task matches."
    return (f"No task matches {' '.join(given)}; the log holds other tasks (qmagic-history --limit 20 "
            "lists the newest).")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(history_main())
