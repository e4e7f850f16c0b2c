from __future__ import annotations

import warnings

import pytest
import torch

warnings.filterwarnings("ignore", message=r".*torch\.jit.*")
torch.set_num_threads(1)  # small layers: threads cost more than they give, and tests run in parallel


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
