"""Curvature products of one block, on ASDL's stored matrices, for several vectors at once.

A block vector is ``(weight, bias)`` with a leading dimension k that stacks k vectors, so the two FOP
gradients share one product. Kron blocks (Linear, convolutions, Embedding) hold ``weight`` as (k, rows,
cols) and ``bias`` as (k, rows) or None; F = B ⊗ A acts as ``B @ W @ A`` and on the bias as ``B`` alone,
exactly as ``asdl.Kron.mvp`` does, with the factor kinds of :mod:`fop_asdl.curvature.factors` (diagonal,
one per group). Unit-wise blocks (BatchNorm, LayerNorm, GroupNorm) hold (k, f) for both and a 2×2 matrix
per unit.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
from asdl.symmatrix import SymMatrix
from torch import Tensor

from ..engine.vectors import BlockVector, cast
from .factors import left as _left, per_group, right as _right

__all__ = ["apply_inverse", "apply_metric", "gram", "matrix_tensors", "has_inverse"]


def _unit_apply(mat: Tensor, vec: BlockVector) -> BlockVector:
    stacked = torch.stack(vec, dim=-1).permute(1, 2, 0)  # (f, 2, k)
    out = torch.matmul(mat, stacked).permute(2, 0, 1)  # (k, f, 2)
    return out[..., 0], out[..., 1]


def apply_inverse(matrix: SymMatrix, vec: BlockVector) -> BlockVector:
    """F̃⁻¹ v with the inverses ASDL built (what K-FAC preconditions with)."""
    if matrix.has_kron:
        kron = matrix.kron
        weight = _left(kron.B_inv, _right(vec[0], kron.A_inv))
        bias = None if vec[1] is None else _left(kron.B_inv, vec[1].unsqueeze(-1)).squeeze(-1)
        return weight, bias
    return _unit_apply(matrix.unit.inv, vec)


def apply_metric(matrix: SymMatrix, vec: BlockVector,
                 damping: Optional[Tuple[Union[float, Tensor], Union[float, Tensor]]] = None) -> BlockVector:
    """F v with the stored curvature; with ``damping`` = (d_A, d_B) (Kron) or (λ, λ) (unit-wise) it is
    the damped F̃ = (B + d_B I) ⊗ (A + d_A I) whose inverse ASDL builds. Formed in the factors' dtype, returned
    in ``vec``'s (which is the inverses', :mod:`fop_asdl.engine.precision`)."""
    dtype = vec[0].dtype
    return cast(_metric(matrix, cast(vec, matrix_tensors(matrix)[0].dtype), damping), dtype)


def _metric(matrix: SymMatrix, vec: BlockVector,
            damping: Optional[Tuple[Union[float, Tensor], Union[float, Tensor]]]) -> BlockVector:
    d_a, d_b = damping if damping is not None else (0.0, 0.0)
    if matrix.has_kron:
        kron = matrix.kron
        weight = vec[0]
        weight = _right(weight, kron.A) + per_group(d_a, weight) * weight if _nonzero(d_a) else _right(weight, kron.A)
        weight = _left(kron.B, weight) + per_group(d_b, weight) * weight if _nonzero(d_b) else _left(kron.B, weight)
        bias = vec[1]
        if bias is not None:
            column = bias.unsqueeze(-1)
            bias_b = _left(kron.B, column)
            bias = (bias_b + per_group(d_b, column) * column if _nonzero(d_b) else bias_b).squeeze(-1)
        return weight, bias
    weight, bias = _unit_apply(matrix.unit.data, vec)
    if _nonzero(d_a):
        weight, bias = weight + d_a * vec[0], bias + d_a * vec[1]
    return weight, bias


def _nonzero(damping: Union[float, Tensor]) -> bool:
    """Whether a damping is added; a device tensor (π-split, always > 0) is, without reading it."""
    return isinstance(damping, Tensor) or damping != 0


def gram(x: BlockVector, y: BlockVector) -> Tensor:
    """All inner products ⟨x_i, y_j⟩ of two stacks, summed over weight and bias: a (k_x, k_y) tensor,
    one small matrix product instead of k_x·k_y elementwise passes."""
    kx, ky = x[0].shape[0], y[0].shape[0]
    out = x[0].reshape(kx, -1) @ y[0].reshape(ky, -1).T
    if x[1] is not None:
        out = out + x[1].reshape(kx, -1) @ y[1].reshape(ky, -1).T
    return out


def matrix_tensors(matrix: SymMatrix) -> List[Tensor]:
    """The stored curvature of a block (Kronecker factors, unit-wise 2×2 blocks), not its inverses."""
    out = []
    if matrix.has_kron:
        out += [t for t in (matrix.kron.A, matrix.kron.B) if t is not None]
    if matrix.has_unit and matrix.unit.data is not None:
        out.append(matrix.unit.data)
    return out


def has_inverse(matrix: Any) -> bool:
    return matrix is not None and (matrix.kron.has_inv if matrix.has_kron else matrix.unit.has_inv)
