"""SENG's sketched Gram (Yang et al. 2021) as pure tensor functions.

A block's per-sample gradient is u_m = Σ_s z_ms p̃_msᵀ over its positions s (one for a plain Linear, the
output pixels of a Conv2d), p̃ the input row (or patch) with a trailing 1 for the bias. SENG replaces the
exact Gram K = [u_m·u_n] by K̂ from two sketches, both drawn here:

1. positions: with more than ``truncated_rank`` = r positions, z_m (S×O) = A Σ Bᵀ is truncated to its r
   leading singular triplets, so u_m ≈ Σ_{k≤r} (σ_k b_k)(p̃_mᵀ a_k)ᵀ: r new "positions" (SENG's conv rule);
2. features: ``sketching_size`` = s of the input columns and s of the output rows, drawn uniformly without
   replacement, each kept column scaled by sqrt(D/s), so that E[K̂] equals the Gram of the truncated u_m
   (ASDL and SENG's code scale by D/s, which inflates K̂ by D/s: it shrinks the damping by s/D).

The coefficients then come from FNGD's solve (:func:`~fop_asdl.methods.fngd_math.fngd_coefficients`) and the
direction d = Σ_m w_m u_m from the exact u_m (FNGD's weighted sum).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fngd_math

__all__ = ["block_rows", "draw_features", "sketched_gram", "truncated_positions"]


def block_rows(x: Tensor, z: Tensor, conv: Optional[Tuple[Sequence[int], Sequence[int], Sequence[int], Sequence[int]]],
               bias: bool) -> Tuple[Tensor, Tensor]:
    """(p̃ (M, S, I[+1]), z (M, S, O)) of a Linear (x (M, I) or (M, T, I)) or a Conv2d (``conv`` = kernel,
    stride, padding, dilation; x (M, C, H, W), z (M, O, H', W'))."""
    if conv is not None:
        kernel, stride, padding, dilation = conv
        p = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
        z = z.flatten(2).transpose(1, 2)
    else:
        p = x if x.dim() == 3 else x.unsqueeze(1)
        z = z if z.dim() == 3 else z.unsqueeze(1)
    if bias:
        p = torch.cat([p, p.new_ones(*p.shape[:2], 1)], dim=2)
    return p, z


def truncated_positions(p: Tensor, z: Tensor, rank: Optional[int]) -> Tuple[Tensor, Tensor]:
    """The r leading singular triplets of each z_m (S×O) and p̃ projected on their left vectors: u_m ≈
    Σ_k ẑ_mk p̂_mkᵀ. Unchanged when ``rank`` is None or not below S."""
    if rank is None or rank >= p.shape[1]:
        return p, z
    # The SVD raises on a NaN or Inf; with zeros there the step's own finiteness check (the exact rows reach
    # the direction) is what reports such a batch, or skips it under a GradScaler.
    z = torch.where(torch.isfinite(z), z, 0.0)
    left, values, right = torch.linalg.svd(z, full_matrices=False)  # z_m = left diag(values) right
    return left[:, :, :rank].transpose(1, 2) @ p, values[:, :rank, None] * right[:, :rank]


def draw_features(size: int, sketching_size: int, generator: torch.Generator, device: torch.device
                  ) -> Optional[Tensor]:
    """``sketching_size`` of ``size`` indices without replacement, sorted; None (keep all) when it is not
    smaller than ``size``."""
    if sketching_size >= size:
        return None
    return torch.randperm(size, generator=generator, device=device)[:sketching_size].sort().values


def _kept(t: Tensor, index: Optional[Tensor]) -> Tensor:
    if index is None:
        return t
    return t.index_select(2, index) * math.sqrt(t.shape[2] / index.numel())


def sketched_gram(p: Tensor, z: Tensor, in_index: Optional[Tensor], out_index: Optional[Tensor],
                  rank: Optional[int], strategy: str = "auto") -> Tensor:
    """K̂ (M×M) from the rows of :func:`block_rows`: positions truncated, then features sampled; the exact
    Gram when nothing is truncated or sampled."""
    p, z = truncated_positions(p, z, rank)
    return fngd_math.linear_gram(_kept(p, in_index), _kept(z, out_index), False, strategy=strategy)
