import pytest
import torch

import early
from sft import write_tiny_checkpoint

# Tiny models are all per-op overhead: a second thread only adds a wake-up wait (measured 20 ms per SDPA call on a
# loaded 2-core machine vs 0.01 ms with one thread), so the suite runs single-threaded.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """The tests that read a slow job (tests/early.py) run last, so the job has the whole suite to finish in."""
    items.sort(key=lambda item: bool(early.JOBS.keys() & set(getattr(item, "fixturenames", ()))))  # stable


def pytest_collection_finish(session):
    """Start the slow jobs (tests/early.py) that the selected tests will read, beside the rest of the suite."""
    early.start({name for item in session.items for name in getattr(item, "fixturenames", ())})


def pytest_sessionfinish(session):
    early.stop()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """One random-weight tiny checkpoint in the release format, shared by the whole session (read-only)."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
