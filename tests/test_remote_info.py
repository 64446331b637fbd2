"""The info socket (PUB) with the real queueserver clients: console text in order, status
on change and periodically, coalesced task events with the final state always sent."""

from __future__ import annotations

import contextlib
import itertools
import json
import socket
import threading
import time

import numpy
import pytest
from bluesky_queueserver import ReceiveSystemInfo
from bluesky_queueserver_api.zmq import REManagerAPI

import qmagic
from qmagic import probe
from qmagic.protocol import status_reply
from qmagic.remote import info as info_module
from qmagic.remote.info import InfoPublisher
from qmagic.remote.pub_socket import MAX_TOPICS

from engine_helpers import TIMEOUT, make_worker  # noqa: F401 - fixture
from polling import eventually, until_free


@contextlib.contextmanager
def _sub_socket(address: str, topic: bytes):
    """A 0MQ SUB socket connected to ``address`` for ``topic``, closed on leaving."""
    import zmq

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.connect(address)
    try:
        yield sub
    finally:
        sub.close(0)
        ctx.term()


def _sub_subscribed(sub, worker) -> None:
    """A raw SUB socket's subscription is in place: markers printed by tasks until one
    arrives, then everything received so far read."""
    deadline = time.monotonic() + TIMEOUT
    while not sub.poll(100):
        worker.submit(lambda: print("sync")).wait(TIMEOUT)
        assert time.monotonic() < deadline, "never subscribed"
    while sub.poll(300):
        sub.recv_multipart()


@pytest.fixture
def setup(make_worker):
    release = threading.Event()

    def scan(n):
        for i in range(n):
            print(f"point {i}")
            qmagic.report_progress(i + 1, n, f"point {i + 1}")
        release.wait(TIMEOUT)
        return n

    worker = make_worker({"scan": scan})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker),
                        status_period=0.2).start()
    rm = REManagerAPI(zmq_control_addr="tcp://127.0.0.1:1", zmq_info_addr=pub.address,
                      console_monitor_poll_timeout=0.05, system_info_monitor_poll_timeout=0.05)
    yield worker, pub, rm, release
    release.set()
    rm.console_monitor.disable_wait(timeout=2)
    rm.system_info_monitor.disable_wait(timeout=2)
    rm.close()
    pub.stop()


@contextlib.contextmanager
def _console_of(worker):
    """REManagerAPI's console monitor on an info socket of ``worker``, subscribed and empty."""
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker)).start()
    rm = REManagerAPI(zmq_control_addr="tcp://127.0.0.1:1", zmq_info_addr=pub.address,
                      console_monitor_poll_timeout=0.05)
    try:
        rm.console_monitor.enable()
        _subscribed(rm.console_monitor, worker)
        yield rm.console_monitor
    finally:
        rm.console_monitor.disable_wait(timeout=2)
        rm.close()
        pub.stop()


