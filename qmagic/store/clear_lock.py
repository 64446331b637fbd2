"""``qmagic-clear-lock``: remove an environment's lock without its key (also a damaged file).

Running kernels notice at once (their watcher sees the new file); no restart is needed.

    qmagic-clear-lock [--environment NAME] [--state-dir DIR]
    python -m qmagic.store.clear_lock --help
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .locks import LockStore
from .paths import STATE_DIR_ENV, default_state_dir

__all__ = ["clear_lock_main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmagic-clear-lock",
        description="Remove the qmagic lock of an environment without its key (also a damaged "
                    "lock file). Running kernels notice at once; no restart needed.")
    parser.add_argument("--environment", default="default",
                        help="environment name, as QMagic.environment_name (default: %(default)s)")
    parser.add_argument("--state-dir", default=None,
                        help=f"folder holding the lock, as QMagic.state_dir (default: ${STATE_DIR_ENV}, "
                             "else the 'qmagic' folder in the Jupyter data dir)")
    return parser


def clear_lock_main(argv: list[str] | None = None) -> int:
    """Run ``qmagic-clear-lock`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args = _parser().parse_args(argv)
    try:
        state_dir = Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()
    except ValueError as exc:  # ($QMAGIC_STATE_DIR is not UTF-8 text)
        print(f"qmagic-clear-lock: error: {exc}", file=sys.stderr)
        return 1
    if not state_dir.is_dir():
        print(f"Nothing to do: the state folder {state_dir} does not exist, so environment "
              f"{args.environment!r} is not locked there.")
        return 0
    try:
        with LockStore(state_dir, args.environment, emergency_key="", watch=False) as store:
            old = store.clear()
    except (ValueError, OSError) as exc:  # StateFileError is an OSError
        print(f"qmagic-clear-lock: error: {exc}", file=sys.stderr)
        return 1
    if old.damaged is not None:
        print(f"The lock file {store.path} was damaged and counted as locked. {old.note}\n"
              f"It has been reset: environment {args.environment!r} is now unlocked.")
    elif old.locked:
        print(f"Removed the lock of environment {args.environment!r} ({store.path}):\n"
              f"  locked by:   {old.user}\n  locked at:   {old.time_str}\n"
              f"  environment: {'locked' if old.environment else 'not locked'}\n"
              f"  queue:       {'locked' if old.queue else 'not locked'}\n"
              f"  note:        {old.note or '---'}\n"
              "Running kernels see the change at once; no restart is needed.")
    else:
        print(f"Nothing to do: environment {args.environment!r} is not locked ({store.path}).")
    return 0


if __name__ == "__main__":
    sys.exit(clear_lock_main())
