"""A test's report as a pytest-xdist worker can send it (tests/conftest.py uses this hook).

A worker sends its reports to the controller as UTF-8: a lone surrogate in one (tests of
hostile texts print them, and compare them: a failing assertion shows them) stopped the
worker, and the run ended with "Unexpectedly no active workers available" instead of the
test's failure.  Captured output, logs, a failure's text and a skip's reason keep such a
character escaped (``\\udc80``)."""

from __future__ import annotations

import pytest


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    report.sections = [(title, _escaped(text)) for title, text in report.sections]
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (a skip: path, line, reason)
        report.longrepr = (*longrepr[:2], _escaped(str(longrepr[2])))
    elif longrepr is not None:
        text = str(longrepr)
        if _escaped(text) != text:  # (else kept as it is: its colours, its sections)
            report.longrepr = _escaped(text)
