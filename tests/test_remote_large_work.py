"""The control channel's budget for large work (:mod:`qmagic.remote.large_work`), on the
test's own thread as the serving thread."""

from __future__ import annotations

import time

from qmagic.jsonreply import LARGE_BYTES, reply_bytes
from qmagic.protocol import QueueserverProtocol
from qmagic.remote.dispatch import dispatch
from qmagic.remote.large_work import SHARE, LargeBudget

from engine_helpers import TIMEOUT, make_worker  # noqa: F401 - fixture


def _serve_for(seconds: float) -> None:
    """Take ``seconds`` of the serving thread's time (what answering a refusal takes)."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        pass


def test_refusals_are_not_large_work_so_a_flood_of_retries_cannot_starve_it():
    """Large work overspent its share by 10 ms while clients kept asking again at once:
    each is refused, and the refusal itself (a small reply) is no large work, so within
    a few tens of milliseconds large work is admitted again.  Before, a refused turn was
    charged as large work: a serving thread busy with refusals spent more than ``SHARE``
    of its time on them, and large work stayed refused for as long as the retries came."""
    budget = LargeBudget()
    budget.allowance = -0.01
    refused, admitted = 0, False
    deadline = time.monotonic() + 0.02 / SHARE * 20
    while time.monotonic() < deadline:
        turn = budget.turn(contended=True)
        admitted = turn.large_work()
        if admitted:
            break
        _serve_for(0.001)  # (the refusal's reply)
        turn.end(200)
        refused += 1
    assert admitted, (refused, budget.allowance)
    assert budget.refused == refused > 0


def test_a_lone_request_is_always_served_and_owes_nothing():
    """A request nobody waited behind does large work even when the share is spent, and
    finds the budget full: none of the time large work took before is owed."""
    budget = LargeBudget()
    budget.allowance = -1.0
    turn = budget.turn(contended=False)
    assert turn.large_work()
    _serve_for(0.002)
    turn.end(10 ** 6)
    contended = budget.turn(contended=True)
    assert contended.large_work() and budget.refused == 0


def test_a_new_copy_of_a_large_result_is_large_work_and_a_small_result_never_is(make_worker):
    """Making a new copy of a large result (its first request, or one whose copy was no
    longer kept) is large work, announced before it is made: a request that waited behind
    others while large work has used its share is told to ask again, nothing copied, the
    refusal not charged.  Before, only checking a kept copy was: clients asking in turn for
    more large results than are kept held up everyone else (~10 s, a reviewer's find).  A
    small result is served whatever the budget, and a lone request gets the large one."""
    w = make_worker({"data": lambda n: [i * 0.5 for i in range(n)]})
    protocol = QueueserverProtocol(w)
    large, small = w.submit("data", [100_000]), w.submit("data", [1000])
    large.wait(TIMEOUT), small.wait(TIMEOUT)
    budget = LargeBudget()

    def ask(task, contended: bool) -> dict:
        turn = turns[-1] = budget.turn(contended)
        budget.allowance = -100.0 if contended else budget.allowance  # (the share used up)
        reply = dispatch(protocol, {"method": "task_result", "params": {"task_uid": task.uid}},
                         large_work=turn.large_work)
        sizes[-1] = len(reply_bytes(reply))
        turn.end(sizes[-1])  # (as the server does)
        return reply

    turns: list = [None]
    sizes = [0]

    reply = ask(small, contended=True)
    assert reply["success"] and len(reply["result"]["return_value"]) == 1000, reply["msg"]
    reply = ask(large, contended=True)
    assert not reply["success"] and reply["msg"] == (
        "The result was not sent (large requests have used their share of the kernel's time while "
        "other clients wait): "
        f"ask again in a second; it stays in the kernel: qmagic.get_worker().get_task('{large.uid}').result()")
    assert reply["result"]["return_value"] is None and reply["status"] == "completed"
    assert len(protocol.result_copies) == 0 and budget.refused == 1  # (nothing copied)
    # (the refusal is not charged: Turn.end charges a turn that did large work or sent a
    # large reply, and this one did neither)
    assert not turns[-1].large and sizes[-1] <= LARGE_BYTES
    reply = ask(large, contended=False)  # (a lone client)
    assert reply["success"] and reply["result"]["return_value"] == large.result(), reply["msg"]
    assert len(protocol.result_copies) == 1 and budget.refused == 1
