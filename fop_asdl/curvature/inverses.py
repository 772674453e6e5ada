"""Inverses of a block's damped curvature, robust and bit-reproducible.

ASDL inverts damped factors with a Cholesky factorisation, which raises on factors that rounding left
indefinite (seen on a small LayerNorm model at damping 1e-2). An eigendecomposition with an eigenvalue
floor gives a usable inverse instead of ending the run. ASDL also adds the damping to a factor's diagonal
in place and subtracts it again; the diagonals are put back exactly, so an inverse rebuilt after a failed
step is bit for bit the one it replaces.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterable, List

import torch
from asdl.symmatrix import Kron, SymMatrix
from torch import nn

__all__ = ["drop_inverses", "kron_damping", "rebuild_inverses", "robust_update_inv"]


# ASDL inverts damped factors with a Cholesky factorisation, which raises on factors that rounding left
# indefinite (seen on a small LayerNorm model at damping 1e-2). An eigendecomposition with an
# eigenvalue floor gives a usable inverse instead of ending the run.
def kron_damping(kron: Kron, damping: float, eps: float = 1e-7) -> tuple[float, float]:
    """The π-split damping (d_A, d_B) that ``asdl.Kron.update_inv`` adds to A and B."""
    a_mean = (kron.A.trace() if kron.A_is_square else torch.sum(kron.A ** 2)) / kron.A_dim
    b_mean = (kron.B.trace() if kron.B_is_square else torch.sum(kron.B ** 2)) / kron.B_dim
    pi = float(torch.sqrt(a_mean / b_mean))
    if pi == 0 or pi == float("inf") or pi != pi:
        return damping, damping
    r = damping ** 0.5
    return max(r * pi, eps), max(r / pi, eps)


def _floored_inverse(mat: torch.Tensor, damping: float) -> torch.Tensor:
    """Inverse of ``mat + damping I`` (batched) with eigenvalues floored to stay positive."""
    sym = 0.5 * (mat + mat.transpose(-1, -2)).double()
    eigvals, eigvecs = torch.linalg.eigh(sym)
    eigvals = eigvals + damping
    floor = torch.clamp(eigvals.abs().amax(dim=-1, keepdim=True) * 1e-6, min=max(damping, 1e-12))
    eigvals = torch.maximum(eigvals, floor)
    inv = (eigvecs / eigvals.unsqueeze(-2)) @ eigvecs.transpose(-1, -2)
    return inv.to(mat.dtype)


def _gram(mat: torch.Tensor) -> torch.Tensor:
    """The covariance a (possibly non-square, SKFAC) factor stands for."""
    return mat if mat.shape[0] == mat.shape[1] else mat.T @ mat


def _inverse_is_usable(matrix: SymMatrix, damping: float) -> bool:
    """Finite inverses of positive definite damped blocks (one host sync, at inverse updates only).

    ASDL's unit-wise inverse (torch.inverse) does not fail on an indefinite 2×2 block, and a negative
    trace makes its π-damping NaN, so success of ``update_inv`` alone proves nothing.
    """
    inverses = [matrix.kron.A_inv, matrix.kron.B_inv] if matrix.has_kron else []
    inverses += [matrix.unit.inv] if matrix.has_unit else []
    if any(inv is None for inv in inverses):  # ASDL leaves the inverse of an all-zero factor unset
        return False
    checks = []
    if matrix.has_kron:
        checks += [torch.isfinite(matrix.kron.A_inv).all(), torch.isfinite(matrix.kron.B_inv).all()]
    if matrix.has_unit:
        eye = torch.eye(2, dtype=matrix.unit.data.dtype, device=matrix.unit.data.device)
        info = torch.linalg.cholesky_ex(matrix.unit.data + damping * eye).info
        checks += [(info == 0).all(), torch.isfinite(matrix.unit.inv).all()]
    return bool(torch.stack(checks).all())


@contextlib.contextmanager
def _diagonals_kept(matrix: SymMatrix):
    """ASDL inverts by adding the damping to a factor's diagonal in place and subtracting it again, which
    moves the diagonal's last bits. The diagonals are put back exactly (an O(n) copy), so the curvature
    after an inversion is bit for bit the one before, and an inverse rebuilt from it is the same."""
    tensors = [t for t in ((matrix.kron.A, matrix.kron.B) if matrix.has_kron else ()) if t is not None
               and t.ndim == 2 and t.shape[0] == t.shape[1]]
    diagonals = [t.diagonal() for t in tensors] + ([matrix.unit.data.diagonal(dim1=1, dim2=2)]
                                                   if matrix.has_unit else [])
    saved = [d.clone() for d in diagonals]
    try:
        yield
    finally:
        for diagonal, original in zip(diagonals, saved):
            diagonal.copy_(original)


def robust_update_inv(matrix: SymMatrix, damping: float, name: str, warned: set) -> None:
    """``matrix.update_inv(damping)`` with an eigenvalue-floor fallback, warning once per block. The
    factors come out bit-identical (:func:`_diagonals_kept`)."""
    try:
        with _diagonals_kept(matrix):
            matrix.update_inv(damping)
        if _inverse_is_usable(matrix, damping):
            return
    except torch.linalg.LinAlgError:
        pass
    if name not in warned:
        warned.add(name)
        warnings.warn(f"fop_asdl: curvature of block '{name}' is not positive definite after damping "
                      f"{damping:g}; using an eigenvalue-floored inverse for it.", RuntimeWarning)
    if matrix.has_kron:
        kron = matrix.kron
        damping_a, damping_b = kron_damping(kron, damping)
        kron.A_inv = _floored_inverse(_gram(kron.A), damping_a)
        kron.B_inv = _floored_inverse(_gram(kron.B), damping_b)
    if matrix.has_unit:
        matrix.unit.inv = _floored_inverse(matrix.unit.data, damping)


def drop_inverses(named_matrices: Iterable) -> List[str]:
    """Free the inverses of every (name, matrix) that has them; the names of those blocks. The factors stay,
    so :func:`rebuild_inverses` restores the inverses bit for bit should the step fail."""
    dropped = []
    for name, matrix in named_matrices:
        if matrix is None or not (matrix.kron.has_inv if matrix.has_kron else matrix.unit.has_inv):
            continue
        if matrix.has_kron:
            matrix.kron.A_inv = matrix.kron.B_inv = None
        else:
            matrix.unit.inv = None
        dropped.append(name)
    return dropped


def rebuild_inverses(matrices: Dict[str, SymMatrix], damping: float, warned: set) -> None:
    """The inverses of ``matrices`` (by block name) again, as :func:`robust_update_inv` built them."""
    for name, matrix in matrices.items():
        robust_update_inv(matrix, damping, name, warned)
