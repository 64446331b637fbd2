"""The magics and the extension on an in-process IPython shell (no kernel).

Parsing, errors, delegation to the worker, text output, completion, load/unload.  What
needs a real kernel (signals, output routing, auto-load, hidden prompts) is in the
test_kernel*.py files.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import uuid

import pytest
from IPython.core.error import UsageError
from traitlets.config import Config

import qmagic
from qmagic import format as fmt
from qmagic.core.engine import MSG_KERNEL_BUSY
from qmagic.ipython.extension import get_session, load_ipython_extension, unload_ipython_extension
from qmagic.ipython.magics.args import split_words, strip_comment
from qmagic.ipython.magics.tasks import MAX_HISTORY_ROWS, MSG_HISTORY_EMPTY
from qmagic.ipython.runner import MSG_NO_KERNEL_LOOP
from qmagic.store.journal import Journal

from store_helpers import task as log_record


TIMEOUT = 10.0

MAGIC_NAMES = ["function_execute", "task_status", "task_result", "task_cancel", "tasks",
               "script_upload", "lock", "unlock", "lock_info", "control_channel"]


@pytest.fixture
def ip(_shell, sigint_as_in_a_cell):
    """The in-process shell, SIGINT as in a cell; qmagic (if a test loaded it) is unloaded
    afterwards."""
    saved = Config(_shell.config.get("QMagic", {}))
    yield _shell
    unload_ipython_extension(_shell)
    _shell.extension_manager.loaded.discard("qmagic")
    _shell.config.QMagic = saved


@pytest.fixture
def qm(ip):
    """The shell with qmagic loaded and a few functions defined; yields the worker."""
    load_ipython_extension(ip)
    ip.run_cell(
        "import threading\n"
        "import qmagic\n"
        "def add(a, b=1):\n"
        "    print('adding', a, b)\n"
        "    return a + b\n"
        "def echo(*args, **kwargs):\n"
        "    return args, kwargs\n"
        "def boom(x):\n"
        "    raise ValueError(f'bad value {x}')\n"
        "gate = threading.Event()\n"
        "def blocked():\n"
        "    while not gate.is_set():\n"
        "        qmagic.cancellable_sleep(0.05)\n"
        "    return 'released'\n"
    ).raise_error()
    ip.user_ns["gate"].clear()
    yield qmagic.get_worker()
    ip.user_ns["gate"].set()


def line(ip, magic, arg=""):
    return ip.run_line_magic(magic, arg)


# =========================================================================================
# splitting arguments
# =========================================================================================
@pytest.mark.parametrize(
    "source, words",
    [
        ("f 1 2", ["f", "1", "2"]),
        ('f "a b" c', ["f", '"a b"', "c"]),
        ("f [1, 2] {'k': (3, 4)}", ["f", "[1, 2]", "{'k': (3, 4)}"]),
        ("f x=[1, 2] label='run 3'", ["f", "x=[1, 2]", "label='run 3'"]),
        ("f 'it''s' \"q\\\"x\"", ["f", "'it''s'", '"q\\"x"']),
        ("f '''a b''' -1", ["f", "'''a b'''", "-1"]),
        ("  f   ", ["f"]),
    ],
)
def test_split_words_keeps_quotes_and_brackets(source, words):
    assert [w for w, _, _ in split_words(source)] == words


@pytest.mark.parametrize("source", ["f [1, 2", "f 1)", "f 'abc", "f (]"])
def test_split_words_rejects_unbalanced(source):
    with pytest.raises(UsageError):
        split_words(source)


@pytest.mark.parametrize(
    "source, kept",
    [
        ("f 1  # move to the edge", "f 1"),
        ("# only a comment", ""),
        ("f\t#tab", "f"),
        ("f '# text' \"a # b\" #c", "f '# text' \"a # b\""),
        ("--key k#1 x=a#b", "--key k#1 x=a#b"),
        ("--note 'unclosed # text", "--note 'unclosed # text"),
    ],
)
def test_strip_comment_drops_a_hash_that_begins_a_word_outside_quotes(source, kept):
    assert strip_comment(source) == kept


# =========================================================================================
# loading
# =========================================================================================
def test_load_registers_and_unload_removes_everything(ip):
    events_before = {k: list(v) for k, v in ip.events.callbacks.items()}
    matchers_before = list(ip.Completer.custom_matchers)
    printers_before = dict(ip.display_formatter.formatters["text/plain"].type_printers)
    load_ipython_extension(ip)
    worker = qmagic.get_worker()
    load_ipython_extension(ip)  # a second load is a silent no-op
    assert qmagic.get_worker() is worker
    for name in MAGIC_NAMES:
        assert name in ip.magics_manager.magics["line"], name
    assert "script_upload" in ip.magics_manager.magics["cell"]
    assert {"TaskMagics", "LockMagics", "RemoteMagics"} <= set(ip.magics_manager.registry)
    assert len(ip.events.callbacks["pre_run_cell"]) == len(events_before["pre_run_cell"]) + 1
    assert len(ip.events.callbacks["post_run_cell"]) == len(events_before["post_run_cell"]) + 1
    assert worker.hidden_names >= {"In", "Out", "get_ipython", "exit", "quit"}
    assert "get_ipython" not in worker.functions_available()
    assert type(worker.engine.foreground).__name__ == "KernelForegroundRunner"

    unload_ipython_extension(ip)
    for name in MAGIC_NAMES:
        assert name not in ip.magics_manager.magics["line"], name
    assert "script_upload" not in ip.magics_manager.magics["cell"]
    assert not {"TaskMagics", "LockMagics", "RemoteMagics"} & set(ip.magics_manager.registry)
    assert {k: list(v) for k, v in ip.events.callbacks.items()} == events_before
    assert ip.Completer.custom_matchers == matchers_before
    assert dict(ip.display_formatter.formatters["text/plain"].type_printers) == printers_before
    assert get_session(ip) is None
    with pytest.raises(RuntimeError, match="%load_ext qmagic"):
        qmagic.get_worker()
    with pytest.raises(qmagic.RequestRefused, match="closed"):
        worker.submit(lambda: 1)

    load_ipython_extension(ip)  # load -> unload -> load
    assert qmagic.get_worker() is not worker
    assert "function_execute" in ip.magics_manager.magics["line"]


def test_load_ext_through_the_extension_manager(ip):
    ip.run_line_magic("load_ext", "qmagic")
    assert "qmagic" in ip.extension_manager.loaded
    assert get_session(ip) is not None
    ip.run_line_magic("unload_ext", "qmagic")
    assert get_session(ip) is None
    assert "function_execute" not in ip.magics_manager.magics["line"]


def test_unload_releases_the_worker(ip):
    """Nothing of an unloaded worker stays reachable (IPython keeps each registered Magics
    instance in ``shell.configurables``, and the magics hold the worker)."""
    import gc
    import weakref

    ip.run_line_magic("load_ext", "qmagic")
    worker = weakref.ref(qmagic.get_worker())
    configurables = len(ip.configurables)
    ip.run_line_magic("reload_ext", "qmagic")
    ip.run_line_magic("unload_ext", "qmagic")
    gc.collect()
    assert worker() is None
    assert len(ip.configurables) == configurables - 4  # (three Magics and the worker, for %config)
    assert not [c for c in ip.configurables if type(c).__module__.startswith("qmagic.")]


@pytest.mark.parametrize("how", ["sigint", "raised"])
def test_interrupted_unload_still_undoes_everything(ip, how):
    """■ during %unload_ext: every step is still undone, the cell ends with one line, and
    %load_ext works again."""
    from qmagic.ipython.extension import UnloadInterrupted

    def qmagic_threads():
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("qmagic"))

    before = qmagic_threads()
    ip.run_line_magic("load_ext", "qmagic")
    worker = qmagic.get_worker()
    worker.submit(lambda: 1).result(TIMEOUT)  # the pool's threads exist

    def interrupt():  # the first step undone: ■ lands as the unload starts
        if how == "sigint":
            signal.raise_signal(signal.SIGINT)
        else:
            raise KeyboardInterrupt

    get_session(ip)._step("probe", interrupt)
    with pytest.raises(UnloadInterrupted) as info:
        ip.run_line_magic("unload_ext", "qmagic")
    assert info.value._render_traceback_() == [
        "KeyboardInterrupt: qmagic finished unloading before the interrupt took effect; "
        "load it again with %load_ext qmagic."]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert get_session(ip) is None
    assert "function_execute" not in ip.magics_manager.magics["line"]
    with pytest.raises(qmagic.RequestRefused, match="closed"):
        worker.submit(lambda: 1)
    assert qmagic_threads() == before
    assert "qmagic" not in ip.extension_manager.loaded  # as after an unload that returned
    ip.run_line_magic("load_ext", "qmagic")
    assert qmagic.get_worker() is not worker


def test_get_worker_names_reload_ext_when_ipython_still_lists_qmagic(ip):
    """IPython lists qmagic as loaded but no session exists (e.g. ■ as IPython ended the
    unload): %load_ext would refuse ("already loaded"), so the text names %reload_ext."""
    ip.extension_manager.loaded.add("qmagic")
    with pytest.raises(RuntimeError, match=r"qmagic is not loaded in this IPython session: "
                                           r"run %reload_ext qmagic\.$"):
        qmagic.get_worker()
    ip.run_line_magic("reload_ext", "qmagic")
    assert get_session(ip) is not None


def test_worker_is_configured_from_the_shell_config(ip):
    ip.config.QMagic.default_user = "Alice"
    load_ipython_extension(ip)
    assert qmagic.get_worker().default_user == "Alice"


def test_a_refused_config_line_in_a_terminal_shell_is_not_kept_for_the_next_load(ip):
    """``%config QMagic.max_background_tasks = 0`` in terminal IPython: refused, but %config
    hands the line to the configurables in order of class name, and the shell's
    (``TerminalInteractiveShell``, here ``InteractiveShell``) comes before ``Worker``: the
    shell kept the refused value, and every later ``%reload_ext qmagic`` failed (TraitError,
    qmagic unloaded).  The shell gets back the value it had; a value taken stays."""
    saved = ip.config.get("QMagic")
    try:
        load_ipython_extension(ip)
        ip.run_line_magic("config", "QMagic.max_background_tasks = 8")
        ip.run_line_magic("config", "QMagic.max_background_tasks = 0")
        ip.run_line_magic("config", "QMagic.cancel_grace_s = -1")  # (a key the shell had not)
        assert (qmagic.get_worker().max_background_tasks, qmagic.get_worker().cancel_grace_s) == (8, 2.0)
        assert ip.config.QMagic.max_background_tasks == 8 and "cancel_grace_s" not in ip.config.QMagic
        ip.run_line_magic("reload_ext", "qmagic")
        assert get_session(ip) is not None and qmagic.get_worker().max_background_tasks == 8
    finally:
        ip.config.pop("QMagic", None)
        if saved is not None:
            ip.config.QMagic = saved


# =========================================================================================
# %function_execute
# =========================================================================================
def test_foreground_call_returns_completed_task(qm, ip, capsys):
    ip.user_ns["x"] = 10
    task = line(ip, "function_execute", "add x b=[1, 2][1]")
    assert task.status.value == "completed" and task.result() == 12
    assert not task.background and task.origin == "magic"
    assert task.output == "adding 10 2\n"
    assert "adding 10 2" in capsys.readouterr().out
    assert ip.display_formatter.format(task)[0]["text/plain"] == fmt.task_line(task)
    assert fmt.task_line(task) == "add(10, b=2)  qmagic user  foreground  completed"


def test_arguments_are_python_expressions(qm, ip):
    ip.user_ns["v"] = {"k": 1}
    task = line(ip, "function_execute", "echo 'a b' \"c\" [1, 2] (3 + 4) v -1 s='x y' d={'q': 1}")
    args, kwargs = task.result()
    assert args == ("a b", "c", [1, 2], 7, {"k": 1}, -1)
    assert kwargs == {"s": "x y", "d": {"q": 1}}


def test_the_call_may_be_written_as_in_python(qm, ip):
    """``%function_execute echo(1, k=2)`` is ``%function_execute echo 1 k=2`` (it was refused:
    "not a function name"); unpacking as in a call; a mistake is one line; ■ never reaches it."""
    ip.user_ns.update(v={"k": 1}, items=[3, 4])
    task = line(ip, "function_execute", "echo('a b', [1, 2], (3 + 4), v, s='x y', d={'q': 1})")
    assert task.name == "echo" and task.status.value == "completed"
    assert task.result() == (("a b", [1, 2], 7, {"k": 1}), {"s": "x y", "d": {"q": 1}})
    task = line(ip, "function_execute", "-b --wait echo(0, *items, **{'k': 5})")
    assert task.background and task.result() == ((0, 3, 4), {"k": 5})
    task = line(ip, "function_execute", "echo()")
    assert task.result() == ((), {})
    for call, says in (("echo(1) 2", "Write the call echo(1) alone, or the name and its arguments apart"),
                       ("echo(1, k=2, k=3)", "Keyword argument k is given twice."),
                       ("echo(*3)", "Cannot unpack *3: 'int' object is not iterable."),
                       ("echo(**[1])", "Cannot unpack **[1]: a mapping is needed, not list."),
                       ("echo(**{1: 2})", "Keywords must be text"),
                       ("echo(nowhere)", "Cannot evaluate argument 'nowhere': NameError"),
                       ("echo(1 +)", "Cannot read the call echo(1 +): invalid syntax."),
                       ("echo(a#b)", "'#' inside the argument"),
                       ("echo(1) --timeout 3", "Options go before the function name")):
        with pytest.raises(UsageError, match=re.escape(says)):
            line(ip, "function_execute", call)
    assert qm.last_task is task  # (none of them started a task)
    with pytest.raises(NameError, match="Function 'nowhere' is not found"):
        line(ip, "function_execute", "nowhere(1)")
    # as in Python, a name not defined has no argument evaluated (side() ran, then "not found")
    ip.user_ns.update(calls=[], side=lambda: ip.user_ns["calls"].append(1))
    for call in ("nowhere(side())", "nowhere side()", "-b --wait nowhere(side(), k=side())"):
        with pytest.raises(NameError, match="Function 'nowhere' is not found"):
            line(ip, "function_execute", call)
    assert ip.user_ns["calls"] == []


def test_the_call_form_reads_every_argument_python_reads(qm, ip):
    """An argument that needs the call's brackets, ``echo(y := 3)``, was evaluated from its
    text alone (``y := 3``: a SyntaxError, a usage error); a call nested past Python's parser
    (a long sum) raised RecursionError through qmagic's frames, and the kernel rendered its
    400-kB line for minutes.  Now the first runs as in Python, the second is one line."""
    task = line(ip, "function_execute", "echo(y := 3, (z := 4), k=(q := 5))")
    assert task.result() == ((3, 4), {"k": 5}) and (ip.user_ns["y"], ip.user_ns["z"], ip.user_ns["q"]) == (3, 4, 5)
    with pytest.raises(UsageError, match="^Cannot read the call echo.*: it is too long or too deeply nested"):
        line(ip, "function_execute", "echo(" + "+".join(["1"] * 4_000) + ")")  # (past the parser: 3,000)
    assert qm.last_task is task


def test_the_call_form_takes_negative_arguments_after_the_first(qm, ip):
    """``%function_execute scan(5, -5)``: its line was split as a shell splits it to read
    the options, so ``-5)`` read as an option: refused with "Unexpected words after
    %function_execute", and ``echo(1, -b)`` with "-b takes no value" (b a variable).  The
    call's own words are never read as options now; the options before it still are."""
    ip.user_ns.update(b=3)
    for call, expected in (("echo(5, -5)", ((5, -5), {})),
                           ("echo(1, -b, 2)", ((1, -3, 2), {})),
                           ("echo(1, --b)", ((1, 3), {})),
                           ("echo(0, -b, k=-1)", ((0, -3), {"k": -1}))):
        assert line(ip, "function_execute", call).result() == expected, call
    task = line(ip, "function_execute", "-b --wait --user 'Ann Lee' echo(2, -b)")
    assert task.background and task.user == "Ann Lee" and task.result() == ((2, -3), {})
    with pytest.raises(UsageError, match="--timeout takes a number"):
        line(ip, "function_execute", "--timeout soon echo(1, -1)")
    assert qm.last_task is task


