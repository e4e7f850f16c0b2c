from __future__ import annotations

import os
import tempfile
import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=r".*torch\.jit.*")
torch.set_num_threads(1)
# the latency cache of test runs stays out of the user's ~/.cache
os.environ.setdefault("RANKSEARCH_CACHE_DIR", tempfile.mkdtemp(prefix="ranksearch-test-cache-"))  # small layers: threads cost more than they give, and tests run in parallel


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
