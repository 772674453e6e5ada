"""The two sub-batch gradient sums of a curvature block (FOP, K-FAC) from its input and output gradient.

:class:`fop_asdl.engine.capture.BlockCapture` hands each block's input x and the gradient at its output; the
block's weight and bias gradients are formed here, separately for the first ⌈n/2⌉ samples (B1) and the
rest (B2): the same arithmetic autograd would have done once, split in two. The full batch goes through
the model once, so BatchNorm sees full-batch statistics and g_avg is exactly the full-batch gradient.
With micro-batches (or on one rank of a sharded run) the sums of all chunks add up (:func:`add_sums`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["BlockSum", "add_sums", "first_half_size", "half_sums", "supports_half_gradients"]

_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def first_half_size(n: int) -> int:
    """|B1| = ⌈n/2⌉."""
    return (n + 1) // 2


def supports_half_gradients(module: nn.Module) -> bool:
    """Whether this module's per-sub-batch gradients can be formed here (and ASDL has its curvature)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return (module.groups == 1 and module.dilation == (1, 1) and module.padding_mode == "zeros"
                and not isinstance(module.padding, str))
    if isinstance(module, _NORM):
        return module.weight is not None and module.bias is not None
    return False


def _normalization_stats(module: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, 1/std), broadcastable to ``x``, with which a BatchNorm/LayerNorm call normalised ``x``."""
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
    elif module.training or module.running_mean is None:
        dims = (0,) + tuple(range(2, x.ndim))
    else:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return module.running_mean.view(shape), torch.rsqrt(module.running_var + module.eps).view(shape)
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)  # one pass over x
    return mean, torch.rsqrt(var + module.eps)


BlockSum = Tuple[Tensor, Optional[Tensor]]  # (weight, bias) gradients summed over some samples


def _norm_param_grads(module: nn.Module, x: Tensor, grad_out: Tensor, halves: Sequence[slice]
                      ) -> List[BlockSum]:
    """Per-half (weight, bias) gradients of a BatchNorm/LayerNorm call: (Σ δ·x̂, Σ δ) over each half,
    with x̂ normalised by the statistics of the whole call (BatchNorm) or of each sample (LayerNorm)."""
    mean, inv_std = _normalization_stats(module, x)
    if isinstance(module, nn.LayerNorm):
        lead = tuple(range(x.ndim - len(module.normalized_shape)))
    else:
        lead = (0,) + tuple(range(2, x.ndim))
    per_sample = isinstance(module, nn.LayerNorm)  # its statistics belong to each row
    out = []
    for rows in halves:
        m, s = (mean[rows], inv_std[rows]) if per_sample else (mean, inv_std)
        g = grad_out[rows]
        out.append(((g * ((x[rows] - m) * s)).sum(lead), g.sum(lead)))
    return out


def _param_grads(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """(weight grad, bias grad) of a Linear or Conv2d call, summed over the samples of ``x``."""
    if isinstance(module, nn.Linear):
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        weight = g2d.T @ x.reshape(-1, x.shape[-1])
        bias = g2d.sum(0) if module.bias is not None else None
        return weight, bias
    if isinstance(module, nn.Conv2d):
        weight = torch.nn.grad.conv2d_weight(x, module.weight.shape, grad_out, module.stride,
                                             module.padding, module.dilation, module.groups)
        bias = grad_out.sum((0, 2, 3)) if module.bias is not None else None
        return weight, bias
    raise TypeError(f"no per-half gradients for {type(module).__name__}")


def half_sums(module: nn.Module, x: Tensor, grad_out: Tensor, split: int) -> List[Optional[BlockSum]]:
    """[sum over the first ``split`` rows, sum over the rest] of a block's (weight, bias) gradient; None for
    a part without rows (a rank of the "ranks" split holds one sub-batch only)."""
    size = x.shape[0]
    halves = [rows for rows in (slice(0, split), slice(split, size)) if rows.stop > rows.start]
    if isinstance(module, _NORM):
        sums = iter(_norm_param_grads(module, x, grad_out, halves))
    else:
        sums = iter([_param_grads(module, x[rows], grad_out[rows]) for rows in halves])
    return [next(sums) if 0 < split else None, next(sums) if split < size else None]


def add_sums(a: Optional[BlockSum], b: Optional[BlockSum]) -> Optional[BlockSum]:
    """a + b for (weight, bias) sums, where None stands for no samples (zero)."""
    if a is None or b is None:
        return b if a is None else a
    return a[0] + b[0], None if a[1] is None else a[1] + b[1]
