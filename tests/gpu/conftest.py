"""The GPU suite: skipped as a whole without CUDA (`pytest` on a CPU machine collects it and skips it)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from sft import write_tiny_checkpoint  # noqa: E402  (at the top: a wrong import fails collection on CPU, in CI)

collect_ignore = ["nccl_worker.py"]  # run by torchrun from test_gpu.py, not a test module


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: tests/gpu runs by hand on a GPU machine (docs/gpu.md)")
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    """tiny_configs/small.json (a 199M model: decoder 8 x 512 with the real 151,674-row vocabulary), random weights."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "small"), "small", max_shard_bytes=2**30)