def test_an_option_written_without_its_value_before_the_call_says_so(qm, ip):
    """``%function_execute --timeout scan(1)`` (the value forgotten): the call was read as the
    timeout and the line refused with "Give the function name", which it had.  It now says
    what --timeout takes, as ``--timeout scan 1`` does."""
    for words in ("--timeout echo(1)", "-b --timeout echo(1, -1)"):
        with pytest.raises(UsageError, match="--timeout takes a number"):
            line(ip, "function_execute", words)
    for words in ("", "-b", "--timeout 5"):
        with pytest.raises(UsageError, match="Give the function name"):
            line(ip, "function_execute", words)


def test_a_trailing_semicolon_ends_the_call_as_in_python(qm, ip):
    """``%function_execute scan 3;`` -- a notebook habit (a semicolon hides a cell's result)
    -- was refused ("Cannot evaluate argument '3;'"), and ``scan(3);`` with "Incorrect
    request format".  It ends the call, as in Python."""
    for call in ("echo 3;", "echo(3);", "echo 3 ;  # the edge", "-b --wait echo(3);"):
        assert line(ip, "function_execute", call).result() == ((3,), {}), call
    assert line(ip, "function_execute", "echo ';'").result() == ((";",), {})
    with pytest.raises(UsageError, match="Cannot evaluate argument"):
        line(ip, "function_execute", "echo 3;;")


def test_a_method_given_as_the_name_says_how_to_run_it(qm, ip):
    """``%function_execute motor.move 3`` (a device's method: what a scientist tries next) was
    refused with "use the name of a function of the namespace (a Python identifier ...)",
    which does not say how to run it.  The line now says to name it first."""
    ip.run_cell("class Motor:\n    def move(self, x):\n        return x\nmotor = Motor()\n").raise_error()
    said = ("Incorrect request format: 'motor.move' is not a function name: only the namespace's own "
            "functions run by name; give it a name there first (move = motor.move) and run 'move'")
    for call in ("motor.move 3", "motor.move(3)", "-b motor.move"):
        with pytest.raises(UsageError) as info:
            line(ip, "function_execute", call)
        assert str(info.value) == said, call
    ip.run_cell("move = motor.move").raise_error()
    assert line(ip, "function_execute", "move(3)").result() == 3  # (the line works as written)
    with pytest.raises(UsageError) as info:  # (a class is callable: it said "not callable")
        line(ip, "function_execute", "Motor")
    assert str(info.value) == ("Object 'Motor' defined in worker namespace is a class, not a function: "
                               "run a function that uses it")


def test_options_are_parsed(qm, ip):
    task = line(ip, "function_execute", "-b --wait --user 'Ann Lee' --group primary echo 1")
    assert task.background and task.done()
    assert task.user == "Ann Lee" and task.user_group == "primary"
    task = line(ip, "function_execute", "--background --wait echo 2")
    assert task.result() == ((2,), {})
    task = line(ip, "function_execute", "-b --timeout 0.05 blocked")
    assert task.wait(TIMEOUT) and task.status.value == "cancelled"
    assert task.error == "deadline of 0.05 s passed"


def test_background_returns_at_once_and_wait_blocks(qm, ip):
    task = line(ip, "function_execute", "-b blocked")
    assert task.background and not task.done()
    ip.user_ns["gate"].set()
    assert task.wait(TIMEOUT) and task.result() == "released"
    ip.run_cell("t = %function_execute -b --wait add 1").raise_error()
    assert ip.user_ns["t"].result() == 2


def test_foreground_failure_raises_the_functions_exception(qm, ip):
    with pytest.raises(ValueError, match="bad value 3"):
        line(ip, "function_execute", "boom 3")
    task = qm.last_task
    assert task.status.value == "failed" and "ValueError: bad value 3" in task.traceback
    assert "qmagic" not in task.traceback and "threading" not in task.traceback
    # with --wait, a background failure raises too
    with pytest.raises(ValueError, match="bad value 4"):
        line(ip, "function_execute", "-b --wait boom 4")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception groups are Python 3.11+")
def test_an_exception_group_shows_the_users_frames_only(qm, ip):
    """IPython cannot format an exception group and falls back to every frame (qmagic's and
    /tmp/ipykernel paths): the cell shows what %task_result shows (found by the notebook tester)."""
    ip.run_cell("def grouped():\n    raise ExceptionGroup('grp', [ValueError('a'), TypeError('b')])\n").raise_error()
    from qmagic.ipython.magics.common import ShownGroup

    with pytest.raises(ShownGroup) as info:  # (IPython would show the group itself: every frame)
        line(ip, "function_execute", "grouped")
    assert type(info.value).__name__ == "ExceptionGroup"  # (the kernel's reply says so)
    assert isinstance(info.value.error, ExceptionGroup)  # noqa: F821 - Python 3.11+
    shown = "\n".join(info.value._render_traceback_())
    assert "ExceptionGroup: grp" in shown and "ValueError: a" in shown and "TypeError: b" in shown
    assert "qmagic" not in shown and "interactiveshell" not in shown


def test_foreground_keyboard_interrupt_is_recorded_and_ends_the_cell(qm, ip):
    ip.run_cell("def interrupted():\n    raise KeyboardInterrupt\n").raise_error()
    with pytest.raises(qmagic.TaskCancelled, match="interrupted"):
        line(ip, "function_execute", "interrupted")
    task = qm.last_task
    assert task.status.value == "cancelled"
    assert task.traceback.strip().splitlines()[-1] == "KeyboardInterrupt"