def _subscribed(monitor, worker) -> None:
    """PUB drops what is sent before a subscription arrives: print markers from a task until
    one reaches the monitor, then empty it."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        worker.submit(lambda: print("sync")).wait(TIMEOUT)
        try:
            monitor.next_msg(timeout=0.1)
        except TimeoutError:
            continue
        while True:
            try:
                monitor.next_msg(timeout=0.3)
            except TimeoutError:
                break
        monitor.clear()
        return
    raise TimeoutError("the console monitor never received a message")


def test_console_monitor_receives_what_tasks_print_in_order(setup):
    worker, pub, rm, release = setup
    rm.console_monitor.enable()
    _subscribed(rm.console_monitor, worker)
    print("printed outside any task: not published")  # only tasks' output by default
    release.set()
    worker.submit("scan", (30,)).result(TIMEOUT)
    got = []
    while "".join(got).count("\n") < 30:  # print() writes the text and the newline apart
        got.append(rm.console_monitor.next_msg(timeout=TIMEOUT)["msg"])
    assert "".join(got) == "".join(f"point {i}\n" for i in range(30))
    assert rm.console_monitor.text().endswith("point 29")
    assert "outside" not in rm.console_monitor.text()


def test_all_output_option_and_progress_bars(setup):
    worker, pub, rm, release = setup
    rm.console_monitor.enable()
    _subscribed(rm.console_monitor, worker)
    pub.all_output = True
    print("progress 10%\rprogress 50%\rprogress 100%\ndone")
    deadline = time.monotonic() + TIMEOUT
    while "done" not in rm.console_monitor.text():
        rm.console_monitor.next_msg(timeout=TIMEOUT)
        assert time.monotonic() < deadline
    assert rm.console_monitor.text().endswith("progress 100%\ndone")


def test_system_info_monitor_receives_status_and_task_events(setup):
    worker, pub, rm, release = setup
    rm.system_info_monitor.enable()
    first = rm.system_info_monitor.next_msg(timeout=TIMEOUT)
    assert set(first) == {"time", "msg"}
    assert "status" in first["msg"] or "task" in first["msg"]
    task = worker.submit("scan", (200,))
    seen = []
    deadline = time.monotonic() + TIMEOUT
    while not any(m.get("status", {}).get("worker_background_tasks") == 1 for m in seen):
        seen.append(rm.system_info_monitor.next_msg(timeout=TIMEOUT)["msg"])
        assert time.monotonic() < deadline
    release.set()
    assert task.result(TIMEOUT) == 200
    events = [m["task"] for m in seen if "task" in m]
    while not events or events[-1].get("status") != "completed":
        msg = rm.system_info_monitor.next_msg(timeout=TIMEOUT)["msg"]
        if "task" in msg:
            events.append(msg["task"])
    mine = [e for e in events if e["task_uid"] == task.uid]
    assert mine[-1]["status"] == "completed" and mine[-1]["result"] == "200"
    assert mine[-1]["progress"] == {"value": 200, "total": 200, "message": "point 200"}
    assert mine[0]["name"] == "scan" and mine[0]["call"] == "scan(200)"
    assert len(mine) < 20  # 200 progress events coalesced (at most ~10/s per task)


def test_a_large_result_never_holds_up_the_stream(make_worker):
    """A task event's result text was repr(result) cut to 200 characters: for 5 million
    floats one C call, which held the GIL ~1.3 s at the task's end (on the text thread, past
    its deadline), so the status stream paused and no remote client had a reply (found by a
    hostile test).  The text is now made from the first items, as repr begins."""
    worker = make_worker({"floats": lambda n: [i * 0.5 for i in range(n)]})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker),
                        status_period=0.1).start()
    rm = REManagerAPI(zmq_control_addr="tcp://127.0.0.1:1", zmq_info_addr=pub.address,
                      system_info_monitor_poll_timeout=0.05)
    try:
        rm.system_info_monitor.enable()
        rm.system_info_monitor.next_msg(timeout=TIMEOUT)  # (subscribed)
        task = worker.submit("floats", (5_000_000,))
        statuses, result, deadline = [], None, time.monotonic() + TIMEOUT
        while result is None or statuses[-1] < done + 0.5:  # (and half a second after)
            assert time.monotonic() < deadline, (result, statuses[-3:])
            msg = rm.system_info_monitor.next_msg(timeout=TIMEOUT)
            if "status" in msg["msg"]:
                statuses.append(msg["time"])
            event = msg["msg"].get("task", {})
            if event.get("task_uid") == task.uid and event.get("status") == "completed":
                result, done = event["result"], msg["time"]
    finally:
        rm.system_info_monitor.disable_wait(timeout=2)
        rm.close()
        pub.stop()
    assert result.startswith("[0.0, 0.5, 1.0, 1.5, ") and result.endswith("...") and len(result) == 200
    gaps = [b - a for a, b in itertools.pairwise(statuses)]
    assert max(gaps) < 0.6, sorted(gaps)[-3:]


def test_queueserver_receiver_reads_the_periodic_status(setup):
    worker, pub, rm, release = setup
    rsi = ReceiveSystemInfo(zmq_subscribe_addr=pub.address, timeout=5000)
    try:
        msgs = [rsi.recv() for _ in range(4)]
    finally:
        rsi._socket.close(0)
    assert all("status" in m["msg"] for m in msgs)
    gaps = [b["time"] - a["time"] for a, b in itertools.pairwise(msgs)]
    assert all(0.05 < gap < 2.0 for gap in gaps), gaps


def test_bad_address_is_a_clear_error(make_worker):
    from qmagic import ControlChannelError

    worker = make_worker()
    with pytest.raises(ControlChannelError, match="Invalid info socket address"):
        InfoPublisher(worker, "nowhere", lambda: {})
    first = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker)).start()
    try:
        with pytest.raises(ControlChannelError, match="Cannot start the info socket"):
            InfoPublisher(worker, first.address, lambda: {}).start()
    finally:
        first.stop()


def test_a_flood_keeps_memory_bounded_and_says_what_was_dropped(make_worker):
    """Producers only note what is new (one wake-up waits at a time); console text waiting to
    be sent is bounded, the oldest dropped first, with a note saying how much (found by a
    hostile test: a progress flood queued 2 million items, +650 MB)."""
    from qmagic.remote.info import CONSOLE_BACKLOG_CHARS, CONSOLE_CHUNK_CHARS, TOPIC_CONSOLE

    worker = make_worker({})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:0", lambda: {})  # not started: nothing drains
    task = qmagic.Task("uid-1", "f", user="u", user_group="g", background=True)
    line = "x" * 999 + "\n"
    for _ in range(3000):
        pub._on_output(task, line)
        pub._on_event("uid-1", progress=None)
    assert pub._queue.qsize() == 1  # one wake-up, whatever came
    assert CONSOLE_BACKLOG_CHARS - len(line) < pub._console_chars <= CONSOLE_BACKLOG_CHARS
    assert pub._console_dropped == 3000 * len(line) - pub._console_chars
    dropped = pub._console_dropped
    sent: list = []
    pub._send = lambda sock, topic, msg: sent.append((topic, msg))
    pub._publish_console(None)
    note = (f"\n[qmagic: {dropped} characters of console output were "
            "dropped: they came faster than they could be sent]\n")
    assert {topic for topic, _ in sent} == {TOPIC_CONSOLE}
    assert "".join(m for _, m in sent) == note + line * (CONSOLE_BACKLOG_CHARS // len(line))
    assert all(len(m) <= CONSOLE_CHUNK_CHARS for _, m in sent)
    assert pub._console_chars == pub._console_dropped == 0 and not pub._wake_pending


def test_one_huge_print_is_cut_to_its_tail_and_keeps_the_lines_before_it(make_worker):
    """A write longer than CONSOLE_CHUNK_CHARS is sent as its tail after a marker saying how
    much was dropped because it was too long; the lines before and after it still go out,
    and no note blames speed (found by a hostile test: one 3 MB print dropped itself and
    the line before it, 'they came faster than they could be sent')."""
    from qmagic.remote.info import CONSOLE_CHUNK_CHARS
    from qmagic.remote.pub_socket import CONSOLE_MESSAGE_BYTES

    pub = InfoPublisher(make_worker({}), "tcp://127.0.0.1:0", lambda: {})  # not started
    task = qmagic.Task("uid-1", "f", user="u", user_group="g", background=True)
    big = "s" + "x" * 3_000_000 + "e"
    for text in ("big start", "\n", big, "\n", "big end", "\n"):
        pub._on_output(task, text)
    assert pub._console_dropped == 0 and pub._console_chars < CONSOLE_CHUNK_CHARS + 200
    sent: list = []
    pub._send = lambda sock, topic, msg: sent.append(msg)
    pub._publish_console(None)
    marker = (f"[... {len(big) - CONSOLE_CHUNK_CHARS} earlier characters dropped: the text was too "
              "long to send whole ...]\n")
    assert "".join(sent) == "big start\n" + marker + big[-CONSOLE_CHUNK_CHARS:] + "\nbig end\n"
    assert all(len(json.dumps(m)) - 2 <= CONSOLE_MESSAGE_BYTES for m in sent)
    assert not any("faster" in m for m in sent)


@pytest.fixture
def describing_a_slow_result(make_worker):
    """A worker with an info socket, whose publisher is now describing a result whose repr
    blocks (until the test ends)."""
    entered, release = threading.Event(), threading.Event()

    class SlowRepr:
        def __repr__(self):
            entered.set()
            release.wait(TIMEOUT)
            return "SlowRepr()"

    worker = make_worker({}, journal_enabled=False)  # (the log describes results too)
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker)).start()
    try:
        worker.submit(SlowRepr).result(TIMEOUT)
        assert entered.wait(TIMEOUT)  # the publisher is describing the result now
        yield worker, pub
    finally:
        release.set()
        pub.stop()
        _probe_free()  # (else the next one's SlowRepr is given up at once: `entered` never set)


def test_a_result_with_a_slow_repr_never_holds_up_other_tasks_events(describing_a_slow_result):
    """Made outside the publisher's lock, the result's text still ran on the thread that
    delivers every task's events (to the panels too): a repr that blocked held up every
    other task's events until it returned.  Texts that run a task's own code now have a
    deadline (0.2 s; past it the message says the repr did not finish)."""
    worker, _ = describing_a_slow_result
    other = worker.submit(lambda: 2)
    other.result(TIMEOUT)
    told = threading.Event()
    other.subscribe(lambda **event: told.set())  # (its current status comes first)
    assert told.wait(TIMEOUT / 4), "another task's events waited for a result's repr"


def test_a_result_with_a_slow_repr_never_holds_up_what_tasks_print(describing_a_slow_result):
    """A task event's text runs the task's own code (its result's repr, its arguments',
    its error's str).  It ran while the publisher held the lock that every print of every
    task takes: a result whose repr blocked froze every task that printed meanwhile (and a
    foreground task's print froze the kernel; found by a hostile test)."""
    worker, _ = describing_a_slow_result
    printer = worker.submit(lambda: print("still printing"))
    assert printer.wait(TIMEOUT / 4) and printer.result() is None


def test_small_plain_values_are_described_while_the_probe_is_busy(describing_a_slow_result):
    """Every text of a task event that was not a lone str, int, float, bool or None (a list
    of three numbers, an exception's message, a call with a list argument) was made on the
    probe thread, past a deadline of 0.2 s or at once given up while that thread was busy:
    with the CPUs loaded and a few tasks computing, 4 final messages in 10 said the result
    "<repr did not finish>" for good.  Small values of built-in types whose reading runs no
    code of their own are now described at once (here: while the probe is held by a repr
    that blocks)."""
    worker, pub = describing_a_slow_result

    def fails(x, points):
        raise ValueError(f"bad value {x}")

    with _sub_socket(pub.address, b"QS_Info") as sub:
        assert sub.poll(TIMEOUT * 1000), "no status within the timeout"  # (subscribed)
        done = worker.submit(lambda n, points: [n, {"a": (1.5, None)}, points], (3, [1, 2]))
        failed = worker.submit(fails, (5, [1, 2]))
        text = worker.submit(lambda: "x" * 20_000)  # (a lone text: cut before its repr is made)
        scan = worker.submit(lambda: numpy.linspace(0.0, 1.0, 3))  # (numpy's own: at once too)
        assert done.wait(TIMEOUT) and failed.wait(TIMEOUT) and text.wait(TIMEOUT) and scan.wait(TIMEOUT)
        final: dict = {}
        while len(final) < 4:
            assert sub.poll(TIMEOUT * 1000), f"final task messages missing: {final}"
            task = json.loads(sub.recv_multipart()[1])["msg"].get("task", {})
            if (task.get("task_uid") in (done.uid, failed.uid, text.uid, scan.uid)
                    and task["status"] in ("completed", "failed")):
                final[task["task_uid"]] = task  # (the slow result's own may come meanwhile)
        assert final[done.uid]["result"] == "[3, {'a': (1.5, None)}, [1, 2]]"
        assert final[done.uid]["call"] == "<lambda>(3, [1, 2])"
        assert final[failed.uid]["error"] == "bad value 5"
        assert final[failed.uid]["call"] == "fails(5, [1, 2])"
        assert final[text.uid]["result"].startswith("'xxxx")
        assert final[scan.uid]["result"] == "array([0. , 0.5, 1. ])"


def test_only_small_values_of_builtin_types_are_described_at_once():
    """What the publisher describes itself (else with the probe's deadline): nothing that runs
    code of its own, nothing whose text takes long to make."""
    from qmagic.probe import AT_ONCE_BUDGET, read_at_once

    class Mine(Exception):
        pass

    class Worded(Exception):
        def __str__(self):
            return "runs code"

    loop: list = []
    loop.append(loop)
    assert read_at_once([1, "a", 2.5, None, True, (1, [2]), {"k": {3: "v"}}, Mine("x", 2), ValueError(4)])
    assert not read_at_once([[0] * AT_ONCE_BUDGET])
    assert not read_at_once(["x" * AT_ONCE_BUDGET])
    assert not read_at_once([2 ** 5000])
    assert not read_at_once([loop])
    for value in (object(), [1, object()], {1: type}, Worded(), Mine(object()), KeyError("k"), type("S", (str,), {})()):
        assert not read_at_once([value]), value
    # numpy's own numbers and plain arrays of numbers (what scans report and return)
    assert read_at_once([numpy.float64(2.5), numpy.int32(3), numpy.bool_(True), numpy.complex64(1j),
                         numpy.arange(500.0), [numpy.zeros((3, 3))], numpy.zeros((1000, 1000))])
    # (counted against the budget, about 10 characters an item; past 1000 items numpy prints
    # 2 x 3 items per axis)
    assert not read_at_once([numpy.arange(999), numpy.arange(999)])
    assert not read_at_once([numpy.zeros((10,) * 8)])
    masked = numpy.ma.masked_array([1, 2], mask=[0, 1])  # (a subclass: its repr is its own code)
    for value in (numpy.array([object()]), masked, numpy.array(["a"]), numpy.datetime64("2026-01-01"),
                  type("Reading", (numpy.ndarray,), {})((2,)), type("F", (numpy.float64,), {})(1.0),
                  type("Faked", (numpy.float64,), {"__module__": "numpy"})(1.0)):
        assert not read_at_once([value]), type(value)
    # print options that run code or print every item (threshold=sys.maxsize, a notebook's
    # habit): an array's text is then made with the deadline (reviewer's findings)
    with numpy.printoptions(threshold=10**9):
        assert not read_at_once([numpy.arange(10)]) and read_at_once([numpy.float64(1.0)])
    with numpy.printoptions(formatter={"float": lambda x: "?"}):
        assert not read_at_once([numpy.zeros(2)])
    with numpy.printoptions(edgeitems=5000):
        assert not read_at_once([numpy.zeros(2)])
    with numpy.printoptions(precision=500):  # (500 digits a number: past the budget's 10 an item)
        assert not read_at_once([numpy.zeros(2)])
    assert read_at_once([numpy.zeros(2)])

    class Proxy:  # (isinstance() asks an object's own __class__: code of its own)
        def __getattribute__(self, name):
            raise AssertionError(f"read_at_once ran the value's code ({name})")

    assert not read_at_once([Proxy()])


def _console_until(monitor, needle: str) -> str:
    """The monitor's text once ``needle`` arrived (TimeoutError if it never does)."""
    deadline = time.monotonic() + TIMEOUT
    while needle not in monitor.text():
        try:
            monitor.next_msg(timeout=0.2)
        except TimeoutError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{needle!r} never reached the console monitor: {monitor.text()!r}")
    return monitor.text()


def test_prints_of_threads_a_task_starts_reach_the_console(make_worker):
    """queueserver publishes everything its worker prints; a task that prints from threads
    of its own (a thread pool, a helper thread, one started by that thread) showed the
    operator nothing: only the task's own thread was published, unless
    zmq_console_all_output.  Threads a task starts now count as the task's work; a thread
    started outside tasks still does not (the scientist's own output stays private)."""
    def fan_out():
        def inner():
            print("from the helper's own thread")

        def helper():
            print("from a thread the task started")
            nested = threading.Thread(target=inner)
            nested.start()
            nested.join()

        thread = threading.Thread(target=helper)
        thread.start()
        thread.join()
        print("task done")

    worker = make_worker({"fan_out": fan_out})
    with _console_of(worker) as console:
        outside = threading.Thread(target=lambda: print("a thread of the notebook's own"))
        outside.start()
        outside.join()
        worker.submit("fan_out").result(TIMEOUT)
        text = _console_until(console, "task done")
        assert text.splitlines() == ["from a thread the task started", "from the helper's own thread",
                                     "task done"]


def test_a_burst_of_prints_reaches_a_slow_subscriber_whole(make_worker):
    """Every write went out as a message of its own (print() makes two): a task printing
    30,000 lines in a burst sent 60,000 messages, and a subscriber that did not read them at
    once (a busy gateway, a GUI) lost all but the ~11,000 0MQ queues, silently — PUB drops
    at its high-water mark, no note.  Text waiting when the publisher wakes now goes out
    together (up to CONSOLE_CHUNK_CHARS a message).  The burst is 11,000 lines (22,000
    writes), under CONSOLE_BACKLOG_CHARS: a publisher that a busy machine kept from running
    for a moment drops the oldest waiting text past that, by design and with a note (30,000
    lines lost 43 so, 1 run in 12 beside three other test runs)."""
    LINES = 11_000  # (x 82 characters: 0.9 of the backlog)
    assert LINES * 82 < info_module.CONSOLE_BACKLOG_CHARS

    def burst(n):
        for i in range(n):
            print(f"line {i:<6} " + "." * 70)
        print("end of burst")

    worker = make_worker({"burst": burst})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: {}).start()
    try:
        with _sub_socket(pub.address, b"QS_Console") as sub:
            _sub_subscribed(sub, worker)
            worker.submit("burst", (LINES,)).result(TIMEOUT * 3)  # nothing is read meanwhile
            text = []
            while not "".join(text[-2:]).endswith("end of burst\n"):
                assert sub.poll(TIMEOUT * 1000), "the end of the burst never arrived"
                topic, payload = sub.recv_multipart()
                text.append(json.loads(payload)["msg"])
            lines = "".join(text).splitlines()
            assert len(lines) == LINES + 1, f"{LINES + 1 - len(lines)} lines lost"
            assert lines == [f"line {i:<6} " + "." * 70 for i in range(LINES)] + ["end of burst"]
    finally:
        pub.stop()


def test_what_was_sent_as_the_publisher_stops_still_reaches_a_subscriber(make_worker):
    """The socket was closed with 0MQ's linger 0: what 0MQ had not written yet when the
    publisher stopped (the kernel exiting, qmagic unloaded) was dropped — the last lines a
    task printed, the final states of the tasks the exit cancelled — and so was what waited
    to be sent when the stop came as the publisher was busy.  A subscriber that reads slower
    than the task prints (here it reads only once the stop began) now gets everything, up to
    the last line and the task's final state."""
    import zmq

    def talk(n):  # (each line handed to 0MQ before the next: none waits in qmagic's backlog)
        for i in range(n):
            sent = pub.messages
            print(f"{i:<4}" + "." * 30_000 + "\n", end="")
            eventually(lambda: pub.messages > sent, TIMEOUT, "the line sent")
        print("the last line")

    worker = make_worker({"talk": talk})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: {}).start()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1)  # (a subscriber that does not read holds little: what is
    sub.setsockopt(zmq.RCVBUF, 4096)  # sent after that waits in the kernel's 0MQ queue)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(pub.address)
    received: list[tuple[bytes, dict]] = []
    try:
        _sub_subscribed(sub, worker)
        task = worker.submit("talk", (200,))  # 6 MB: more than the system's socket buffers hold
        assert task.result(TIMEOUT) is None
        assert worker.engine.bus.flush(TIMEOUT)  # (its final state reached the publisher)
        stopping = threading.Thread(target=pub.stop)
        stopping.start()

        def final(item):
            return item[0] == b"QS_Info" and item[1]["msg"].get("task", {}).get("status") == "completed"

        while not (any(final(item) for item in received)
                   and "the last line" in "".join(m["msg"] for t, m in received if t == b"QS_Console")):
            assert sub.poll(TIMEOUT * 1000), "the last messages were dropped at the stop"
            topic, payload = sub.recv_multipart()
            received.append((topic, json.loads(payload)))
        stopping.join(TIMEOUT)
        assert not stopping.is_alive()
        text = "".join(m["msg"] for t, m in received if t == b"QS_Console")
        assert text.count("." * 30_000) == 200 and text.endswith("the last line\n")
    finally:
        sub.close(0)
        ctx.term()
        pub.stop()


