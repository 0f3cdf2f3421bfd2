import multiprocessing
import os
import sys

import pytest

# One thread per process: 2-core machines, several ranks per test (docs/architecture.md §6: contention costs up to 10x).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))  # `import harness` from any test module


@pytest.fixture(autouse=True)
def _reap_stray_children():
    """No test may leave processes behind: kill any child still alive after the test and fail loudly."""
    yield
    strays = multiprocessing.active_children()
    for p in strays:
        p.kill()
        p.join(5)
    assert not strays, f"test left {len(strays)} child processes running: {[p.name for p in strays]}"


@pytest.fixture(autouse=True)
def _one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
