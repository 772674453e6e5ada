"""The packaged Fashion-MNIST subset and the .npz loader."""
from pathlib import Path

import numpy as np
import pytest
import torch

from fop_asdl.data import ArrayDataset, DatasetFileError, load_fashion_mnist_subset, load_npz_dataset


@pytest.fixture(scope="module")
def subset() -> ArrayDataset:
    return load_fashion_mnist_subset()


def test_subset_shapes_and_dtypes(subset: ArrayDataset) -> None:
    assert subset.x_train.shape == (5000, 1, 28, 28) and subset.x_test.shape == (1000, 1, 28, 28)
    assert subset.y_train.shape == (5000,) and subset.y_test.shape == (1000,)
    assert subset.x_train.dtype == subset.x_test.dtype == torch.float32
    assert subset.y_train.dtype == subset.y_test.dtype == torch.int64


def test_subset_is_class_balanced(subset: ArrayDataset) -> None:
    assert torch.bincount(subset.y_train).tolist() == [500] * 10
    assert torch.bincount(subset.y_test).tolist() == [100] * 10


def test_subset_normalised_with_train_statistics(subset: ArrayDataset) -> None:
    # The subset's own x/255 statistics (0.2874 / 0.3544) are close to, not equal to, the full set's.
    assert abs(subset.x_train.mean().item()) < 0.02
    assert abs(subset.x_train.std().item() - 1.0) < 0.02
    # Pixel 0 maps to -mean/std.
    assert subset.x_train.min().item() == pytest.approx(-0.2860 / 0.3530, abs=1e-5)


def test_subset_is_deterministic(subset: ArrayDataset) -> None:
    again = load_fashion_mnist_subset()
    assert all(torch.equal(a, b) for a, b in zip(subset, again))


def test_subset_starts_in_official_order(subset: ArrayDataset) -> None:
    # First official Fashion-MNIST labels: train 9 0 0 3 0 2 7 2 5 5, test 9 2 1 1 6 1 4 6 5 7.
    assert subset.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert subset.y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]


def _write(path: Path, x_train: np.ndarray, x_test: np.ndarray, **extra: np.ndarray) -> Path:
    np.savez(path, x_train=x_train, y_train=np.arange(len(x_train)) % 10,
             x_test=x_test, y_test=np.arange(len(x_test)) % 10, **extra)
    return path


def test_npz_hwc_images_become_nchw_with_per_channel_stats(tmp_path: Path) -> None:
    x = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    x[..., 1] = 255
    data = load_npz_dataset(_write(tmp_path / "cifar10.npz", x, x[:2]))
    assert data.x_train.shape == (4, 3, 32, 32) and data.x_test.shape == (2, 3, 32, 32)
    expected = torch.tensor([-0.4914 / 0.2470, (1 - 0.4822) / 0.2435, -0.4465 / 0.2616])
    torch.testing.assert_close(data.x_train[0, :, 5, 7], expected)


def test_npz_grayscale_gets_channel_dim_and_name_picks_stats(tmp_path: Path) -> None:
    x = np.full((3, 28, 28), 255, dtype=np.uint8)
    data = load_npz_dataset(_write(tmp_path / "mnist.npz", x, x))
    assert data.x_train.shape == (3, 1, 28, 28)
    assert data.x_train[0, 0, 0, 0].item() == pytest.approx((1 - 0.1307) / 0.3081)
    data = load_npz_dataset(_write(tmp_path / "fashion_mnist_full.npz", x, x))
    assert data.x_train[0, 0, 0, 0].item() == pytest.approx((1 - 0.2860) / 0.3530)


def test_npz_other_test_split(tmp_path: Path) -> None:
    x = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    path = _write(tmp_path / "cifar10.npz", x, x, x_test_exact=x[:1],
                  y_test_exact=np.zeros(1, dtype=np.int64))
    assert load_npz_dataset(path, test_split="test_exact").x_test.shape == (1, 3, 32, 32)


def test_npz_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_npz_dataset(tmp_path / "mnist.npz")
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    with pytest.raises(ValueError, match="cannot tell the dataset"):
        load_npz_dataset(_write(tmp_path / "images.npz", x, x))
    with pytest.raises(ValueError, match="unknown dataset"):
        load_npz_dataset(tmp_path / "images.npz", dataset="imagenet")
    with pytest.raises(ValueError, match="channel"):
        load_npz_dataset(tmp_path / "images.npz", dataset="cifar10")


# --- damaged or wrong dataset files: errors that name the file and the problem --------------------------
def _arrays(**changes: np.ndarray) -> dict:
    x = np.zeros((4, 28, 28), dtype=np.uint8)
    arrays = {"x_train": x, "y_train": np.arange(4), "x_test": x[:2], "y_test": np.arange(2)}
    return {k: v for k, v in {**arrays, **changes}.items() if v is not None}


@pytest.mark.parametrize("arrays, message", [
    (_arrays(y_test=None), r"lacks the array\(s\) \['y_test'\]"),
    (_arrays(x_train=np.zeros((4, 28, 28), dtype=np.float32)), "'x_train' has dtype float32; expected uint8"),
    (_arrays(y_train=np.zeros(4)), "'y_train' has dtype float64; expected integer class labels"),
    (_arrays(y_train=np.array([0, 1, 2, 10])), r"'y_train' holds labels 0..10; expected 0..9 \(10 classes\)"),
    (_arrays(y_test=np.array([-1, 0])), "'y_test' holds labels -1..0; expected 0..9"),
    (_arrays(y_train=np.arange(3)), r"'y_train' has shape \(3,\); expected one label per image, \(4,\)"),
    (_arrays(x_test=np.zeros((2, 28, 28, 3), dtype=np.uint8)), r"'x_test' has shape \(2, 28, 28, 3\)"),
    (_arrays(y_train=np.array([0, 1, None, 3], dtype=object)), "'y_train' holds pickled Python objects"),
])
def test_wrong_npz_contents_are_named(tmp_path: Path, arrays: dict, message: str) -> None:
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    with pytest.raises(DatasetFileError, match=message) as info:
        load_npz_dataset(path)
    assert str(path) in str(info.value) and info.value.path == path


def test_damaged_and_foreign_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"<html>502 Bad Gateway</html>")  # what a failed download leaves behind
    with pytest.raises(DatasetFileError, match=r"mnist.npz: is not an .npz archive .*b'<html>'"):
        load_npz_dataset(path)
    np.savez(path, **_arrays())
    path.write_bytes(path.read_bytes()[:300])  # truncated: the zip directory at the end is gone
    with pytest.raises(DatasetFileError, match="mnist.npz: is a damaged .npz archive"):
        load_npz_dataset(path)
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(DatasetFileError, match="holds a single .npy array, not an .npz archive"):
        load_npz_dataset(path)


def test_corrupted_member_is_named(tmp_path: Path) -> None:
    path = tmp_path / "mnist.npz"
    np.savez_compressed(path, **_arrays(x_train=np.arange(4 * 28 * 28).reshape(4, 28, 28).astype(np.uint8)))
    raw = bytearray(path.read_bytes())
    start = raw.index(b"x_train.npy") + len("x_train.npy") + 40  # inside the first member's deflate stream
    raw[start:start + 64] = bytes(64)
    path.write_bytes(bytes(raw))
    with pytest.raises(DatasetFileError, match="array 'x_train' cannot be read"):
        load_npz_dataset(path)
