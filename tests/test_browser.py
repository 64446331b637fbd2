"""The panels in a real browser: JupyterLab on loopback, driven by Playwright + Debian chromium.

Runs ``tests/browser/panels.ipynb`` cell by cell and checks what a user sees: rows advancing
to 100 %, Cancel turning a row cancelled (also while a cell blocks the main thread), lock
and unlock from the lock panel (a wrong key shown as an error), and a storm of 100 tasks x
1000 progress updates per second that neither trips the server's IOPub rate limit nor leaves
a row inexact.  IOPub messages are counted from the kernel websocket.  Screenshots go to
the folder ``tests/browser_lab.py`` chooses (the test prints it; set
``QMAGIC_TEST_ARTIFACTS`` to keep them).

Needs ``/usr/bin/chromium`` (``.ci/run`` installs it) and the ``playwright`` package: without
them this test FAILS, it does not skip.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
from browser_lab import CHROMIUM, CHROMIUM_ARGS, Lab, artifacts_dir, expect_timeout, require_browser

NOTEBOOK = Path(__file__).resolve().parent / "browser" / "panels.ipynb"
IOPUB_LIMIT = 1000.0  # the Jupyter server's default iopub_msg_rate_limit (msgs/s over 3 s)

pytestmark = pytest.mark.timeout(120)


class IOPubCounter:
    """Counts kernel websocket messages per channel/type with their arrival times."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.frames: list[tuple[float, str, str, str]] = []  # (time, channel, msg_type, text)

    def attach(self, page) -> None:
        page.on("websocket", self._on_socket)

    def _on_socket(self, ws) -> None:
        if "/channels" in ws.url:
            ws.on("framereceived", self._on_frame)

    def _on_frame(self, payload) -> None:
        now = time.monotonic()
        try:
            if isinstance(payload, (bytes, bytearray)):
                from jupyter_server.services.kernels.connection.base import (
                    deserialize_msg_from_ws_v1,
                )

                channel, parts = deserialize_msg_from_ws_v1(bytes(payload))
                header = json.loads(parts[0])
                content = parts[3].decode("utf-8", "replace") if len(parts) > 3 else ""
            else:
                msg = json.loads(payload)
                channel, header = msg.get("channel", ""), msg.get("header", {})
                content = json.dumps(msg.get("content", {}))
        except Exception:  # noqa: BLE001 - count what we cannot parse as "?"
            channel, header, content = "?", {}, ""
        with self.lock:
            self.frames.append((now, channel, header.get("msg_type", "?"), content))

    def between(self, start: float, end: float, *, channel: str = "iopub") -> list[tuple[float, str, str, str]]:
        with self.lock:
            return [f for f in self.frames if start <= f[0] <= end and f[1] == channel]


ARTIFACTS: Path | None = None  # set by the test (browser_lab.artifacts_dir)


def _shot(locator_or_page, name: str) -> None:
    assert ARTIFACTS is not None
    locator_or_page.screenshot(path=str(ARTIFACTS / name))


def _run_cell(page, index: int, timeout_ms: float = 30_000) -> None:
    """Select cell ``index`` in command mode and run it with Ctrl+Enter, once; returns when its
    prompt shows that the run was accepted ([*], or a new [n] for a quick cell)."""
    from playwright.sync_api import expect

    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    before = prompt.text_content() or ""
    prompt.click()
    page.keyboard.press("Escape")
    expect(cell).to_have_class(re.compile(r"\bjp-mod-selected\b"))
    # the key press goes where the focus is: wait until it is in the notebook (command mode)
    expect(page.locator(".jp-Notebook.jp-mod-commandMode:focus-within")).to_have_count(1)
    page.keyboard.press("Control+Enter")
    page.wait_for_function(
        "([el, before]) => /\\[(\\*|\\d+)\\]/.test(el.textContent) && el.textContent !== before",
        arg=[prompt.element_handle(), before], timeout=timeout_ms,
    )


def _wait_cell_done(page, index: int, timeout_ms: float = 30_000) -> None:
    prompt = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt")
    page.wait_for_function(
        "([el]) => /\\[\\d+\\]/.test(el.textContent)", arg=[prompt.element_handle()], timeout=timeout_ms
    )


