"""scripts/make_data_subset.py, the builder of the packaged Fashion-MNIST subset: the first k samples of every
class in the source's order, pixels and keys unchanged (run on a small labelled file, not the real data)."""
import subprocess
import sys

import numpy as np

from scaffold import REPO


def test_first_k_per_class_in_source_order(tmp_path):
    source, out = tmp_path / "source.npz", tmp_path / "subset.npz"
    y_train = np.array([2, 2, 2, 0, 1, 0, 1, 0, 1, 2])
    y_test = np.array([2, 2, 0, 1, 0, 1])
    x_train = np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2)
    x_test = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2) + 100
    np.savez(source, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_data_subset.py"), str(source), "--out",
                           str(out), "--train-per-class", "2", "--test-per-class", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with np.load(out) as subset:
        assert sorted(subset.files) == ["x_test", "x_train", "y_test", "y_train"]
        kept_train, kept_test = [0, 1, 3, 4, 5, 6], [0, 2, 3]  # the first two (one) of each class, in order
        np.testing.assert_array_equal(subset["y_train"], y_train[kept_train])
        np.testing.assert_array_equal(subset["x_train"], x_train[kept_train])
        np.testing.assert_array_equal(subset["y_test"], y_test[kept_test])
        np.testing.assert_array_equal(subset["x_test"], x_test[kept_test])
        assert subset["x_train"].dtype == np.uint8


def test_a_class_with_too_few_samples_is_an_error(tmp_path):
    source = tmp_path / "source.npz"
    np.savez(source, x_train=np.zeros((3, 2, 2), np.uint8), y_train=np.array([0, 0, 1]),
             x_test=np.zeros((2, 2, 2), np.uint8), y_test=np.array([0, 1]))
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "make_data_subset.py"), str(source), "--out",
                           str(tmp_path / "subset.npz"), "--train-per-class", "2", "--test-per-class", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "class 1 has only 1 samples, fewer than 2" in done.stderr
