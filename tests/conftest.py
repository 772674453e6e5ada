"""Fixtures and hooks of every test folder; the shared helpers live in scaffold.py."""
import pytest
import torch

from fop_asdl.data import load_fashion_mnist_subset


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where no CUDA device is (scripts/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    skip = pytest.mark.skip(reason=f"needs a CUDA device: torch.cuda.is_available() is False (torch "
                                   f"{torch.__version__}, {built})")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture
def image_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 1, 6, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 3, (11,), generator=gen)
    return x, t


@pytest.fixture(scope="module")
def real_batch():
    """64 images of the Fashion-MNIST subset shipped in the package, with their labels."""
    data = load_fashion_mnist_subset()
    return data.x_train[:64], data.y_train[:64]
