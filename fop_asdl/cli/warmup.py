"""Linear learning-rate warm-up, as a factor on whatever lr the schedule set, applied only for the step.

The factor (t+1)/W of step t < W multiplies the optimizer's lr just for that ``optimizer.step()`` and is
then undone, so the schedules (plateau, cosine, constant) run exactly as they would without it and compose
with it by multiplication; nothing new goes into a checkpoint (t counts the steps of the run's history).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from .experiment import ExperimentSettings

__all__ = ["WARMUP_UNITS", "warmup_steps", "warmup_factor", "warmed_up"]

WARMUP_UNITS = ("steps", "epochs")


def warmup_steps(config: ExperimentSettings, steps_per_epoch: int) -> int:
    """W: ``warmup`` steps, or ``warmup`` epochs of ``steps_per_epoch`` rounded to whole steps."""
    if config.warmup_unit == "epochs":
        return round(config.warmup * steps_per_epoch)
    return int(config.warmup)


def warmup_factor(step: int, warmup: int) -> float:
    """(step+1)/W for the first W steps (counting from 0), then 1."""
    return (step + 1) / warmup if step < warmup else 1.0


@contextmanager
def warmed_up(optimizer: torch.optim.Optimizer, factor: float) -> Iterator[None]:
    """Every parameter group's lr times ``factor`` inside the block, restored exactly after it."""
    if factor == 1.0:
        yield
        return
    saved = [group["lr"] for group in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, saved):
        group["lr"] = lr * factor
    try:
        yield
    finally:
        for group, lr in zip(optimizer.param_groups, saved):
            group["lr"] = lr