def test_a_failed_task_says_so_on_the_console(make_worker):
    """A queueserver worker logs a failed task's error and traceback to its console
    ("Error occurred while executing 'Execute function': ...", then the traceback), so an
    operator watching qserver-console-monitor or the gateway's console sees why the task
    stopped; qmagic's console showed the task's prints and then nothing.  It now follows a
    failed task's prints with queueserver's line (task_result's msg) and the traceback."""
    def measure(x):
        print("measuring")
        raise ValueError(f"bad value {x}")

    worker = make_worker({"measure": measure})
    with _console_of(worker) as console:
        task = worker.submit("measure", (3,))
        assert task.wait(TIMEOUT) and task.status.value == "failed"
        text = _console_until(console, "ValueError: bad value 3")
        lines = text.splitlines()
        assert lines[:3] == ["measuring", "Error occurred while executing 'Execute function': bad value 3:",
                             "Traceback (most recent call last):"]
        assert 'raise ValueError(f"bad value {x}")' in text


def test_cancelled_and_interrupted_tasks_say_so_on_the_console(make_worker):
    """A queueserver worker logs a function stopped by an exception — ``KeyboardInterrupt``
    too — with its "Error occurred while executing ..." line and the traceback.  qmagic's
    console said so for failed tasks only: a cancelled or interrupted task's prints were
    followed by nothing.  Each now ends with queueserver's line (task_result's msg, which
    gives the reason) and the traceback where the task's code was stopped."""
    started = threading.Event()

    def wait_long():
        print("waiting")
        started.set()
        qmagic.cancellable_sleep(3 * TIMEOUT)

    def stopped_by_hand():
        print("moving")
        raise KeyboardInterrupt  # (what ■ raises in a task's code)

    worker = make_worker({"wait_long": wait_long, "stopped_by_hand": stopped_by_hand})
    with _console_of(worker) as console:
        task = worker.submit("wait_long")
        assert started.wait(TIMEOUT)
        task.cancel()
        assert task.wait(TIMEOUT) and task.status.value == "cancelled"
        needle = "Error occurred while executing 'Execute function': Task was cancelled from Python:"
        lines = _console_until(console, needle).splitlines()
        assert lines[:3] == ["waiting", needle, "Traceback (most recent call last):"], lines
        console.clear()
        task = worker.submit("stopped_by_hand")
        assert task.wait(TIMEOUT) and task.status.value == "cancelled"
        needle = ("Error occurred while executing 'Execute function': Task was interrupted "
                  "(■ or KeyboardInterrupt):")
        text = _console_until(console, needle)
        assert text.splitlines()[:3] == ["moving", needle, "Traceback (most recent call last):"], text
        assert "raise KeyboardInterrupt" in text


