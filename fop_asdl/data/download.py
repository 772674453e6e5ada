"""Download MNIST, Fashion-MNIST and CIFAR-10/100 from their official sources and convert them to ``.npz``.

Every file is checked against its published md5 before it is read, so a truncated or tampered download
fails loudly instead of training on wrong data. The result has the keys ``load_npz_dataset`` reads:
uint8 ``x_train``/``x_test`` (N,H,W) or (N,H,W,C) and int64 ``y_train``/``y_test``, in official order.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import numpy as np

__all__ = ["RemoteFile", "SOURCES", "download_dataset"]


class RemoteFile(NamedTuple):
    url: str
    md5: str


_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # PyTorch's maintained mirror of LeCun's files
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"  # Zalando's official host
_CIFAR = "https://www.cs.toronto.edu/~kriz/"
_IDX = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

#: Official files and md5s per dataset (idx files: train images, train labels, test images, test labels).
SOURCES: Dict[str, Sequence[RemoteFile]] = {
    "mnist": tuple(RemoteFile(_MNIST + name, md5) for name, md5 in zip(_IDX, (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))),
    "fashion_mnist": tuple(RemoteFile(_FASHION + name, md5) for name, md5 in zip(_IDX, (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))),
    "cifar10": (RemoteFile(_CIFAR + "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
    "cifar100": (RemoteFile(_CIFAR + "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
}


def download_dataset(name: str, data_dir: Union[str, Path],
                     files: Optional[Sequence[RemoteFile]] = None) -> Path:
    """Fetch ``name`` (a key of :data:`SOURCES`), verify the md5s, write ``data_dir/<name>.npz``; its path.

    ``files`` replaces the official sources (a mirror, or ``file://`` URLs in tests). Nothing is left in
    ``data_dir`` when a download or a checksum fails.
    """
    if name not in SOURCES:
        raise ValueError(f"no download source for dataset {name!r}; choose one of {sorted(SOURCES)}.")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    out = data_dir / f"{name}.npz"
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".{name}-download-") as tmp:
        paths = [_fetch(remote, Path(tmp)) for remote in (files if files is not None else SOURCES[name])]
        arrays = _CONVERTERS[name](paths)
        partial = Path(tmp) / out.name
        np.savez_compressed(partial, **arrays)
        os.replace(partial, out)
    return out


def _fetch(remote: RemoteFile, folder: Path) -> Path:
    """Stream ``remote`` into ``folder`` while hashing it; raise on an md5 mismatch."""
    path = folder / remote.url.rstrip("/").rsplit("/", 1)[-1]
    digest = hashlib.md5()
    with urllib.request.urlopen(remote.url) as response, open(path, "wb") as f:
        for chunk in iter(lambda: response.read(1 << 20), b""):
            digest.update(chunk)
            f.write(chunk)
    if digest.hexdigest() != remote.md5:
        raise ValueError(f"checksum mismatch for {remote.url}: md5 {digest.hexdigest()}, expected "
                         f"{remote.md5}. The download is corrupt or not the official file; nothing was written.")
    return path


def _read_idx(path: Path) -> np.ndarray:
    """An idx(.gz) file (LeCun's format: big-endian magic 0x0000 08 <ndim>, then dims, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path.name} is not a uint8 idx file.")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _from_idx(paths: List[Path]) -> Dict[str, np.ndarray]:
    x_train, y_train, x_test, y_test = (_read_idx(p) for p in paths)
    return {"x_train": x_train, "y_train": y_train.astype(np.int64),
            "x_test": x_test, "y_test": y_test.astype(np.int64)}


Converter = Callable[[List[Path]], Dict[str, np.ndarray]]


def _cifar(members: Dict[str, Sequence[str]], label_key: bytes) -> Converter:
    """Converter for a CIFAR python tarball: pickled dicts of (N, 3072) uint8 rows (CHW) and labels."""
    def convert(paths: List[Path]) -> Dict[str, np.ndarray]:
        out = {}
        with tarfile.open(paths[0], "r:gz") as tar:
            by_name = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            for split, names in members.items():
                batches = []
                for name in names:
                    with tar.extractfile(by_name[name]) as f:  # md5-verified official archive
                        batches.append(pickle.load(f, encoding="bytes"))
                x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                out[f"x_{split}"] = np.ascontiguousarray(x, dtype=np.uint8)
                out[f"y_{split}"] = np.concatenate([b[label_key] for b in batches]).astype(np.int64)
        return out
    return convert


_CONVERTERS: Dict[str, Converter] = {
    "mnist": _from_idx,
    "fashion_mnist": _from_idx,
    "cifar10": _cifar({"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}, b"labels"),
    "cifar100": _cifar({"train": ["train"], "test": ["test"]}, b"fine_labels"),
}
