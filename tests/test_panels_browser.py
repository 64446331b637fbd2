"""The panels as a user sees them: JupyterLab on loopback, Playwright + Debian chromium.

One notebook, generated here, run cell by cell with the qmagic extension loaded:

- a lock taken "by Alice", ``%lock_info``, then unlocked by a later cell: the lock panel tells
  both truths (what it was when its cell ran, and "Now (live)");
- ``%tasks --all`` with completed, failed, cancelled, running and script rows; a background
  scan's row shown by a cell, which becomes a static row once the scan ends after that cell
  (the widgets of all but the newest static row are closed then: their static copies stay);
- ``%function_execute scan ...`` in the foreground: its live row appears in its own cell,
  advances, ends completed, and the returned Task adds no second widget; a second one is
  cancelled with the row's Cancel button while it holds the cell: the cell ends with the one
  ``TaskCancelled`` line (as with ■);
- the same panels in JupyterLab's dark theme (switched with the theme command).

In both themes it checks what makes a panel legible: the text contrast of the rows, badges,
lock panel and messages (WCAG ratio >= 4.5, computed from the browser's own colours), the
buttons inside their row's borders, and progress and call texts not cut.  Screenshots of
both themes and of a running foreground task go to the folder ``tests/browser_lab.py``
chooses (the test prints it; set ``QMAGIC_TEST_ARTIFACTS`` to keep them); with ``QMAGIC_REFRESH_DOCS=1`` the light ones also refresh
``docs/task-panel.png`` and ``docs/lock-panel.png``.

Needs ``/usr/bin/chromium`` and the ``playwright`` package: without them this test FAILS,
it does not skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from browser_lab import (
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO_ROOT,
    Lab,
    artifacts_dir,
    expect_timeout,
    require_browser,
)

DOCS = REPO_ROOT / "docs"
ARTIFACTS: Path | None = None  # set by the test (browser_lab.artifacts_dir)
NOTEBOOK = "panels-experience.ipynb"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
#: Least WCAG contrast ratio of any text in a panel (AA for normal text).
MIN_CONTRAST = 4.5

pytestmark = pytest.mark.timeout(180)

CELLS = [
    # 0: set-up
    '%load_ext qmagic\n'
    'import os\n'
    'from qmagic.panels import rested\n'
    'rested.KEEP_OPEN = 1  # (older static rows close their widgets; their static copies stay)\n'
    'import qmagic\n'
    'def scan(n, dt=0.05):\n'
    '    """A measurement with n points (the middle one waits while a file "pause" exists)."""\n'
    '    for i in range(n):\n'
    '        qmagic.report_progress(i + 1, n, f"point {i + 1} of {n}")\n'
    '        qmagic.cancellable_sleep(dt)\n'
    '        while i + 1 == n // 2 and os.path.exists("pause"):\n'
    '            qmagic.cancellable_sleep(0.02)\n'
    '    return n\n'
    'def broken():\n'
    '    for slot in range(1, 41):\n'
    '        print(f"slot {slot}: no sample")\n'
    '    raise ValueError("the sample holder is empty") from LookupError("all 40 slots are empty")\n'
    'print("ready")',
    # 1-3: tutorial 04's story: Alice's lock, the lock panel, a later unlock
    '%lock --user Alice --note "beam time until 18:00"',
    '%lock_info',
    '%unlock',
    # 4: the task panel, then tasks of every kind
    '%tasks --all',
    '%%script_upload -b --name calibration.py\ncalibrated = True',
    'w = qmagic.get_worker()\n'
    'done = w.submit("scan", (20, 0.01))\n'
    'bad = w.submit("broken")\n'
    'stopped = w.submit("scan", (100_000,))\n'
    'running = w.submit("scan", (100_000, 0.2))\n'
    'w.cancel(stopped)\n'
    'done.wait(10), bad.wait(10), stopped.wait(10)\n'
    'display(w.submit("scan", (30, 0.05)))  # its live row, static once it ends (after the cell)\n'
    'print("tasks started")',
    # 7: a foreground task with its live row in its cell (held at its middle point while
    # the test looks at the running row: see _foreground)
    '%function_execute scan 50 0.02',
    # 8: a foreground task cancelled from its row (dark theme run re-uses cell 7)
    '%function_execute scan 100000',
]


def _notebook() -> dict:
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"cell-{i}", "metadata": {}, "execution_count": None,
                   "outputs": [], "source": source} for i, source in enumerate(CELLS)],
    }


# -- the page -----------------------------------------------------------------------------------
def _cell(page, index: int):
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def _accept_dialogs(page) -> None:
    """A loaded machine may let JupyterLab ask which kernel to use (the session started by
    the REST call was not seen yet): accept its default (Python 3), as a user would."""
    from playwright.sync_api import expect

    dialogs = page.locator(".jp-Dialog")
    if dialogs.count():
        print(f"accepting a JupyterLab dialog: {dialogs.first.inner_text()[:200]!r}")
        dialogs.first.locator(".jp-mod-accept").first.click()
        expect(dialogs).to_have_count(0, timeout=10_000)


def _run_cell(page, index: int, attempts: int = 3) -> None:
    """Select cell ``index`` (command mode) and run it with Ctrl+Enter; retried while the
    notebook is still connecting (the prompt shows [*] or [n] once the run was accepted)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect

    prompt = _cell(page, index).locator(".jp-InputPrompt")
    expect(prompt).to_be_visible()
    before = prompt.text_content() or ""
    for _ in range(attempts):
        _accept_dialogs(page)
        prompt.click()
        page.keyboard.press("Escape")
        page.keyboard.press("Control+Enter")
        try:
            expect(prompt).not_to_have_text(before, timeout=5_000)
            expect(prompt).to_have_text(re.compile(r"\[(\*|\d+)\]"), timeout=5_000)
            return
        except (AssertionError, PlaywrightTimeout):
            continue
    raise AssertionError(f"cell {index} did not start running after {attempts} attempts")


