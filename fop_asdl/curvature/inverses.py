"""Inverses of a block's damped curvature, robust, bit-reproducible, and with one host sync for all blocks.

ASDL inverts damped factors with a Cholesky factorisation, which raises on factors that rounding left
indefinite (seen on a small LayerNorm model at damping 1e-2). An eigendecomposition with an eigenvalue
floor gives a usable inverse instead of ending the run. ASDL also adds the damping to a factor's diagonal
in place and subtracts it again; the diagonals are put back exactly, so an inverse rebuilt after a failed
step is bit for bit the one it replaces.

ASDL's ``update_inv`` reads the device about 7 times per block (its π tests, its all-zero tests, the
Cholesky error checks), and checking the result read it once more: on a GPU, a pipeline stall each. The
same operations run here (bit for bit the same inverses) with every decision kept on the device, and one
host read per inverse update tells which blocks need the fallback (:func:`invert_all`).

The inverses are taken in the maker's ``inverse_dtype`` (:mod:`fop_asdl.engine.precision`); factors in
another dtype are cast once per inversion (a copy only then), the stored factors stay as they are.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Iterable, List, Tuple, Union

import torch
from asdl.symmatrix import Kron, SymMatrix, UnitWise
from torch import Tensor

from . import factors

__all__ = ["drop_inverses", "invert_all", "kron_damping", "pi_damping", "rebuild_inverses", "robust_update_inv"]

Damping = Union[float, Tensor]


def pi_damping(kron: Kron, damping: float, eps: float = 1e-7) -> Tuple[Tensor, Tensor]:
    """The π-split damping (d_A, d_B) of the fallback and of FOP's damped metric, as 0-d float64 device
    tensors (no host sync): the values :func:`kron_damping` reads off. For a diagonal or per-group factor
    (:mod:`fop_asdl.curvature.factors`) the same split, one value per group."""
    if not (factors.is_plain(kron.A) and factors.is_plain(kron.B)):
        return factors.pi_damping(kron.A, kron.B, damping, eps)
    a_mean = (kron.A.trace() if kron.A_is_square else torch.sum(kron.A ** 2)) / kron.A_dim
    b_mean = (kron.B.trace() if kron.B_is_square else torch.sum(kron.B ** 2)) / kron.B_dim
    pi = torch.sqrt(a_mean / b_mean).double()
    usable = (pi != 0) & (pi != float("inf")) & (pi == pi)
    r = torch.full_like(pi, damping ** 0.5)  # a tensor: float / tensor is float · (1 / tensor), not division
    fixed = torch.full_like(pi, damping)
    return (torch.where(usable, torch.clamp(r * pi, min=eps), fixed),
            torch.where(usable, torch.clamp(r / pi, min=eps), fixed))


def kron_damping(kron: Kron, damping: float, eps: float = 1e-7) -> tuple:
    """:func:`pi_damping` as Python floats (one host read); as tensors for a diagonal or per-group factor."""
    if not (factors.is_plain(kron.A) and factors.is_plain(kron.B)):
        return pi_damping(kron, damping, eps)
    d_a, d_b = torch.stack(pi_damping(kron, damping, eps)).tolist()
    return d_a, d_b


def _floored_inverse(mat: torch.Tensor, damping: Damping, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``mat + damping I`` (batched; a vector stands for its diagonal matrix) in ``dtype`` with
    eigenvalues floored to stay positive; ``damping`` a number or one per matrix of the batch."""
    damping = torch.as_tensor(damping, dtype=torch.float64, device=mat.device)
    damping = damping.reshape(-1, 1) if damping.dim() else damping
    minimum = torch.clamp(damping, min=1e-12)
    if mat.dim() == 1:  # diag(f): its eigenvalues are f
        eigvals = mat.double() + damping
        floor = torch.maximum(eigvals.abs().amax() * 1e-6, minimum)
        return (1.0 / torch.maximum(eigvals, floor)).to(dtype)
    sym = 0.5 * (mat + mat.transpose(-1, -2)).double()
    eigvals, eigvecs = torch.linalg.eigh(sym)
    eigvals = eigvals + damping
    floor = torch.maximum(eigvals.abs().amax(dim=-1, keepdim=True) * 1e-6, minimum)
    eigvals = torch.maximum(eigvals, floor)
    inv = (eigvecs / eigvals.unsqueeze(-2)) @ eigvecs.transpose(-1, -2)
    return inv.to(dtype)


