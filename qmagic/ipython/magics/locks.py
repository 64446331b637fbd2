"""The lock magics: ``%lock``, ``%unlock`` and ``%lock_info``.

Keys are never printed.  A key typed on the magic's line (``--key X``) is kept in IPython's
history like anything typed in a cell; ``--prompt-key`` asks for it in a hidden prompt
instead (nothing recorded), and without any key option this kernel's remembered key or your
default key (``qmagic.get_default_lock_key()``) is used.
"""

from __future__ import annotations

import getpass
from typing import Any

from IPython.core.error import StdinNotImplementedError, UsageError
from IPython.core.magic import Magics, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments

from ... import format as fmt
from ...errors import RequestRefused, StateFileError
from ...store.keys import read_default_lock_key
from .args import parse_line, strip_comment, unquote
from .common import refused, show_panel

__all__ = ["LockMagics"]

_KEY_OPTIONS = "--key KEY (or --prompt-key)"  # how %lock and %unlock take a key


def _key(opts: Any) -> str | None:
    if getattr(opts, "default_key", False):  # (%unlock only)
        if opts.key is not None or opts.prompt_key:
            raise UsageError("Give one of --key KEY, --prompt-key or --default-key.")
        key = read_default_lock_key()
        if key is None:
            raise UsageError("You have no default lock key (none was ever made): give --key KEY.")
        return key
    if opts.prompt_key:
        if opts.key is not None:
            raise UsageError("Give --key KEY or --prompt-key, not both.")
        try:
            key = getpass.getpass("Lock key (hidden): ")
        except StdinNotImplementedError:
            raise UsageError(
                "This frontend cannot show a hidden prompt: run the magic in JupyterLab or a "
                "notebook, or give --key KEY (kept in IPython's history)."
            ) from None
        if not key:
            raise UsageError("No key typed; nothing was changed.")
        return key
    return unquote(opts.key)


@magics_class
class LockMagics(Magics):
    """Lock magics; each delegates to ``self.worker``."""

    def __init__(self, shell: Any, worker: Any) -> None:
        super().__init__(shell)
        self.worker = worker

    @magic_arguments()
    @argument("-e", "--environment", action="store_true", help="Lock the environment (the default).")
    @argument("-q", "--queue", action="store_true", help="Lock the queue (permissions, history).")
    @argument("-a", "--all", action="store_true", dest="all", help="Lock both.")
    @argument("--key", default=None,
              help="Lock key (kept in IPython's history like the rest of the line; see --prompt-key).")
    @argument("--prompt-key", dest="prompt_key", action="store_true",
              help="Type the key in a hidden prompt (not kept in any history).")
    @argument("--user", default=None, help="Name shown to others (default: QMagic.default_user).")
    @argument("--note", default=None, help="Why it is locked, shown to others.")
    @line_magic
    def lock(self, line: str) -> None:
        """Lock the environment (the default), the queue (-q) or both (-a): then only holders
        of the key can run or cancel tasks (environment), or change permissions and clear
        the history (queue).  Locking again replaces the scopes (``%lock -q`` after ``%lock``
        leaves the environment unlocked, and says so).

        Without a key option: the key this kernel locked with last, else your default key
        (``qmagic.get_default_lock_key()``).  This kernel remembers the key, so its own magics
        and Python calls keep working; others must give it.  The key is never printed.
        """
        opts = parse_line(self.lock, line)
        chosen = opts.environment or opts.queue or opts.all  # else the worker's default
        environment = (opts.environment or opts.all) if chosen else None
        queue = (opts.queue or opts.all) if chosen else None
        try:
            key, before = _key(opts), self.worker.current_lock().to_lock_info()
            state = self.worker.lock(key, environment=environment, queue=queue,
                                     note=unquote(opts.note), user=unquote(opts.user), origin="magic")
        except (RequestRefused, StateFileError) as exc:  # one line, what to do
            refused(exc, _KEY_OPTIONS)
        after = state.to_lock_info()
        print(fmt.lock_text(after))
        dropped = [scope for scope in ("environment", "queue") if before.get(scope) and not after.get(scope)]
        if dropped:  # (%lock -q after %lock: the new lock's scopes replace the old one's)
            print(f"The {' and the '.join(dropped)} {'is' if len(dropped) == 1 else 'are'} no longer locked: a new "
                  "lock replaces the scopes of the one before (-a locks both).")

    @magic_arguments()
    @argument("--key", default=None,
              help="Lock key or emergency key (kept in IPython's history; see --prompt-key).")
    @argument("--prompt-key", dest="prompt_key", action="store_true",
              help="Type the key in a hidden prompt (not kept in any history).")
    @argument("--default-key", dest="default_key", action="store_true",
              help="Use your default lock key (qmagic.get_default_lock_key(), never shown): the "
              "key of a lock taken with %%lock without a key, after this kernel restarted.")
    @line_magic
    def unlock(self, line: str) -> None:
        """Unlock the environment and queue: with this kernel's remembered key, or the lock key or
        emergency key given.  Prints "Unlocked." (or "Not locked." when it was not locked)."""
        opts = parse_line(self.unlock, line)
        try:
            # (the word comes from the unlock itself: a reading before it could be stale)
            state, released = self.worker.release_lock(_key(opts), origin="magic")
        except (RequestRefused, StateFileError) as exc:  # one line, what to do
            refused(exc, _KEY_OPTIONS)
        print(fmt.lock_text(state.to_lock_info(), unlocked=released))

    @line_magic
    def lock_info(self, line: str) -> None:
        """Show the lock: who locked what, the note, whether an emergency key is set; with
        widgets as a live panel, which also says since when and where the lock can be taken
        and released (the text shows no clock time: a notebook's stored output stays the same)."""
        if strip_comment(line).strip():
            raise UsageError("%lock_info takes no arguments.")
        if show_panel(self.shell, lambda p: p.LockPanel(self.worker)):
            return
        try:
            state = self.worker.lock_state()
        except (RequestRefused, StateFileError) as exc:  # one line, what to do
            refused(exc, _KEY_OPTIONS)
        print(fmt.lock_text(state.to_lock_info()))