def _wait_done(page, index: int, timeout_ms: float = 30_000) -> None:
    from playwright.sync_api import expect

    expect(_cell(page, index).locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=timeout_ms)


def _shot(locator, name: str) -> Path:
    assert ARTIFACTS is not None
    path = ARTIFACTS / name
    locator.screenshot(path=str(path))
    return path


_CONTRAST_JS = """
(scope, selector) => [...scope.querySelectorAll(selector)].slice(0, 8).map((el) => {
  const parse = (c) => {
    if (c === '' || c === 'transparent') return [0, 0, 0, 0];
    let m = c.match(/^rgba?\\(([^)]+)\\)$/);
    if (m) { const p = m[1].split(/[\\s,\\/]+/).filter(Boolean).map(Number);
             return [p[0], p[1], p[2], p.length > 3 ? p[3] : 1]; }
    m = c.match(/^color\\(srgb ([^)]+)\\)$/);
    if (m) { const p = m[1].split(/[\\s\\/]+/).filter(Boolean).map(Number);
             return [p[0] * 255, p[1] * 255, p[2] * 255, p.length > 3 ? p[3] : 1]; }
    return null;
  };
  const over = (top, bottom) => {
    const a = top[3] + bottom[3] * (1 - top[3]);
    return [0, 1, 2].map(i => (top[i] * top[3] + bottom[i] * bottom[3] * (1 - top[3])) / a).concat([a]);
  };
  const chain = [];
  for (let n = el; n; n = n.parentElement) chain.unshift(n);
  let bg = [255, 255, 255, 1];
  for (const n of chain) {
    const c = parse(getComputedStyle(n).backgroundColor);
    if (c === null) return {error: 'unparsed background ' + getComputedStyle(n).backgroundColor};
    if (c[3] > 0) bg = over(c, bg);
  }
  const f = parse(getComputedStyle(el).color);
  if (f === null) return {error: 'unparsed colour ' + getComputedStyle(el).color};
  const fg = over(f, bg);
  const lum = (c) => { const [r, g, b] = c.slice(0, 3).map(v => { v /= 255;
    return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  const [l1, l2] = [lum(fg), lum(bg)];
  return {ratio: (Math.max(l1, l2) + 0.05) / (Math.min(l1, l2) + 0.05), text: el.textContent.trim().slice(0, 40),
          fg: fg.map(Math.round), bg: bg.map(Math.round), colour: getComputedStyle(el).color};
})
"""