@pytest.mark.parametrize(
    "arg, message",
    [
        ("", "Give the function name"),
        ("-b", "Give the function name"),
        # (words it does not take are not repeated: they may be a lock key)
        ("--bogus add", r"^Unexpected words after %function_execute \(not repeated here"),
        ("--user", "^--user needs a value: write --user USER[.]$"),
        ("--timeout", "^--timeout needs a value: write --timeout SECONDS[.]$"),
        ("-b --timeout= add", "^--timeout needs a value"),
        ("--timeout --wait add", "^--timeout needs a value"),
        ("add --timeout", "^--timeout needs a value: write it before the function name, "
                          "%function_execute --timeout SECONDS add ...$"),
        ("add 1 --lock-key  # the key", "^--lock-key needs a value"),
        ("add [1, 2", "Missing"),
        ("add undefined_name_xyz", "NameError"),
        ("add b=1 2", "follows a keyword"),
        ("add b=1 b=2", "twice"),
        ("add b=", "Missing value"),
        ("1add", "not a function name"),
        ("add 1 -b", "Options go before the function name"),
        ("add 1 --wait", "Options go before the function name"),
        # (the option's value is never shown back: it may be a lock key)
        ("add 1 --lock-key #secret", r"^Options go before the function name: %function_execute "
                                     r"--lock-key KEY add \.\.\. \('--lock-key' came after 'add'\)\.$"),
        ("add 1 --lock-key=s3cret", r"^Options go before the function name: %function_execute "
                                    r"--lock-key KEY add \.\.\. \('--lock-key' came after 'add'\)\.$"),
        ("add 1 --timeout 5", "^Options go before the function name: %function_execute --timeout SECONDS add"),
        # (a unique prefix of an option, as before the name: not an argument to evaluate)
        ("add 1 --lock s3cret", r"^Options go before the function name: %function_execute "
                                r"--lock-key KEY add \.\.\. \('--lock' came after 'add'\)\.$"),
        ("add 1 --back", "^Options go before the function name: %function_execute --background add"),
        ("--wait add 1", "--wait goes with -b"),
    ],
)
def test_bad_input_is_a_one_line_usage_error(qm, ip, arg, message):
    before = len(qm.tasks())
    with pytest.raises(UsageError, match=message) as info:
        line(ip, "function_execute", arg)
    assert "\n" not in str(info.value).strip()
    assert len(qm.tasks()) == before


@pytest.mark.parametrize(
    "magic, arg",
    [("task_cancel", "--lock-key"), ("script_upload", "--name"), ("script_upload", "--lock-key --name x"),
     ("lock", "--key"), ("lock", "--note --key K"), ("lock", "--user=  # who"), ("unlock", "--key")],
)
def test_an_option_without_its_value_says_it_needs_one(qm, ip, magic, arg):
    """Argparse's "argument --key: expected one argument" (and %function_execute's "Give the
    function name" for ``--timeout``): every option that takes a value says so alike."""
    option = arg.split()[0].split("=")[0]
    with pytest.raises(UsageError, match=f"^{option} needs a value: write {option} [A-Z]+[.]$"):
        line(ip, magic, arg)
    assert get_session(ip).worker.lock_state().to_lock_info()["environment"] is False


def test_keyword_arguments_may_have_non_ascii_names(qm, ip):
    """``KEY=VALUE`` took ASCII names only: ``énergie=3`` was evaluated as an expression and
    refused as "Cannot evaluate argument 'énergie=3': SyntaxError", although the function's
    own name may be ``größe`` and Python takes both."""
    ip.run_cell("def größe(énergie=1, **kw):\n    return énergie, kw\n").raise_error()
    assert line(ip, "function_execute", "größe énergie=3 Δt=0.5").result(TIMEOUT) == (3, {"Δt": 0.5})


def test_a_trailing_comment_is_ignored_by_every_magic(qm, ip, capsys, tmp_path):
    """``%function_execute add 1  # move to the edge`` read the comment as arguments (a
    NameError on 'move'); every magic's line may end with ``# ...``.  A ``#`` inside quotes or
    inside a word is text; inside a Python-expression argument it is refused (Python would
    drop the rest)."""
    assert line(ip, "function_execute", "add 1 b=2  # move to the edge").result() == 3
    assert line(ip, "function_execute", "-b --wait add 1 #b=5").result() == 2
    task = line(ip, "function_execute", "echo '# kept' x=\"a # b\"  # dropped")
    assert task.result() == (("# kept",), {"x": "a # b"})
    with pytest.raises(UsageError, match=r"^'#' inside the argument 'x=a#b' would start a Python comment"):
        line(ip, "function_execute", "echo x=a#b")
    capsys.readouterr()
    line(ip, "task_status", f"{task.uid[:8]}  # the echo")
    assert capsys.readouterr().out == f"{task.uid[:8]}: completed\n"
    line(ip, "task_result", "# the latest")
    assert "result: (('# kept',), " in capsys.readouterr().out
    line(ip, "tasks", "--all # every one")
    line(ip, "task_cancel", "--all  # nothing runs")
    assert "Cancel requested for 0 tasks." in capsys.readouterr().out
    script = tmp_path / "s.py"
    script.write_text("from_file = 1\n")
    assert line(ip, "script_upload", f"--name run3 '{script}'  # the file").name == "run3"
    result = ip.run_cell("%%script_upload --name cell  # the body\nfrom_cell = 2\n")
    assert result.success and result.result.name == "cell" and ip.user_ns["from_cell"] == 2
    capsys.readouterr()
    line(ip, "lock", "--key K#1 --note 'see # 3' # before the move")
    assert capsys.readouterr().out == "Locked by qmagic user: environment\nNote: see # 3\n"
    line(ip, "lock_info", "# who?")
    line(ip, "control_channel", "status  # is it on?")
    capsys.readouterr()
    line(ip, "unlock", "--key K#1  # the key holds its '#'")
    assert capsys.readouterr().out == "Unlocked.\n"


def test_a_key_that_starts_with_a_hash_is_the_options_value_not_a_comment(qm, ip, capsys):
    """``%task_cancel UID --lock-key #secret`` said "--lock-key needs a value": ``#secret``
    was read as a comment, though a lock key may start with ``#`` (a remote client may lock
    with one).  The word right after an option that needs a value is its value; a lone ``#``
    there, or a ``#`` word anywhere else, still starts a comment."""
    task = line(ip, "function_execute", "-b blocked")
    qm.lock("#secret", environment=True, user="Alice", origin="remote")  # (not this kernel's key)
    with pytest.raises(UsageError, match="^The environment is locked by Alice"):
        line(ip, "task_cancel", task.uid[:8])
    capsys.readouterr()
    line(ip, "task_cancel", f"{task.uid[:8]} --lock-key #secret  # the key starts with #")
    assert capsys.readouterr().out.startswith("Cancel requested: blocked()")
    assert task.wait(TIMEOUT) and task.status.value == "cancelled"
    assert line(ip, "function_execute", "--lock-key #secret add 1 #b=5").result(TIMEOUT) == 2
    assert line(ip, "function_execute", "--lock-key=#secret add 2").result(TIMEOUT) == 3
    with pytest.raises(UsageError, match="^--lock-key needs a value: write --lock-key KEY[.]$"):
        line(ip, "task_cancel", "--all --lock-key # the key")
    line(ip, "unlock", "--key #secret # released")
    assert capsys.readouterr().out.endswith("Unlocked.\n")
    line(ip, "lock", "--note #3 --key #k#2 # a note and a key, both with '#'")
    assert capsys.readouterr().out == "Locked by qmagic user: environment\nNote: #3\n"
    line(ip, "unlock", "--key #k#2")
    assert qm.lock_state().to_lock_info()["environment"] is False


def test_an_argument_raising_an_exception_with_a_broken_str_is_one_usage_error(qm, ip):
    ip.run_cell(
        "class DeviceError(Exception):\n"
        "    def __str__(self): return self.device.name  # no .device\n"
        "def read_setpoint(): raise DeviceError()\n"
        "def two_lines(): raise ValueError('first\\nsecond')\n"
    ).raise_error()
    with pytest.raises(UsageError) as info:
        line(ip, "function_execute", "add (read_setpoint())")
    assert str(info.value).startswith("Cannot evaluate argument '(read_setpoint())': DeviceError. ")
    with pytest.raises(UsageError) as info:
        line(ip, "function_execute", "add (two_lines())")
    assert "ValueError: first\\nsecond. " in str(info.value) and "\n" not in str(info.value)


def test_help_shows_every_option_without_rst_markup(qm, ip):
    doc = ip.find_line_magic("function_execute").__doc__
    for option in ("--background", "--user", "--group", "--lock-key", "--wait", "--timeout", "KEY=VALUE"):
        assert option in doc
    assert doc.lstrip().startswith("%function_execute [-b]")
    for name in MAGIC_NAMES:
        doc = ip.find_line_magic(name).__doc__
        assert doc.strip() and "::" not in doc, name


def test_help_reads_as_plain_text(qm, ip):
    """%tasks? showed "--history <[N]>" (IPython wraps a value that is not a plain name in
    <> for reStructuredText), and %lock_info? its docstring's indentation."""
    assert "--history [N]  " in ip.find_line_magic("tasks").__doc__
    for name in MAGIC_NAMES:
        doc = ip.find_line_magic(name).__doc__
        assert "<[" not in doc and "]>" not in doc, name
    assert not [line for line in ip.find_line_magic("lock_info").__doc__.splitlines() if line.startswith(" ")]


def test_refusals_are_one_line_usage_errors(qm, ip):
    qm.user_group_permissions = {
        "user_groups": {"root": {"allowed_functions": [None]},
                        "primary": {"allowed_functions": ["add"]}}
    }
    with pytest.raises(UsageError) as info:
        line(ip, "function_execute", "echo 1")
    assert str(info.value) == "Function 'echo' is not allowed for users from 'primary' group."
    assert line(ip, "function_execute", "add 1").result() == 2


def test_missing_function_fails_the_task_with_one_line(qm, ip):
    with pytest.raises(NameError, match="'no_such_function_here' is not found") as info:
        line(ip, "function_execute", "no_such_function_here")
    assert info.value._render_traceback_() == [
        "NameError: Function 'no_such_function_here' is not found in the worker namespace"]
    assert qm.last_task.status.value == "failed"


def test_hidden_and_builtin_names_never_run(qm, ip):
    for name in ("exit", "quit", "get_ipython", "print", "open"):
        with pytest.raises(NameError, match="is not found in the worker namespace"):
            line(ip, "function_execute", name)
    with pytest.raises(UsageError, match="not allowed"):
        line(ip, "function_execute", "_private")


