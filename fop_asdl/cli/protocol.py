"""The paper's training protocol for one run: learning-rate scaling, update interval, model, optimizer,
schedule, loss and gradient maker, identical across methods except where a method needs its own.

SGD, K-FAC and FOP share torch's SGD (momentum, coupled weight decay); AdamW uses torch's AdamW (decoupled
weight decay). SGD and AdamW get their gradients from the plain "sgd" gradient maker, K-FAC and FOP from
their makers with the same ``asdl.PreconditioningConfig``, so K-FAC and FOP share every schedule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import asdl
import torch
from torch import nn

from .. import make_gradient_maker
from ..data import DATASETS, ArrayDataset
from ..models import build_model
from .config import METHODS, ConfigError, ExperimentConfig

__all__ = [
    "RunSpec",
    "update_interval",
    "build_model_for",
    "build_optimizer",
    "build_scheduler",
    "build_gradient_maker",
    "loss_function",
]

Scheduler = Union[torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau]


@dataclass(frozen=True)
class RunSpec:
    """One point of the sweep: ``method`` at global ``batch_size``, base learning rate and seed."""

    config: ExperimentConfig
    method: str
    batch_size: int
    base_lr: float
    seed: int

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown value {self.method!r}; choose one of {', '.join(METHODS)}.")
        if self.batch_size < 2:
            raise ConfigError(
                "batch_size", f"must be >= 2 (FOP splits it in two halves), got {self.batch_size}."
            )
        if not self.base_lr > 0:
            raise ConfigError("lr", f"must be > 0, got {self.base_lr}.")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}.")
        if isinstance(self.config.epochs, dict) and self.batch_size not in self.config.epochs:
            raise ConfigError("epochs", f"the map has no entry for batch size {self.batch_size}.")

    @property
    def lr(self) -> float:
        """Linear scaling: the base lr holds at ``base_batch``."""
        return self.base_lr * self.batch_size / self.config.base_batch

    @property
    def interval(self) -> int:
        c = self.config
        return update_interval(c.update_interval, c.interval_at_base_batch, self.batch_size, c.base_batch)

    @property
    def epochs(self) -> int:
        return self.config.epochs_for(self.batch_size)

    @property
    def name(self) -> str:
        """Relative run directory: ``b<batch>/<method>/lr<base lr>_seed<seed>``."""
        return f"b{self.batch_size}/{self.method}/lr{self.base_lr:g}_seed{self.seed}"

    def describe(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "batch_size": self.batch_size,
            "base_lr": self.base_lr,
            "lr": self.lr,
            "seed": self.seed,
            "update_interval": self.interval,
            "epochs": self.epochs,
        }


def update_interval(setting: Union[int, str], k: int, batch_size: int, base_batch: int) -> int:
    """``setting`` if an int; "auto": max(5, round(k · base_batch / batch)), the paper's rule that the
    interval shrinks as the batch grows (fewer steps per epoch) but never goes below 5 steps."""
    if setting != "auto":
        return int(setting)
    return max(5, round(k * base_batch / batch_size))


def build_model_for(config: ExperimentConfig, data: ArrayDataset) -> nn.Module:
    """The configured model, sized for the data's channels, image size and number of classes."""
    _, channels, height, width = data.x_train.shape
    classes = DATASETS[config.dataset]
    kwargs: Dict[str, Any] = {
        "mlp": {"in_features": channels * height * width, "num_classes": classes},
        "small_cnn": {"in_channels": channels, "image_size": height, "num_classes": classes},
    }.get(config.model, {"in_channels": channels, "num_classes": classes})
    return build_model(config.model, **kwargs)


def build_optimizer(spec: RunSpec, model: nn.Module) -> torch.optim.Optimizer:
    c = spec.config
    if spec.method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=c.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=c.momentum, weight_decay=c.weight_decay)


def build_scheduler(
    spec: RunSpec, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> Optional[Scheduler]:
    """plateau: stepped per epoch with the test accuracy; cosine: stepped per step; constant: None."""
    c = spec.config
    if c.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=c.plateau_factor, patience=c.plateau_patience
        )
    if c.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.epochs * steps_per_epoch)
    return None


def build_gradient_maker(spec: RunSpec, model: nn.Module, local_batch: int,
                         steps_per_epoch: Optional[int] = None) -> asdl.GradientMaker:
    """Through ``fop_asdl.make_gradient_maker``; ``micro_batch_size`` only when set and below the batch;
    FNGD also gets ``iters_per_epoch`` (where its coefficient epoch ends) and ``alpha``, HyLo
    ``iters_per_epoch`` (its KID/KIS choice is per epoch)."""
    c = spec.config
    kwargs: Dict[str, Any] = {}
    if c.micro_batch_size is not None and c.micro_batch_size < local_batch:
        kwargs["micro_batch_size"] = c.micro_batch_size
    if spec.method in ("sgd", "adamw"):
        return make_gradient_maker("sgd", model, None, **kwargs)
    config = asdl.PreconditioningConfig(
        damping=c.damping,
        ema_decay=c.ema_decay,
        curvature_upd_interval=spec.interval,
        preconditioner_upd_interval=spec.interval,
    )
    if spec.method == "fngd":
        kwargs.update(iters_per_epoch=steps_per_epoch, alpha=c.fngd_alpha)
    if spec.method == "hylo":
        kwargs.update(iters_per_epoch=steps_per_epoch)
    return make_gradient_maker(spec.method, model, config, **kwargs)


def loss_function(config: ExperimentConfig) -> nn.Module:
    """A module, not a partial: ASDL switches its ``reduction`` attribute to 'sum' for the Fisher pass."""
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