_LEGIBLE = (".qm-call", ".qm-user", ".qm-mode", ".qm-el", ".qm-b",
            ".qm-pt", ".qm-end", ".qmagic-task-summary")


def _check_legible(page, theme: str) -> list[str]:
    """Contrast of every panel text kind, in this theme; returns "selector: ratio" lines."""
    from playwright.sync_api import expect

    report = []
    checks = [(page.locator(".qmagic-task-panel").first, sel) for sel in _LEGIBLE]
    lock = page.locator(".qmagic-lock-panel")
    checks += [(lock, ".qmagic-lock-state div"), (lock, ".qmagic-lock-then"), (lock, ".qmagic-lock-label")]
    for scope, selector in checks:
        expect(scope.locator(selector).first).to_be_visible()
        results = scope.evaluate(_CONTRAST_JS, selector)  # one go: rows are redrawn at every update
        assert results, selector
        for result in results:
            assert "error" not in result, result
            assert result["ratio"] >= MIN_CONTRAST, (
                f"{theme}: {selector} {result['text']!r} has contrast {result['ratio']:.2f} < {MIN_CONTRAST}: {result}")
        report.append(f"{theme} {selector}: contrast >= {min(r['ratio'] for r in results):.1f}")
    return report


def _check_not_cut(panel) -> None:
    """No call and no progress text of the panel is cut short (an ellipsis hides nothing)."""
    cut = panel.evaluate("""(p) => [...p.querySelectorAll('.qm-call, .qm-pt')]
        .filter(el => el.scrollWidth > el.clientWidth).map(el => el.textContent)""")
    assert cut == [], f"texts cut short in the task panel: {cut}"


_GEOMETRY_JS = """
(segment, key) => {
  const rect = (el) => { const r = el.getBoundingClientRect();
                         return {x: r.x, y: r.y, right: r.right, bottom: r.bottom}; };
  const row = segment.querySelector(`.qm-row[data-task="${key}"]`);
  const buttons = [...segment.querySelectorAll(`.qmagic-task-controls .qmagic-task-${key}`)];
  const cut = (sel) => { const el = row.querySelector(sel); return el.scrollWidth > el.clientWidth; };
  const under = [...row.querySelectorAll('.qm-h > *, .qm-p > *')].map(rect);
  return {row: rect(row), buttons: buttons.map(b => ({text: b.textContent.trim(), ...rect(b)})),
          textRight: Math.max(...under.map(r => r.right)),
          progressCut: cut('.qm-pt'), callCut: cut('.qm-call')};
}
"""


def _check_row_geometry(row) -> None:
    """The running row's two buttons sit inside the row's box; its call and progress text
    are not cut (measured in one go: the rows' HTML is redrawn at every update)."""
    from playwright.sync_api import expect

    expect(row).to_be_visible()
    key = row.get_attribute("data-task")
    segment = row.locator("xpath=ancestor::div[contains(@class,'qmagic-task-segment')][1]")
    buttons = segment.locator(f".qmagic-task-controls .qmagic-task-{key}")
    expect(buttons).to_have_count(2)  # Cancel and Details
    expect(buttons.first).to_have_text("Cancel")
    expect(buttons.last).to_be_visible()
    found = segment.evaluate(_GEOMETRY_JS, key)
    box = found["row"]
    assert [b["text"] for b in found["buttons"]] == ["Cancel", "Details"], found
    assert found["textRight"] <= min(b["x"] for b in found["buttons"]), f"text under the buttons: {found}"
    for b in found["buttons"]:
        assert box["x"] <= b["x"] and b["right"] <= box["right"], found
        assert box["y"] <= b["y"] and b["bottom"] <= box["bottom"], found
    assert not found["progressCut"], f"the progress text is cut: {row.locator('.qm-pt').text_content()!r}"
    assert not found["callCut"], f"the call is cut: {row.locator('.qm-call').text_content()!r}"


_ENDS_JS = """
(details) => [...details.querySelectorAll('.qmagic-detail pre')].map((el) => {
  const text = el.firstChild, n = text.textContent.trimEnd().length, range = document.createRange();
  range.setStart(text, n - 1);
  range.setEnd(text, n);
  const last = range.getBoundingClientRect(), box = el.getBoundingClientRect();
  return {section: el.parentElement.className.split(' ').pop(), overflows: el.scrollHeight > el.clientHeight + 4,
          endShown: last.top >= box.top - 1 && last.bottom <= box.bottom + 1};
})
"""