# =========================================================================================
# the busy rule and foreground requests from other threads
# =========================================================================================
def test_foreground_request_from_a_thread_while_a_cell_runs_is_refused(qm, ip):
    ip.run_cell(
        "from qs_helpers import QS\n"
        "replies = {}\n"
        "def probe():\n"
        "    qs = QS(qmagic.get_worker())\n"
        "    replies['state'] = qs.status()['ip_kernel_state']\n"
        "    replies['fg'] = qs.function_execute({'name': 'add', 'args': [1]})\n"
        "    replies['bg'] = qs.function_execute({'name': 'add', 'args': [1]}, run_in_background=True)\n"
        "th = threading.Thread(target=probe)\n"
        "th.start(); th.join(10)\n"
    ).raise_error()
    replies = ip.user_ns["replies"]
    assert replies["state"] == "busy"
    assert replies["fg"]["success"] is False and replies["fg"]["msg"] == MSG_KERNEL_BUSY
    assert replies["bg"]["success"] is True
    assert qm.get_task(replies["bg"]["task_uid"]).wait(TIMEOUT)  # it prints: let it finish
    assert qm.engine.foreground.user_busy() is False  # after the cell


def test_without_a_kernel_loop_foreground_requests_from_threads_are_refused(qm):
    errors = []

    def request():
        try:
            qm.submit("add", (1,), background=False)
        except qmagic.RequestRefused as exc:
            errors.append(str(exc))

    th = threading.Thread(target=request)
    th.start()
    th.join(TIMEOUT)
    assert errors == [MSG_NO_KERNEL_LOOP]


def test_kernel_interrupt_is_refused_during_a_foreground_task_unless_asked(qm, ip):
    if not hasattr(signal, "pthread_kill"):
        pytest.skip("needs pthread_kill")
    ip.run_cell(
        "seen = {}\n"
        "def selfstop():\n"
        "    w = qmagic.get_worker()\n"
        "    try:\n"
        "        w.interrupt()\n"
        "    except qmagic.RequestRefused as exc:\n"
        "        seen['plain'] = str(exc)\n"
        "    seen['asking'] = True\n"
        "    w.interrupt(interrupt_task=True)  # the interrupt lands in here\n"
        "    threading.Event().wait(10)\n"
        "    seen['not reached'] = True\n"
    ).raise_error()
    with pytest.raises(qmagic.TaskCancelled, match="interrupted"):
        line(ip, "function_execute", "selfstop")
    seen = ip.user_ns["seen"]
    assert seen["plain"] == "Failed to interrupt IPython kernel: Not allowed to interrupt running task"
    assert seen["asking"] and "not reached" not in seen
    assert qm.last_task.status.value == "cancelled"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


# =========================================================================================
# %task_status, %task_result, %task_cancel, %tasks
# =========================================================================================
def test_task_status_and_result(qm, ip, capsys):
    capsys.readouterr()
    line(ip, "task_status")
    assert capsys.readouterr().out == fmt.no_tasks_line(qm.journal_enabled) + "\n"
    task = line(ip, "function_execute", "add 1 b=5")
    capsys.readouterr()
    line(ip, "task_status", f"{task.uid[:6]} {task.uid} ffffffff")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{task.uid[:6]}: completed"
    assert out[1] == f"{task.uid}: completed"
    assert out[2].startswith("ffffffff: not found")
    line(ip, "task_status", "' ' ''")  # (blank uids were shown as nothing before the colon)
    assert capsys.readouterr().out.splitlines() == [
        "' ': too short: give at least 4 characters of the uid",
        "'': no uid: give a task uid (see %tasks)"]
    line(ip, "task_status")
    assert capsys.readouterr().out == "add(1, b=5)  qmagic user  foreground  completed\n"
    line(ip, "task_result")
    assert capsys.readouterr().out == (
        "add(1, b=5)  qmagic user  foreground  completed\nresult: 6\noutput:\n    adding 1 5\n"
    )
    with pytest.raises(UsageError, match="too short"):
        line(ip, "task_result", task.uid[:3])
    with pytest.raises(ValueError):
        line(ip, "function_execute", "boom 1")
    line(ip, "task_result")
    detail = capsys.readouterr().out
    assert detail.startswith("boom(1)  qmagic user  foreground  failed\ntraceback:\n")
    assert "ValueError: bad value 1" in detail
    assert "qmagic/" not in detail and "threading" not in detail


def test_task_result_shows_a_progress_line_redrawn_in_place_as_its_last_state(qm, ip, capsys):
    """A task that redraws a progress line with ``end="\\r"`` (as tqdm does): the cell shows
    one line, but ``%task_result`` split the output at every carriage return, so it listed
    each step on a line of its own (a thousand lines for a thousand points; the panel's
    Details showed the last state).  It now reads as the terminal and the cell leave it."""
    ip.run_cell(
        "def progress_bar(n):\n"
        "    print('scan')\n"
        "    for i in range(n):\n"
        "        print(f'\\r{i + 1}/{n} points', end='')\n"
        "    print('\\r\\ndone', end='\\r\\n')\n"
        "    return n\n").raise_error()
    task = line(ip, "function_execute", "-b --wait progress_bar 500")
    assert task.output.count("\r") > 500  # (the task keeps what it wrote)
    capsys.readouterr()
    line(ip, "task_result")
    assert capsys.readouterr().out == (
        "progress_bar(500)  qmagic user  background  completed\nresult: 500\n"
        "output:\n    scan\n    500/500 points\n    done\n")


def test_the_value_example_in_task_result_help_runs(qm, ip):
    """``%task_result?`` says how to get the value itself: that line runs in a notebook
    that imported qmagic, with UID replaced by a task's uid."""
    import re

    task = line(ip, "function_execute", "add 1 b=5")
    doc = ip.find_line_magic("task_result").__doc__
    example = re.search(r"``([^`]*get_task\(UID\)[^`]*)``", doc).group(1)
    result = ip.run_cell(example.replace("UID", repr(task.uid[:8])))
    assert result.success and result.result == 6


def test_task_result_of_an_error_with_a_lone_surrogate_can_be_sent(qm, ip, capsys):
    """A task whose error names a file that is not UTF-8 (``f"cannot read {name}"`` with a
    name from os.listdir): ``%task_result`` showed nothing in the cell (the kernel could not
    encode the text, and logged a traceback to its terminal); a lone surrogate now reads
    U+FFFD, as a terminal shows it."""
    ip.run_cell("def read_file(name):\n    raise OSError(f'cannot read {name}')\n").raise_error()
    with pytest.raises(OSError):
        line(ip, "function_execute", "read_file 'data_\\udcff.h5'")
    capsys.readouterr()
    line(ip, "task_result")
    out = capsys.readouterr().out
    out.encode("utf-8")  # (what the kernel sends must be UTF-8)
    assert "OSError: cannot read data_\ufffd.h5" in out, out


def test_task_cancel_without_uid_after_a_finished_task_points_to_the_running_ones(qm, ip):
    """``%task_cancel`` (the latest task) when the latest task finished but an earlier one
    still runs: the line says so and how to stop it, not only "nothing to cancel"."""
    running = line(ip, "function_execute", "-b blocked")
    line(ip, "function_execute", "add 1")
    with pytest.raises(UsageError) as info:
        line(ip, "task_cancel")
    assert str(info.value) == (
        "The latest task, add(1), has already finished (completed); 1 task is still queued or "
        "running: %task_cancel --all stops it, %task_cancel UID one task (%tasks lists them).")
    assert not running.done()
    line(ip, "function_execute", "add 2")
    ip.user_ns["gate"].set()
    assert running.wait(TIMEOUT)
    with pytest.raises(UsageError) as info:  # nothing runs: as before
        line(ip, "task_cancel")
    assert str(info.value) == "add(2) has already finished (completed); there is nothing to cancel."


def test_task_cancel(qm, ip, capsys):
    task = line(ip, "function_execute", "-b blocked")
    capsys.readouterr()
    line(ip, "task_cancel", task.uid[:8])
    assert capsys.readouterr().out.startswith("Cancel requested: blocked()  qmagic user  background")
    assert task.wait(TIMEOUT) and task.status.value == "cancelled"
    with pytest.raises(UsageError, match="already finished") as info:
        line(ip, "task_cancel", task.uid)
    assert task.uid not in str(info.value)
    # (the usage it gave left out --lock-key, which a locked environment needs)
    with pytest.raises(UsageError, match=r"^Give a UID or --all, not both: write %task_cancel "
                       r"\[UID \| --all\] \[--force\] \[--lock-key KEY\]\.$"):
        line(ip, "task_cancel", f"{task.uid} --all")
    with pytest.raises(UsageError, match="No task"):
        line(ip, "task_cancel", "ffffffff")
    for word in ("all", "ALL", "'all'", "*"):  # (it said "prefix 'all' is too short")
        with pytest.raises(UsageError, match=r"^To cancel every queued and running task, write %task_cancel --all\.$"):
            line(ip, "task_cancel", word)
    # without UID: the latest task
    latest = line(ip, "function_execute", "-b blocked")
    capsys.readouterr()
    line(ip, "task_cancel")
    assert capsys.readouterr().out.startswith("Cancel requested: blocked()")
    assert latest.wait(TIMEOUT) and latest.status.value == "cancelled"
    t1 = line(ip, "function_execute", "-b blocked")
    t2 = line(ip, "function_execute", "-b blocked")
    capsys.readouterr()
    line(ip, "task_cancel", "--all --force")
    assert capsys.readouterr().out == "Cancel requested for 2 tasks (forced if it does not stop).\n"
    assert t1.wait(TIMEOUT) and t2.wait(TIMEOUT)
    assert t1.status.value == t2.status.value == "cancelled"


def test_tasks_table(qm, ip, capsys):
    for i in range(12):
        line(ip, "function_execute", f"add {i}")
    running = line(ip, "function_execute", "-b blocked")
    capsys.readouterr()
    line(ip, "tasks")
    out = capsys.readouterr().out.splitlines()
    # without widgets the table is the only view: each row shows the short uid that
    # %task_cancel UID takes (a terminal had no way to name the task to stop)
    assert out[0].split() == ["uid", "task", "user", "mode", "status", "progress"]
    assert out[1].startswith(f"{running.uid[:8]}  blocked()") and ("running" in out[1] or "queued" in out[1])
    assert out[2].split()[1] == "add(11)"
    assert len(out) == 1 + 10 + 1 and out[-1] == "(3 more tasks not shown; use --all)"
    line(ip, "tasks", "--all")
    assert len(capsys.readouterr().out.splitlines()) == 1 + 13
    line(ip, "tasks", "--running")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 and out[1].split()[1] == "blocked()"
    assert out[2] == "(12 finished tasks not shown; use --all)"  # (as the panel's text form says it)
    line(ip, "task_cancel", out[1].split()[0])  # the uid as the table shows it
    assert running.wait(TIMEOUT) and running.status.value == "cancelled"
    with pytest.raises(UsageError):
        line(ip, "tasks", "--all --running")
    ip.user_ns["gate"].set()
    assert running.wait(TIMEOUT)


def test_tasks_running_without_a_running_task_says_how_many_others_and_how_to_see_them(qm, ip, capsys):
    """``%tasks --running`` with none running printed "No tasks." (as if the kernel had
    none) while its panel's text form added "(12 more tasks not shown; use --all)": both
    say it by one rule (format.tasks_text; test_widgets checks the panel's)."""
    tasks = [qm.submit("add", (i,)) for i in range(12)]
    assert all(t.wait(TIMEOUT) for t in tasks)
    capsys.readouterr()
    line(ip, "tasks", "--running")
    assert capsys.readouterr().out == "No queued or running tasks.\n(12 finished tasks not shown; use --all)\n"


