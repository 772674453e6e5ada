"""Runner data: long-tailed subsets, on-device augmentation, named datasets, checksum-verified downloads."""
import gzip
import hashlib
import io
import pickle
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fop_asdl.data.augment import crop_flip, sample_crop_flip
from fop_asdl.cli import main
from fop_asdl.data import RemoteFile, download_dataset, load_dataset, long_tail_counts, long_tail_indices

from scaffold import REPO

SUBSET = REPO / "fop_asdl" / "_data" / "fashion_mnist_subset.npz"


# --- long tail -----------------------------------------------------------------------------------------
def test_long_tail_counts_match_the_published_cifar_lt_sizes() -> None:
    assert long_tail_counts(5000, 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(long_tail_counts(5000, 10, 100)) == 12406  # CIFAR-10-LT, rho = 100
    assert sum(long_tail_counts(5000, 10, 50)) == 13996   # rho = 50
    assert sum(long_tail_counts(500, 100, 100)) == 10847  # CIFAR-100-LT, rho = 100
    assert long_tail_counts(7, 3, 1) == [7, 7, 7]


def test_fashion_mnist_lt_and_mnist_lt_counts() -> None:
    # Fashion-MNIST: 6000 training images per class; issue 12 measured 14 886 images at rho = 100.
    assert long_tail_counts(6000, 10, 100) == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    assert sum(long_tail_counts(6000, 10, 100)) == 14886
    assert sum(long_tail_counts(6000, 10, 50)) == 16796
    # MNIST's smallest class (5: 5421 images) is n_max, so every class can supply its count.
    assert sum(long_tail_counts(5421, 10, 100)) == 13449


def test_fashion_mnist_lt_from_the_packaged_subset_keeps_the_test_set_balanced(tmp_path: Path) -> None:
    shutil.copy(SUBSET, tmp_path / "fashion_mnist.npz")  # 500 / 100 real images per class
    for rho in (100.0, 50.0):
        lt = load_dataset("fashion_mnist_lt", tmp_path, imbalance=rho)
        assert torch.bincount(lt.y_train, minlength=10).tolist() == long_tail_counts(500, 10, rho)
        assert torch.bincount(lt.y_test, minlength=10).tolist() == [100] * 10
    assert long_tail_counts(500, 10, 100)[-1] == 5


def test_mnist_lt_takes_n_max_from_the_smallest_class(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(10), [12, 9, 10, 10, 10, 10, 10, 10, 10, 11])  # class 1 is the smallest
    x = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=labels, x_test=x[:20], y_test=np.arange(20) % 10)
    lt = load_dataset("mnist_lt", tmp_path, imbalance=3.0)
    assert torch.bincount(lt.y_train, minlength=10).tolist() == long_tail_counts(9, 10, 3.0)
    assert long_tail_counts(9, 10, 3.0) == [9, 7, 7, 6, 5, 4, 4, 3, 3, 3]
    assert len(lt.y_test) == 20


def test_long_tail_keeps_the_first_samples_of_each_class_in_array_order() -> None:
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1, 0, 2, 1, 0, 1, 2, 2, 1, 0])  # 6 of each class
    kept = long_tail_indices(labels, imbalance=4.0, num_classes=3)  # n_c = 6, 3, 1
    assert torch.bincount(labels[kept]).tolist() == [6, 3, 1]
    assert kept.tolist() == sorted(kept.tolist())
    for c, n in enumerate([6, 3, 1]):
        assert kept[labels[kept] == c].tolist() == torch.nonzero(labels == c).flatten()[:n].tolist()


# --- augmentation --------------------------------------------------------------------------------------
def test_crop_flip_shapes_and_determinism_under_a_seed() -> None:
    x = torch.randn(16, 3, 32, 32)
    out = [crop_flip(x, sample_crop_flip(16, 4, torch.Generator().manual_seed(s)), 4, (0.0, 0.0, 0.0))
           for s in (7, 7, 8)]
    assert out[0].shape == x.shape and out[0].dtype == x.dtype and out[0].is_contiguous()
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])


def test_crop_flip_moves_and_mirrors_pixels_and_pads_with_fill() -> None:
    x = torch.arange(2 * 5 * 5, dtype=torch.float32).view(1, 2, 5, 5)
    shifted = crop_flip(x, _params(top=4, left=0, flip=False), 2, (-1.0, -2.0))
    # top 4 of the 2-padded image = original rows 2..4, then 2 padding rows; left 0 = 2 padding columns first
    assert torch.equal(shifted[0, 0, :3, 2:], x[0, 0, 2:, :3])
    assert (shifted[0, 0, 3:] == -1).all() and (shifted[0, 1, :, :2] == -2).all()
    centred = crop_flip(x, _params(top=2, left=2, flip=True), 2, (-1.0, -2.0))
    assert torch.equal(centred, x.flip(-1))


