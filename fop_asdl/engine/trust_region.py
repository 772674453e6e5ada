"""kl_clip: a trust region on the step's squared Fisher norm (Ba, Grosse and Martens 2017).

All preconditioned block gradients Δ_l of a step are scaled together by

    ν = min(1, sqrt(κ / (lr² Σ_l ‖Δ_l‖²_F̃))),

so the step lr·ν·Δ the optimizer takes has ‖·‖²_F̃ ≤ κ. ‖Δ_l‖²_F̃ is what each method already forms: the sum
of FOP's KL terms (eqs. 19-22), g_avgᵀ F̃⁻¹ g_avg for K-FAC. Pure tensor code, no host sync.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["LearningRate", "validate_kl_clip", "kl_clip_factor", "step_factor"]

#: A learning rate, or a zero-argument callable returning the current one (so a scheduler is followed).
LearningRate = Union[float, Callable[[], float]]


def validate_kl_clip(kl_clip: Optional[float], lr: Optional[LearningRate]) -> Tuple[Optional[float],
                                                                                   Optional[LearningRate]]:
    """(κ, lr) checked at construction; κ None switches the bound off."""
    if kl_clip is None:
        return None, lr
    if isinstance(kl_clip, bool) or not isinstance(kl_clip, (int, float)) or not kl_clip > 0:
        raise ValueError(f"kl_clip must be a positive float or None, got {kl_clip!r}.")
    if lr is None:
        raise ValueError("kl_clip bounds the step lr·Δ, so it needs the learning rate: pass lr=<float> or "
                         "lr=lambda: optimizer.param_groups[0]['lr'] (followed when a scheduler changes it).")
    if not callable(lr) and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
        raise ValueError(f"lr must be a positive float or a zero-argument callable, got {lr!r}.")
    return float(kl_clip), lr


def step_factor(kl_clip: Optional[float], lr: Optional[LearningRate], norms: Sequence[Tensor],
                grad_scale: Union[float, Tensor] = 1.0) -> Optional[Tensor]:
    """ν of a maker's step (None with kl_clip off, or with no preconditioned block to bound): what every
    method with ``kl_clip`` calls, so the bound is applied one way everywhere."""
    if kl_clip is None or not norms:
        return None
    return kl_clip_factor(norms, kl_clip, lr, grad_scale)


def kl_clip_factor(norms: Sequence[Tensor], kl_clip: float, lr: LearningRate,
                   grad_scale: Union[float, Tensor] = 1.0) -> Tensor:
    """ν from the blocks' squared F̃-norms of p.grad. NaN entries (a block a remote owner had no curvature
    for yet) are left out; ``grad_scale``: the GradScaler's scale, by which p.grad is multiplied."""
    norm = torch.stack(list(norms)).nansum()
    if isinstance(grad_scale, Tensor) or grad_scale != 1.0:
        norm = norm / (grad_scale.to(norm.dtype) if isinstance(grad_scale, Tensor) else grad_scale) ** 2
    rate = float(lr() if callable(lr) else lr)
    bound = torch.sqrt(kl_clip / (rate * rate * norm).clamp_min(torch.finfo(norm.dtype).tiny))
    return bound.clamp(max=1.0)