def test_a_request_in_the_default_group_the_rules_lack_names_the_setting_in_one_line(qm, ip):
    """``QMagic.default_user_group = "students"`` without a rule for it: %function_execute
    and %%script_upload said "Unknown user group: 'students'" (or, for a script, nothing),
    naming no setting; now one line names it and what to do."""
    qm.default_user_group = "students"
    for call in (lambda: line(ip, "function_execute", "add 1"),
                 lambda: ip.run_cell_magic("script_upload", "", "students_x = 1\n")):
        with pytest.raises(UsageError) as info:
            call()
        assert str(info.value).startswith("Unknown user group: 'students': QMagic.default_user_group (the group "
                                          "of requests that name none) is not a group of the permission rules")
    assert "students_x" not in ip.user_ns


def test_script_upload_takes_user_and_group_as_function_execute_does(qm, ip, tmp_path):
    """``run_script`` (and a remote script_upload) take a user and a group; %%script_upload
    had neither option.  It has both now, passed to run_script: the same rule (an unknown
    group refused in the same line as %function_execute's)."""
    qm.set_permissions({"user_groups": {"root": {"allowed_functions": [None]},
                                        "students": {"allowed_functions": [None]}}})
    task = ip.run_cell_magic("script_upload", "-b --user Bob --group students", "su_first = 1\n")
    assert task.wait(TIMEOUT) and task.status.value == "completed"
    assert (task.user, task.user_group) == ("Bob", "students")
    script = tmp_path / "su.py"
    script.write_text("su_second = 2\n")
    task = line(ip, "script_upload", f"--user 'Ann Lee' --group students {script}")
    assert (task.user, task.user_group, ip.user_ns["su_second"]) == ("Ann Lee", "students", 2)
    refusals = []
    for call in (lambda: ip.run_cell_magic("script_upload", "--group visitors", "su_third = 3\n"),
                 lambda: line(ip, "function_execute", "--group visitors add 1")):
        with pytest.raises(UsageError) as info:
            call()
        refusals.append(str(info.value))
    assert refusals == ["Unknown user group: 'visitors'"] * 2 and "su_third" not in ip.user_ns


def test_tasks_of_a_closed_worker_say_it_was_closed(qm, ip, capsys):
    """README: after ``close()`` the tasks in memory stay readable and the task panel says the
    worker is closed; %tasks' text (a terminal, and the panel's text/plain) listed them as an
    open worker's, though every new task is refused.  The line is under the table now."""
    from qmagic.worker_state import MSG_WORKER_CLOSED

    line(ip, "function_execute", "add 1")
    qm.close()
    capsys.readouterr()
    for options in ("", "--all", "--running"):
        line(ip, "tasks", options)
        out = capsys.readouterr().out.splitlines()
        assert out[-1] == MSG_WORKER_CLOSED, (options, out)
    assert MSG_WORKER_CLOSED not in fmt.task_table([])  # (an open worker's says nothing of it)


def test_tasks_all_as_text_is_bounded_and_says_where_the_rest_is(qm, ip, capsys):
    """Without widgets, ``%tasks --all`` / ``--running`` print a text table: at most
    MAX_HISTORY_ROWS rows (the newest), then how many are left out and where they all are."""
    qm.max_finished_tasks = MAX_HISTORY_ROWS + 10
    count = MAX_HISTORY_ROWS + 3
    tasks = [qm.submit("add", (i,)) for i in range(count)]
    assert all(t.wait(TIMEOUT) for t in tasks)
    capsys.readouterr()
    line(ip, "tasks", "--all")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + MAX_HISTORY_ROWS + 1, len(out)
    assert out[1].split()[1] == f"add({count - 1})" and out[-2].split()[1] == "add(3)"
    assert out[-1] == (f"(3 more tasks not shown; a cell shows the newest {MAX_HISTORY_ROWS}; "
                       "all of them: qmagic.get_worker().tasks())")
    running = [qm.submit("blocked") for _ in range(2)]
    line(ip, "tasks", "--running")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 2 + 1 and out[-1] == f"({count} finished tasks not shown; use --all)"
    ip.user_ns["gate"].set()
    assert all(t.wait(TIMEOUT) for t in running)



def test_module_history_reads_the_kernels_log_after_a_cd(ip, tmp_path, monkeypatch):
    """A relative QMAGIC_STATE_DIR, then a notebook's %cd: qmagic.history() read the folder
    of that name in the new working folder (nothing) while %tasks --history listed the
    kernel's tasks (hostile test).  It reads the log the kernel writes."""
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setenv("QMAGIC_STATE_DIR", "state")
    load_ipython_extension(ip)
    ip.user_ns["double"] = lambda x: 2 * x
    task = qmagic.get_worker().submit("double", (2,), background=False)
    ip.run_line_magic("cd", str(tmp_path / "b"))
    assert [r["uid"] for r in qmagic.history()] == [task.uid]
    assert [r["uid"] for r in qmagic.get_worker().history()] == [task.uid]
    assert not (tmp_path / "b" / "state").exists()


def test_task_result_shows_a_rich_result_below_its_text(qm, ip):
    """A scan returning a DataFrame or a figure: %task_result showed only its text
    ("result: <Figure size 640x480 with 1 Axes>").  A result with a rich form is shown so,
    below the text; plain results, failed and running tasks show their text only."""
    from IPython.utils.capture import capture_output

    ip.run_cell("class Table:\n"
                "    def _repr_html_(self):\n"
                "        return '<table><tr><td>1</td></tr></table>'\n"
                "    def __repr__(self):\n"
                "        return 'Table()'\n"
                "def tabulate():\n"
                "    return Table()\n").raise_error()
    task = line(ip, "function_execute", "tabulate")
    with capture_output() as shown:
        line(ip, "task_result", task.uid)
    assert "result: Table()" in shown.stdout
    assert [o.data.get("text/html") for o in shown.outputs] == ["<table><tr><td>1</td></tr></table>"]
    for plain in (line(ip, "function_execute", "add 1"),
                  qm.submit("boom", (1,), background=True)):
        plain.wait(10)
        with capture_output() as shown:
            line(ip, "task_result", plain.uid)
        assert shown.outputs == [] and shown.stdout.startswith(("add(1)", "boom(1)")), shown.stdout


def test_module_history_with_the_kernels_log_off_says_so(ip):
    """The log switched off from the start: qmagic.history() said "nothing was recorded there
    yet (check environment_name and state_dir)", names the scientist never changed; it names
    the setting that is off.  Another environment asked for by name keeps the usual words."""
    from qmagic.store.records import JournalWarning

    ip.config.QMagic.journal_enabled = False
    load_ipython_extension(ip)
    ip.user_ns["double"] = lambda x: 2 * x
    qmagic.get_worker().submit("double", (2,), background=False)
    for ask in (qmagic.history, qmagic.history_dataframe):
        with pytest.warns(JournalWarning) as caught:
            assert len(ask()) == 0
        assert [str(w.message).split(": nothing was recorded there yet ")[1] for w in caught] == [
            "(this kernel's log is off (QMagic.journal_enabled = False): turn it on to keep a record "
            "of every task)."]
    with pytest.warns(JournalWarning, match=r"yet \(check environment_name and state_dir\)\.$"):
        assert qmagic.history(environment_name="hutch") == []


def test_tasks_history_of_an_empty_log_says_it_is_empty(ip, capsys):
    """``%tasks --history`` before any task printed the table's header alone (SUBMITTED
    STATUS ... UID), which reads as a table that failed to fill: it says the log is empty."""
    load_ipython_extension(ip)
    capsys.readouterr()
    line(ip, "tasks", "--history")
    assert capsys.readouterr().out.splitlines() == [MSG_HISTORY_EMPTY]
    ip.run_cell("def count(x):\n    return len(x)")
    task = qmagic.get_worker().submit("count", ("abc",), background=True)
    assert task.result(timeout=TIMEOUT) == 3
    capsys.readouterr()
    line(ip, "tasks", "--history")
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("SUBMITTED") and "count('abc')" in out[1] and MSG_HISTORY_EMPTY not in out


def test_tasks_history_is_bounded_and_says_where_the_rest_is(ip, capsys):
    """``%tasks --history N`` with a large log: the newest N rows, then one line saying that
    older tasks are in the log and how to see them; an N beyond what a cell can take (a
    cell's output of many MB freezes JupyterLab) prints the newest MAX_HISTORY_ROWS and says
    how to get the rest outside the cell."""
    count = MAX_HISTORY_ROWS + 5
    with Journal(os.environ["QMAGIC_STATE_DIR"], "default") as journal:
        for i in range(count):
            journal.submitted(log_record(uuid.uuid4().hex, "completed", name=f"scan_{i}"))
    load_ipython_extension(ip)
    capsys.readouterr()
    line(ip, "tasks", "--history 3")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 3 + 1 and "scan_1004" in out[1] and "scan_1002" in out[3]
    assert out[-1] == ("Older tasks are in the experiment log: %tasks --history N lists the newest N "
                       f"(up to {MAX_HISTORY_ROWS}); all of them: qmagic.history() or, in a "
                       "terminal, qmagic-history.")
    line(ip, "tasks", f"--history {count}")  # more than a cell shows
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + MAX_HISTORY_ROWS + 1 and "scan_5(" in out[-2]
    assert out[-1] == (f"Only the newest {MAX_HISTORY_ROWS} are shown in a cell; for more: "
                       f"qmagic.history(limit={count}) or, in a terminal, qmagic-history --limit {count}.")
    line(ip, "tasks", f"--history {count + 1}")  # the whole log, capped: still says so
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"Only the newest {MAX_HISTORY_ROWS} ")
    line(ip, "tasks", f"--history {MAX_HISTORY_ROWS}")
    assert len(capsys.readouterr().out.splitlines()) == 1 + MAX_HISTORY_ROWS + 1
    line(ip, "tasks", "--history 5000000")
    assert len(capsys.readouterr().out.splitlines()) == 1 + MAX_HISTORY_ROWS + 1


def test_a_uid_prefix_says_whether_it_is_too_short_unknown_or_matches_several(ip, capsys):
    """``%task_result`` / ``%task_status`` with a prefix: too short says so (and nothing
    about the log, which was not asked); one that several tasks of the experiment log share
    says to give more characters, not that the task is in neither place."""
    twins = ["abcd1111-0000-4000-8000-000000000001", "abcd2222-0000-4000-8000-000000000002"]
    with Journal(os.environ["QMAGIC_STATE_DIR"], "default") as journal:
        for uid in twins:
            journal.submitted(log_record(uid, "completed"))
    load_ipython_extension(ip)
    with pytest.raises(UsageError) as info:
        line(ip, "task_result", "abc")
    assert str(info.value) == ("Task uid prefix 'abc' is too short: give at least 4 characters of the "
                               "uid (see %tasks).")
    with pytest.raises(UsageError) as info:
        line(ip, "task_result", "abcd")
    assert str(info.value) == ("Task uid prefix 'abcd' matches several tasks in the experiment log; "
                               "give more characters (see %tasks --history).")
    with pytest.raises(UsageError) as info:
        line(ip, "task_result", "ffff")
    assert str(info.value) == ("No task with uid 'ffff' in this kernel's memory. It is not in the "
                               "experiment log either (%tasks --history lists the tasks it holds).")
    assert "completed" in line_output(ip, capsys, "task_result", "abcd1")
    capsys.readouterr()
    line(ip, "task_status", "abc abcd ffff abcd2")
    assert capsys.readouterr().out.splitlines() == [
        "abc: too short: give at least 4 characters of the uid",
        "abcd: matches several tasks: give more characters",
        "ffff: not found (see %tasks --history)",
        "abcd2: completed (from the experiment log)",
    ]


