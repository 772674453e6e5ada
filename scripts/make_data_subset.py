"""Build the small Fashion-MNIST subset packaged with fop_asdl, so tests and the quick comparison run offline.

Selection (deterministic, no RNG): the first ``--train-per-class`` train images and the first
``--test-per-class`` test images of every class, in official order; the kept rows stay in their original
relative order. Pixels stay uint8, the keys stay those of the source file.

    python scripts/make_data_subset.py [SOURCE] [--out fop_asdl/_data/fashion_mnist_subset.npz]
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "fashion_mnist.npz"
DEFAULT_OUT = REPO / "fop_asdl" / "_data" / "fashion_mnist_subset.npz"


def first_k_per_class(labels: np.ndarray, k: int) -> np.ndarray:
    """Indices (ascending) of the first ``k`` samples of each class; fails if a class has fewer."""
    picked = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if idx.size < k:
            raise ValueError(f"class {c} has only {idx.size} samples, fewer than {k}.")
        picked.append(idx[:k])
    return np.sort(np.concatenate(picked))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path, default=DEFAULT_SOURCE,
                        help="full fashion_mnist.npz (default: ../shared/data/fashion_mnist.npz)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    args = parser.parse_args()

    with np.load(args.source) as d:
        arrays = {}
        for split, k in (("train", args.train_per_class), ("test", args.test_per_class)):
            x, y = d[f"x_{split}"], d[f"y_{split}"]
            idx = first_k_per_class(y, k)
            arrays[f"x_{split}"], arrays[f"y_{split}"] = x[idx], y[idx]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)

    print(f"source sha256 {hashlib.sha256(args.source.read_bytes()).hexdigest()}")
    for key, a in arrays.items():
        print(f"{key}: {a.dtype} {a.shape}")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} B), "
          f"sha256 {hashlib.sha256(args.out.read_bytes()).hexdigest()}")


if __name__ == "__main__":
    main()