def test_a_task_cancelled_in_the_queue_says_it_never_started(make_worker):
    """A task cancelled while it waited for a free thread never ran: the console wrote
    queueserver's "Error occurred while executing ..." for it, as if its code had failed.
    It now says that the task was cancelled before it started, and why (no traceback)."""
    release = threading.Event()
    worker = make_worker({"hold": lambda: release.wait(TIMEOUT), "scan": lambda: print("scanning")},
                         max_background_tasks=1)
    with _console_of(worker) as console:
        holding = worker.submit("hold")
        try:
            waiting = worker.submit("scan")
            assert waiting.status.value == "queued"
            waiting.cancel()
            assert waiting.wait(TIMEOUT) and waiting.status.value == "cancelled"
            text = _console_until(console, "Function 'scan' was cancelled before it started: "
                                  "Task was cancelled from Python")
            assert "Error occurred" not in text and "Traceback" not in text, text
        finally:
            release.set()
        assert holding.wait(TIMEOUT) and holding.status.value == "completed"


def test_a_task_that_failed_before_it_started_is_not_said_to_be_cancelled(make_worker):
    """A task can fail without starting (a coroutine whose event loop cannot be had): the
    console said that it "was cancelled before it started".  It says that it failed."""
    from qmagic.core.loops import MSG_NO_BLUESKY_LOOP, bluesky_loop

    async def acq():
        return "ran"

    assert bluesky_loop() is None, "a bluesky event loop leaked from another test"
    worker = make_worker({"acq": acq}, async_loop="bluesky")
    with _console_of(worker) as console:
        task = worker.submit("acq")
        assert task.wait(TIMEOUT) and task.status.value == "failed" and task.started_at is None
        text = _console_until(console, "Error occurred while executing 'Execute function': "
                              + MSG_NO_BLUESKY_LOOP)
        assert "cancelled" not in text, text


