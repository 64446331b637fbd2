"""The panels' stylesheet: every look of the HTML in :mod:`qmagic.panels.render`, once.

Each panel sends :func:`stylesheet` once, as a ``<style>`` in a hidden ``HTML`` widget of
its own (:func:`style_html`); its rows then carry short class names (``qm-row``,
``qm-call``, ``qm-b``...) and only per-row data inline (a progress bar's width).  A row
is about 0.5 kB instead of 2.5 kB, so a tick that re-sends a block of rows sends a tenth
of the bytes.  Every rule is scoped under :data:`PANEL_CLASS`, a class only qmagic panels
carry, so the sheet (which the browser applies to the whole page) styles nothing else.

Colours come from JupyterLab's theme variables (``--jp-ui-font-color1``,
``--jp-border-color2``, ``--jp-brand-color1``, ``--jp-success-color1``...), then VS Code's,
then JupyterLab's light values (classic Notebook), so a panel reads well in the light and
the dark theme: text always uses the theme's font colours; a status colour (``--qm-c``,
set by ``data-status`` or a lock badge's class) marks borders, dots and bars, and tints
backgrounds only lightly (``color-mix``; transparent where it is unknown).
"""

from __future__ import annotations

import functools

__all__ = [
    "PANEL_CLASS",
    "ROW_HEIGHT_PX",
    "HEADER_PX",
    "BUTTON_WIDTH_PX",
    "TOGGLE_WIDTH_PX",
    "CONTROLS_GAP_PX",
    "CONTROLS_WIDTH_PX",
    "CONTROLS_MARGIN_PX",
    "STATUS_COLOURS",
    "BORDER2",
    "STATIC_CLASS",
    "stylesheet",
    "style_html",
    "row_style_html",
]

#: The class every qmagic panel carries; every rule of the stylesheet is scoped under it.
PANEL_CLASS = "qmagic-panel"
#: Height of one task row, in the table and in the controls column (they must agree).
ROW_HEIGHT_PX = 48
#: Height of the counts line on top of a task table (the controls column is padded by as much).
HEADER_PX = 26
#: The controls drawn over the right end of every row: Cancel / Force stop, then Details.
BUTTON_WIDTH_PX = 80
TOGGLE_WIDTH_PX = 64
CONTROLS_GAP_PX = 6
CONTROLS_WIDTH_PX = BUTTON_WIDTH_PX + CONTROLS_GAP_PX + TOGGLE_WIDTH_PX
#: Space between the controls and the row's right edge.
CONTROLS_MARGIN_PX = 8

# Theme colours: JupyterLab's, then VS Code's, then JupyterLab's light values.
FONT1 = "var(--jp-ui-font-color1, var(--vscode-editor-foreground, rgba(0, 0, 0, 0.87)))"
FONT2 = "var(--jp-ui-font-color2, var(--vscode-descriptionForeground, rgba(0, 0, 0, 0.54)))"
BORDER1 = "var(--jp-border-color1, var(--vscode-editorWidget-border, #bdbdbd))"
BORDER2 = "var(--jp-border-color2, var(--vscode-editorWidget-border, #e0e0e0))"
LAYOUT2 = "var(--jp-layout-color2, var(--vscode-editorWidget-background, #eeeeee))"
CODE_FONT = "var(--jp-code-font-family, var(--vscode-editor-font-family, monospace))"
UI_FONT_SIZE = "var(--jp-ui-font-size1, 13px)"

#: The colour that marks each status (badge border and tint, progress bar, details rule).
STATUS_COLOURS: dict[str, str] = {
    "queued": "var(--jp-layout-color4, #757575)",
    "running": "var(--jp-brand-color1, #1976d2)",
    "completed": "var(--jp-success-color1, #388e3c)",
    "failed": "var(--jp-error-color1, #d32f2f)",
    "cancelled": "var(--jp-warn-color1, #f57c00)",
}
_MESSAGE_COLOURS = {
    "error": STATUS_COLOURS["failed"],
    "ok": STATUS_COLOURS["completed"],
    "info": STATUS_COLOURS["running"],
}