def _gram(mat: torch.Tensor) -> torch.Tensor:
    """The covariance a (possibly non-square, SKFAC) factor stands for; a vector or stack as it is."""
    return mat if not factors.is_plain(mat) or mat.shape[0] == mat.shape[1] else mat.T @ mat


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


# --- ASDL's update_inv, its decisions kept on the device ---------------------------------------------
def _asdl_damping(kron: Kron, damping: float, eps: float = 1e-7) -> Tuple[Damping, Damping]:
    """``asdl.Kron.update_inv``'s π-split damping: ``max(√λ π, eps)`` in the factors' dtype where π is
    neither 0 nor inf, else λ; ``torch.where`` in place of its ``if`` (the same values, as tensors)."""
    if not (kron.has_A and kron.has_B):
        return damping, damping
    if not (factors.is_plain(kron.A) and factors.is_plain(kron.B)):  # no ASDL precedent: NaN π gives λ
        return factors.pi_damping(kron.A, kron.B, damping, eps)
    a_mean = (kron.A.trace() if kron.A_is_square else torch.sum(kron.A ** 2)) / kron.A_dim
    b_mean = (kron.B.trace() if kron.B_is_square else torch.sum(kron.B ** 2)) / kron.B_dim
    pi = torch.sqrt(a_mean / b_mean)
    usable = (pi != 0) & (pi != float("inf"))  # NaN passes, as in ASDL: the inverse then fails the check
    r = damping ** 0.5
    fixed = torch.full_like(pi, damping)
    return (torch.where(usable, torch.clamp(r * pi, min=eps), fixed),
            torch.where(usable, torch.clamp(r / pi, min=eps), fixed))


