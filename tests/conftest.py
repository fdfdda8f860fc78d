import pytest
import torch

from checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """One random-weight tiny checkpoint in the release format, shared by the whole session (read-only)."""
    return write_tiny_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
