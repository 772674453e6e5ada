"""Datasets as whole in-memory tensors (see :mod:`.arrays`), read from checked files (:mod:`.npzfile`),
found by name (:mod:`.catalog`), downloaded with checksums (:mod:`.download`), and made long-tailed
(:mod:`.longtail`)."""
from .arrays import NORMALIZATION, NUM_CLASSES, ArrayDataset, load_fashion_mnist_subset, load_npz_dataset
from .catalog import DATA_ENV, DATASETS, base_dataset, dataset_file, load_dataset
from .download import SOURCES, RemoteFile, download_dataset
from .longtail import long_tail_counts, long_tail_indices
from .npzfile import DatasetFileError

__all__ = ["ArrayDataset", "NORMALIZATION", "NUM_CLASSES", "DatasetFileError", "load_fashion_mnist_subset",
           "load_npz_dataset",
           "DATASETS", "DATA_ENV", "base_dataset", "dataset_file", "load_dataset",
           "SOURCES", "RemoteFile", "download_dataset", "long_tail_counts", "long_tail_indices"]
