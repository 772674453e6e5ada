"""HyLo's per-sample rows (A, G) of each layer type (HYLO_SPEC §2.1): pure tensor functions, no ASDL, no modules.

Row j stands for the rank-one per-sample gradient g_j a_jᵀ in the layer's (d_g × d_a) layout, the bias as
the last column of a. A Linear's rows are exact (or its tokens'); a convolution's are reduced over output
positions (the paper's approximation); with groups a row holds one (a, g) pair per group, (rows, G, width),
standing for the block-diagonal gradient ⊕_g g_g a_gᵀ; an Embedding's rows are those of the Linear on one-hot
rows it is, each a's multi-hot row held as its ids and weights beside the vocabulary size: no V-wide row is
stored, and none is formed outside a refresh's kernel.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["REDUCTIONS", "TOKEN_REDUCTIONS", "conv2d_patch_sums", "conv2d_rows", "embedding_rows", "linear_rows"]

IntPair = Union[int, Tuple[int, int]]
REDUCTIONS = ("mean", "sum", "scaled_mean")
TOKEN_REDUCTIONS = ("flatten",) + REDUCTIONS


def _choice(name: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}.")
    return value


def _factor_dtype(t: Tensor) -> Tensor:
    """Half-precision captures are factorised in fp32 (§2.6: all factor math in fp32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _reduce(a_sum: Tensor, g_sum: Tensor, positions: int, bias: bool,
            reduction: str) -> Tuple[Tensor, Tensor]:
    """Rows from per-sample sums over positions (§2.1). The bias 1 is appended per position before the
    reduction, so its entry is 1 for the means and S for "sum": every convention is then a pure
    power of S times the mean rows (û_sum = S² û_mean, û_scaled_mean = S û_mean)."""
    if bias:
        a_sum = torch.cat([a_sum, a_sum.new_full((a_sum.shape[0], 1), float(positions))], 1)
    a_scale = 1.0 if reduction == "sum" else 1.0 / positions
    g_scale = 1.0 / positions if reduction == "mean" else 1.0
    return a_sum * a_scale, g_sum * g_scale


def linear_rows(x: Tensor, grad_out: Tensor, bias: bool,
                token_reduction: str = "flatten") -> Tuple[Tensor, Tensor]:
    """Per-sample rows (A, G) of an nn.Linear from its input and the output gradient of the summed loss.

    x: (m, d_in) or (m, *tokens, d_in). Tokens are flattened into samples by default (the MKOR port,
    rows = m·T); "mean" | "sum" | "scaled_mean" reduce them per sample like conv positions.
    """
    _choice("token_reduction", token_reduction, TOKEN_REDUCTIONS)
    x, grad_out = _factor_dtype(x), _factor_dtype(grad_out)
    if x.shape[:-1] != grad_out.shape[:-1]:
        raise ValueError(f"x {tuple(x.shape)} and grad_out {tuple(grad_out.shape)} must agree in every "
                         f"dimension but the last; pass the layer's own input and output gradient.")
    if x.dim() == 2 or token_reduction == "flatten":
        a, g = x.reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])
        if bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        return a, g
    positions = math.prod(x.shape[1:-1])
    token_dims = tuple(range(1, x.dim() - 1))
    return _reduce(x.sum(token_dims), grad_out.sum(token_dims), positions, bias, token_reduction)