def _factor_inverse(factor: Tensor, damping: Damping, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(inverse of factor + damping I in ``dtype``, whether it is usable): ``asdl.utils.cholesky_inv``
    (square) or ``smw_inv`` (SKFAC) with the ``_ex`` solvers, whose error codes stay on the device. ASDL skips
    an all-zero factor; it is marked unusable here, which gives it the fallback it got before. A diagonal or
    per-group factor: :func:`fop_asdl.curvature.factors.damped_inverse`."""
    factor = factor.to(dtype)  # a copy only for another dtype; the damping below is undone on it either way
    ok = ~torch.all(factor == 0)
    if not factors.is_plain(factor):
        inverse, usable = factors.damped_inverse(factor, damping)
        return inverse.to(dtype), ok & usable
    if factor.shape[0] == factor.shape[1]:
        diag = torch.diagonal(factor)
        diag += damping
        chol, info = torch.linalg.cholesky_ex(factor)
        diag -= damping
        try:
            inverse = torch.cholesky_inverse(chol)
        except torch.linalg.LinAlgError:  # CPU only, on a zero pivot of a failed factorisation
            return torch.zeros_like(factor), torch.zeros_like(ok)
    else:
        n, d = factor.shape
        eye = torch.eye(d, dtype=dtype, device=factor.device)
        gram = factor @ factor.T
        diag = torch.diagonal(gram)
        diag += damping * n
        solved, info = torch.linalg.solve_ex(gram, factor)
        inverse = (eye - factor.T @ solved) / damping
    return inverse, ok & (info == 0) & torch.isfinite(inverse).all()


def _unit_inverse(unit: UnitWise, damping: float, dtype: torch.dtype) -> Tensor:
    """``asdl.UnitWise.update_inv`` with ``linalg.inv_ex``, in ``dtype``; whether the inverse is usable.
    ASDL's unit-wise inverse does not fail on an indefinite 2×2 block, so definiteness is checked too."""
    data = unit.data.to(dtype)
    ok = ~torch.all(data == 0)
    diag = torch.diagonal(data, dim1=1, dim2=2)
    diag += damping
    unit.inv = torch.linalg.inv_ex(data).inverse
    definite = torch.linalg.cholesky_ex(data).info == 0
    diag -= damping
    return ok & definite.all() & torch.isfinite(unit.inv).all()


def _asdl_inverses(matrix: SymMatrix, damping: float, dtype: torch.dtype) -> Tensor:
    """``matrix.update_inv(damping)``'s inverses (bit for bit in the factors' dtype) in ``dtype``, without a
    host sync; whether they are usable, as a 0-d device tensor."""
    checks = []
    if matrix.has_kron:
        kron = matrix.kron
        if not kron.has_data:
            raise ValueError("data do not exist.")
        damping_a, damping_b = _asdl_damping(kron, damping)
        kron.A_inv, ok_a = _factor_inverse(kron.A, damping_a, dtype)
        kron.B_inv, ok_b = _factor_inverse(kron.B, damping_b, dtype)
        checks += [ok_a, ok_b]
    if matrix.has_unit:
        checks.append(_unit_inverse(matrix.unit, damping, dtype))
    if not checks:
        raise ValueError("fop_asdl inverts Kronecker-factored and unit-wise curvature only.")
    return torch.stack(checks).all()


def _fall_back(matrix: SymMatrix, damping: float, name: str, warned: set, dtype: torch.dtype) -> None:
    """The eigenvalue-floored inverses of a block whose damped curvature is not positive definite."""
    if name not in warned:
        warned.add(name)
        warnings.warn(f"fop_asdl: curvature of block '{name}' is not positive definite after damping "
                      f"{damping:g}; using an eigenvalue-floored inverse for it.", RuntimeWarning)
    if matrix.has_kron:
        kron = matrix.kron
        damping_a, damping_b = pi_damping(kron, damping)
        kron.A_inv = _floored_inverse(_gram(kron.A), damping_a, dtype)
        kron.B_inv = _floored_inverse(_gram(kron.B), damping_b, dtype)
    if matrix.has_unit:
        matrix.unit.inv = _floored_inverse(matrix.unit.data, damping, dtype)


def invert_all(named_matrices: Iterable[Tuple[str, SymMatrix]], damping: float, warned: set,
               dtype: torch.dtype) -> None:
    """Every (name, matrix)'s inverses as ``update_inv(damping)`` builds them, in ``dtype``, with an
    eigenvalue-floor fallback (warning once per block, ``warned`` holds the names). One host read for all
    blocks; the factors come out bit-identical (:func:`_diagonals_kept`)."""
    pending: List[Tuple[str, SymMatrix, Tensor]] = []
    for name, matrix in named_matrices:
        with _diagonals_kept(matrix):
            pending.append((name, matrix, _asdl_inverses(matrix, damping, dtype)))
    if not pending:
        return
    usable = torch.stack([flag for _, _, flag in pending]).tolist()  # the one host sync
    for (name, matrix, _), ok in zip(pending, usable):
        if not ok:
            _fall_back(matrix, damping, name, warned, dtype)


def robust_update_inv(matrix: SymMatrix, damping: float, name: str, warned: set) -> None:
    """One block's :func:`invert_all`, in its factors' dtype."""
    dtype = (matrix.kron.A if matrix.has_kron else matrix.unit.data).dtype
    invert_all([(name, matrix)], damping, warned, dtype)


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


def rebuild_inverses(matrices: Dict[str, SymMatrix], damping: float, warned: set, dtype: torch.dtype) -> None:
    """The inverses of ``matrices`` (by block name) again, as :func:`invert_all` built them."""
    invert_all(matrices.items(), damping, warned, dtype)