def test_a_thread_a_task_started_does_not_keep_the_task(make_worker):
    """A thread started by a task's work (a pool's, which lives on) notes the task weakly:
    the task and its result go when the worker forgets them."""
    import gc
    import weakref

    class Big:
        pass

    started, release = threading.Event(), threading.Event()

    def start_a_long_thread():
        threading.Thread(target=lambda: (started.set(), release.wait(TIMEOUT)), daemon=True).start()
        return Big()

    worker = make_worker({"start_a_long_thread": start_a_long_thread}, journal_enabled=False)
    task = worker.submit("start_a_long_thread")
    result = weakref.ref(task.result(TIMEOUT))
    assert started.wait(TIMEOUT)
    try:
        worker.submit(lambda: None).result(TIMEOUT)  # (the engine keeps its last task)
        worker.clear_finished()
        del task
        gc.collect()
        assert result() is None, "the thread the task started keeps its result alive"
    finally:
        release.set()


def test_a_status_change_without_task_events_is_published_at_once(make_worker):
    """queueserver publishes its status on every change; qmagic re-read it only after a
    print or a task event, else once per period: a lock taken (or the environment closed,
    a cell started) reached system_info_monitor and the gateway's /api/status/ws up to a
    period later.  The status is now compared every 0.1 s and published when it changed."""
    worker = make_worker({})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker), status_period=60).start()
    rm = REManagerAPI(zmq_control_addr="tcp://127.0.0.1:1", zmq_info_addr=pub.address,
                      system_info_monitor_poll_timeout=0.05)
    try:
        rm.system_info_monitor.enable()
        deadline = time.monotonic() + TIMEOUT
        while True:  # subscribed once a message arrives (a task's events publish its status)
            assert time.monotonic() < deadline, "never subscribed"
            worker.submit(lambda: None).result(TIMEOUT)
            try:
                rm.system_info_monitor.next_msg(timeout=0.3)
                break
            except TimeoutError:
                continue
        worker.lock("status-key", environment=True)
        deadline = time.monotonic() + 2.0  # (the period is 60 s)
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "the new lock was not published"
            try:
                msg = rm.system_info_monitor.next_msg(timeout=remaining)["msg"]
            except TimeoutError:
                continue
            if msg.get("status", {}).get("lock", {}).get("environment"):
                break
    finally:
        worker.unlock("status-key")
        rm.system_info_monitor.disable_wait(timeout=2)
        rm.close()
        pub.stop()


