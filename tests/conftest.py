import pytest
import torch

from concept_eraser.tiny import make_tiny_checkpoint

FAMILIES = ("sd1", "sd2", "sdxl")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """One seeded tiny fp16 checkpoint per family, shared by the session (read-only)."""
    folder = tmp_path_factory.mktemp("tiny")
    return {family: make_tiny_checkpoint(folder / f"{family}.safetensors", family) for family in FAMILIES}


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: a second BLAS thread only adds spin-waiting (float64 products slowed down 40× on a
    busy CPU). Modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