#: Installs a MutationObserver that records, in ``window.__qmagicProgressTexts``, every
#: progress text shown by the task row whose text contains the given call, until it completes.
_RECORD_PROGRESS_TEXTS = """(call) => {
    const seen = window.__qmagicProgressTexts = [];
    const observer = new MutationObserver(() => {
        for (const row of document.querySelectorAll('.qm-row')) {
            if (!row.textContent.includes(call)) continue;
            const text = row.querySelector('.qm-pt');
            if (text && seen[seen.length - 1] !== text.textContent) seen.push(text.textContent);
            if (row.dataset.status === 'completed') observer.disconnect();
        }
    });
    observer.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""

#: True when the task row and its Cancel button (found by task key) are both laid out and the
#: button's middle is within the row's height.
_BUTTON_ON_ROW = """(key) => {
    const row = document.querySelector(`.qm-row[data-task="${key}"]`);
    const button = document.querySelector(`.qmagic-cancel.qmagic-task-${key}`);
    if (!row || !button) return null;
    const r = row.getBoundingClientRect(), b = button.getBoundingClientRect();
    const middle = b.top + b.height / 2;
    return {aligned: r.height > 0 && b.height > 0 && r.top <= middle && middle <= r.bottom,
            row: [r.top, r.bottom], button: [b.top, b.bottom]};
}"""


def _top_of(locator, timeout_s: float = 15.0) -> float:
    """The y of ``locator``'s box once it has one (the panel re-renders its rows: between two
    renderings the element is briefly gone and has no box)."""
    deadline = time.monotonic() + timeout_s
    while (box := locator.bounding_box()) is None:
        assert time.monotonic() < deadline, "the row never had a box"
        time.sleep(0.02)
    return box["y"]


def _expect_button_on_row(page, key: str, timeout_ms: float = 15_000) -> None:
    """Wait until the Cancel button of task ``key`` sits on its row; fail with the positions."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"(key) => ({_BUTTON_ON_ROW})(key)?.aligned", arg=key, timeout=timeout_ms)
    except PlaywrightTimeout:
        raise AssertionError(
            f"the Cancel button of task {key} is not on its row: {page.evaluate(_BUTTON_ON_ROW, key)}"
        ) from None


#: Per panel and segment: the task keys of its rows and the classes of its buttons (failure report).
_PANELS_DRAWN = """() => [...document.querySelectorAll('.qmagic-task-panel')].map((panel, p) =>
    [...panel.querySelectorAll('.qmagic-task-segment')].map((segment, s) => {
        const rows = [...segment.querySelectorAll('.qm-row')].map(r => `${r.dataset.task}:${r.dataset.status}`);
        const buttons = [...segment.querySelectorAll('.qmagic-task-controls > *')].map(
            b => (b.className.match(/qmagic-(cancel|details-toggle|task-[0-9a-f]+)/g) || ['spacer']).join('.'));
        return `panel ${p} segment ${s}: rows ${rows.join(' ')} | controls ${buttons.join(' ')}`;
    })).flat()"""


#: Per controls grid, the page's widget model: where its views are drawn and the buttons its
#: ``children`` name (what the page was told, drawn or not), in the form of ``_PANELS_DRAWN``.
_PANELS_TOLD = """async () => {
    let found = null;
    const find = (w) => {
        if (found || !w) return;
        if (w._manager && w._manager.promise) { found = w._manager.promise; return; }
        for (const child of (w.widgets || (w.layout && w.layout.widgets) || [])) find(child);
    };
    for (const cell of window.jupyterapp.shell.currentWidget.content.widgets) find(cell.outputArea);
    if (!found) return ['(no widget manager found in the notebook)'];
    const manager = await found;
    const panels = [...document.querySelectorAll('.qmagic-task-panel')];
    const label = m => (m.get('_dom_classes') || []).filter(
        c => /^qmagic-(cancel|details-toggle|task-[0-9a-f]+)$/.test(c)).join('.') || 'spacer';
    const lines = [];
    for (const promise of Object.values(manager._models)) {
        const model = await promise.catch(() => null);
        if (!model || !(model.get('_dom_classes') || []).includes('qmagic-task-controls')) continue;
        const views = await Promise.all(Object.values(model.views || {}).map(v => v.catch(() => null)));
        const where = views.filter(v => v && v.el).map(v => {
            const p = panels.findIndex(panel => panel.contains(v.el));
            const segments = p < 0 ? [] : [...panels[p].querySelectorAll('.qmagic-task-segment')];
            return `panel ${p} segment ${segments.findIndex(s => s.contains(v.el))}`;
        });
        lines.push(`${where.join(', ') || 'not drawn'}: controls ${(model.get('children') || []).map(label).join(' ')}`);
    }
    return lines.sort();
}"""