def test_an_error_naming_a_file_that_is_not_utf8_is_published_as_valid_text(make_worker):
    """A task's error text (str(exc)) may hold a file name that is not UTF-8 (its bytes as
    lone surrogates); the task message carried them as they were, which a subscriber that
    encodes as UTF-8 (the gateway's /api/info/ws) cannot send.  They read U+FFFD now."""
    name = b"caf\xe9.dat".decode("utf-8", "surrogateescape")

    def open_odd():
        raise ValueError(f"cannot read {name}")

    published = _published_error(make_worker, open_odd)
    assert published == "cannot read caf\ufffd.dat"
    published.encode("utf-8")


def _published_error(make_worker, fails) -> str:
    """The ``error`` text the info publisher keeps for a task of ``fails`` that failed."""
    worker = make_worker({"fails": fails})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:0", lambda: {})  # not started: nothing drains
    task = worker.submit("fails")
    assert task.wait(TIMEOUT)
    pub._on_event(task.uid, error=task.exception(), status="failed")
    return pub._tasks[task.uid]["error"]


def test_a_progress_message_naming_a_file_that_is_not_utf8_is_published_as_valid_text(make_worker):
    """As the error text above, for the message of report_progress (``f"reading {name}"``
    with a name from os.listdir): it went out with its lone surrogates."""
    name = b"caf\xe9.dat".decode("utf-8", "surrogateescape")

    received = json.loads(_published_progress(make_worker, 1, 2, f"reading {name}"))
    assert received["msg"]["task"]["progress"]["message"] == "reading caf\ufffd.dat"  # (as UTF-8)


class _Recorder:
    """What the publishing thread's socket is given: keeps what is sent."""

    def __init__(self) -> None:
        self.sent: list = []

    def send_multipart(self, frames, flags=0):
        self.sent.append(frames)


def _published_progress(make_worker, *progress) -> bytes:
    """The info message of a task that reported ``progress`` (report_progress's arguments)."""
    worker = make_worker({"report": lambda: qmagic.report_progress(*progress)})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:0", lambda: {})  # not started: nothing drains
    task = worker.submit("report")
    assert task.wait(TIMEOUT)
    pub._on_event(task.uid, progress=task.progress)
    socket = _Recorder()
    pub._publish_tasks(socket, time.monotonic() + 60)  # (what the thread sends: the task is due)
    return socket.sent[0][1]


def _refuse(token):
    raise AssertionError(f"not JSON: {token}")


def test_a_progress_of_nan_is_published_as_strict_json(make_worker):
    """report_progress(math.nan, ...) (a reading that failed, used as the progress) went out
    as Python's ``NaN`` token, which no strict JSON reader (a browser behind the gateway's
    /api/info/ws) takes: it is null now, as in the control channel's replies."""
    import math

    sent = _published_progress(make_worker, math.nan, math.inf, "reading")
    progress = json.loads(sent, parse_constant=_refuse)["msg"]["task"]["progress"]
    assert progress == {"value": None, "total": None, "message": "reading"}


def _deep(levels: int, leaf: object) -> list:
    value: object = leaf
    for _ in range(levels):
        value = [value]
    return value  # type: ignore[return-value]


class _Reading:
    """A value whose ``str()`` waits until ``go`` is set (a device asked for its reading)."""

    def __init__(self, text: str) -> None:
        self.text, self.go = text, threading.Event()

    def __str__(self) -> str:
        self.go.wait(3 * TIMEOUT)
        return self.text


def test_a_progress_value_whose_str_blocks_never_holds_up_the_stream(make_worker):
    """``report_progress(stage_x, 10)``: JSON cannot write the object, and its text was made
    with ``str()`` on the publishing thread with no deadline; a ``__str__`` that waits for a
    device held every status, task and console message for as long as it waited (a
    reviewer's finding).  Its text is made with a deadline now, like a result's repr."""
    pub = InfoPublisher(make_worker({}), "tcp://127.0.0.1:0", lambda: {})  # not started
    socket = _Recorder()
    ready, stuck = _Reading("12.5 mm"), _Reading("never read")
    ready.go.set()
    pub._send(socket, b"QS_Info", {"task": {"progress": {"value": ready, "total": 10}}})
    assert json.loads(socket.sent[0][1])["msg"]["task"]["progress"] == {"value": "12.5 mm", "total": 10}
    sent = threading.Event()

    def send() -> None:
        pub._send(socket, b"QS_Info", {"task": {"progress": {"value": stuck, "total": 10}}})
        sent.set()

    threading.Thread(target=send, daemon=True).start()
    try:
        assert sent.wait(TIMEOUT), "the publishing thread waited for the value's __str__"
        # the control channel's reads (RE.state, plans, results) have a thread of their own
        assert probe.read(lambda: "answered", TIMEOUT) == "answered"
    finally:
        stuck.go.set()
        _probe_free()
    progress = json.loads(socket.sent[1][1])["msg"]["task"]["progress"]
    assert progress == {"value": "<repr did not finish>", "total": 10}


