import os

import pytest
import torch

# Deterministic CPU runs: fixed seeds per test, two threads at most (CI has two cores).
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