#: Runs ``code`` in a new kernel subshell (it answers while a cell holds the main thread) and
#: returns its output.
_KERNEL_OUTPUT = """async (code) => {
    const kernel = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
    const late = ms => new Promise(resolve => setTimeout(() => resolve(null), ms));
    if (!kernel.supportsSubshells) return '(the kernel has no subshells)';
    const created = await Promise.race([kernel.requestCreateSubshell({}).done, late(20000)]);
    if (created === null) return '(the kernel did not create a subshell in 20 s)';
    const subshell = kernel.clone({subshellId: created.content.subshell_id});
    try {
        const future = subshell.requestExecute({code, store_history: false});
        const out = [];
        future.onIOPub = m => {
            if (m.header.msg_type === 'stream') out.push(m.content.text);
            if (m.header.msg_type === 'error') out.push(`${m.content.ename}: ${m.content.evalue}`);
        };
        return (await Promise.race([future.done, late(20000)])) === null
            ? '(the subshell did not answer in 20 s)' : out.join('');
    } finally {
        subshell.dispose();
    }
}"""

#: Run in the kernel by the failure report: per panel segment, the buttons the kernel sent last.
_KERNEL_SENT = """
from qmagic.panels.pump import current_pump as _qm_pump
def _qm_label(w):
    return ".".join(c for c in w._dom_classes if c in ("qmagic-cancel", "qmagic-details-toggle")
                    or c.startswith("qmagic-task-")) or "spacer"
for _qm_p, _qm_v in enumerate(v for v in (_qm_pump().views() if _qm_pump() else []) if hasattr(v, "_table")):
    for _qm_s, _qm_seg in enumerate(_qm_v._table.segments):
        print(f"view {_qm_p} ({type(_qm_v).__name__}) segment {_qm_s}: controls",
              " ".join(_qm_label(w) for w in _qm_seg.grid.children))
"""


def _report(page, script: str, *args) -> list[str]:
    """The lines ``script`` returns (a failure report: never raises)."""
    try:
        result = page.evaluate(script, *args)
    except Exception as exc:  # noqa: BLE001 - a report, not a check
        return [f"(could not read the page: {exc})"]
    return result.splitlines() if isinstance(result, str) else result


def test_panels_in_jupyterlab(tmp_path):
    global ARTIFACTS
    require_browser()
    from playwright.sync_api import sync_playwright

    ARTIFACTS = artifacts_dir("browser")
    print(f"\nscreenshots: {ARTIFACTS}")
    started = time.monotonic()
    lab = Lab(tmp_path, (NOTEBOOK.name, NOTEBOOK.read_text()), autoload=True)
    try:
        lab.wait_ready()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            counter = IOPubCounter()
            counter.attach(page)
            console: list[str] = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"[:500])
                    if m.type in ("error", "warning") else None)
            try:
                with expect_timeout(15_000):  # (see _scenario)
                    _scenario(page, counter, lab)
            except BaseException:
                _shot(page, "failure.png")
                print(f"failure screenshot: {ARTIFACTS / 'failure.png'}\nserver log tail:\n{lab.log()[-2000:]}")
                print("browser console (errors and warnings):", *console[-40:], sep="\n  ")
                print("panels as drawn:", *_report(page, _PANELS_DRAWN), sep="\n  ")
                print("controls the page was told:", *_report(page, _PANELS_TOLD), sep="\n  ")
                print("controls the kernel sent:",
                      *_report(page, _KERNEL_OUTPUT, _KERNEL_SENT), sep="\n  ")
                raise
            browser.close()
        assert "iopub messages resumed" not in lab.log()
    finally:
        lab.stop()
    print(f"browser test took {time.monotonic() - started:.1f} s; screenshots in {ARTIFACTS}")