def test_a_uid_typed_in_capitals_finds_its_task_in_the_log(ip, capsys):
    """``%task_result A5ED0265`` (a uid read off a screen or a paper log) found nothing: uids
    were matched case-sensitively.  Now a hex uid or prefix in any case finds its task; a
    remote client's uid is kept exactly, and its exact spelling wins (not ambiguous)."""
    own, remote = "a5ed0265-0000-4000-8000-000000000001", "A5ED0265-REMOTE"
    with Journal(os.environ["QMAGIC_STATE_DIR"], "default") as journal:
        journal.submitted(log_record(own, "completed"))
        journal.submitted(log_record(remote, "failed"))
    load_ipython_extension(ip)
    assert "completed" in line_output(ip, capsys, "task_result", own.upper())
    assert "completed" in line_output(ip, capsys, "task_result", "A5ED0265-0")
    assert "failed" in line_output(ip, capsys, "task_result", "A5ED0265")  # (the remote uid, exactly)
    line(ip, "task_status", "A5ED0265-00 a5ed0265")
    assert capsys.readouterr().out.splitlines() == ["A5ED0265-00: completed (from the experiment log)",
                                                    "a5ed0265: completed (from the experiment log)"]
    assert [r["uid"] for r in qmagic.history(uid="A5ED02")] == [remote, own]


def line_output(ip, capsys, magic, arg):
    capsys.readouterr()
    line(ip, magic, arg)
    return capsys.readouterr().out


def test_tasks_history_of_a_small_log_has_no_more_line(ip, capsys):
    with Journal(os.environ["QMAGIC_STATE_DIR"], "default") as journal:
        for i in range(3):
            journal.submitted(log_record(uuid.uuid4().hex, "completed", name=f"scan_{i}"))
    load_ipython_extension(ip)
    capsys.readouterr()
    line(ip, "tasks", "--history 3")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 + 3 and "scan_0(" in out[-1]


# =========================================================================================
# %script_upload
# =========================================================================================
def test_script_upload_file_and_cell(qm, ip, tmp_path):
    script = tmp_path / "setup script.py"
    script.write_text("sample_name = 'S1'\ndef measure(n):\n    return n * 2\n")
    task = line(ip, "script_upload", f"'{script}'")
    assert task.status.value == "completed" and task.kind == "script"
    assert task.name == "setup_script.py"  # the file name, made a valid script name
    assert task.namespace_changes["added"] == ["measure", "sample_name"]
    assert "measure" in qm.functions_available()
    assert line(ip, "function_execute", "measure 4").result() == 8

    result = ip.run_cell("%%script_upload --name calibration\nsample_name = 'S2'\n")
    assert result.success and result.result.namespace_changes["changed"] == ["sample_name"]
    assert result.result.name == "calibration"
    assert fmt.task_line(result.result).startswith("calibration")
    assert ip.user_ns["sample_name"] == "S2"

    task = line(ip, "script_upload", f"-b --no-update-lists '{script}'")
    assert task.background and task.wait(TIMEOUT) and task.status.value == "completed"


def test_failing_script_leaves_the_namespace_unchanged(qm, ip):
    ip.user_ns["keep"] = 1
    before = set(ip.user_ns)
    result = ip.run_cell("%%script_upload\nkeep = 2\nnew_name = 3\nraise RuntimeError('half way')\n")
    assert isinstance(result.error_in_exec, RuntimeError)
    assert ip.user_ns["keep"] == 1 and "new_name" not in ip.user_ns
    assert set(ip.user_ns) - before <= {"_", "__", "___"} | {k for k in ip.user_ns if k.startswith("_i")}
    assert qm.last_task.status.value == "failed"


def test_a_script_with_a_notebook_magic_line_says_scripts_are_plain_python(qm, ip, capsys):
    """A cell pasted into ``%%script_upload`` with ``%matplotlib inline`` or ``!ls`` in it
    failed with a bare "SyntaxError: invalid syntax" at that line; it now also says that a
    script is plain Python and where such lines run.  Other syntax errors say nothing more."""
    MSG_IPYTHON_LINE = ("A script is plain Python: IPython's %magic and !command lines do not run "
                        "in it (run them in a cell).")
    for body in ("not_bound_here = 1\n%matplotlib inline\n", "not_bound_here = 1\n  !ls -l\n"):
        result = ip.run_cell("%%script_upload\n" + body)
        error = result.error_in_exec.error  # (the cell's stand-in shows the script's SyntaxError)
        assert isinstance(error, SyntaxError) and error.__notes__ == [MSG_IPYTHON_LINE], body
        assert MSG_IPYTHON_LINE in capsys.readouterr().out  # (the cell shows it)
        assert "not_bound_here" not in ip.user_ns
        assert MSG_IPYTHON_LINE in qm.last_task.traceback  # (%task_result too)
    result = ip.run_cell("%%script_upload\nx = 1 +\n")
    assert not getattr(result.error_in_exec.error, "__notes__", None)


@pytest.mark.parametrize("source, kind, shown", [
    ("x = 1\ndef f(:\n", "SyntaxError", "def f(:"),
    ("x = 1\n  y = 2\n", "IndentationError", "y = 2"),
    ("file", "SyntaxError", "def f(:"),
    ("function", "SyntaxError", "compile('def f(:'"),
])
def test_syntax_error_shows_only_the_users_error(qm, ip, capsys, tmp_path, source, kind, shown):
    """IPython shows a SyntaxError with every frame it passed, ignoring _render_traceback_:
    the cell must show the script's line and caret (and the user's frames), nothing of
    IPython or qmagic."""
    import re

    if source == "file":
        (tmp_path / "bad.py").write_text("x = 1\ndef f(:\n")
        cell = f"%script_upload '{tmp_path / 'bad.py'}'"
    elif source == "function":
        ip.run_cell("def broken():\n    return compile('def f(:', '<made>', 'exec')\n").raise_error()
        cell = "%function_execute broken"
    else:
        cell = "%%script_upload\n" + source
    capsys.readouterr()
    result = ip.run_cell(cell)
    out = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    error = result.error_in_exec
    assert type(error).__name__ == kind and isinstance(error.error, SyntaxError)
    assert str(error) == str(error.error)
    assert shown in out and f"{kind}: " in out, out
    for internal in ("qmagic", "interactiveshell", "run_cell_magic", "run_line_magic", "settle"):
        assert internal not in out, out
    assert qm.last_task.status.value == "failed"


@pytest.mark.parametrize("quote", ['"', "'"])
def test_control_channel_takes_a_quoted_address(qm, ip, capsys, tmp_path, quote):
    """Quotes around the address (as every other magic's values take them) were kept: 0MQ
    was asked for '"ipc://..."' and answered "Protocol not supported (addr=...)"."""
    address = f"ipc://{tmp_path}/qmagic-cc"
    try:
        line(ip, "control_channel", f"start {quote}{address}{quote}")
        assert f"serving bluesky-queueserver clients on {address}\n" in capsys.readouterr().out
    finally:
        line(ip, "control_channel", "stop")


def test_control_channel_says_when_it_moves(qm, ip, capsys, tmp_path):
    """``%control_channel start ADDRESS2`` while it served on ADDRESS1 moved it without a
    word: the clients of the first address were dropped.  The magic says so; a start on the
    address it serves on changes nothing and says nothing of a move."""
    first, second = f"ipc://{tmp_path}/cc-1", f"ipc://{tmp_path}/cc-2"
    try:
        line(ip, "control_channel", f"start {first}")
        assert "moved" not in capsys.readouterr().out
        line(ip, "control_channel", f"start {first}")
        assert "moved" not in capsys.readouterr().out
        line(ip, "control_channel", f"start {second}")
        out = capsys.readouterr().out
        assert out.startswith(f"Control channel moved from {first}: its clients were disconnected; they "
                              f"connect to {second} now.\nControl channel: serving bluesky-queueserver "
                              f"clients on {second}\n"), out
    finally:
        line(ip, "control_channel", "stop")


@pytest.mark.parametrize("port", ["99999", "-5"])
def test_control_channel_refuses_a_port_out_of_range(qm, ip, port):
    with pytest.raises(UsageError, match=r"^Invalid control channel address 'tcp://127\.0\.0\.1:"
                                         + port + r"': the port must be a number from 1 to 65535"):
        line(ip, "control_channel", f"start tcp://127.0.0.1:{port}")
    assert get_session(ip).remote.server is None


@pytest.mark.parametrize("quote", ['"', "'"])
def test_task_magics_take_quoted_uids(qm, ip, capsys, quote):
    """A uid in quotes (as the other magics' values take them) was looked up with its
    quotes: 'No task with uid '"1a2b3c4d"' in this kernel's memory'."""
    done = qm.submit("add", (1,))
    assert done.result(TIMEOUT) == 2
    capsys.readouterr()  # (what add printed)
    uid = f"{quote}{done.uid[:8]}{quote}"
    line(ip, "task_status", uid)
    assert capsys.readouterr().out == f"{done.uid[:8]}: completed\n"
    line(ip, "task_result", uid)
    assert "result: 2" in capsys.readouterr().out
    running = qm.submit("blocked")
    line(ip, "task_cancel", f"{quote}{running.uid[:8]}{quote}")
    assert running.wait(TIMEOUT) and running.status.value == "cancelled"


def test_script_upload_usage_errors(qm, ip, tmp_path):
    with pytest.raises(UsageError, match="Give the script file"):
        line(ip, "script_upload")
    with pytest.raises(UsageError, match="Cannot read the script"):
        line(ip, "script_upload", str(tmp_path / "missing.py"))
    with pytest.raises(UsageError, match="takes no PATH"):
        ip.run_cell_magic("script_upload", "some.py", "x = 1\n")
    with pytest.raises(UsageError, match="Invalid script name"):
        ip.run_cell_magic("script_upload", "--name 'two words'", "x = 1\n")


