"""Reading a dataset ``.npz`` with every problem reported against the file, not as numpy's raw traceback.

A truncated download, an HTML error page saved under the file's name, an archive of pickled objects, float
labels or labels outside the class range would otherwise surface as "This file contains pickled (object)
data ...", a zipfile error, or silently wrong training. Each check names the file, the array and the fix.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

__all__ = ["DatasetFileError", "read_dataset_arrays"]

ZIP_MAGIC, NPY_MAGIC = b"PK", b"\x93NUMPY"
REBUILD = "download it again (download: true) or rebuild it"


class DatasetFileError(ValueError):
    """A dataset file is unreadable or does not hold what the loader needs; the message names the file."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"dataset file {path}: {problem}")
        self.path = path


def read_dataset_arrays(path: Path, keys: Sequence[str], num_classes: int,
                        channels: int) -> Dict[str, np.ndarray]:
    """The arrays ``keys`` (pairs ``x_<split>``, ``y_<split>``) of the ``.npz`` at ``path``, checked: uint8
    images (N,H,W) or (N,H,W,C) with ``channels`` channels, integer labels in [0, num_classes), one per image.
    """
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
    if head.startswith(NPY_MAGIC):
        raise DatasetFileError(path, f"holds a single .npy array, not an .npz archive of {', '.join(keys)}.")
    if not head.startswith(ZIP_MAGIC):
        raise DatasetFileError(path, f"is not an .npz archive (a zip file starts with b'PK', this one with "
                                     f"{head!r}); it is damaged or another kind of file: {REBUILD}.")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
        raise DatasetFileError(path, f"is a damaged .npz archive ({error}): {REBUILD}.") from None
    with archive:
        missing = [k for k in keys if k not in archive.files]
        if missing:
            raise DatasetFileError(path, f"lacks the array(s) {missing}; it has {sorted(archive.files)}.")
        arrays = {k: _read(archive, k, path) for k in keys}
    for x_key, y_key in zip(keys[0::2], keys[1::2]):
        _check_images(arrays[x_key], x_key, channels, path)
        _check_labels(arrays[y_key], y_key, len(arrays[x_key]), num_classes, path)
    return arrays


def _read(archive: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise DatasetFileError(path, f"array '{key}' holds pickled Python objects (dtype object); the "
                                         f"loader reads only plain arrays (uint8 images, integer labels), "
                                         f"never unpickles.") from None
        raise DatasetFileError(path, f"array '{key}' cannot be read ({error}): {REBUILD}.") from None
    except Exception as error:  # zlib / lzma / zipfile errors of a corrupted member
        raise DatasetFileError(path, f"array '{key}' cannot be read ({type(error).__name__}: {error}): "
                                     f"{REBUILD}.") from None


def _check_images(x: np.ndarray, key: str, channels: int, path: Path) -> None:
    if x.dtype != np.uint8:
        raise DatasetFileError(path, f"array '{key}' has dtype {x.dtype}; expected uint8 images (0-255).")
    found = {3: 1, 4: x.shape[-1]}.get(x.ndim)
    if found != channels:
        raise DatasetFileError(path, f"array '{key}' has shape {tuple(x.shape)}; expected (N,H,W) or "
                                     f"(N,H,W,C) images with {channels} channel(s).")
    if len(x) == 0:
        raise DatasetFileError(path, f"array '{key}' holds no images.")


def _check_labels(y: np.ndarray, key: str, n_images: int, num_classes: int, path: Path) -> None:
    if y.dtype.kind not in "iu":
        raise DatasetFileError(path, f"array '{key}' has dtype {y.dtype}; expected integer class labels.")
    if y.shape != (n_images,):
        raise DatasetFileError(path, f"array '{key}' has shape {tuple(y.shape)}; expected one label per "
                                     f"image, ({n_images},).")
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= num_classes:
        raise DatasetFileError(path, f"array '{key}' holds labels {low}..{high}; expected "
                                     f"0..{num_classes - 1} ({num_classes} classes).")
