"""The diagonal of the empirical Fisher of one block, Σ_m u_m ⊙ u_m, from its input and output gradient.

u_m = Σ_s z_ms x̃_msᵀ is sample m's (weight, bias) gradient, summed over its positions s (Linear tokens,
Conv2d output pixels). With one position the square factorises, (z_m x_mᵀ)⊙(z_m x_mᵀ) = (z_m⊙z_m)(x_m⊙x_m)ᵀ,
and the sum over samples is one GEMM. With several it does not (the positions' cross terms): the per-sample
gradients are formed, a bounded number of samples at a time. (ASDL 0.1a5's Conv2d diagonal sums
Σ_{m,s} z²_ms p²_ms, the one-position formula, whenever that needs less memory: it drops those cross terms.)
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["squared_gradient_sums"]

DEFAULT_CHUNK_ELEMS = 1 << 24  # elements of one chunk's unfolded patches plus per-sample gradients


def squared_gradient_sums(x: Tensor, z: Tensor, bias: bool,
                          conv: Optional[Tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int]]] = None,
                          chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tuple[Tensor, Optional[Tensor]]:
    """(Σ_m u_m,W ⊙ u_m,W as (O, I·k_h·k_w), Σ_m u_m,b ⊙ u_m,b or None). ``x``, ``z``: a Linear's input and
    output gradient ((M, I) / (M, O), or (M, T, I) / (M, T, O)) or a Conv2d's ((M, C, H, W) / (M, O, H', W'),
    ``conv`` = kernel, stride, padding, dilation)."""
    if conv is None and x.dim() == 2:
        squares = (z * z).T @ (x * x)
        return squares, ((z * z).sum(0) if bias else None)
    m = x.shape[0]
    if conv is None:
        positions, width, out = x.shape[1], x.shape[2], z.shape[2]
    else:
        kernel, stride, padding, dilation = conv
        positions, out = z.shape[2] * z.shape[3], z.shape[1]
        width = x.shape[1] * kernel[0] * kernel[1]
    rows = max(1, chunk_elems // (positions * width + out * width))
    squares = x.new_zeros(out, width)
    for start in range(0, m, rows):
        xs, zs = x[start:start + rows], z[start:start + rows]
        if conv is not None:
            xs = F.unfold(xs, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
            zs = zs.flatten(2).transpose(1, 2)
        u = torch.bmm(zs.transpose(1, 2), xs)  # (rows, O, I): the samples' gradients
        squares += (u * u).sum(0)
    if not bias:
        return squares, None
    b = z.sum(1) if conv is None else z.sum((2, 3))
    return squares, (b * b).sum(0)