# =========================================================================================
# %lock, %unlock, %lock_info
# =========================================================================================
def test_lock_magics(qm, ip, capsys):
    line(ip, "lock_info")
    assert capsys.readouterr().out == "Not locked.\n"
    line(ip, "lock", "--key K1 --note 'Changing samples' --user Alice")
    assert capsys.readouterr().out == "Locked by Alice: environment\nNote: Changing samples\n"
    line(ip, "lock_info")
    assert capsys.readouterr().out == "Locked by Alice: environment\nNote: Changing samples\n"
    # this kernel remembers the key: its own magics keep working
    assert line(ip, "function_execute", "add 1").result() == 2
    capsys.readouterr()
    line(ip, "unlock")
    assert capsys.readouterr().out == "Unlocked.\n"
    line(ip, "unlock")  # (nothing to unlock: it says so)
    assert capsys.readouterr().out == "Not locked.\n"
    line(ip, "lock", "-a --key K2")
    assert capsys.readouterr().out == "Locked by qmagic user: environment, queue\n"
    line(ip, "lock", "-a")  # (the same scopes again: nothing more to say)
    assert capsys.readouterr().out == "Locked by qmagic user: environment, queue\n"
    line(ip, "lock", "-q")  # (meant "the queue too": it said only what is locked now)
    assert capsys.readouterr().out == ("Locked by qmagic user: queue\nThe environment is no longer locked: a new "
                                       "lock replaces the scopes of the one before (-a locks both).\n")
    line(ip, "lock", "-e")
    assert capsys.readouterr().out == ("Locked by qmagic user: environment\nThe queue is no longer locked: a new "
                                       "lock replaces the scopes of the one before (-a locks both).\n")
    line(ip, "unlock")
    assert capsys.readouterr().out == "Unlocked.\n"
    with pytest.raises(UsageError, match="not both"):
        line(ip, "lock", "--key K --prompt-key")
    with pytest.raises(UsageError, match="Give one of --key KEY, --prompt-key or --default-key"):
        line(ip, "unlock", "--key K --default-key")
    with pytest.raises(UsageError, match="no default lock key .* give --key KEY"):
        line(ip, "unlock", "--default-key")  # (none made yet in this test's folders)
    line(ip, "lock")  # without a key: the default key (made now)
    capsys.readouterr()
    line(ip, "unlock", "--default-key")
    assert capsys.readouterr().out == "Unlocked.\n"


def test_unlock_says_what_the_unlock_itself_did(qm, ip, capsys, monkeypatch):
    """%unlock read the lock, then unlocked, and chose its word from the reading: when
    another client unlocked in between, it said "Unlocked." for a lock it did not release."""
    line(ip, "lock", "--key K")
    capsys.readouterr()
    store, real, fired = qm._locks, qm._locks._refresh, []

    def refresh():  # the magic's first reading of the lock file; then another client unlocks
        snap = real()
        if not fired and threading.current_thread() is threading.main_thread():
            fired.append(True)
            qm.unlock("K", origin="remote")
        return snap

    monkeypatch.setattr(store, "_refresh", refresh)
    line(ip, "unlock")
    assert fired and capsys.readouterr().out == "Not locked.\n"
    assert not qm.lock_state().locked


@pytest.mark.parametrize("magic, arg, secret", [
    ("unlock", "s3cret", "s3cret"),  # --key forgotten
    ("lock", "--key my secret words", "secret"),  # a key with spaces, unquoted
    ("unlock", "--keys s3cret", "s3cret"),  # a misspelt option
    ("task_cancel", "--lock-key ab cd ef", "cd"),
])
def test_words_a_key_magic_does_not_take_are_not_repeated(qm, ip, capsys, magic, arg, secret):
    """A magic that takes a lock key never repeats the words it does not take (argparse's
    "unrecognized arguments: secret"): they may be the key, or part of it, and a cell's
    output is kept in the notebook. One line says what the magic takes instead."""
    with pytest.raises(UsageError) as info:
        line(ip, magic, arg)
    text = str(info.value)
    assert secret not in text and "\n" not in text, text
    assert text.startswith((f"Unexpected words after %{magic} ", f"Unexpected words after %{magic}: ")), text
    assert f"; write %{magic} [" in text, text
    assert "a key with spaces goes in quotes" in text
    assert qm.lock_state().locked is False and secret not in capsys.readouterr().err


@pytest.mark.parametrize("arg", ["--lock-key my wordz add", "--lock-key my wordz add 1", "--lock-key=my wordz add",
                                 "-b --lock-key my wordz --wait add"])
def test_a_key_with_spaces_unquoted_is_never_shown_as_the_function_name(qm, ip, arg):
    """``%function_execute --lock-key my wordz add``: the word after the key's first word
    is not a function, so it is most likely the key's rest; it is not repeated (it was shown
    as "Function 'wordz' is not found", and the task was started and logged under it)."""
    with pytest.raises(UsageError) as info:
        line(ip, "function_execute", arg)
    text = str(info.value)
    assert "wordz" not in text and "my" not in text.split() and "\n" not in text, text
    assert text == ("No function of the namespace follows --lock-key's value (not repeated here: the words "
                    "may hold the key); write %function_execute --lock-key KEY NAME ..., a key with spaces "
                    "in quotes."), text
    assert qm.tasks() == []
    assert line(ip, "function_execute", "--lock-key 'my wordz' add 1").result() == 2  # quoted: the key


#: argparse's own words, which a magic's error never shows.
ARGPARSE_WORDS = ("argument ", "invalid choice", "choose from", "unrecognized", "invalid int", "explicit argument",
                  "[{", "[N]]", "usage")


@pytest.mark.parametrize("magic, arg, message", [
    ("tasks", "--history abc", "--history takes a whole number, not 'abc': write %tasks [--all] [--running] "
                               "[--history N]."),
    ("tasks", "--bogus", "%tasks does not take '--bogus': write %tasks [--all] [--running] [--history N]."),
    ("tasks", "--history 5 6", "%tasks does not take '6': write %tasks [--all] [--running] [--history N]."),
    ("control_channel", "bogus", "%control_channel takes start, stop or status, not 'bogus': write "
                                 "%control_channel [start|stop|status] [ADDRESS]."),
    ("control_channel", "start tcp://127.0.0.1:1 more", "%control_channel does not take 'more': write "
                                                        "%control_channel [start|stop|status] [ADDRESS]."),
    ("task_status", "--x", "%task_status does not take '--x': write %task_status [UID ...]."),
    ("task_result", "abcd ef01", "%task_result does not take 'ef01': write %task_result [UID]."),
    ("task_cancel", "--force=3 abcd", "--force takes no value: write %task_cancel [--all] [--force] "
                                      "[--lock-key KEY] [UID]."),
    ("function_execute", "--timeout soon add", "--timeout takes a number: write %function_execute [-b] [--wait] "
                                               "[--timeout SECONDS] [--user USER] [--group GROUP] [--lock-key KEY] "
                                               "NAME [ARG | KEY=VALUE ...]."),
    # a mistyped option is named, with the option meant (a near miss of an option is never a key)
    ("function_execute", "--timout 5 add 1", "Unexpected words after %function_execute: there is no option "
                                             "--timout (did you mean --timeout?); write %function_execute [-b] "
                                             "[--wait] [--timeout SECONDS] [--user USER] [--group GROUP] [--lock-key "
                                             "KEY] NAME [ARG | KEY=VALUE ...] (a key with spaces goes in quotes)."),
    ("lock", "--nte 'changing samples'", "Unexpected words after %lock: there is no option --nte (did you mean "
                                         "--note?); write %lock [-e] [-q] [-a] [--key KEY] [--prompt-key] [--user "
                                         "USER] [--note NOTE] (a key with spaces goes in quotes)."),
    ("tasks", "--histroy 5", "%tasks has no option --histroy (did you mean --history?): write %tasks [--all] "
                             "[--running] [--history N]."),
    # an option's value (a key) that looks like a near miss of an option is never repeated
    ("task_cancel", "0cc4 extra --lock-key '--force ab'", "Unexpected words after %task_cancel (not repeated "
                                                          "here: they may hold a key); write %task_cancel [--all] "
                                                          "[--force] [--lock-key KEY] [UID] (a key with spaces "
                                                          "goes in quotes)."),
    ("task_cancel", "0cc4 extra --lock-key=--forse", "Unexpected words after %task_cancel (not repeated here: they "
                                                     "may hold a key); write %task_cancel [--all] [--force] "
                                                     "[--lock-key KEY] [UID] (a key with spaces goes in quotes)."),
    ("function_execute", "--bogus add", "Unexpected words after %function_execute (not repeated here: they may "
                                        "hold a key); write %function_execute [-b] [--wait] [--timeout SECONDS] "
                                        "[--user USER] [--group GROUP] [--lock-key KEY] NAME [ARG | KEY=VALUE ...] "
                                        "(a key with spaces goes in quotes)."),
])
def test_a_bad_option_is_one_line_of_what_happened_and_what_to_write(qm, ip, magic, arg, message):
    """argparse's texts ("argument action: invalid choice: 'x' (choose from ...)",
    "unrecognized arguments", usages like ``[--history [N]]``) never reach a magic's error:
    one line says what was wrong and how to write it (a value is repeated only by a magic
    that takes no key)."""
    with pytest.raises(UsageError) as info:
        line(ip, magic, arg)
    text = str(info.value)
    assert text == message
    assert not any(word in text for word in ARGPARSE_WORDS), text
    assert qm.tasks() == []


def test_lock_again_with_another_key_says_what_to_do(qm, ip, capsys):
    """``%lock --key B`` while locked with key A: one line that says who locked, and what
    to do (it was queueserver's text joined by semicolons: "RE Manager was locked with a
    different key; RE Manager is locked by ...; Environment is locked: True; ...; Note: ---")."""
    line(ip, "lock", "--key K1 --note 'Changing samples' --user Alice")
    capsys.readouterr()
    with pytest.raises(UsageError) as info:
        line(ip, "lock", "-q --key K2")
    text = str(info.value)
    assert text.startswith("The environment is already locked by Alice (since "), text
    assert text.endswith("; note: Changing samples) with another key: to change the lock, give the "
                         "key with --key KEY (or --prompt-key); to lock with a new key, unlock "
                         "first."), text
    assert "RE Manager" not in text and "K1" not in text and "K2" not in text
    assert line(ip, "lock_info") is None and capsys.readouterr().out == (
        "Locked by Alice: environment\nNote: Changing samples\n")  # unchanged
    line(ip, "unlock")


