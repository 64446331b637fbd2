"""Keep Hypothesis's files out of the checkout.

Hypothesis's pytest plugin writes caches into ``./.hypothesis`` while collecting (before
any fixture runs) unless ``HYPOTHESIS_STORAGE_DIRECTORY`` names another folder.  The
session's conftest should set that variable inside its sandbox; until it does, a test
module that uses Hypothesis imports this module, which points Hypothesis at a temporary
folder, and uses the ``remove_hypothesis_home`` fixture to delete it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest
from hypothesis import configuration

HOME: str | None = None
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    HOME = tempfile.mkdtemp(prefix="qmagic-hypothesis-")
    configuration.set_hypothesis_home_dir(HOME)


@pytest.fixture(scope="module", autouse=True)
def remove_hypothesis_home():
    """Module fixture (import it into the test module): removes the temporary folder."""
    yield
    if HOME:
        shutil.rmtree(HOME, ignore_errors=True)