def test_a_progress_value_that_is_a_dict_subclass_is_described_without_its_own_code(make_worker):
    """json asks a dict subclass for its items(): its own code ran on the publishing thread
    with no deadline (a reviewer's finding).  Progress values go out as plain data now:
    numbers as numbers, anything else as its text (made with the deadline)."""
    calls: list[str] = []

    class Readings(dict):
        def items(self):
            calls.append(threading.current_thread().name)
            return super().items()

    class Counts(int):
        pass

    sent = _published_progress(make_worker, Readings(x=1.5), Counts(10), "reading")
    progress = json.loads(sent, parse_constant=_refuse)["msg"]["task"]["progress"]
    assert progress == {"value": "{'x': 1.5}", "total": 10, "message": "reading"}
    assert threading.main_thread().name not in calls  # (the publisher's calls run here; the
    # experiment log reads the value on its own deadline thread)
    np_sent = _published_progress(make_worker, numpy.float64(2.5), numpy.int64(4), None)
    assert json.loads(np_sent)["msg"]["task"]["progress"] == {"value": 2.5, "total": 4, "message": None}


def _probe_free() -> None:
    """Wait until the info socket's deadline thread has returned from what it was running."""
    until_free(info_module._TEXTS, TIMEOUT)


def test_a_progress_value_json_cannot_write_never_stops_the_stream(make_worker):
    """A progress value that holds itself, or one with NaN as a key or deep inside (700
    lists: json writes that, a walk of Python calls did not) made the message's encoding
    raise, and the publishing thread stopped: no more status, task or console messages
    (a reviewer's finding).  Such a message goes out, strict JSON, with the value's text if
    JSON cannot write it."""
    import math

    looped: list = [1]
    looped.append(looped)
    pub = InfoPublisher(make_worker({}), "tcp://127.0.0.1:0", lambda: {})  # not started
    socket = _Recorder()
    sent = socket.sent
    for value in ({math.nan: 1}, _deep(700, math.nan), looped):
        pub._send(socket, b"QS_Info", {"task": {"progress": {"value": value}}})
        json.loads(sent[-1][1], parse_constant=_refuse)
    assert json.loads(sent[0][1])["msg"]["task"]["progress"]["value"] == {"NaN": 1}
    assert "[1, [...]]" in json.loads(sent[2][1])["msg"]


def _zmtp_subscriber(address: str) -> socket.socket:
    """A bare TCP connection to ``address`` that greets as a 0MQ SUB (ZMTP 3.0, NULL): what
    it sends next is read as its messages.  (No 0MQ socket: libzmq's own SUB and XSUB keep
    what they send, and one that sent a huge message crashed the test process at exit.)"""
    host, port = address[len("tcp://"):].rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    conn.sendall(b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32))
    ready = b"\x05READY" + b"\x0bSocket-Type" + (3).to_bytes(4, "big") + b"SUB"
    conn.sendall(bytes([0x04, len(ready)]) + ready)
    greeting = b""
    while b"READY" not in greeting:  # (the kernel's greeting and READY: a 0MQ peer)
        chunk = conn.recv(4096)
        assert chunk, f"the handshake failed: {greeting!r}"
        greeting += chunk
    return conn


def test_a_subscriber_sending_a_huge_message_is_disconnected_unread(make_worker):
    """0MQ's PUB read a subscription whole, however long, and kept it: a client that sent one
    of 300 MB grew the kernel by 2 GB (a hostile test).  A message over the info socket's
    limit drops the sender's connection before it is read; other subscribers are served."""
    worker = make_worker({})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker),
                        status_period=0.05).start()
    try:
        with _zmtp_subscriber(pub.address) as conn:
            size = 300_000_000
            conn.sendall(bytes([0x02]) + size.to_bytes(8, "big") + b"\x01" + b"a" * 1000)  # (the rest never comes)
            assert _dropped(conn), "a subscriber that announced a 300 MB message was kept connected"
        with _sub_socket(pub.address, info_module.TOPIC_INFO) as sub:  # the others are served
            assert sub.poll(TIMEOUT * 1000), "no status reached a subscriber"
            assert sub.recv_multipart()[0] == info_module.TOPIC_INFO
    finally:
        pub.stop()