def _tint(percent: int) -> str:
    """A background tinted with the element's ``--qm-c``: transparent where color-mix is unknown."""
    return f"background:transparent;background:color-mix(in srgb, var(--qm-c) {percent}%, transparent)"


_CUT = "min-width:0;overflow:hidden;text-overflow:ellipsis"
_PRE = (f"margin:2px 0 8px 0;padding:6px 8px;max-height:220px;overflow:auto;white-space:pre-wrap;"
        f"word-break:break-word;font-family:{CODE_FONT};font-size:12px;line-height:1.35;"
        f"background:{LAYOUT2};color:{FONT1};border-radius:4px")


def _rules() -> list[tuple[str, str]]:
    right = CONTROLS_WIDTH_PX + 2 * CONTROLS_MARGIN_PX
    line = "display:flex;align-items:center;gap:8px;min-width:0;white-space:nowrap"
    rules = [(f"[data-status={status}]", f"--qm-c:{colour}") for status, colour in STATUS_COLOURS.items()]
    rules += [(f".qmagic-message-{kind}", f"--qm-c:{colour}") for kind, colour in _MESSAGE_COLOURS.items()]
    rules += [
        (".qm-locked", f"--qm-c:{STATUS_COLOURS['failed']}"),
        (".qm-unlocked", f"--qm-c:{STATUS_COLOURS['completed']}"),
        (".qm-title", f"font-weight:600;font-size:13px;color:{FONT1}"),
        (".qm-tbl", "display:grid;grid-template-columns:minmax(0, 1fr)"),
        (".qm-row", f"box-sizing:border-box;height:{ROW_HEIGHT_PX}px;padding:3px {right}px 3px 8px;"
                    "display:flex;flex-direction:column;justify-content:center;gap:4px;overflow:hidden;"
                    f"border-bottom:1px solid {BORDER2};line-height:normal;font-size:{UI_FONT_SIZE};"
                    f"color:{FONT1}"),
        (".qm-h, .qm-p", line),
        (".qm-b", "flex:0 0 auto;display:inline-block;box-sizing:border-box;min-width:86px;"
                  "text-align:center;border-radius:10px;padding:1px 8px;font-size:11.5px;font-weight:600;"
                  f"letter-spacing:0.02em;color:{FONT1};border:1px solid var(--qm-c);{_tint(18)}"),
        (".qm-call", f"flex:0 0 auto;max-width:50%;{_CUT};font-family:{CODE_FONT};font-size:12.5px;"
                     "font-weight:600"),
        (".qm-mode", f"flex:0 0 auto;font-size:11px;padding:0 6px;border-radius:8px;"
                     f"border:1px solid {BORDER1};color:{FONT2}"),
        (".qm-user", f"flex:0 100 auto;{_CUT};color:{FONT2}"),
        (".qm-el", f"flex:0 0 auto;margin-left:auto;font-variant-numeric:tabular-nums;color:{FONT2}"),
        (".qm-bar", f"flex:0 0 150px;height:6px;border-radius:3px;background:{LAYOUT2};overflow:hidden"),
        (".qm-fill", "display:block;height:100%;background:var(--qm-c)"),
        (".qm-pt", f"flex:0 1 auto;{_CUT}"),
        (".qm-end", f"flex:0 100 auto;{_CUT};color:{FONT2}"),
        (".qmagic-task-summary", f"box-sizing:border-box;height:{HEADER_PX}px;padding:4px 8px 0 8px;"
                                 f"font-size:12px;color:{FONT2};white-space:nowrap;{_CUT};line-height:normal;"
                                 f"border-bottom:1px solid {BORDER2}"),
        (".qmagic-empty", f"padding:8px;line-height:normal;color:{FONT2}"),
        (".qmagic-hidden-count", f"font-size:12px;color:{FONT2};padding:2px 8px;line-height:1.4"),
        (".qmagic-task-details", "padding:6px 10px 2px 10px;border-left:3px solid var(--qm-c);"
                                 f"border-bottom:1px solid {BORDER2};line-height:normal;color:{FONT1}"),
        (".qm-facts", f"font-size:12px;color:{FONT2};margin-bottom:6px"),
        (".qm-dt", f"font-weight:600;font-size:12px;color:{FONT2}"),
        (".qmagic-detail pre", _PRE),
        # what matters is at the end (the exception, the newest output): the box shows its
        # end, also after each update (the text is sent again whole, the scroll reset)
        (".qmagic-detail-traceback pre, .qmagic-detail-output pre, .qmagic-detail-log pre",
         "display:flex;flex-direction:column-reverse"),
        (".qmagic-message", "white-space:pre-wrap;font-size:12.5px;line-height:1.35;padding:4px 8px;"
                            f"border-radius:3px;color:{FONT1};border-left:3px solid var(--qm-c);{_tint(12)}"),
        (".qmagic-lock-scope", "margin-right:6px"),
        (".qmagic-lock-label", f"font-size:11.5px;font-weight:600;color:{FONT2};margin-bottom:3px"),
        (".qmagic-lock-state", f"font-size:13px;line-height:1.4;color:{FONT1}"),
        (".qmagic-lock-state .qm-line", "margin-top:3px"),
        (".qmagic-lock-then", f"--qm-c:{BORDER1};font-size:12.5px;line-height:1.4;color:{FONT1};"
                              f"padding:4px 8px;margin-bottom:6px;border-left:3px solid var(--qm-c);{_tint(15)}"),
        (".qmagic-lock-then .qm-dt", "font-size:inherit"),
    ]
    return rules


