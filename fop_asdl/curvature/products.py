"""Curvature products of one block, on ASDL's stored matrices, for several vectors at once.

A block vector is ``(weight, bias)`` with a leading dimension k that stacks k vectors, so the two FOP
gradients share one product. Kron blocks (Linear, Conv2d) hold ``weight`` as (k, out, in) and ``bias``
as (k, out) or None; F = B ⊗ A acts as ``B @ W @ A`` and on the bias as ``B`` alone, exactly as
``asdl.Kron.mvp`` does. Unit-wise blocks (BatchNorm, LayerNorm) hold (k, f) for both and a 2×2 matrix
per unit.
"""
from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
from asdl.symmatrix import SymMatrix
from torch import Tensor

from ..engine.vectors import BlockVector, cast

__all__ = ["apply_inverse", "apply_metric", "gram", "matrix_tensors", "has_inverse"]


def _right(w: Tensor, factor: Tensor) -> Tensor:
    """w @ A for a stack w (k, out, in); a non-square SKFAC factor X stands for A = XᵀX."""
    k, out, n_in = w.shape
    flat = w.reshape(k * out, n_in)
    flat = flat @ factor if factor.shape[0] == factor.shape[1] else (flat @ factor.T) @ factor
    return flat.view(k, out, n_in)


def _left(factor: Tensor, w: Tensor) -> Tensor:
    """B @ w for w (k, out, ...) stacked along dim 0; a non-square factor X stands for B = XᵀX."""
    if factor.shape[0] == factor.shape[1]:
        return torch.matmul(factor, w)
    return torch.matmul(factor.T, torch.matmul(factor, w))


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
        weight = _right(weight, kron.A) + d_a * weight if _nonzero(d_a) else _right(weight, kron.A)
        weight = _left(kron.B, weight) + d_b * weight if _nonzero(d_b) else _left(kron.B, weight)
        bias = vec[1]
        if bias is not None:
            bias_b = _left(kron.B, bias.unsqueeze(-1)).squeeze(-1)
            bias = bias_b + d_b * bias if _nonzero(d_b) else bias_b
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