def test_a_subscriber_holding_too_many_topics_is_disconnected(make_worker, caplog):
    """0MQ keeps every subscription in memory while its subscriber is connected: a client
    making 300,000 of them grew the kernel to 3.9 GB in 20 s (a hostile test).  Past
    _MAX_TOPICS topics the socket is made again at its address, dropping every connection;
    subscribers reconnect on their own and are served."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    worker = make_worker({})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker),
                        status_period=0.05).start()
    address = pub.address
    ctx = zmq.Context()
    greedy = ctx.socket(zmq.SUB)
    greedy.setsockopt(zmq.LINGER, 0)
    greedy.setsockopt(zmq.RECONNECT_IVL, 60_000)  # (it does not come back during the test)
    events = greedy.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
    try:
        greedy.connect(address)
        for i in range(MAX_TOPICS * 4):
            greedy.setsockopt(zmq.SUBSCRIBE, b"topic-%06d" % i)
        seen = []
        deadline = time.monotonic() + TIMEOUT
        while zmq.EVENT_DISCONNECTED not in seen and time.monotonic() < deadline:
            if events.poll(100):
                seen.append(recv_monitor_message(events)["event"])
        assert zmq.EVENT_DISCONNECTED in seen, f"a subscriber of {MAX_TOPICS * 4} topics was kept"
        assert pub.renewals >= 1 and pub.address == address and pub.running
        assert f"made again {pub.renewals} time" in "\n".join(pub.describe())  # (in %control_channel)
        assert sum("subscribed to more than" in r.getMessage() for r in caplog.records) == 1
        with _sub_socket(address, info_module.TOPIC_INFO) as sub:  # the others are served
            assert sub.poll(TIMEOUT * 1000), "no status reached a subscriber"
            assert sub.recv_multipart()[0] == info_module.TOPIC_INFO
    finally:
        greedy.disable_monitor()
        events.close(0)
        greedy.close(0)
        ctx.term()
        pub.stop()


def test_an_info_socket_that_cannot_be_made_again_says_it_is_off(make_worker, tmp_path, caplog):
    """A renewal that cannot bind the address again (here its folder is gone) ends the info
    socket's thread: %control_channel's lines then say it is off and how to start it again;
    stopping it afterwards is quiet and the worker goes on."""
    import zmq

    worker = make_worker({"f": lambda: 1})
    (tmp_path / "gone").mkdir()
    pub = InfoPublisher(worker, f"ipc://{tmp_path}/gone/info", lambda: status_reply(worker),
                        status_period=0.05).start()
    ctx = zmq.Context()
    greedy = ctx.socket(zmq.SUB)
    greedy.setsockopt(zmq.LINGER, 0)
    try:
        greedy.connect(pub.address)
        greedy.setsockopt(zmq.SUBSCRIBE, info_module.TOPIC_INFO)
        assert greedy.poll(TIMEOUT * 1000), "the subscriber was not served"  # (connected)
        (tmp_path / "gone" / "info").unlink()
        (tmp_path / "gone").rmdir()
        for i in range(MAX_TOPICS * 2):
            greedy.setsockopt(zmq.SUBSCRIBE, b"topic-%06d" % i)
        deadline = time.monotonic() + TIMEOUT
        while pub.running and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not pub.running, "the info socket was still running at an address that is gone"
        assert pub.describe() == ["  info socket: off (see the kernel's log); to start it again, set "
                                  "QMagic.zmq_info_address to None and back"]
        assert any(r.getMessage().startswith("qmagic: the info socket is off") for r in caplog.records)
    finally:
        greedy.close(0)
        ctx.term()
        pub.stop()
    assert worker.submit("f").result(TIMEOUT) == 1


def _dropped(conn: socket.socket) -> bool:
    """True once the kernel closes ``conn`` (within TIMEOUT); what it sends is read and let go."""
    try:
        while conn.recv(65536):
            pass
    except socket.timeout:
        return False
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("sends", ["cancels, then as many topics", "what no subscriber sends"])
def test_a_raw_peer_cannot_get_around_the_topic_limit(make_worker, sends):
    """A reviewer's findings on the first version of the limit: cancels of topics never
    subscribed (which 0MQ passes up too) took one each off a count, so a raw peer sending N
    of them, then N topics, held them all (+720 MB for 50,000); and messages that are no
    subscription (which a PUB dropped) were all passed up, the publishing thread read them
    for as long as they came: nothing was published, a CPU was busy, memory grew.  Topics
    are a set now, and a peer that sends what no subscriber sends is disconnected."""
    worker = make_worker({})
    pub = InfoPublisher(worker, "tcp://127.0.0.1:*", lambda: status_reply(worker),
                        status_period=0.05).start()
    try:
        with _zmtp_subscriber(pub.address) as conn:
            if sends == "what no subscriber sends":
                notes = [b"hello"] * 3
            else:
                topics = [b"topic-%06d" % i for i in range(MAX_TOPICS + 44)]  # (fewer than one look reads)
                notes = [b"\x00" + t for t in topics] + [b"\x01" + t for t in topics]
            conn.sendall(b"".join(bytes([0x00, len(note)]) + note for note in notes))
            assert _dropped(conn), f"a peer sending {sends} was kept connected"
        assert pub.renewals >= 1 and pub.running
        with _sub_socket(pub.address, info_module.TOPIC_INFO) as sub:  # the others are served
            assert sub.poll(TIMEOUT * 1000), "no status reached a subscriber"
    finally:
        pub.stop()


def test_renewals_warn_once_a_minute_and_an_address_that_cannot_be_bound_again_says_so(caplog, tmp_path):
    """The making-again of the info socket (qmagic.remote.pub_socket.Renewals), alone: a
    client that keeps subscribing too much is warned about once a minute (then the debug
    log), every renewal counted; a socket that cannot be bound again leaves the stream off,
    said in the log with what to do."""
    import logging

    import zmq

    from qmagic.remote.pub_socket import Renewals, bound

    ctx = zmq.Context()
    renewals, stop = Renewals(), threading.Event()
    address = f"ipc://{tmp_path}/info"
    sock = bound(ctx, address, lambda s: None)
    try:
        with caplog.at_level(logging.DEBUG, logger="qmagic"):
            for _ in range(3):
                sock = renewals.renew(ctx, sock, address, lambda s: None, stop)
                assert sock is not None
            renewals._warned_at -= 60  # (a minute later: warned again)
            sock = renewals.renew(ctx, sock, address, lambda s: None, stop)
            warned = [r for r in caplog.records if "subscribed to more than" in r.getMessage()]
            assert renewals.count == 4 and [r.levelno for r in warned] == [
                logging.WARNING, logging.DEBUG, logging.DEBUG, logging.WARNING]
            assert warned[-1].getMessage().endswith("(they reconnect on their own; 4 times so far).")
            sock.close(0)
            sock = bound(ctx, f"inproc://info-{id(renewals)}", lambda s: None)
            gone = f"ipc://{tmp_path}/no-such-folder/info"  # (cannot be bound: not a port in use)
            assert renewals.renew(ctx, sock, gone, lambda s: None, stop) is None
            sock = None
        off = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(off) == 1 and off[0].startswith(f"qmagic: the info socket is off: it could not be "
                                                   f"opened again at {gone} (")
        assert off[0].endswith("To start it again, set QMagic.zmq_info_address to None and back, or to "
                               "another address.")
    finally:
        if sock is not None:
            sock.close(0)
        ctx.term()


def test_an_error_of_several_lines_is_published_saying_more_follows(make_worker):
    """A task's error of several lines ('detector saturated at\\n channel 7 ...') was
    published as its first line, read as the whole message; it ends ' ...' as in every
    other view of the task (format.first_line)."""
    def saturate():
        raise RuntimeError("detector saturated at\n channel 7, 4.2e6 counts/s")

    assert _published_error(make_worker, saturate) == "detector saturated at ..."