def _check_details_show_their_end(panel) -> None:
    """The failed row's Details show the end of its traceback and of its output (the
    exception, the newest lines) without scrolling, though they are taller than their boxes."""
    from playwright.sync_api import expect

    key = panel.locator(".qm-row[data-status='failed']").get_attribute("data-task")
    toggle = panel.locator(f".qmagic-task-controls .qmagic-task-{key}").last
    toggle.click()
    details = panel.locator(f".qmagic-task-details[data-task='{key}']")
    expect(details.locator(".qmagic-detail-output pre")).to_contain_text("slot 40: no sample")
    found = {r["section"]: r for r in details.evaluate(_ENDS_JS)}
    assert found["qmagic-detail-output"]["overflows"], found  # (else the check below says nothing)
    for section in ("qmagic-detail-traceback", "qmagic-detail-output"):
        assert found[section]["endShown"], f"the end of {section} is hidden below its box: {found}"
    toggle.click()
    expect(details).to_have_count(0)


_STYLED_JS = """
(scope) => {
  const css = (el) => getComputedStyle(el);
  const probe = document.createElement('span');
  probe.style.color = 'var(--jp-success-color1, #388e3c)';
  scope.appendChild(probe);
  const success = css(probe).color;
  probe.remove();
  const row = scope.querySelector('.qm-row[data-status="completed"]');
  return {sheets: scope.querySelectorAll('style').length, success, height: css(row).height,
          fill: css(row.querySelector('.qm-fill')).backgroundColor,
          badge: css(row.querySelector('.qm-b')).borderTopColor,
          styled: [...row.querySelectorAll('[style]')].map(el => el.getAttribute('style'))};
}
"""


def _check_styled(scope, theme: str) -> str:
    """The panel's stylesheet (a <style> set as an HTML widget's innerHTML) applies in
    JupyterLab: a completed row is ROW_HEIGHT_PX tall, its bar and badge in the theme's
    success colour, and only the bar's width is inline."""
    found = scope.evaluate(_STYLED_JS)
    assert found["sheets"] == 1, found
    assert found["height"] == "48px" and found["fill"] == found["success"] == found["badge"], found
    assert found["styled"] == ["width:100.0%"], found
    return f"{theme}: the stylesheet applies ({found['success']} for completed)"


# -- the test ------------------------------------------------------------------------------------
def test_panels_light_and_dark_in_jupyterlab(tmp_path):
    global ARTIFACTS
    require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS = artifacts_dir("panels-browser")
    print(f"\nscreenshots: {ARTIFACTS}")
    started = time.monotonic()
    lab = Lab(tmp_path, (NOTEBOOK, json.dumps(_notebook())), autoload=False)
    try:
        lab.wait_ready()
        lab.start_kernel()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            try:
                with expect_timeout(15_000):  # (see _scenario)
                    report = _scenario(page, lab)
            except BaseException:  # noqa: BLE001
                page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
                print(f"failure screenshot: {ARTIFACTS / 'failure.png'}\nserver log tail:\n{lab.log()[-2000:]}")
                raise
            browser.close()
    finally:
        lab.stop()
    print("\n".join(report))
    print(f"browser test took {time.monotonic() - started:.1f} s; screenshots in {ARTIFACTS}")


