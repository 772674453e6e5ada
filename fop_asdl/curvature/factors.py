"""Kronecker factors beyond ASDL's dense square ones, and the products, damping and inverses of every kind.

A Kron block's F = B ⊗ A acts on its weight W as stored (a Conv weight as the (rows, cols) matrix its
curvature is defined on) as ``B @ W @ A``: B on the rows, A on the columns, the bias (one entry per row)
by B alone. A factor is

* a dense square matrix (ASDL's Linear and Conv2d factors);
* a non-square matrix X standing for XᵀX (ASDL's SKFAC factors, ``swift=True``);
* a vector f standing for diag(f): an Embedding's token counts, which a dense V×V matrix would hold on
  its diagonal only (:mod:`fop_asdl.curvature.layer_ops`);
* a stack (G, n, n), one factor per group of a grouped convolution: both factors are stacked, the rows of
  W split into G equal parts, and part g gets B_g W_g A_g; F = ⊕_g B_g ⊗ A_g, each group damped and
  inverted as a layer of its own.

Nothing here syncs with the host except what ASDL's own inversion does (its all-zero check).
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

__all__ = ["damped_inverse", "is_plain", "left", "mean_eigenvalue", "per_group", "pi_damping", "right"]

Damping = Union[float, Tensor]


def is_plain(factor: Tensor) -> bool:
    """A dense or SKFAC matrix: what ASDL's own Kron code handles."""
    return factor.dim() == 2


def _grouped(w: Tensor, groups: int) -> Tensor:
    """(k, rows, cols) as (k, G, rows / G, cols)."""
    return w.reshape(w.shape[0], groups, w.shape[1] // groups, w.shape[2])


def left(factor: Tensor, w: Tensor) -> Tensor:
    """B @ w for a stack w (k, rows, cols)."""
    if factor.dim() == 1:
        return factor[:, None] * w
    if factor.dim() == 3:
        return torch.matmul(factor, _grouped(w, factor.shape[0])).reshape(w.shape)
    if factor.shape[0] == factor.shape[1]:
        return torch.matmul(factor, w)
    return torch.matmul(factor.T, torch.matmul(factor, w))


def right(w: Tensor, factor: Tensor) -> Tensor:
    """w @ A for a stack w (k, rows, cols)."""
    if factor.dim() == 1:
        return w * factor
    if factor.dim() == 3:
        return torch.matmul(_grouped(w, factor.shape[0]), factor).reshape(w.shape)
    k, rows, cols = w.shape
    flat = w.reshape(k * rows, cols)
    flat = flat @ factor if factor.shape[0] == factor.shape[1] else (flat @ factor.T) @ factor
    return flat.view(k, rows, cols)


def per_group(damping: Damping, w: Tensor) -> Damping:
    """A damping that is one value per group (a tensor (G,)), spread over the rows of a stack w (k, rows,
    cols); a float or 0-d tensor as it is."""
    if not isinstance(damping, Tensor) or damping.dim() == 0:
        return damping
    return damping.to(w.dtype).repeat_interleave(w.shape[1] // damping.shape[0]).view(1, -1, 1)


def mean_eigenvalue(factor: Tensor) -> Tensor:
    """trace / dimension of what the factor stands for; one per group for a stack."""
    if factor.dim() == 1:
        return factor.mean()
    if factor.dim() == 3:
        return factor.diagonal(dim1=-2, dim2=-1).mean(-1)
    if factor.shape[0] == factor.shape[1]:
        return factor.trace() / factor.shape[-1]
    return torch.sum(factor ** 2) / factor.shape[-1]


def pi_damping(a: Tensor, b: Tensor, damping: float, eps: float = 1e-7) -> Tuple[Tensor, Tensor]:
    """ASDL's π-split damping (d_A, d_B) = (√λ π, √λ / π), π = √(mean eig A / mean eig B), floored at
    ``eps``; λ on both where π is 0, infinite or NaN. One value per group for stacked factors."""
    pi = torch.sqrt(mean_eigenvalue(a) / mean_eigenvalue(b))
    usable = torch.isfinite(pi) & (pi > 0)
    r = damping ** 0.5
    fallback = torch.full_like(pi, damping)
    d_a = torch.where(usable, torch.clamp(r * pi, min=eps), fallback)
    d_b = torch.where(usable, torch.clamp(r / torch.where(usable, pi, 1.0), min=eps), fallback)
    return d_a, d_b


def damped_inverse(factor: Tensor, damping: Tensor) -> Tuple[Tensor, Tensor]:
    """((factor + d I)⁻¹, whether it is usable as a 0-d device tensor) of a vector (elementwise) or a stack
    (batched Cholesky with its error codes kept on the device); the factor is not touched."""
    if factor.dim() == 1:
        damped = factor + damping
        inverse = 1.0 / damped
        return inverse, (damped > 0).all() & torch.isfinite(inverse).all()
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    chol, info = torch.linalg.cholesky_ex(factor + torch.as_tensor(damping).reshape(-1, 1, 1) * eye)
    try:
        inverse = torch.cholesky_inverse(chol)
    except torch.linalg.LinAlgError:  # CPU only, on a zero pivot of a failed factorisation
        return torch.zeros_like(factor), torch.zeros((), dtype=torch.bool, device=factor.device)
    return inverse, (info == 0).all() & torch.isfinite(inverse).all()
