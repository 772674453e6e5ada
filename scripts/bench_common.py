"""What the step benchmarks share: one ASDL training step (the same calls for every method), timed or not,
and putting the weights back after it, so every measured step works at the same representative values."""
from __future__ import annotations

import time
from typing import Any, Sequence

import asdl
import torch
import torch.nn.functional as F

from fop_asdl import make_gradient_maker


def baseline_maker(name: str, model: torch.nn.Module, interval: int) -> Any:
    """The references of the method benchmarks: ``"sgd"``, or ``"kfac"`` with curvature and inverses every
    ``interval`` steps (damping 1e-3)."""
    if name == "sgd":
        return make_gradient_maker("sgd", model)
    return make_gradient_maker("kfac", model, asdl.PreconditioningConfig(
        damping=1e-3, curvature_upd_interval=interval, preconditioner_upd_interval=interval))


def asdl_step(maker: Any, model: torch.nn.Module, opt: Any, x: torch.Tensor, t: torch.Tensor) -> None:
    """zero_grad, setup_model_call, setup_loss_call (cross-entropy), forward_and_backward, opt.step()."""
    opt.zero_grad(set_to_none=True)
    dummy_y = maker.setup_model_call(model, x)
    maker.setup_loss_call(F.cross_entropy, dummy_y, t)
    maker.forward_and_backward()
    opt.step()


def timed_step(maker: Any, model: torch.nn.Module, opt: Any, x: torch.Tensor, t: torch.Tensor) -> float:
    """:func:`asdl_step`'s wall seconds (``time.perf_counter``; CPU runs: nothing to synchronise)."""
    start = time.perf_counter()
    asdl_step(maker, model, opt, x, t)
    return time.perf_counter() - start


def restore(params: Sequence[torch.Tensor], init: Sequence[torch.Tensor]) -> None:
    """Copy the initial weights back into the parameters."""
    with torch.no_grad():
        for p, p0 in zip(params, init):
            p.copy_(p0)
