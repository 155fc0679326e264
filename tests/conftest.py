import pytest
import torch

# Small thread count keeps the suite predictable on shared 2-core machines.
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def cuda_available() -> bool:
    return torch.cuda.is_available()
