"""Datasets by name: where their ``.npz`` files live, how many classes they have, and how to load them.

Files are looked up as ``<data_dir>/<file>`` with ``data_dir`` from the caller or else the environment
variable ``FOP_DATA``; with ``download=True`` a missing file is fetched from its official source first.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from .arrays import NUM_CLASSES, ArrayDataset, load_fashion_mnist_subset, load_npz_dataset
from .download import download_dataset
from .longtail import long_tail_indices

__all__ = ["DATASETS", "DATA_ENV", "base_dataset", "dataset_file", "load_dataset"]

DATA_ENV = "FOP_DATA"
SUBSET = "fashion_mnist_subset"

#: Number of classes of every dataset name the loader accepts; ``*_lt`` are the long-tailed versions.
DATASETS: Dict[str, int] = {
    **NUM_CLASSES, SUBSET: 10, **{f"{name}_lt": classes for name, classes in NUM_CLASSES.items()},
}


def base_dataset(name: str) -> str:
    """The balanced dataset a name derives from (file, normalisation): ``cifar10_lt`` -> ``cifar10``."""
    if name == SUBSET:
        return "fashion_mnist"
    return name[:-len("_lt")] if name.endswith("_lt") else name


def dataset_file(name: str, data_dir: Optional[Union[str, Path]] = None) -> Path:
    """``<data_dir or $FOP_DATA>/<base>.npz``; raises if neither directory is given."""
    folder = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not folder:
        raise FileNotFoundError(f"dataset {name!r} needs a data directory: pass data_dir (--data-dir) or set "
                                f"{DATA_ENV}; it must hold {base_dataset(name)}.npz (or set download).")
    return Path(folder) / f"{base_dataset(name)}.npz"


def load_dataset(name: str, data_dir: Optional[Union[str, Path]] = None, download: bool = False,
                 imbalance: float = 100.0, test_split: str = "test",
                 device: Optional[Union[str, torch.device]] = None) -> ArrayDataset:
    """Load dataset ``name`` (a key of :data:`DATASETS`) onto ``device``.

    ``imbalance`` is ρ of the ``*_lt`` versions (ignored otherwise); ``test_split`` picks e.g. CIFAR-10's
    ``test_exact`` images. ``fashion_mnist_subset`` is the packaged subset and needs no file.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    if name == SUBSET:
        return load_fashion_mnist_subset(device)
    path = dataset_file(name, data_dir)
    if not path.is_file():
        if not download:
            raise FileNotFoundError(f"{path} not found: put {path.name} there, point data_dir/{DATA_ENV} to "
                                    f"its folder, or set download to fetch it from the official source.")
        download_dataset(base_dataset(name), path.parent)
    data = load_npz_dataset(path, dataset=base_dataset(name), device=device, test_split=test_split)
    if not name.endswith("_lt"):
        return data
    keep = long_tail_indices(data.y_train, imbalance, DATASETS[name])
    return data._replace(x_train=data.x_train[keep], y_train=data.y_train[keep])
