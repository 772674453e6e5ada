"""The two sub-batch gradient sums of a curvature block (FOP, K-FAC) from its input and output gradient.

:class:`fop_asdl.engine.capture.BlockCapture` hands each block's input x and the gradient at its output; the
block's weight and bias gradients are formed here, separately for the first ⌈n/2⌉ samples (B1) and the
rest (B2): the same arithmetic autograd would have done once, split in two. The full batch goes through
the model once, so BatchNorm sees full-batch statistics and g_avg is exactly the full-batch gradient.
With micro-batches (or on one rank of a sharded run) the sums of all chunks add up (:func:`fop_asdl.engine.vectors.add`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .layers import CONVS, conv_weight_sum, embedding_problem, embedding_tokens, to_conv_layout
from .vectors import BlockVector

__all__ = ["autograd_sums", "average_and_difference", "average_and_difference_pair", "first_half_size", "half_sums",
           "sub_batch_factors", "supports_half_gradients"]

_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def first_half_size(n: int) -> int:
    """|B1| = ⌈n/2⌉."""
    return (n + 1) // 2


def supports_half_gradients(module: nn.Module, all_layer_types: bool = True) -> bool:
    """Whether this module's per-sub-batch gradients can be formed here (and ASDL has its curvature); without
    ``all_layer_types`` only the layers ASDL 0.1a5 itself covers: Linear, Conv2d (groups 1, no dilation, zero
    padding), BatchNorm1d/2d and LayerNorm (a method whose math knows no diagonal or per-group factor, EKFAC)."""
    if not all_layer_types:
        if isinstance(module, nn.Conv2d):
            return (module.groups == 1 and module.dilation == (1, 1) and module.padding_mode == "zeros"
                    and not isinstance(module.padding, str))
        if not isinstance(module, (nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
            return False
    if isinstance(module, (nn.Linear, *CONVS)):
        return True
    if isinstance(module, nn.Embedding):
        return embedding_problem(module) is None
    if isinstance(module, _NORM):
        return module.weight is not None and module.bias is not None
    return False


def _norm_param_grads(module: nn.Module, x: Tensor, grad_out: Tensor, halves: Sequence[slice]
                      ) -> List[BlockVector]:
    """Per-half (weight, bias) gradients of a BatchNorm/LayerNorm/GroupNorm call: (Σ δ·x̂, Σ δ) over each
    half, with x̂ normalised by the statistics of the whole call (BatchNorm) or of each sample (LayerNorm,
    GroupNorm: of each group of channels).

    The statistics come from the layer's own forward kernel (BatchNorm's on CUDA: its statistics kernel) and
    each half's sums from its own fused backward kernel, asked for the weight and bias only: one pass over x
    for the statistics and one over x and δ for the sums, where the same arithmetic written out as
    elementwise products costs six (and ``var_mean`` is 2-10x slower than these kernels on the CPU).
    bf16/fp16 weights and buffers are read in x's dtype (the weight only scales the input gradient, which is
    not asked for, but LayerNorm's and GroupNorm's kernels shape their sums by the weight and bias).
    """
    wanted, eps = [False, True, True], module.eps
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):  # their kernels read memory as contiguous
        x, grad_out, weight = x.contiguous(), grad_out.contiguous(), module.weight.to(x.dtype)
    if isinstance(module, nn.LayerNorm):
        shape, bias = list(module.normalized_shape), module.bias.to(x.dtype)
        _, mean, rstd = torch.native_layer_norm(x, shape, None, None, eps)
        return [torch.ops.aten.native_layer_norm_backward(grad_out[rows], x[rows], shape, mean[rows], rstd[rows],
                                                          weight, bias, wanted)[1:] for rows in halves]
    if isinstance(module, nn.GroupNorm):
        channels, pixels, groups = x.shape[1], x[0, 0].numel(), module.num_groups
        _, mean, rstd = torch.native_group_norm(x, None, None, x.shape[0], channels, pixels, groups, eps)
        return [torch.ops.aten.native_group_norm_backward(grad_out[rows], x[rows], mean[rows], rstd[rows], weight,
                                                          rows.stop - rows.start, channels, pixels, groups,
                                                          wanted)[1:] for rows in halves]
    if module.training or module.running_mean is None:  # the statistics of this call, as the forward used
        stats = (None, None, *_batch_statistics(x, eps), True)
    else:
        stats = (module.running_mean.to(x.dtype), module.running_var.to(x.dtype), None, None, False)
    return [torch.ops.aten.native_batch_norm_backward(grad_out[rows], x[rows], None, *stats, eps, wanted)[1:]
            for rows in halves]


def _batch_statistics(x: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    """(mean, 1/√(var + eps)) per channel of a BatchNorm input over the whole call. On CUDA from the
    statistics kernel alone (the one SyncBatchNorm calls: one read of x); the CPU has no such kernel, and its
    native forward, which also writes a normalised output nobody reads, is still 2-10x faster there than
    ``var_mean``."""
    if x.is_cuda:
        mean, invstd = torch.batch_norm_stats(x, eps)
        return mean, invstd
    _, mean, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
    return mean, invstd


def _param_grads(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """(weight grad, bias grad) of a Linear, convolution or Embedding call, summed over the samples of ``x``."""
    if isinstance(module, nn.Linear):
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        weight = g2d.T @ x.reshape(-1, x.shape[-1])
        bias = g2d.sum(0) if module.bias is not None else None
        return weight, bias
    if isinstance(module, CONVS):
        bias = grad_out.sum((0, *range(2, grad_out.ndim))) if module.bias is not None else None
        return conv_weight_sum(module, x, grad_out), bias
    if isinstance(module, nn.Embedding):  # Σ over tokens of e_id g_tᵀ: the rows of the ids, padding left out
        ids, keep = embedding_tokens(module, x)
        g2d = grad_out.reshape(ids.numel(), -1)
        if module.padding_idx is not None:
            g2d = g2d * keep.reshape(-1, 1)
        return g2d.new_zeros(module.weight.shape).index_add_(0, ids.reshape(-1), g2d), None
    raise TypeError(f"no per-half gradients for {type(module).__name__}")


def half_sums(module: nn.Module, x: Tensor, grad_out: Tensor, split: int) -> List[Optional[BlockVector]]:
    """[sum over the first ``split`` rows, sum over the rest] of a block's (weight, bias) gradient; None for
    a part without rows (a rank of the "ranks" split holds one sub-batch only)."""
    size = x.shape[0]
    halves = [rows for rows in (slice(0, split), slice(split, size)) if rows.stop > rows.start]
    if isinstance(module, _NORM):
        sums = iter(_norm_param_grads(module, x, grad_out, halves))
    else:
        sums = iter([_param_grads(module, x[rows], grad_out[rows]) for rows in halves])
    return [next(sums) if 0 < split else None, next(sums) if split < size else None]


def autograd_sums(module: nn.Module) -> BlockVector:
    """A block's (weight, bias) sums from autograd's ``.grad`` in :func:`half_sums`' layout (a ConvTranspose2d's
    weight as W', :func:`~fop_asdl.engine.layers.to_conv_layout`; an Embedding has no bias): K-FAC's plain steps
    take them in place of captured sums."""
    bias = getattr(module, "bias", None)
    return to_conv_layout(module, module.weight.grad), None if bias is None else bias.grad


def average_and_difference(sum1: Tensor, sum2: Tensor, n1: Union[float, Tensor], n2: Union[float, Tensor],
                           scale: float = 1.0) -> Tuple[Tensor, Tensor]:
    """(g_avg, g_diff) from the summed per-sample gradients of B1 and B2 (step 1), both times ``scale``.

    g_i = sum_i / n_i; g_avg = (n1 g1 + n2 g2) / n is the full-batch mean gradient also for odd n.
    """
    pair = average_and_difference_pair(sum1, sum2, sub_batch_factors(n1, n2, sum1.dtype, sum1.device, scale))
    return pair[0], pair[1]


#: The columns c1, c2 with [g_avg; g_diff] = c1 sum1 + c2 sum2.
Factors = Tuple[Tensor, Tensor]


def sub_batch_factors(n1: Union[float, Tensor], n2: Union[float, Tensor], dtype: torch.dtype,
                      device: torch.device, scale: float = 1.0) -> Factors:
    """c1 = scale (1/n, 1/n1) and c2 = scale (1/n, −1/n2) as (2,) tensors, formed once per step (from Python
    numbers by fills, never a host-to-device copy: that would wait for the device)."""
    values = [scale / (n1 + n2), scale / n1, -scale / n2]
    to_avg, to_g1, to_g2 = (v.to(device=device, dtype=dtype) if isinstance(v, Tensor)
                            else torch.full((), v, dtype=dtype, device=device) for v in values)
    return torch.stack((to_avg, to_g1)), torch.stack((to_avg, to_g2))


def average_and_difference_pair(sum1: Tensor, sum2: Tensor, factors: Factors) -> Tensor:
    """[g_avg; g_diff] stacked along a new dim 0 (the stack FOP's products take) in two kernels, where the
    average, the difference and their stack took six."""
    c1, c2 = (c.view((2,) + (1,) * sum1.dim()) for c in factors)
    return (sum1.unsqueeze(0) * c1).addcmul_(sum2.unsqueeze(0), c2)
