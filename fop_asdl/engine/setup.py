"""The set-up every maker shares: the module it works on, and the batch it reads off the model call."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["batch_size_of", "eager_module", "prepared_model", "reject_ddp"]


def prepared_model(model: nn.Module) -> nn.Module:
    """The module a maker works on: a DDP-wrapped model refused, a ``torch.compile``d one's eager module."""
    reject_ddp(model)
    return eager_module(model)


def reject_ddp(model: nn.Module) -> None:
    """ASDL's makers need the bare module: DDP would all-reduce raw gradients behind their back."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("The model is wrapped in DistributedDataParallel, which would all-reduce raw "
                        "gradients behind the gradient maker. Pass the bare model (model.module); this "
                        "version trains in one process (a sharded torchrun path is planned).")


def eager_module(model: Any, warn: bool = True) -> Any:
    """The eager module inside a ``torch.compile``d one (``model._orig_mod``, the same parameters), else
    ``model``. The per-layer hooks of the step machinery (frozen weights during a block's forward, hooks on its
    output) cannot run inside a compiled graph, so its steps run the model eagerly: the same gradients."""
    if type(model).__name__ != "OptimizedModule" or not isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return model
    if warn:
        warnings.warn("fop_asdl: the gradient maker runs this torch.compile'd model's eager module "
                      "(model._orig_mod, the same parameters): its per-layer hooks cannot run inside a compiled "
                      "graph. The gradients are the eager model's; compilation speeds up nothing here.",
                      UserWarning)
    return model._orig_mod


def batch_size_of(args: tuple, kwargs: dict) -> int:
    """Dim 0 of the first tensor among the model-call arguments (ASDL's batch convention)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ValueError("The model call has no tensor argument with a batch dimension; pass the inputs "
                     "to setup_model_call(model, x, ...).")