def _scenario(page, counter: IOPubCounter, lab: Lab) -> None:
    """The user's steps; see the module docstring."""
    from playwright.sync_api import expect

    # Every wait below is for a state the page must reach; on a loaded 2-core machine the
    # kernel -> server -> browser round trips of a panel update can take seconds (expect()'s
    # timeout is 15 s here: the caller sets it).
    page.set_default_timeout(30_000)
    page.goto(lab.url)
    page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=30_000)
    # The kernel is connected once the status bar says so.  (The toolbar's execution indicator
    # says "idle" from the start, while the status bar still shows "No Kernel | Initializing",
    # then "Connecting": a cell run before that is dropped.)
    expect(page.locator("#jp-main-statusbar").get_by_text(
        re.compile(r"\(ipykernel\) \| Idle"))).to_be_visible(timeout=60_000)

    # -- cell 0: set-up ------------------------------------------------------------------
    _run_cell(page, 0)
    _wait_cell_done(page, 0)
    expect(page.locator(".jp-Notebook .jp-Cell").nth(0).locator(".jp-OutputArea")).to_contain_text("ready")

    # -- cell 1: a task panel; three tasks with progress and one to cancel -----------------
    # Every text the measure(40) row shows is recorded in the page as it changes (no sampling).
    page.evaluate(_RECORD_PROGRESS_TEXTS, "measure(40)")
    _run_cell(page, 1)
    panel = page.locator(".qmagic-task-panel").first
    panel.wait_for(timeout=20_000)
    row40 = panel.locator(".qm-row", has_text="measure(40)")
    expect(row40).to_have_attribute("data-status", "completed", timeout=20_000)
    seen = {text.split(" ")[0] for text in page.evaluate("() => window.__qmagicProgressTexts")}
    for n in (20, 30, 40):
        row = panel.locator(".qm-row", has_text=f"measure({n})")
        expect(row).to_have_attribute("data-status", "completed", timeout=15_000)
        expect(row.locator(".qm-pt")).to_contain_text(f"{n}/{n}")
        expect(row.locator(".qm-fill")).to_have_attribute("style", re.compile(r"width:100\.0%"))
    intermediate = {s for s in seen if re.fullmatch(r"\d+/40", s) and s != "40/40"}
    print(f"intermediate progress texts seen: {len(intermediate)}")
    assert len(intermediate) >= 3, f"progress did not advance visibly: {sorted(seen)}"
    _shot(panel, "01-task-panel-progress-done.png")

    long_row = panel.locator(".qm-row", has_text="long_measurement")
    expect(long_row).to_have_attribute("data-status", "running")
    key = long_row.get_attribute("data-task")
    cancel = panel.locator(f".qmagic-cancel.qmagic-task-{key}")
    # the button sits on its row (the table and the controls column are aligned); both are
    # re-rendered as the panel updates, so the check waits for a laid-out, aligned state
    expect(long_row).to_be_visible()
    expect(cancel).to_be_visible()
    _expect_button_on_row(page, key)
    top = _top_of(long_row)
    cancel.click()
    expect(long_row).to_have_attribute("data-status", "cancelled")
    expect(panel.locator(".qmagic-panel-message")).to_contain_text("Cancel requested")
    # the message that appeared moved no row under the pointer (a second click would hit another)
    assert _top_of(long_row) == top, "the rows moved when the panel's message appeared"
    expect(panel.locator(f".qmagic-cancel.qmagic-task-{key}")).to_have_count(0)
    panel.locator(f".qmagic-details-toggle.qmagic-task-{key}").click()
    expect(panel.locator(".qmagic-task-details")).to_contain_text("TaskCancelled")
    _shot(panel, "02-task-panel-cancelled-details.png")
    _wait_cell_done(page, 1)

    # -- cell 2: the lock panel -----------------------------------------------------------
    _run_cell(page, 2)
    lock = page.locator(".qmagic-lock-panel")
    lock.wait_for(timeout=15_000)
    expect(lock.locator(".qmagic-lock-state")).to_have_class(re.compile("qmagic-lock-unlocked"))
    lock.locator(".qmagic-lock-key input").fill("browser-key")
    lock.locator(".qmagic-lock-note input").fill("aligning the beam")
    lock.locator(".qmagic-lock-button").click()
    expect(lock.locator(".qmagic-lock-state")).to_have_class(re.compile("qmagic-lock-locked"))
    expect(lock.locator(".qmagic-lock-state")).to_contain_text("aligning the beam")
    expect(lock.locator(".qmagic-lock-key input")).to_have_value("")
    _shot(lock, "03-lock-panel-locked.png")
    lock.locator(".qmagic-lock-key input").fill("not-the-key")
    lock.locator(".qmagic-unlock-button").click()
    expect(lock.locator(".qmagic-message-error")).to_contain_text("or ask them to unlock")
    expect(lock.locator(".qmagic-lock-state")).to_have_class(re.compile("qmagic-lock-locked"))
    _shot(lock, "04-lock-panel-wrong-key.png")
    lock.locator(".qmagic-lock-key input").fill("browser-key")
    lock.locator(".qmagic-unlock-button").click()
    expect(lock.locator(".qmagic-lock-state")).to_have_class(re.compile("qmagic-lock-unlocked"))
    expect(lock.locator(".qmagic-message-ok")).to_contain_text("Unlocked")
    _shot(lock, "05-lock-panel-unlocked.png")

    # -- cells 3-4: the storm ---------------------------------------------------------------
    storm_start = time.monotonic()
    _run_cell(page, 3)
    _wait_cell_done(page, 3)
    _run_cell(page, 4)
    _wait_cell_done(page, 4, timeout_ms=60_000)
    storm_end = time.monotonic()
    expect(page.locator(".jp-Notebook .jp-Cell").nth(4).locator(".jp-OutputArea")).to_contain_text(
        "storm done: 100 completed, 150000 progress events")
    storm_panel = page.locator(".qmagic-task-panel").nth(1)
    storm_rows = storm_panel.locator(".qm-row", has_text="storm_task(")
    expect(storm_rows).to_have_count(100)
    expect(storm_panel.locator(".qm-row[data-status='completed']", has_text="storm_task(")
           ).to_have_count(100)
    texts = storm_rows.locator(".qm-pt").all_text_contents()
    assert texts == ["1500/1500"] * 100, sorted(set(texts))
    storm_panel.evaluate("el => el.scrollIntoView({block: 'start'})")
    _shot(page, "06-storm-panel-final.png")
    frames = counter.between(storm_start, storm_end)
    counted = [f for f in frames if f[2] not in ("status", "comm_open", "execute_input")]
    comm_msgs = [f for f in counted if f[2] == "comm_msg"]
    seconds = storm_end - storm_start
    # The server averages over 3-s windows; the storm lasts 1.5 s, so its rate is taken over
    # 1-s windows (the busiest one holds at least a third of any 3-s window: a stricter check).
    worst = max((sum(1 for f in counted if s <= f[0] < s + 1.0) for s, *_ in counted), default=0)
    print(f"storm: {seconds:.1f} s, {len(counted)} rate-limited IOPub messages "
          f"({len(counted) / seconds:.1f}/s, worst 1-s window {worst:.1f}/s), "
          f"{len(comm_msgs)} comm_msg ({len(comm_msgs) / seconds:.1f}/s)")
    assert worst < IOPUB_LIMIT / 4, worst
    assert not any("rate exceeded" in f[3] for f in counter.frames)
    assert "IOPub message rate exceeded" not in page.content()

    # -- cell 5: Cancel while a cell blocks the main thread (kernel subshell) ---------------
    _run_cell(page, 5)
    cell5 = page.locator(".jp-Notebook .jp-Cell").nth(5)
    row = cell5.locator(".qm-row")
    expect(row).to_have_attribute("data-status", "running", timeout=15_000)
    expect(cell5.locator(".jp-InputPrompt")).to_contain_text("*")
    clicked = time.monotonic()
    cell5.locator(".qmagic-cancel").click()
    expect(cell5.locator(".jp-OutputArea")).to_contain_text("blocking cell ended: cancelled", timeout=15_000)
    assert time.monotonic() - clicked < 30  # handled while the cell blocked (bg.wait(60))
    expect(row).to_have_attribute("data-status", "cancelled")
    _shot(cell5, "07-cancel-while-cell-blocks.png")
    _wait_cell_done(page, 5)
    # The panel of cell 1 shows it too (its updates are batched: it may come later than the
    # cell's own row; the next step must not take that task for cell 6's, still "running").
    bg_key = row.get_attribute("data-task")
    expect(panel.locator(f".qm-row[data-task='{bg_key}']")).to_have_attribute(
        "data-status", "cancelled")

    # -- cell 6: a foreground task holds the main thread; Cancel it from the panel ---------
    _run_cell(page, 6)
    cell6 = page.locator(".jp-Notebook .jp-Cell").nth(6)
    fg_row = panel.locator(f".qm-row[data-status='running']:not([data-task='{bg_key}'])",
                           has_text="long_measurement")
    expect(fg_row).to_have_count(1, timeout=15_000)
    expect(cell6.locator(".jp-InputPrompt")).to_contain_text("*")
    fg_key = fg_row.get_attribute("data-task")
    before = fg_row.locator(".qm-pt").text_content()
    expect(fg_row.locator(".qm-pt")).not_to_have_text(before)
    panel.locator(f".qmagic-cancel.qmagic-task-{fg_key}").click()
    expect(cell6.locator(".jp-OutputArea")).to_contain_text("foreground task ended: cancelled",
                                                              timeout=15_000)
    expect(panel.locator(f".qm-row[data-task='{fg_key}']")).to_have_attribute(
        "data-status", "cancelled")
    panel.evaluate("el => el.scrollIntoView({block: 'start'})")
    _shot(page, "08-foreground-task-cancelled.png")
    shutil.copy(ARTIFACTS / "08-foreground-task-cancelled.png", ARTIFACTS / "09-whole-notebook.png")


def test_without_chromium_the_browser_tests_fail_instead_of_skipping():
    with pytest.raises(pytest.fail.Exception, match="must not be skipped"):
        require_browser("/nonexistent/chromium")
