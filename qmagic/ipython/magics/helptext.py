"""``%magic?``: each magic's help as plain text.

IPython's ``magic_arguments`` makes a magic's ``__doc__`` from its parser, for
reStructuredText: a ``::`` line before the usage, and an option's value that is not a plain
name wrapped in ``<>`` (``--history <[N]>`` for an optional value).  The notebook shows that
text as it is, so :func:`tidy_help` makes it again without either; a magic without options
gets its docstring without the source's indentation.
"""

from __future__ import annotations

import inspect

from IPython.core.magic_arguments import MagicHelpFormatter

from .args import usage_text

__all__ = ["tidy_help"]


class _PlainHelpFormatter(MagicHelpFormatter):
    """IPython's help formatter, an option's value shown as argparse shows it (``[N]``)."""

    def _format_action_invocation(self, action):  # noqa: ANN001, ANN202 - argparse's hook
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        value = self._format_args(action, action.dest.upper())
        return ", ".join(f"{option} {value}" for option in action.option_strings)


def tidy_help(magics_class: type) -> type:
    """Make the ``__doc__`` of each magic of ``magics_class`` plain text (module docstring),
    its first line written as the magics' own errors write it (:func:`usage_text`:
    ``[start|stop|status]``, not argparse's ``[{start,stop,status}]``)."""
    table = getattr(magics_class, "magics", {})
    magics = {method: magic for kind in ("cell", "line") for magic, method in table.get(kind, {}).items()}
    for method, magic in magics.items():
        func = vars(magics_class).get(method)
        doc = getattr(func, "__doc__", None)
        if not isinstance(doc, str):
            continue
        parser = getattr(func, "parser", None)
        if parser is not None:
            parser.formatter_class = _PlainHelpFormatter
            doc = parser.format_help()
            doc = doc[2:].lstrip("\n") if doc.startswith("::") else doc
            func.__doc__ = usage_text(parser, f"%{magic}") + "\n\n" + doc.partition("\n\n")[2]
        else:
            func.__doc__ = inspect.cleandoc(doc)
    return magics_class
