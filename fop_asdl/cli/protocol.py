"""The paper's training protocol for one run: learning-rate scaling, update interval, model, optimizer,
schedule, loss and gradient maker, identical across methods except where a method's entry in the method
table (:mod:`.methods`) says otherwise.

Every method gets its optimizer and its maker's options from its entry; the methods whose makers
precondition with curvature share one ``asdl.PreconditioningConfig`` recipe, so K-FAC, FOP and HyLo share
every schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

import asdl
import torch
from torch import nn

from .. import make_gradient_maker
from ..data import DATASETS, ArrayDataset
from ..optim.hybrid import HybridOptimizer, other_parameters, preconditioned_parameters
from ..models import build_model
from .config import ConfigError, ExperimentConfig
from .methods import METHODS, MakerInputs, MethodSpec, missing_library
from .search import Point

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
    """One point of the sweep: ``method`` at global ``batch_size``, base learning rate, the values of its
    other searched hyperparameters (``hparams``, e.g. ``(("damping", 0.01),)``) and seed.

    ``config`` is the run's own config: the study's, with ``hparams`` written into their fields (so the
    maker, the optimizer and ``summary.json`` all see the values that ran).
    """

    config: ExperimentConfig
    method: str
    batch_size: int
    base_lr: float
    seed: int
    hparams: Tuple[Tuple[str, float], ...] = ()

    @classmethod
    def at(cls, config: ExperimentConfig, method: str, batch_size: int, point: Mapping[str, float],
           seed: int) -> "RunSpec":
        """The run at a search point ``{"lr": base lr, other hyperparameter: value, ...}``; the other values
        in the order of the method's hyperparameters, so the same point always names the same run folder."""
        order = METHODS[method].hyperparameter_names if method in METHODS else ()
        rank = {name: i for i, name in enumerate(order)}
        hparams = tuple(sorted(((k, v) for k, v in point.items() if k != "lr"),
                               key=lambda kv: rank.get(kv[0], len(order))))
        return cls(config, method, batch_size, point["lr"], seed, hparams)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError("method", f"unknown value {self.method!r}; choose one of {', '.join(METHODS)}.")
        missing = missing_library(METHODS[self.method])
        if missing:
            raise ConfigError("method", missing)
        reads = self.method_spec.hyperparameter_names
        for name, _ in self.hparams:
            if name == "lr" or name not in reads:
                raise ConfigError(name, f"{self.method} does not read '{name}' (besides lr it reads "
                                        f"{', '.join(reads[1:])}).")
        if self.hparams:
            object.__setattr__(self, "config", dataclasses.replace(self.config, **dict(self.hparams)))
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
    def method_spec(self) -> MethodSpec:
        """The method's entry in the method table."""
        return METHODS[self.method]

    @property
    def lr(self) -> float:
        """Linear scaling: the base lr holds at ``base_batch``."""
        return self.base_lr * self.batch_size / self.config.base_batch

    @property
    def others_lr(self) -> float:
        """others_optimizer's lr, under the same linear scaling."""
        return self.config.others_lr * self.batch_size / self.config.base_batch

    @property
    def interval(self) -> int:
        c = self.config
        return update_interval(c.update_interval, c.interval_at_base_batch, self.batch_size, c.base_batch)

    @property
    def epochs(self) -> int:
        return self.config.epochs_for(self.batch_size)

    @property
    def point(self) -> Point:
        """The search point: ``{"lr": base lr, **hparams}``."""
        return {"lr": self.base_lr, **dict(self.hparams)}

    @property
    def name(self) -> str:
        """Relative run directory: ``b<batch>/<method>/lr<base lr>[_<name><value>...]_seed<seed>``."""
        values = "".join(f"_{k}{v:g}" for k, v in self.hparams)
        return f"b{self.batch_size}/{self.method}/lr{self.base_lr:g}{values}_seed{self.seed}"

    def describe(self) -> Dict[str, Any]:
        return {
            "method": self.method,
            "batch_size": self.batch_size,
            "point": self.point,
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
        "vit": {"in_channels": channels, "image_size": height, "num_classes": classes},
        "gpt": {"in_channels": channels, "image_size": height, "num_classes": classes},
    }.get(config.model, {"in_channels": channels, "num_classes": classes})
    return build_model(config.model, **kwargs)