def _scenario(page, lab: Lab) -> list[str]:
    from playwright.sync_api import expect

    # Panel updates go kernel -> server -> browser, batched: on a loaded 2-core machine that
    # takes seconds: expect()'s timeout is 15 s here (the caller sets it, and sets it back).
    # Open the notebook once JupyterLab knows its kernel specs and sessions: opened any
    # earlier (a /lab/tree/... address) it may ask which kernel to use.
    page.goto(f"http://127.0.0.1:{lab.port}/lab?token={lab.token}")
    page.wait_for_function("() => window.jupyterapp !== undefined", timeout=30_000)
    page.evaluate("""async (path) => {
        const app = window.jupyterapp;
        await app.restored;
        await app.serviceManager.ready;
        await app.serviceManager.kernelspecs.ready;
        await app.serviceManager.sessions.ready;
        await app.commands.execute('docmanager:open', {path, factory: 'Notebook'});
    }""", NOTEBOOK)
    expect(page.locator(".jp-Notebook .jp-Cell").first).to_be_visible(timeout=30_000)
    expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_have_count(1, timeout=30_000)
    expect(page.locator("body")).to_have_attribute("data-jp-theme-light", "true")

    _run_cell(page, 0)
    expect(_cell(page, 0).locator(".jp-OutputArea")).to_contain_text("ready", timeout=30_000)

    # -- tutorial 04: the lock panel under %lock_info after a later cell unlocked --------------
    for index in (1, 2, 3):
        _run_cell(page, index)
        _wait_done(page, index)
    lock = _cell(page, 2).locator(".qmagic-lock-panel")
    expect(lock.locator(".qmagic-lock-state")).to_have_class(re.compile("qmagic-lock-unlocked"), timeout=10_000)
    expect(lock.locator(".qmagic-lock-label")).to_contain_text("Now (live) — changed since this cell ran")
    expect(lock.locator(".qmagic-lock-then")).to_contain_text("When this cell ran")
    expect(lock.locator(".qmagic-lock-then")).to_contain_text("Alice")
    expect(lock.locator(".qmagic-lock-then")).to_contain_text("beam time until 18:00")

    # -- the task panel with every kind of row ---------------------------------------------------
    for index in (4, 5, 6):
        _run_cell(page, index)
        _wait_done(page, index)
    expect(_cell(page, 6).locator(".jp-OutputArea")).to_contain_text("tasks started")
    # the background scan shown by cell 6 outlives it: its row becomes static when it ends
    expect(_cell(page, 6).locator(".qm-static .qm-row")).to_have_attribute("data-status", "completed",
                                                                           timeout=20_000)
    expect(_cell(page, 6).locator(".qmagic-cancel")).to_have_count(0)
    panel = _cell(page, 4).locator(".qmagic-task-panel")
    for call, status in (("scan(20, 0.01)", "completed"), ("broken()", "failed"),
                         ("scan(100000)", "cancelled"), ("scan(100000, 0.2)", "running")):
        row = panel.locator(".qm-row", has=page.locator(".qm-call", has_text=re.compile(
            "^" + re.escape(call) + "$")))
        expect(row).to_have_attribute("data-status", status, timeout=10_000)
    script = panel.locator(".qm-row", has_text="calibration.py (script)")
    expect(script).to_have_attribute("data-status", "completed")
    expect(panel.locator(".qm-row[data-status='failed'] .qm-end")).to_have_text(
        "ValueError: the sample holder is empty")
    _check_not_cut(panel)
    _check_details_show_their_end(panel)
    running = panel.locator(".qm-row[data-status='running']", has_text="scan(100000, 0.2)")
    expect(running.locator(".qm-pt")).to_contain_text("point")
    _check_row_geometry(running)

    # -- a foreground task: its live row in its own cell ----------------------------------------
    report = _foreground(page, lab, 7, "light")
    _run_cell(page, 8)
    cell8 = _cell(page, 8)
    row8 = cell8.locator(".qm-row")
    expect(row8).to_have_attribute("data-status", "running", timeout=15_000)
    expect(row8.locator(".qm-pt")).to_contain_text("point")
    cell8.locator(".qmagic-cancel").click()
    expect(cell8.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")).to_have_text(
        "TaskCancelled: scan(100000) was cancelled from the panel (Cancel button); it is recorded as cancelled.",
        timeout=15_000)
    expect(row8).to_have_attribute("data-status", "cancelled")
    _wait_done(page, 8)
    expect(row8).to_have_count(1)
    _shot(cell8, "light-3-foreground-cancelled.png")
    report.append(_check_saved_rows(page, lab))
    expect(page.get_by_text("Error displaying widget")).to_have_count(0)  # (rows closed once static)

    report += _check_legible(page, "light")
    report += [_check_styled(panel, "light"), _check_styled(_cell(page, 7), "light")]
    panel.scroll_into_view_if_needed()
    _shot(panel, "light-1-task-panel.png")
    _shot(lock, "light-2-lock-panel.png")
    if os.environ.get("QMAGIC_REFRESH_DOCS") == "1":
        shutil.copy(ARTIFACTS / "light-1-task-panel.png", DOCS / "task-panel.png")
        shutil.copy(ARTIFACTS / "light-2-lock-panel.png", DOCS / "lock-panel.png")

    # -- the dark theme ----------------------------------------------------------------------------
    page.evaluate("() => window.jupyterapp.commands.execute('apputils:change-theme', "
                  "{theme: 'JupyterLab Dark'})")
    expect(page.locator("body")).to_have_attribute("data-jp-theme-light", "false", timeout=15_000)
    expect(page.locator("body")).to_have_attribute("data-jp-theme-name", "JupyterLab Dark")
    report += _foreground(page, lab, 7, "dark")
    report += _check_legible(page, "dark")
    report += [_check_styled(panel, "dark"), _check_styled(_cell(page, 7), "dark")]
    _check_not_cut(panel)
    panel.scroll_into_view_if_needed()
    _shot(panel, "dark-1-task-panel.png")
    _shot(lock, "dark-2-lock-panel.png")
    _shot(cell8, "dark-3-foreground-cancelled.png")
    expect(page.get_by_text("Error displaying widget")).to_have_count(0)
    return report


