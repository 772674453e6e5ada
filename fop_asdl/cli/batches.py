"""The training data on the device: loading, and per-epoch shuffling, batching and augmentation there.

The whole dataset lives on the training device, so an epoch is a permutation plus indexing: no
DataLoader, no host round trip. Data order and augmentation draw from their own ``torch.Generator`` s,
seeded from the run's seed, so a run is reproducible and its generators can be checkpointed.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ..data.augment import crop_flip, sample_crop_flip
from ..data import NORMALIZATION, ArrayDataset, base_dataset, load_dataset
from .config import ConfigError, ExperimentConfig
from .distributed import Topology

__all__ = ["load_data", "augmentation", "EpochBatches", "AUGMENT_SEED_OFFSET", "CROP_PADDING"]

AUGMENT_SEED_OFFSET = 1  # the augmentation generator's seed is seed + 1: a stream apart from the data order
CROP_PADDING = 4


def load_data(config: ExperimentConfig, device: torch.device) -> ArrayDataset:
    """The configured dataset on ``device``, cut to ``subset_size`` / ``test_size`` when those are set."""
    data = load_dataset(
        config.dataset,
        config.data_dir,
        download=config.download,
        imbalance=config.imbalance,
        test_split=config.test_split,
        device=device,
    )
    n_train = config.subset_size or len(data.x_train)
    n_test = config.test_size or len(data.x_test)
    return ArrayDataset(
        data.x_train[:n_train], data.y_train[:n_train], data.x_test[:n_test], data.y_test[:n_test]
    )


def augmentation(config: ExperimentConfig) -> Optional[str]:
    """ "crop_flip" or None; "auto" means crop_flip for CIFAR, nothing for MNIST-like images."""
    if config.augment == "auto":
        return "crop_flip" if base_dataset(config.dataset).startswith("cifar") else None
    return None if config.augment == "none" else config.augment


class EpochBatches:
    """Yields this rank's part of every full global batch of one epoch (the last partial batch is dropped,
    so every step sees exactly ``batch_size`` samples, the size the learning rate was scaled for)."""

    def __init__(
        self, data: ArrayDataset, config: ExperimentConfig, batch_size: int, seed: int, topo: Topology
    ):
        if batch_size > len(data.x_train):
            raise ConfigError(
                "batch_sizes",
                f"batch size {batch_size} exceeds the {len(data.x_train)} training "
                f"images (see also subset_size).",
            )
        self.x, self.y = data.x_train, data.y_train
        self.batch_size = batch_size
        self.local = topo.local_batch(batch_size)
        self.offset = topo.rank * self.local
        device = self.x.device
        self.order = torch.Generator(device=device).manual_seed(seed)
        self.augment_generator = torch.Generator(device=device).manual_seed(seed + AUGMENT_SEED_OFFSET)
        self.augment = augmentation(config)
        mean, std = NORMALIZATION[base_dataset(config.dataset)]
        self.fill = [-m / s for m, s in zip(mean, std)]  # the normalised value of a black (0) pixel

    @property
    def steps_per_epoch(self) -> int:
        return len(self.x) // self.batch_size

    def epoch(self) -> Iterator[Tuple[Tensor, Tensor]]:
        perm = torch.randperm(len(self.x), generator=self.order, device=self.x.device)
        for step in range(self.steps_per_epoch):
            start = step * self.batch_size + self.offset
            idx = perm[start : start + self.local]
            x = self.x[idx]
            if self.augment == "crop_flip":
                # Drawn for the whole global batch, so the images are the same whatever the world size.
                params = sample_crop_flip(self.batch_size, CROP_PADDING, self.augment_generator)
                x = crop_flip(x, params.narrow(self.offset, self.local), CROP_PADDING, self.fill)
            yield x, self.y[idx]

    def state_dict(self) -> Dict[str, Any]:
        return {"order": self.order.get_state(), "augment": self.augment_generator.get_state()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.order.set_state(state["order"])
        self.augment_generator.set_state(state["augment"])