def build_optimizer(spec: RunSpec, model: nn.Module, maker: asdl.GradientMaker) -> torch.optim.Optimizer:
    """The method's optimizer over the model's parameters (its config's ``update_interval`` resolved to the
    run's interval), joined by AdamW (``others_lr``, ``others_weight_decay``) on every other parameter
    when it steps only some: those its ``own_parameters`` picks (Muon's hidden matrices), or, with
    ``others_optimizer`` "adamw" for a method that takes it (the paper's transformer protocol), the blocks
    its maker preconditions."""
    c, method = dataclasses.replace(spec.config, update_interval=spec.interval), spec.method_spec
    if method.own_parameters is not None:
        own = method.own_parameters(model)
        if not own:
            raise ConfigError("model", f"{spec.method} steps only some parameters (hidden weight matrices) and "
                                       f"finds none in model {c.model!r}; choose a model with hidden layers.")
        chosen = set(own)
        others = [p for p in model.parameters() if p.requires_grad and p not in chosen]
    elif c.others_optimizer == "adamw" and method.takes_others_optimizer:
        own, others = preconditioned_parameters(maker), other_parameters(maker)
    else:
        return method.optimizer.build(model.parameters(), spec.lr, c)
    adamw = torch.optim.AdamW(others, lr=spec.others_lr, weight_decay=c.others_weight_decay)
    return HybridOptimizer(method.optimizer.build(own, spec.lr, c), adamw)


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


def build_gradient_maker(spec: RunSpec, model: nn.Module, local_batch: int, steps_per_epoch: Optional[int] = None,
                         lr: Optional[Callable[[], float]] = None) -> asdl.GradientMaker:
    """Through ``fop_asdl.make_gradient_maker``, as the method's entry says: ``micro_batch_size`` only when
    set and below the batch; an ``asdl.PreconditioningConfig`` for a preconditioning maker (else None);
    ``kl_clip`` (with ``lr``, the run's current learning rate) and ``ema_bias_correction`` when set, to the
    methods that take them; then the method's own options (e.g. FNGD's ``iters_per_epoch``, where its
    coefficient epoch ends, and ``alpha``; HyLo's ``iters_per_epoch``, as its KID/KIS choice is per
    epoch)."""
    c, method = spec.config, spec.method_spec
    kwargs: Dict[str, Any] = {}
    if c.micro_batch_size is not None and c.micro_batch_size < local_batch:
        kwargs["micro_batch_size"] = c.micro_batch_size
    config = None
    if method.preconditioning:
        # AdamW's, not ours: the paper's protocol preconditions the Linear/Conv blocks only (docs/runner.md)
        others = [nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.Embedding]
        ignore = others if c.others_optimizer else None
        config = asdl.PreconditioningConfig(
            ignore_modules=ignore,
            damping=c.damping,
            ema_decay=c.ema_decay,
            curvature_upd_interval=spec.interval,
            preconditioner_upd_interval=spec.interval,
        )
    if method.takes_kl_clip and c.kl_clip is not None:
        kwargs.update(kl_clip=c.kl_clip, lr=lr)
    if method.needs_lr:
        kwargs["lr"] = lr
    if method.takes_ema_bias_correction and c.ema_bias_correction:
        kwargs["ema_bias_correction"] = True
    kwargs.update(method.options(MakerInputs(c, steps_per_epoch)))
    return make_gradient_maker(method.maker, model, config, **kwargs)


def loss_function(config: ExperimentConfig) -> nn.Module:
    """A module, not a partial: ASDL switches its ``reduction`` attribute to 'sum' for the Fisher pass."""
    return nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