def _check_saved_rows(page, lab: Lab) -> str:
    """The notebook JupyterLab saves holds the foreground rows as static final rows (HTML and
    text, no widget view): reopened without a kernel, or read anywhere, they still say how
    each task ended (a live row's widget model is gone then)."""
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")  # (awaited)
    cells = json.loads((lab.root / NOTEBOOK).read_text())["cells"]
    for index, mode, status in ((6, "background", "completed"), (7, "foreground", "completed"),
                                (8, "foreground", "cancelled")):
        rows = [out["data"] for out in cells[index]["outputs"] if "text/html" in out.get("data", {})]
        assert len(rows) == 1, cells[index]["outputs"]
        assert WIDGET_MIME not in rows[0] and f'data-status="{status}"' in "".join(rows[0]["text/html"]), rows
        assert f"{mode}  {status}" in "".join(rows[0]["text/plain"]), rows
    return "saved notebook: the rows of ended tasks are static final rows (foreground and background)"


def _foreground(page, lab: Lab, index: int, theme: str) -> list[str]:
    """Run the foreground cell: a live row in it while it runs, its final state, no second
    widget from the returned Task.  The scan holds at its middle point until the running row
    was checked (a file "pause" in the notebook's folder: see ``scan``)."""
    from playwright.sync_api import expect

    pause = lab.root / "pause"
    pause.touch()
    _run_cell(page, index)
    cell = _cell(page, index)
    row = cell.locator(".qm-row")
    expect(row).to_have_attribute("data-status", "running", timeout=15_000)
    expect(row).to_have_attribute("data-mode", "foreground")
    expect(row.locator(".qm-mode")).to_have_text("foreground")
    expect(row.locator(".qm-pt")).to_contain_text(re.compile(r"\d+/50 · point \d+ of 50"))
    expect(cell.locator(".jp-InputPrompt")).to_have_text("[*]:")
    _check_row_geometry(row)
    _shot(cell, f"{theme}-0-foreground-running.png")
    pause.unlink()
    _wait_done(page, index)
    expect(row).to_have_attribute("data-status", "completed")
    expect(row.locator(".qm-pt")).to_have_text("50/50 · point 50 of 50")
    expect(row.locator(".qm-el")).to_have_text(re.compile(r"^\d+(\.\d)? s$"))
    expect(cell.locator(".qm-row")).to_have_count(1)  # the returned Task: text only
    expect(cell.locator(".jp-OutputArea-output").last).to_have_text(
        "scan(50, 0.02)  qmagic user  foreground  completed  50/50 point 50 of 50")
    # the cell ended: the row is a static copy of its final state (no buttons, no widget)
    expect(cell.locator(".qm-static .qm-row[data-status='completed']")).to_have_count(1)
    expect(cell.locator(".qmagic-cancel")).to_have_count(0)
    _shot(cell, f"{theme}-0-foreground-completed.png")
    return [f"{theme} foreground row ok"]