def test_lock_with_another_key_refuses_tasks_in_one_line(qm, ip, capsys):
    line(ip, "lock", "-e --key secret-1")
    qm._remembered_key = None  # as another kernel without the key
    with pytest.raises(UsageError) as info:
        line(ip, "function_execute", "add 1")
    assert "\n" not in str(info.value) and "secret-1" not in str(info.value)
    assert "locked by qmagic user" in str(info.value) and "--lock-key KEY" in str(info.value)
    with pytest.raises(UsageError, match="does not hold the key"):
        line(ip, "unlock")
    # a wrong key given is not a missing one (it said "give the key with ...": a reviewer)
    with pytest.raises(UsageError) as info:
        line(ip, "unlock", "--key wrong")
    assert "\n" not in str(info.value) and "wrong" not in str(info.value)
    assert str(info.value).endswith(": the key given is neither its lock key nor the emergency key; "
                                    "check the key, or ask them to unlock."), str(info.value)
    with pytest.raises(UsageError) as info:
        line(ip, "function_execute", "--lock-key wrong add 1")
    assert str(info.value).endswith(": the key given does not open it; check the key, or ask them "
                                    "to unlock."), str(info.value)
    qm._remembered_key = "stale"  # a key this kernel remembers (not given) that no longer opens it
    with pytest.raises(UsageError) as info:
        line(ip, "unlock")
    assert str(info.value).endswith(": give the key with --key KEY (or --prompt-key), or the "
                                    "emergency key, or ask them to unlock."), str(info.value)
    qm._remembered_key = None
    assert line(ip, "function_execute", "--lock-key secret-1 add 1").result() == 2
    # %task_cancel takes the key the refusal asks for
    task = qm.submit(lambda: qmagic.cancellable_sleep(60), lock_key="secret-1")
    with pytest.raises(UsageError, match="--lock-key KEY"):
        line(ip, "task_cancel", task.uid)
    line(ip, "task_cancel", f"{task.uid} --lock-key secret-1")
    assert task.wait(10) and task.status.value == "cancelled"
    line(ip, "task_cancel", "--all --lock-key secret-1")
    # a quoted key is the key (as in every other magic), in both forms of %task_cancel
    task = qm.submit(lambda: qmagic.cancellable_sleep(60), lock_key="secret-1")
    line(ip, "task_cancel", f'{task.uid} --lock-key "secret-1"')
    assert task.wait(10) and task.status.value == "cancelled"
    task = qm.submit(lambda: qmagic.cancellable_sleep(60), lock_key="secret-1")
    line(ip, "task_cancel", "--all --lock-key 'secret-1'")
    assert task.wait(10) and task.status.value == "cancelled"
    line(ip, "unlock", "--key secret-1")
    assert capsys.readouterr().out.endswith("Unlocked.\n")
    with pytest.raises(UsageError, match="no arguments"):
        line(ip, "lock_info", "extra")


# =========================================================================================
# completion
# =========================================================================================
def _completions(ip, text, jedi=True):
    from IPython.core.completer import provisionalcompleter

    jedi, ip.Completer.use_jedi = ip.Completer.use_jedi, jedi  # (jedi's inference of a magic's
    try:  # line takes seconds: off where only qmagic's matchers can offer what is looked for)
        with provisionalcompleter():
            return {c.text for c in ip.Completer.completions(text, len(text))}
    finally:
        ip.Completer.use_jedi = jedi


def test_completion_offers_namespace_functions_after_the_options(qm, ip):
    ip.run_cell("def scan_fast(): pass\ndef scan_slow(): pass\nscan_value = 3\n").raise_error()
    assert {"scan_fast", "scan_slow"} <= _completions(ip, "%function_execute scan_")
    found = _completions(ip, "%function_execute -b --user Ann scan_")
    assert {"scan_fast", "scan_slow"} <= found and "scan_value" not in found
    # not in the option value position, nor for other magics
    assert "scan_fast" not in _completions(ip, "%function_execute --user scan_")
    assert "scan_fast" not in _completions(ip, "%tasks scan_")


def test_completion_offers_task_uids_after_the_task_magics(qm, ip):
    """``%task_cancel <TAB>`` offered nothing (a scientist copied uids from %tasks by hand):
    the uids of the tasks in memory are offered, as %tasks shows them (8 characters), newest
    first; a cancel offers unfinished tasks only."""
    gate = threading.Event()
    ip.user_ns["hold"] = lambda: gate.wait(TIMEOUT)
    done = line(ip, "function_execute", "add 1")
    running = line(ip, "function_execute", "-b hold")
    try:
        both = {done.uid[:8], running.uid[:8]}
        for magic in ("task_status", "task_result"):
            assert both <= _completions(ip, f"%{magic} ", jedi=False)
            assert _completions(ip, f"%{magic} {done.uid[:3]}", jedi=False) >= {done.uid[:8]}
        assert running.uid[:8] in _completions(ip, "%task_cancel ", jedi=False)
        assert done.uid[:8] not in _completions(ip, "%task_cancel ", jedi=False)
        assert not both & _completions(ip, "%tasks ", jedi=False) and not both & _completions(ip, "%task_cancel --", jedi=False)
    finally:
        gate.set()
        assert running.wait(TIMEOUT)


# =========================================================================================
# text forms (qmagic.format)
# =========================================================================================
def test_a_failed_task_says_why_in_its_line_and_under_its_row(qm, ip, capsys):
    ip.run_cell("def calibrate(offset):\n    return 100 / offset\n").raise_error()
    with pytest.raises(ZeroDivisionError):
        line(ip, "function_execute", "calibrate 0")
    task = qm.last_task
    assert fmt.task_line(task) == (
        "calibrate(0)  qmagic user  foreground  failed  error: ZeroDivisionError: division by zero")
    done = line(ip, "function_execute", "calibrate 4")
    assert fmt.task_table([task, done]) == (
        "task          user         mode        status     progress\n"
        "calibrate(0)  qmagic user  foreground  failed\n"
        "    error: ZeroDivisionError: division by zero\n"
        "calibrate(4)  qmagic user  foreground  completed"
    )
    capsys.readouterr()
    line(ip, "task_status", task.uid[:8])
    assert capsys.readouterr().out == f"{task.uid[:8]}: failed  error: ZeroDivisionError: division by zero\n"
    detail = fmt.task_detail(task).splitlines()  # (the traceback follows: not said twice)
    assert detail[0] == "calibrate(0)  qmagic user  foreground  failed"
    assert detail[-1].strip() == "ZeroDivisionError: division by zero"
    # a record whose error names no type, or already starts with it; a long one is cut
    rec = {**task.to_dict(), "error": "kernel stopped while the task was running", "error_type": None}
    assert fmt.record_line(rec).endswith("failed  error: kernel stopped while the task was running")
    rec.update(error="ValueError: bad\nsecond line", error_type="ValueError")
    # (a message of several lines: its first, and "..." says more follows; it read as complete)
    assert fmt.record_line(rec).endswith("failed  error: ValueError: bad ...")
    rec.update(error="ValueError: " + "y" * 200 + "\nsecond line")
    assert fmt.error_note(rec).endswith("y...") and len(fmt.error_note(rec)) == 100
    rec.update(error="ValueError: " + "y" * 84 + "\nsecond line")  # (a first line of 96: room for " ...")
    assert fmt.error_note(rec) == "ValueError: " + "y" * 84 + " ..."
    rec.update(error="ValueError: " + "y" * 86 + "\nsecond line")
    assert fmt.error_note(rec) == "ValueError: " + "y" * 85 + "..." and len(fmt.error_note(rec)) == 100
    rec.update(error="x" * 500)
    assert len(fmt.error_note(rec)) == 100 and len(fmt.task_table([rec]).splitlines()) == 3
    # a cancelled task's line and row say no "error" (the history says why, without a type)
    rec.update(status="cancelled", error="Task was cancelled with %task_cancel", error_type="TaskCancelled")
    assert fmt.record_line(rec).endswith("  cancelled") and len(fmt.task_table([rec]).splitlines()) == 2
    assert fmt.error_note(rec) == "Task was cancelled with %task_cancel"
    stopped = qm.submit(lambda: qmagic.cancellable_sleep(60))
    line(ip, "task_cancel", stopped.uid[:8])
    assert stopped.wait(TIMEOUT) and stopped.status.value == "cancelled"
    capsys.readouterr()
    line(ip, "task_status", stopped.uid[:8])  # (by uid as without: no "error" for a cancel)
    assert capsys.readouterr().out == f"{stopped.uid[:8]}: cancelled\n"


def test_text_forms_show_progress_script_changes_and_no_key(qm, ip, capsys):
    ip.run_cell("def half():\n    qmagic.report_progress(2, 4, 'half')\n").raise_error()
    task = line(ip, "function_execute", "half")
    assert fmt.task_line(task) == "half()  qmagic user  foreground  completed  2/4 half"
    assert fmt.task_table([task]) == (
        "task    user         mode        status     progress\n"
        "half()  qmagic user  foreground  completed  2/4 half"
    )
    assert fmt.task_table([], hidden=1) == "No tasks.\n(1 more task not shown; use --all)"
    assert ip.run_cell("%%script_upload --name zz\nzz_new = 1\n").success
    capsys.readouterr()
    line(ip, "task_result")
    assert capsys.readouterr().out.endswith("  qmagic user  foreground  completed\nadded: zz_new\n")
    info = {"environment": True, "queue": False, "user": "Bo", "time": 1.0, "time_str": "x",
            "note": None, "emergency_lock_key_is_set": True}
    assert fmt.lock_text(info) == "Locked by Bo: environment\n(An emergency unlock key is set.)"


def test_progress_values_qmagic_cannot_format_never_break_the_views(qm, ip, capsys):
    from qmagic.panels import render

    ip.run_cell(
        "class BadStr:\n"
        "    def __str__(self): raise RuntimeError('no str')\n"
        "    def __repr__(self): raise RuntimeError('no repr')\n"
        "    def __float__(self): raise RuntimeError('no float')\n"
        "def count(n, total=None):\n"
        "    qmagic.report_progress(n, total, 'events')\n"
    ).raise_error()
    huge = line(ip, "function_execute", "count (10**400) (-2 * 10**5000)")
    bad = line(ip, "function_execute", "count (BadStr())")
    bad_total = line(ip, "function_execute", "count 1 (BadStr())")
    assert huge.status.value == "completed" and bad.status.value == "completed"
    assert bad_total.progress.fraction is None and "1/&lt;BadStr" in render.row_html(bad_total)
    assert fmt.task_line(huge).endswith("completed  1e+400/-2e+5000 events")
    assert fmt.task_line(bad).endswith("completed  <BadStr with a failing str> events")
    capsys.readouterr()
    line(ip, "tasks")
    out = capsys.readouterr().out
    assert "1e+400/-2e+5000 events" in out and "<BadStr with a failing str> events" in out
    assert "1e+400/-2e+5000" in render.row_html(huge) and "failing str" in render.row_html(bad)
    assert repr(bad.progress) == "Progress(value=<BadStr with a failing repr>, total=None, message='events')"


def test_a_press_as_a_waited_background_task_ends_says_it_ended(qm):
    """■ lands as the background task a cell waits for (``-b --wait``) has just ended: the
    line says it ended, not that it keeps running."""
    import contextlib

    from qmagic.ipython.magics.common import wait_interruptibly

    class Pressed:  # the kernel runner's guard, with ■ landing in it
        @staticmethod
        @contextlib.contextmanager
        def guard(_):
            raise KeyboardInterrupt
            yield

    task = qm.submit(lambda: 7)
    assert task.result(TIMEOUT) == 7
    with pytest.raises(KeyboardInterrupt) as info:
        wait_interruptibly(task, Pressed())
    assert str(info.value) == (f"stopped waiting; the background task <lambda>() had already ended "
                               f"(completed): see %task_result {task.uid[:8]}.")