def _pair(v: IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv2d_patch_sums(x: Tensor, kernel_size: IntPair, stride: IntPair = 1,
                      padding: Union[IntPair, str] = 0, dilation: IntPair = 1) -> Tuple[Tensor, int]:
    """Σ_s im2col(x_j)[s, :] for each sample, shape (m, C_in·kh·kw) in weight order, and S.

    One strided slice of the padded input per kernel offset (k² slices, no m×C_in k²×S unfold buffer).
    """
    (kh, kw), (sh, sw), (dh, dw) = _pair(kernel_size), _pair(stride), _pair(dilation)
    if isinstance(padding, str):
        _choice("padding", padding, ("valid", "same"))
        if padding == "same" and (sh, sw) != (1, 1):
            raise ValueError("padding='same' needs stride 1 (as in nn.Conv2d); pass numeric padding.")
        full = (0, 0) if padding == "valid" else (dh * (kh - 1), dw * (kw - 1))
        pads = (full[1] // 2, full[1] - full[1] // 2, full[0] // 2, full[0] - full[0] // 2)
    else:
        ph, pw = _pair(padding)
        pads = (pw, pw, ph, ph)
    xp = F.pad(x, pads)
    h_out = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    w_out = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    sums = [xp[:, :, i * dh: i * dh + sh * (h_out - 1) + 1: sh,
               j * dw: j * dw + sw * (w_out - 1) + 1: sw].sum((2, 3))
            for i in range(kh) for j in range(kw)]
    return torch.stack(sums, -1).reshape(x.shape[0], -1), h_out * w_out


def conv2d_rows(x: Tensor, grad_out: Tensor, kernel_size: IntPair, stride: IntPair = 1,
                padding: Union[IntPair, str] = 0, dilation: IntPair = 1, *, bias: bool,
                conv_reduction: str = "mean", groups: int = 1) -> Tuple[Tensor, Tensor]:
    """Per-sample rows (A, G) of an nn.Conv2d (zero padding: pad ``x`` beforehand for another padding
    mode), reduced over the S positions; with ``groups`` > 1 one (a, g) pair per group, (m, G, width).

    "mean" (the authors' code, default; the reference hyperparameters assume it), "sum" (the paper's
    text) or "scaled_mean" (S·mean: the scale-correct reduce approximation of Σ_s g_s x_sᵀ).
    """
    _choice("conv_reduction", conv_reduction, REDUCTIONS)
    x, grad_out = _factor_dtype(x), _factor_dtype(grad_out)
    if x.dim() != 4 or grad_out.dim() != 4 or x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"x {tuple(x.shape)} and grad_out {tuple(grad_out.shape)} must be 4-D "
                         f"(m, C, H, W) with the same batch size.")
    a_sum, positions = conv2d_patch_sums(x, kernel_size, stride, padding, dilation)
    if positions != grad_out.shape[2] * grad_out.shape[3]:
        raise ValueError(f"the conv geometry gives {positions} output positions but grad_out has "
                         f"{grad_out.shape[2] * grad_out.shape[3]}; pass the layer's kernel_size, "
                         f"stride, padding and dilation.")
    g_sum = grad_out.sum((2, 3))
    if groups == 1:
        return _reduce(a_sum, g_sum, positions, bias, conv_reduction)
    m = x.shape[0]
    a, g = _reduce(a_sum.reshape(m * groups, -1), g_sum.reshape(m * groups, -1), positions, bias, conv_reduction)
    return a.reshape(m, groups, -1), g.reshape(m, groups, -1)


def embedding_rows(ids: Tensor, keep: Tensor, grad_out: Tensor,
                   token_reduction: str = "mean") -> Tuple[Tensor, Tensor]:
    """Rows of an nn.Embedding (ids (m, T)), exactly those of the Linear on one-hot rows it is, tokens
    flattened or reduced per sample as :func:`linear_rows` does them. a is a sparse multi-hot row held as
    (rows, 2, K): the ids (in the rows' float dtype, exact below 2^24 in float32) and their weights (``keep``,
    0 at ``padding_idx``, times the reduction's scale), K = 1 for "flatten", T otherwise; g as for a Linear."""
    _choice("token_reduction", token_reduction, TOKEN_REDUCTIONS)
    grad_out = _factor_dtype(grad_out).reshape(*ids.shape, -1)
    weights = keep.to(grad_out.dtype)
    if token_reduction == "flatten":
        ids, weights, g = ids.reshape(-1, 1), weights.reshape(-1, 1), grad_out.reshape(-1, grad_out.shape[-1])
    else:
        positions = ids.shape[1]
        weights = weights * (1.0 if token_reduction == "sum" else 1.0 / positions)
        g = grad_out.sum(1) * (1.0 / positions if token_reduction == "mean" else 1.0)
    return torch.stack([ids.to(g.dtype), weights], 1), g


