"""The control channel's budget for large work (:mod:`qmagic.remote.large_work`), on the
test's own thread as the serving thread."""

from __future__ import annotations

import time

from qmagic.remote.large_work import SHARE, LargeBudget


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
