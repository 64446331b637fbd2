"""Property-based fuzzing of the remote door (issue 14): the request parser and dispatch.

Hypothesis generates requests — arbitrary JSON values, request-shaped dicts whose methods are
served and whose parameters have any type, and raw byte frames — and sends them to
:func:`qmagic.remote.dispatch.dispatch` and to a live :class:`ControlServer`.  The properties:

- every request gets a reply: a dict with a boolean ``success`` (or queueserver's status
  shape), which JSON can encode; never an exception, never a hang (Hypothesis' deadline);
- a task exists only for a reply that says so (``success`` and a ``task_uid``): a refused
  request starts nothing, and the worker's task count moves only with accepted requests;
- functions hidden from the catalog (IPython's ``exit``, ``quit``, ``get_ipython``, names
  starting with ``_``) never run, whatever the request;
- the live server keeps serving real clients afterwards.

The runs are deterministic (``derandomize``) and bounded: a few hundred examples, a deadline
per example, no example database (nothing is written to disk).  For a longer random search
set ``QMAGIC_FUZZ_EXAMPLES=5000 QMAGIC_FUZZ_RANDOM=1`` (``QMAGIC_FUZZ_SHRINK=1`` to shrink
a failure to its simplest form).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from datetime import timedelta

import pytest
import zmq

import hypothesis

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from traitlets.config import Config  # noqa: E402

from qmagic import Worker  # noqa: E402
from qmagic.protocol import QueueserverProtocol  # noqa: E402
from qmagic.remote.dispatch import METHODS, dispatch  # noqa: E402
from qmagic.remote.server import ControlServer  # noqa: E402

from qs_helpers import STATUS_KEYS  # noqa: E402

pytestmark = pytest.mark.timeout(120)

EXAMPLES = int(os.environ.get("QMAGIC_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=5),  # a hang, not a slow machine
    derandomize=not os.environ.get("QMAGIC_FUZZ_RANDOM"),
    database=None,
    # Shrinking a failure can take minutes: off by default (the failing request is shown
    # as found; QMAGIC_FUZZ_SHRINK=1 turns it on).
    phases=[Phase.explicit, Phase.generate]
    + ([Phase.shrink] if os.environ.get("QMAGIC_FUZZ_SHRINK") else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture],
    print_blob=True,
)
REPLY_TIMEOUT_MS = 5000
HIDDEN = ("exit", "quit", "get_ipython", "In", "Out")
PRIVATE = ("_private", "_", "__builtins__")
EMERGENCY_KEY = "fuzz-emergency-key"

# -- strategies ----------------------------------------------------------------------------------
#: Text with every code point, lone surrogates often (JSON's "\udcff" escapes decode to them).
any_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=20),
    st.text(st.one_of(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                      st.sampled_from("az_0.:( \x00\n")), max_size=8),
)
names = st.one_of(
    st.sampled_from(("add", "echo", "raises", "no_such_function") + HIDDEN + PRIVATE
                    + ("print", "eval", "__import__", "os.system", "")),
    any_text,
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), any_text)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(any_text, children, max_size=4)),
    max_leaves=12,
)
PARAM_NAMES = sorted({p for m in METHODS.values() if m.params for p in m.params})
SAFE_SCRIPTS = ("x_fuzz = 1", "def defined_by_fuzz():\n    return 1\n", "raise ValueError('x')",
                "this is ( not python", "")
flags = st.one_of(st.booleans(), st.none())
small_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 5), any_text),
                          lambda c: st.lists(c, max_size=3), max_leaves=4)
rules = st.fixed_dictionaries({"user_groups": st.dictionaries(
    st.one_of(st.sampled_from(("root", "primary", "admin")), any_text),
    st.dictionaries(st.sampled_from(("allowed_functions", "forbidden_functions")),
                    st.lists(st.one_of(st.none(), names, any_text.map(lambda t: ":" + t)), max_size=3)),
    min_size=1, max_size=3)})

#: A valid request's parameters for each served method (values of the right types).
VALID = {
    "function_execute": st.fixed_dictionaries(
        {"item": st.fixed_dictionaries(
            {"item_type": st.just("function"), "name": names},
            optional={"args": st.lists(small_json, max_size=3),
                      "kwargs": st.dictionaries(st.sampled_from("abc"), small_json, max_size=2)}),
         "user": st.sampled_from(("Ann", "Bob")),
         "user_group": st.sampled_from(("primary", "root", "admin"))},
        optional={"run_in_background": flags, "lock_key": st.none()}),
    "script_upload": st.fixed_dictionaries(
        {"script": st.sampled_from(SAFE_SCRIPTS)},
        optional={"run_in_background": flags, "update_lists": flags, "update_re": flags,
                  "lock_key": st.none()}),
    "task_status": st.fixed_dictionaries({"task_uid": st.one_of(any_text, st.lists(any_text, max_size=4))}),
    "task_result": st.fixed_dictionaries({"task_uid": any_text}),
    "lock": st.fixed_dictionaries({"lock_key": st.just("fuzz-key"), "user": st.sampled_from(("Ann", "Bob"))},
                                  optional={"environment": flags, "queue": flags,
                                            "note": st.one_of(st.none(), any_text)}),
    "unlock": st.fixed_dictionaries({"lock_key": st.sampled_from(("fuzz-key", "other-key"))}),
    "lock_info": st.fixed_dictionaries({}, optional={"lock_key": st.sampled_from(("fuzz-key", "x"))}),
    "kernel_interrupt": st.fixed_dictionaries({}, optional={"interrupt_task": flags,
                                                            "interrupt_plan": flags}),
    "permissions_set": st.fixed_dictionaries({"user_group_permissions": rules}),
    "permissions_reload": st.fixed_dictionaries({}, optional={"restore_permissions": flags,
                                                              "restore_plans_devices": flags}),
}


#: The methods that start tasks come up more often: they are the door's dangerous side.
METHOD_CHOICE = st.one_of(st.sampled_from(("function_execute", "script_upload")),
                          st.sampled_from(sorted(METHODS)))


@st.composite
def requests(draw) -> object:
    """A request: mostly a valid request of a served method with 0 to 3 fields (of the
    parameters or of the item) changed to anything — another type, a lone surrogate, deleted,
    an unknown name; sometimes a broken envelope, or any JSON value at all."""
    kind = draw(st.integers(0, 19))
    if kind == 0:
        return draw(json_values)
    method = draw(METHOD_CHOICE)
    params = dict(draw(VALID.get(method, st.just({}))))
    if isinstance(params.get("item"), dict):
        params["item"] = dict(params["item"])
    for _ in range(draw(st.integers(0, 3))):
        item = params.get("item")
        paths = [("params", key) for key in sorted(params)] + [("params", None)]
        if isinstance(item, dict):
            paths += [("item", key) for key in ("item_type", "name", "args", "kwargs", None)]
        where, key = draw(st.sampled_from(paths))
        target = item if where == "item" else params
        if key is None:  # a name the method does not know, or one of another method
            key = draw(st.one_of(st.sampled_from(PARAM_NAMES), any_text))
        if draw(st.integers(0, 3)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(json_values)
    request: dict = {"method": method, "params": params}
    if kind == 1:  # a broken envelope
        broken = draw(st.integers(0, 3))
        if broken == 0:
            request["method"] = draw(st.one_of(json_values, any_text))
        elif broken == 1:
            request["params"] = draw(json_values)
        elif broken == 2:
            del request["params"]
        else:
            request[draw(any_text)] = draw(json_values)
    return request


def _safe(request: object) -> object:
    """Never let generated text run as a script: a str script becomes a comment or one of
    the known scripts (the fuzz is about the door, not about running arbitrary code)."""
    if isinstance(request, dict) and isinstance(request.get("params"), dict):
        script = request["params"].get("script")
        if isinstance(script, str) and script not in SAFE_SCRIPTS:
            request["params"]["script"] = "# " + script.replace("\r", " ").replace("\n", " ")
    return request


# -- the worker under test -------------------------------------------------------------------------
class Target:
    """A worker with sentinel functions, and the bookkeeping of what the replies promised."""

    def __init__(self, tmp_path) -> None:
        self.ran: list[str] = []
        self.ran_lock = threading.Lock()
        namespace: dict = {"__builtins__": __builtins__}
        for name in HIDDEN + PRIVATE[:2]:
            namespace[name] = self._sentinel(name)
        namespace["add"] = lambda a=0, b=0: a + b
        namespace["echo"] = lambda *args, **kwargs: [list(args), kwargs]

        def raises(*args, **kwargs):
            raise RuntimeError("raised on purpose")

        namespace["raises"] = raises
        config = Config()
        config.QMagic.state_dir = str(tmp_path / "state")
        config.QMagic.emergency_lock_key = EMERGENCY_KEY
        self.worker = Worker(namespace, config=config)
        self.worker.hidden_names = set(HIDDEN)
        self.worker.catalog.refresh(force=True)
        self.protocol = QueueserverProtocol(self.worker)
        self.promised: set[str] = set()

    def _sentinel(self, name: str):
        def sentinel(*args, **kwargs):
            with self.ran_lock:
                self.ran.append(name)
        return sentinel

    def check_reply(self, request: object, reply: object, tasks_before: set[str]) -> None:
        assert isinstance(reply, dict), (request, reply)
        json.dumps(reply)  # the server can always encode it
        if set(reply) == STATUS_KEYS:
            assert isinstance(request, dict) and request.get("method") in ("status", "ping")
        else:
            assert isinstance(reply.get("success"), bool), (request, reply)
            assert isinstance(reply.get("msg"), str), (request, reply)
        uid = reply.get("task_uid")
        new = {t.uid for t in self.worker.tasks()} - tasks_before
        if reply.get("success") is True and isinstance(uid, str) and isinstance(request, dict) \
                and request.get("method") in (
                "function_execute", "script_upload", "environment_update"):
            assert new == {uid}, (request, reply, new)
            self.promised.add(uid)
        else:
            assert new == set(), (request, reply, new)

    def restore(self) -> None:
        """Undo what an accepted request changed (lock, environment, rules) for the next one."""
        w = self.worker
        state = w.lock_state()
        if state.environment or state.queue:
            w.unlock(EMERGENCY_KEY)
        if not w.environment_is_open:
            w.environment_open()
        if w.permissions.to_dict() != self.default_rules:
            w.reload_permissions()

    def finish(self) -> None:
        """Every promised task ended; no sentinel ran; no request reached a catch-all; the
        worker still works."""
        w = self.worker
        assert self.internal_errors == [], self.internal_errors[:3]
        for task in w.tasks():
            assert task.wait(10.0), task
        assert self.ran == [], self.ran
        assert w.submit("add", (20, 22)).result(10.0) == 42

    def close(self) -> None:
        self.worker.close()


class _InternalErrors(logging.Handler):
    """Records the door's catch-all paths: a request that reached one was not refused on
    purpose (an unchecked type deep inside, or a bug) — the fuzz treats that as a failure."""

    MARKERS = ("control request %r failed", "failed to process a request",
               "control channel stopped on an unexpected error")

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if any(marker in str(record.msg) for marker in self.MARKERS):
            self.seen.append(record.getMessage() + "\n" + (self.format(record) if record.exc_info else ""))


@pytest.fixture
def target(tmp_path):
    t = Target(tmp_path)
    t.default_rules = t.worker.permissions.to_dict()
    internal = _InternalErrors()
    logging.getLogger("qmagic").addHandler(internal)
    t.internal_errors = internal.seen
    yield t
    logging.getLogger("qmagic").removeHandler(internal)
    t.close()


# -- dispatch --------------------------------------------------------------------------------------
def test_dispatch_answers_every_request(target):
    @FUZZ
    @given(request=requests())
    def check(request):
        request = _safe(request)
        before = {t.uid for t in target.worker.tasks()}
        reply = dispatch(target.protocol, request, client="fuzz")
        target.check_reply(request, reply, before)
        assert target.internal_errors == [], (request, target.internal_errors[:1])
        target.restore()

    check()
    target.finish()


# -- a live server -------------------------------------------------------------------------------
@pytest.fixture
def live(target):
    server = ControlServer(functools.partial(dispatch, target.protocol), "tcp://127.0.0.1:*",
                           max_message_bytes=4096).start()
    ctx = zmq.Context()
    sockets: list[zmq.Socket] = []

    def connect() -> zmq.Socket:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, REPLY_TIMEOUT_MS)
        sock.connect(server.address)
        sockets.append(sock)
        return sock

    yield server, connect
    for sock in sockets:
        sock.close(0)
    ctx.term()
    server.stop()


def _encode(request: object) -> bytes:
    return json.dumps(request).encode("utf-8")  # ensure_ascii: surrogates travel as escapes


frames_strategy = st.one_of(
    requests().map(lambda r: [_encode(_safe(r))]),
    st.lists(st.binary(max_size=64), min_size=1, max_size=3),
    requests().map(lambda r: _encode(_safe(r))).flatmap(
        lambda b: st.integers(0, len(b)).map(lambda n: [b[:n]])),  # truncated JSON
    st.integers(4000, 5000).map(lambda n: [b"{" + b" " * n + b"}"]),  # beyond the size limit
    st.lists(st.just(b'{"method": "status"}'), min_size=2, max_size=3),  # several frames
)


def test_live_server_answers_every_frame(target, live):
    server, connect = live
    sock = connect()

    @FUZZ
    @given(frames=frames_strategy)
    def check(frames):
        before = {t.uid for t in target.worker.tasks()}
        sock.send_multipart(frames)
        try:
            raw = sock.recv()
        except zmq.Again:
            pytest.fail(f"no reply within {REPLY_TIMEOUT_MS} ms to {frames!r:.300}")
        reply = json.loads(raw)
        try:
            request = json.loads(frames[0]) if len(frames) == 1 else None
        except (ValueError, RecursionError):
            request = None
        if not isinstance(request, dict) or sum(map(len, frames)) > server.max_message_bytes:
            request = {}
        target.check_reply(request, reply, before)
        assert target.internal_errors == [], (frames, target.internal_errors[:1])
        target.restore()

    check()
    assert server.running
    # a real client is still served, and nothing that was refused ran
    from bluesky_queueserver_api import BFunc
    from remote_client import LoopClient  # (queueserver's asyncio client: that file says why)

    rm = LoopClient(zmq_control_addr=server.address, timeout_recv=10.0)
    try:
        assert rm.status(reload=True)["manager_state"] in ("idle", "executing_task")
        uid = rm.function_execute(BFunc("add", 1, 2), run_in_background=True)["task_uid"]
        assert rm.wait_for_completed_task(uid, timeout=10.0) == {uid: "completed"}
        assert rm.task_result(uid)["result"]["return_value"] == 3
    finally:
        rm.close()
    assert server.requests >= 1 and server.malformed >= 1
    target.finish()
