"""Shared helpers for the engine/worker tests (plain threads, no IPython)."""

from __future__ import annotations

import threading

import pytest
from traitlets.config import Config

from qmagic import Worker

TIMEOUT = 10.0


from qs_helpers import QS, STATUS_KEYS  # noqa: F401,E402 - re-exported


class Gate:
    """A function that blocks until released; records that it started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def __call__(self, value=None):
        self.calls += 1
        self.started.set()
        assert self.release.wait(TIMEOUT), "gate never released"
        return value


@pytest.fixture
def make_worker(tmp_path, request):
    """Factory of isolated workers, all closed after the test.

    Each writes its lock and experiment log into the test's own state folder.  The log is
    on, as in real use, unless the test module sets ``ENGINE_ALONE = True`` (tests of the
    engine's own rules: the log is tested in test_worker_journal.py and
    test_kernel_journal.py) or a test passes ``journal_enabled=False``.
    """
    workers: list[Worker] = []
    log_on = not getattr(request.module, "ENGINE_ALONE", False)

    def make(namespace: dict | None = None, **settings) -> Worker:
        config = Config()
        config.QMagic.state_dir = str(tmp_path / "state")
        config.QMagic.journal_enabled = log_on
        for key, value in settings.items():
            setattr(config.QMagic, key, value)
        worker = Worker({} if namespace is None else namespace, config=config)
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        worker.close(timeout=5)
