from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=r".*torch\.jit.*")
torch.set_num_threads(1)  # small layers: threads cost more than they give, and tests run in parallel
# the latency cache of a test run stays out of the user's ~/.cache and goes when the run ends; the
# pytest-xdist workers inherit the variable, so only the process that made the folder removes it
if "RANKSEARCH_CACHE_DIR" not in os.environ:
    _test_cache = tempfile.mkdtemp(prefix="ranksearch-test-cache-")
    os.environ["RANKSEARCH_CACHE_DIR"] = _test_cache
    atexit.register(shutil.rmtree, _test_cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