def _params(top: int, left: int, flip: bool):
    from fop_asdl.data.augment import CropFlip
    return CropFlip(torch.tensor([top]), torch.tensor([left]), torch.tensor([flip]))


def test_crop_flip_params_drawn_for_a_global_batch_slice_per_rank() -> None:
    params = sample_crop_flip(8, 4, torch.Generator().manual_seed(0))
    part = params.narrow(4, 4)
    assert all(torch.equal(a, b[4:]) for a, b in zip(part, params))


# --- named datasets and downloads ----------------------------------------------------------------------
def _idx(array: np.ndarray) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


def _serve(tmp_path: Path, name: str, payload: bytes) -> RemoteFile:
    path = tmp_path / "server" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(payload)
    return RemoteFile(path.as_uri(), hashlib.md5(payload).hexdigest())


def test_download_idx_files_via_file_url_with_checksums(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 256, (4, 28, 28))
    y_train, y_test = np.arange(6) % 10, np.arange(4) % 10
    files = [_serve(tmp_path, n, _idx(a)) for n, a in (("train-images-idx3-ubyte.gz", x_train),
                                                       ("train-labels-idx1-ubyte.gz", y_train),
                                                       ("t10k-images-idx3-ubyte.gz", x_test),
                                                       ("t10k-labels-idx1-ubyte.gz", y_test))]
    out = download_dataset("fashion_mnist", tmp_path / "data", files=files)
    assert out == tmp_path / "data" / "fashion_mnist.npz"
    with np.load(out) as d:
        assert np.array_equal(d["x_train"], x_train) and d["x_train"].dtype == np.uint8
        assert np.array_equal(d["y_test"], y_test) and d["y_test"].dtype == np.int64
    data = load_dataset("fashion_mnist", tmp_path / "data")  # the loader reads what the download wrote
    assert data.x_train.shape == (6, 1, 28, 28)


def test_download_checksum_mismatch_fails_and_leaves_nothing(tmp_path: Path) -> None:
    good = _serve(tmp_path, "cifar-10-python.tar.gz", b"not the archive")
    with pytest.raises(ValueError, match="checksum mismatch .*cifar-10-python.tar.gz.*expected 0{32}"):
        download_dataset("cifar10", tmp_path / "data", files=[good._replace(md5="0" * 32)])
    assert list((tmp_path / "data").iterdir()) == []


def test_download_cifar_tarball_is_converted_to_hwc(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": rng.integers(0, 256, (2, 3072), dtype=np.uint8) for i in range(1, 6)}
    batches["test_batch"] = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in batches.items():
            blob = pickle.dumps({b"data": data, b"labels": list(range(len(data)))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    remote = _serve(tmp_path, "cifar-10-python.tar.gz", buffer.getvalue())
    with np.load(download_dataset("cifar10", tmp_path, files=[remote])) as d:
        assert d["x_train"].shape == (10, 32, 32, 3) and d["x_test"].shape == (3, 32, 32, 3)
        # pixel (row 1, col 2) of channel 1 of the first image: CHW row-major offset 1024 + 32 + 2
        assert d["x_train"][0, 1, 2, 1] == batches["data_batch_1"][0, 1024 + 34]
        assert d["y_train"].tolist() == [0, 1] * 5


def test_dataset_lookup_uses_data_dir_then_env_and_names_the_fix(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("FOP_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="FOP_DATA"):
        load_dataset("mnist")
    monkeypatch.setenv("FOP_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"mnist.npz not found.*download"):
        load_dataset("mnist")
    x = np.zeros((50, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10.npz", x_train=x, y_train=np.arange(50) % 10, x_test=x[:5],
             y_test=np.zeros(5, dtype=np.int64))
    lt = load_dataset("cifar10_lt", imbalance=5.0)  # 5 per class: n_c = floor(5 * 5^(-c/9))
    assert torch.bincount(lt.y_train, minlength=10).tolist() == long_tail_counts(5, 10, 5.0)


def test_cli_reports_a_damaged_dataset_file_by_name(tmp_path: Path, capsys) -> None:
    (tmp_path / "mnist.npz").write_bytes(b"\x80\x04\x95 not a zip")  # e.g. a pickle saved under the name
    code = main(["train", "--no-progress", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--set", "dataset=mnist_lt", "epochs=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert f"fop-asdl: error: dataset file {tmp_path / 'mnist.npz'}: is not an .npz archive" in err
    assert "Traceback" not in err
