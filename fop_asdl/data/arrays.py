"""Datasets as whole in-memory tensors: the models here are small enough that a DataLoader only adds overhead.

``load_fashion_mnist_subset`` reads the real Fashion-MNIST subset shipped inside the package (see
``fop_asdl/_data/README.md``), so tests and quick runs need no download. ``load_npz_dataset`` reads the
full ``.npz`` files (MNIST, Fashion-MNIST, CIFAR-10/100) with the same keys.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from .npzfile import read_dataset_arrays

__all__ = ["ArrayDataset", "NORMALIZATION", "NUM_CLASSES", "load_fashion_mnist_subset", "load_npz_dataset"]

#: Per-channel (mean, std) of x/255 over each dataset's full train set.
NORMALIZATION: Dict[str, Tuple[Tuple[float, ...], Tuple[float, ...]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
#: Classes of each dataset file: its labels must lie in [0, classes).
NUM_CLASSES: Dict[str, int] = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}
SUBSET_FILE = "fashion_mnist_subset.npz"


class ArrayDataset(NamedTuple):
    """Normalised float32 NCHW images and int64 labels of a train and a test split."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_fashion_mnist_subset(device: Optional[Union[str, torch.device]] = None) -> ArrayDataset:
    """The packaged subset: 5000 train / 1000 test images, first 500 / 100 per class in official order."""
    ref = resources.files("fop_asdl").joinpath("_data", SUBSET_FILE)
    with resources.as_file(ref) as path:
        return load_npz_dataset(path, dataset="fashion_mnist", device=device)


def load_npz_dataset(path: Union[str, Path], dataset: Optional[str] = None,
                     device: Optional[Union[str, torch.device]] = None,
                     test_split: str = "test") -> ArrayDataset:
    """Load ``x_train, y_train, x_test, y_test`` from an ``.npz`` of uint8 HW or HWC images.

    A file that is not such an archive (damaged, pickled objects, wrong dtype or shape, labels outside the
    dataset's classes, a missing array) raises :class:`DatasetFileError` naming the file and the problem.

    Args:
        path: the ``.npz`` file.
        dataset: key of :data:`NORMALIZATION` whose train statistics normalise the images; by default the
            longest key the file name starts with (``fashion_mnist_subset.npz`` -> ``"fashion_mnist"``).
        device: where the tensors go.
        test_split: ``"test"``, or e.g. ``"test_exact"`` for the bit-exact CIFAR-10 test images.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    dataset = dataset if dataset is not None else _dataset_from_name(path)
    if dataset not in NORMALIZATION:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {sorted(NORMALIZATION)}.")
    mean, std = NORMALIZATION[dataset]
    keys = ("x_train", "y_train", f"x_{test_split}", f"y_{test_split}")
    arrays = read_dataset_arrays(path, keys, NUM_CLASSES[dataset], channels=len(mean))
    x_train, y_train, x_test, y_test = (arrays[k] for k in keys)
    return ArrayDataset(_images(x_train, mean, std, device), _labels(y_train, device),
                        _images(x_test, mean, std, device), _labels(y_test, device))


def _dataset_from_name(path: Path) -> str:
    matches = [name for name in NORMALIZATION if path.stem.startswith(name)]
    if not matches:
        raise ValueError(f"cannot tell the dataset from the file name {path.name!r}; pass dataset= one of "
                         f"{sorted(NORMALIZATION)}.")
    return max(matches, key=len)


def _images(x: np.ndarray, mean: Tuple[float, ...], std: Tuple[float, ...],
            device: Optional[Union[str, torch.device]]) -> Tensor:
    """uint8 (N,H,W) or (N,H,W,C) (checked by :func:`read_dataset_arrays`) -> normalised float32 (N,C,H,W)."""
    t = torch.from_numpy(x).to(device).float().div_(255.0)  # move the uint8 bytes, not 4x as many floats
    t = t.unsqueeze(1) if x.ndim == 3 else t.permute(0, 3, 1, 2)
    shape = (1, len(mean), 1, 1)
    mean_t = torch.tensor(mean, device=t.device).view(shape)
    std_t = torch.tensor(std, device=t.device).view(shape)
    return ((t - mean_t) / std_t).contiguous()


def _labels(y: np.ndarray, device: Optional[Union[str, torch.device]]) -> Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