#: Class of a finished row's static copy (:func:`row_style_html`): no buttons to make room for.
STATIC_CLASS = "qm-static"

#: The selectors a task row uses (its static copy carries only their rules).
_ROW_SELECTORS = frozenset({".qm-tbl", ".qm-row", ".qm-h, .qm-p", ".qm-b", ".qm-call", ".qm-mode", ".qm-user",
                            ".qm-el", ".qm-bar", ".qm-fill", ".qm-pt", ".qm-end"})


def _scoped(rules: list[tuple[str, str]], scope: str = f".{PANEL_CLASS}") -> str:
    out = []
    for selector, body in rules:
        scoped = ", ".join(f"{scope} {part.strip()}" for part in selector.split(","))
        out.append(f"{scoped}{{{body}}}")
    return "\n".join(out)


@functools.lru_cache(maxsize=None)
def stylesheet() -> str:
    """The CSS of every panel, each rule scoped under ``.qmagic-panel``."""
    return _scoped(_rules())


def style_html() -> str:
    """The value of a panel's style widget: the stylesheet in a ``<style>`` element."""
    return f'<style class="qmagic-style">\n{stylesheet()}\n</style>'


@functools.lru_cache(maxsize=None)
def row_style_html() -> str:
    """The ``<style>`` of a finished row's static copy: the row's rules only (status colours
    included), its right end not kept for buttons.  Every rule is scoped under
    ``.qmagic-panel .qm-static`` (:data:`STATIC_CLASS`): a saved notebook's static rows, made
    by any version of qmagic, style only themselves, never the live panels on the same page
    (a ``<style>`` in an output applies to the whole page)."""
    rules = [(sel, body) for sel, body in _rules() if sel in _ROW_SELECTORS or sel.startswith("[data-status=")]
    rules.append((".qm-row", "padding-right:8px"))
    box = _scoped([(f".{STATIC_CLASS}", f"margin:2px 0;border:1px solid {BORDER2};border-bottom:none")])
    return f'<style class="qmagic-style">\n{box}\n{_scoped(rules, f".{PANEL_CLASS} .{STATIC_CLASS}")}\n</style>'
