"""HyLo's per-layer math (HYLO_SPEC §2.1-§2.4) as pure tensor functions.

Nothing here knows about ASDL, hooks, modules or ranks. The three phases the maker wires are separate:

* per rank, on a refresh step: the row builders of :mod:`fop_asdl.methods.hylo_rows` (re-exported here)
  reduce one layer's captured input and output gradient to per-sample rows (A_i, G_i), one (a, g) pair per
  group for a grouped convolution, ids and weights for an Embedding's multi-hot rows (``vocab``: the width);
  ``kis_select`` or ``kid_select`` keeps r_loc of them;
* owner, after the all-gather: ``kis_factors`` / ``kid_factors`` build the r×r matrix M;
* every step: ``precondition`` applies the stored factors to the current mean gradient (no host sync).

Refresh-time functions may sync where the algorithm needs it (``torch.multinomial``, the pivot search of
``kid_skeleton="pivoted_qr"``); failed factorisations give NaN, not exceptions; none calls ``.item()``
or branches in Python on tensor values.

A layer's gradient is handled as one matrix V (d_g × d_a) with the bias as the last column, and row j of
the Jacobian U is vec(g_j a_jᵀ), so U V = ((A Vᵀ) ∘ G) 1 and Uᵀ y = Gᵀ diag(y) A (§1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .hylo_rows import (REDUCTIONS, TOKEN_REDUCTIONS, _choice, conv2d_patch_sums, conv2d_rows, embedding_rows,
                        linear_rows)

__all__ = [
    "LocalFactors", "LowRankFactors", "linear_rows", "conv2d_patch_sums", "conv2d_rows", "embedding_rows",
    "kernel", "jacobian_apply", "jacobian_transpose_apply", "exact_sngd", "kis_probabilities", "kis_select",
    "kid_select", "kis_factors", "kid_factors", "apply_factors", "precondition", "prefactor", "widths",
    "REDUCTIONS", "TOKEN_REDUCTIONS",
]

SCALINGS = ("consistent", "reference")


@dataclass
class LocalFactors:
    """One rank's reduced rows of one layer: what it contributes to the all-gather (§4)."""

    a: Tensor  # (r_loc, d_a), (r_loc, G, d_a / G) with groups, or (r_loc, 2, K) ids and weights with a vocab
    g: Tensor  # (r_loc, d_g) or (r_loc, G, d_g / G)
    y: Optional[Tensor]  # (r_loc, r_loc) for KID, None for KIS
    index: Tensor  # which local rows were kept (for logging and tests; not sent)


@dataclass
class LowRankFactors:
    """The stored operator of one layer: V ↦ (1/α)[V − scale · Uˢᵀ M Uˢ V] (§2.3 step 6, §2.4 step 9)."""

    a: Tensor  # (r, d_a), (r, G, d_a / G), or (r, 2, K) ids and weights of multi-hot rows when vocab > 0
    g: Tensor  # (r, d_g) or (r, G, d_g / G)
    matrix: Tensor  # M, (r, r)
    scale: float  # c_P
    vocab: int = 0  # > 0: the rows of a are multi-hot vectors of this width, held as ids and weights


def _check_rows(a: Tensor, g: Tensor, vocab: int = 0) -> int:
    if vocab:
        ok = a.dim() == 3 and a.shape[1] == 2 and g.dim() == 2
    else:
        ok = a.dim() in (2, 3) and g.dim() == a.dim() and (a.dim() == 2 or a.shape[1] == g.shape[1])
    if not ok:
        raise ValueError(f"a and g must be (rows, width), or (rows, groups, width) alike, got shapes "
                         f"{tuple(a.shape)} and {tuple(g.shape)}; build them with hylo_rows.")
    if a.shape[0] != g.shape[0]:
        raise ValueError(f"a has {a.shape[0]} rows but g has {g.shape[0]}: both must hold the same "
                         f"samples in the same order (take them from one linear_rows/conv2d_rows call).")
    return a.shape[0]


def _check_rank(rank: int, rows: int) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}; use lowrank_schedule.local_rows(ρ, m), "
                         f"which is max(1, floor(ρ·m)).")
    if rank > rows:
        raise ValueError(f"rank {rank} exceeds the {rows} rows available; lower the compression ratio "
                         f"or pass rank={rows} (exact SNGD).")


def _check_damping(damping: float) -> None:
    if not damping > 0:
        raise ValueError(f"damping must be > 0 (it is the α of (F + αI)⁻¹), got {damping!r}.")


def _ids(a: Tensor) -> Tuple[Tensor, Tensor]:
    """(ids, weights), each (rows, K), of sparse multi-hot rows (:func:`~fop_asdl.methods.hylo_rows.embedding_rows`)."""
    return a[:, 0].long(), a[:, 1]


def _dense(a: Tensor, vocab: int) -> Tensor:
    """Sparse multi-hot rows as (rows, vocab): refresh time only (kernels, scores), never stored."""
    ids, weights = _ids(a)
    return weights.new_zeros(a.shape[0], vocab).scatter_add_(1, ids, weights)


def _products(a1: Tensor, g1: Tensor, a2: Tensor, g2: Tensor, vocab: int = 0) -> Tensor:
    """⟨û_i, û_j⟩ = Σ_groups (a1_i·a2_j)(g1_i·g2_j) for all row pairs (sparse multi-hot rows with a vocab)."""
    if vocab:
        return (_dense(a1, vocab) @ _dense(a2, vocab).T) * (g1 @ g2.T)
    if a1.dim() == 2:
        return (a1 @ a2.T) * (g1 @ g2.T)
    by_group = lambda x: x.transpose(0, 1)  # (G, rows, width)
    return (by_group(a1) @ by_group(a2).transpose(1, 2) * (by_group(g1) @ by_group(g2).transpose(1, 2))).sum(0)


def _scores(a: Tensor, g: Tensor, vocab: int = 0) -> Tensor:
    """‖û_j‖² of every row."""
    if vocab:
        return _dense(a, vocab).square().sum(1) * g.square().sum(1)
    if a.dim() == 2:
        return a.square().sum(1) * g.square().sum(1)
    return (a.square().sum(2) * g.square().sum(2)).sum(1)


def kernel(a: Tensor, g: Tensor, scale: float, vocab: int = 0) -> Tensor:
    """scale · (A Aᵀ ∘ G Gᵀ) = scale · U Uᵀ, without forming U."""
    return scale * _products(a, g, a, g, vocab)


def jacobian_apply(a: Tensor, g: Tensor, v: Tensor, vocab: int = 0) -> Tensor:
    """U V: entry j is g_jᵀ V a_j (per group, summed; for multi-hot rows the weighted columns of V at the ids)."""
    if vocab:
        ids, weights = _ids(a)
        return ((v.T[ids] * weights[..., None]).sum(1) * g).sum(1)
    if a.dim() == 2:
        return ((a @ v.T) * g).sum(1)
    return torch.einsum("rgi,goi,rgo->r", a, v.reshape(a.shape[1], g.shape[2], a.shape[2]), g)


def jacobian_transpose_apply(a: Tensor, g: Tensor, y: Tensor, vocab: int = 0) -> Tensor:
    """Uᵀ y = Σ_j y_j g_j a_jᵀ, shaped like V (for multi-hot rows an index_add into the columns of the ids)."""
    if vocab:
        ids, weights = _ids(a)
        columns = (y[:, None, None] * weights[..., None] * g[:, None, :]).reshape(-1, g.shape[1])
        return g.new_zeros(g.shape[1], vocab).index_add_(1, ids.reshape(-1), columns.T)
    if a.dim() == 2:
        return g.T @ (y[:, None] * a)
    return torch.einsum("rgo,r,rgi->goi", g, y, a).reshape(-1, a.shape[2])


def widths(factors: LowRankFactors) -> Tuple[int, int]:
    """(d_g, d_a) of the gradient matrix V the factors act on."""
    a, g = factors.a, factors.g
    if factors.vocab:
        return g.shape[1], factors.vocab
    return (g.shape[1], a.shape[1]) if a.dim() == 2 else (g.shape[1] * g.shape[2], a.shape[2])


def apply_factors(v: Tensor, factors: LowRankFactors, damping: Union[float, Tensor]) -> Tensor:
    """(1/α)[V − c_P Uˢᵀ M Uˢ V] on a combined (d_g, d_a) gradient, in the rows' dtype (M's products in its
    own), returned in V's. Per-step path: no host sync."""
    f = factors
    dtype = f.g.dtype
    y = (f.matrix @ jacobian_apply(f.a, f.g, v.to(dtype), f.vocab).to(f.matrix.dtype)).to(dtype)
    return ((v.to(dtype) - f.scale * jacobian_transpose_apply(f.a, f.g, y, f.vocab)) / damping).to(v.dtype)


def precondition(grad_weight: Tensor, grad_bias: Optional[Tensor], factors: LowRankFactors,
                 damping: Union[float, Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Precondition a layer's current mean gradient with the stored (possibly stale) factors.

    The bias is preconditioned jointly as the last column; ``damping`` must be the α the factors
    were built with. Per-step path: no host sync.
    """
    v = grad_weight.reshape(grad_weight.shape[0], -1)
    if grad_bias is not None:
        v = torch.cat([v, grad_bias.reshape(-1, 1)], 1)
    if tuple(v.shape) != widths(factors):
        raise ValueError(f"gradient of shape {tuple(v.shape)} (bias as last column) does not match the "
                         f"factors' (d_g, d_a) = {widths(factors)}; was the bias flag the same when the rows "
                         f"were built?")
    out = apply_factors(v, factors, damping)
    if grad_bias is None:
        return out.reshape(grad_weight.shape), None
    return out[:, :-1].reshape(grad_weight.shape), out[:, -1].reshape(grad_bias.shape)


def prefactor(method: str, rows: int, *, kernel_scaling: str = "consistent", total_rows: Optional[int] = None,
              reweighted: bool = False) -> float:
    """c_P of the stored operator (= c_K of the owner's kernel) for ``rows`` gathered rows: KIS 1/r
    (1/N for reweighted rows under "consistent"), KID 1/N ("consistent") or 1/r ("reference"). Every
    rank can compute it, so only M has to travel."""
    _choice("kernel_scaling", kernel_scaling, SCALINGS)
    _choice("method", method, ("kis", "kid"))
    if method == "kid" or reweighted:
        if method == "kis" and kernel_scaling == "consistent" and total_rows is None:
            raise ValueError("reweighted KIS rows estimate UᵀU, so pass total_rows=N (the global batch).")
        return _consistent_scale(kernel_scaling, total_rows, 1.0 / rows)
    return 1.0 / rows


def kis_factors(a_s: Tensor, g_s: Tensor, damping: float, *, kernel_scaling: str = "consistent",
                total_rows: Optional[int] = None, reweighted: bool = False, vocab: int = 0) -> LowRankFactors:
    """Owner, KIS (§2.3 step 5): M = (c K̂ + αI)⁻¹ by Cholesky, from the gathered rows.

    c = 1/r: exact SNGD on the sampled sub-batch. With ``reweighted`` rows (an unbiased estimate of
    UᵀU) the consistent c is 1/N and needs ``total_rows`` = N; "reference" always uses 1/r. A failed
    factorisation (NaN/Inf rows) gives a NaN M rather than an exception, so that the step's finiteness
    check reports it on every rank alike (no host sync here).
    """
    _check_damping(damping)
    rows = _check_rows(a_s, g_s, vocab)
    scale = prefactor("kis", rows, kernel_scaling=kernel_scaling, total_rows=total_rows, reweighted=reweighted)
    eye = torch.eye(rows, dtype=g_s.dtype, device=g_s.device)
    chol, info = torch.linalg.cholesky_ex(kernel(a_s, g_s, scale, vocab) + damping * eye)
    matrix = torch.where(info == 0, torch.cholesky_inverse(chol), torch.full_like(chol, math.nan))
    return LowRankFactors(a_s, g_s, matrix, scale, vocab)


def exact_sngd(a: Tensor, g: Tensor, v: Tensor, damping: float, vocab: int = 0) -> Tensor:
    """The reference operator (§2.2): (F + αI)⁻¹ V with F = (1/N) UᵀU, by SMW on all N rows."""
    return apply_factors(v, kis_factors(a, g, damping, vocab=vocab), damping)


def kis_probabilities(a: Tensor, g: Tensor, probability: str = "norm_sq", vocab: int = 0) -> Tensor:
    """P(j) ∝ ‖a_j‖²‖g_j‖² = ‖û_j‖² (code, default) or ‖a_j‖‖g_j‖ (paper text); uniform if all zero or
    any is NaN/Inf (multinomial would raise; the rows' NaN then reaches the finiteness check)."""
    _choice("kis_probability", probability, ("norm_sq", "norm"))
    scores = _scores(a, g, vocab)
    if probability == "norm":
        scores = scores.sqrt()
    total = scores.sum()
    return torch.where(torch.isfinite(total) & (total > 0), scores / total.clamp_min(torch.finfo(scores.dtype).tiny),
                       torch.full_like(scores, 1.0 / scores.numel()))


def kis_select(a: Tensor, g: Tensor, rank: int, generator: torch.Generator, *,
               probability: str = "norm_sq", reweight: bool = False, vocab: int = 0) -> LocalFactors:
    """Per rank, KIS (§2.3 steps 1-3): draw ``rank`` rows with P(j) ∝ score from ``generator``.

    Default: without replacement and no reweighting (the authors' code). ``reweight=True`` is the
    RandNLA estimator: with replacement, row j scaled by 1/sqrt(rank·p_j) (pass ``reweighted=True``
    to ``kis_factors``).
    """
    rows = _check_rows(a, g, vocab)
    _check_rank(rank, rows)
    p = kis_probabilities(a, g, probability, vocab)
    # a floor of the smallest normal number keeps multinomial valid when fewer than `rank` rows score > 0
    index = torch.multinomial(p + torch.finfo(p.dtype).tiny, rank, replacement=reweight,
                              generator=generator)
    a_s, g_s = a[index], g[index]
    if reweight:  # û_j = g_j a_jᵀ scaled through a (through g for one-hot rows, held as ids)
        factor = (rank * p[index]).clamp_min(torch.finfo(p.dtype).tiny).sqrt()
        if vocab:
            g_s = g_s / factor[:, None]
        else:
            a_s = a_s / factor.view(-1, *[1] * (a_s.dim() - 1))
    return LocalFactors(a_s, g_s, None, index)


def _consistent_scale(kernel_scaling: str, total_rows: Optional[int], reference: float) -> float:
    if kernel_scaling == "reference":
        return reference
    if total_rows is None or total_rows < 1:
        raise ValueError(f"kernel_scaling='consistent' scales by 1/N: pass total_rows=N, the global "
                         f"number of rows (P·m), got {total_rows!r}.")
    return 1.0 / total_rows


def _pivot_order(q: Tensor, rank: int) -> Tensor:
    """Column-pivoted QR's first ``rank`` pivots of q (greedy on the Schur complement of qᵀq, i.e. a
    partial pivoted Cholesky), then the other rows. Refresh-time only (argmax each step; no .item())."""
    m = q.shape[0]
    gram = q.T @ q
    resid = gram.diagonal().clone()
    basis = q.new_zeros(m, rank)
    priority = torch.full((m,), float(m), dtype=q.dtype, device=q.device)
    for k in range(rank):
        j = torch.argmax(resid)
        pivot = resid[j].clamp_min(torch.finfo(q.dtype).tiny).sqrt()
        col = (gram[:, j] - basis[:, :k] @ basis[j, :k]) / pivot
        basis[:, k] = col
        resid = (resid - col.square()).index_fill(0, j.reshape(1), -math.inf)
        priority = priority.index_fill(0, j.reshape(1), float(k))
    return torch.argsort(priority, stable=True)


def kid_select(a: Tensor, g: Tensor, rank: int, damping: float, *, kernel_scaling: str = "consistent",
               total_rows: Optional[int] = None, skeleton: str = "norm_sort", vocab: int = 0) -> LocalFactors:
    """Per rank, KID (Alg. 2, §2.4 steps 1-6): keep ``rank`` skeleton rows and Y_i = W (E + αI)⁻¹ Wᵀ.

    The local Gram is scaled by c_Q = 1/N ("consistent", needs ``total_rows`` = N) or 1 ("reference").
    Skeleton: rows sorted by ‖a‖²‖g‖² (the authors' code) or column-pivoted QR of the Gram.
    """
    _choice("kernel_scaling", kernel_scaling, SCALINGS)
    _choice("kid_skeleton", skeleton, ("norm_sort", "pivoted_qr"))
    _check_damping(damping)
    m = _check_rows(a, g, vocab)
    _check_rank(rank, m)
    gram_scale = _consistent_scale(kernel_scaling, total_rows, 1.0)
    scores = _scores(a, g, vocab)
    order = torch.argsort(scores, descending=True, stable=True)
    if skeleton == "pivoted_qr":
        order = order[_pivot_order(kernel(a[order], g[order], gram_scale, vocab), rank)]
    a, g = a[order], g[order]
    q = kernel(a, g, gram_scale, vocab)
    eye = torch.eye(m, dtype=g.dtype, device=g.device)
    qmat, rmat = torch.linalg.qr(q)
    r11 = rmat[:rank, :rank]
    # a numerically singular R11 (duplicate or zero rows in the skeleton) gets a tiny diagonal floor
    diag = r11.diagonal()
    tol = m * torch.finfo(q.dtype).eps * rmat.diagonal().abs().max()
    floor = torch.where(diag < 0, -tol, tol)
    r11 = r11 + torch.diag(torch.where(diag.abs() < tol, floor - diag, torch.zeros_like(diag)))
    t = torch.linalg.solve_triangular(r11, rmat[:rank, rank:], upper=True)
    w = torch.cat([eye[:rank, :rank], t], 1)  # (rank, m): Q ≈ Q[:, :rank] W
    resid = torch.zeros_like(q)
    resid[:, rank:] = qmat[:, rank:] @ rmat[rank:, rank:]  # E = Q − Q[:, :rank] W
    y = w @ torch.linalg.solve_ex(resid + damping * eye, w.T)[0]  # _ex: bad data -> NaN, never a raise
    return LocalFactors(a[:rank], g[:rank], y, order[:rank])


def kid_factors(a_s: Tensor, g_s: Tensor, y_blocks: Sequence[Tensor], *, kernel_scaling: str = "consistent",
                total_rows: Optional[int] = None, vocab: int = 0) -> LowRankFactors:
    """Owner, KID (eq. 8, §2.4 step 8): M = Y − Y (K̂⁻¹ + Y)⁻¹ Y with Y = blockdiag(Y_1..Y_P).

    Computed as M = (I + Y K̂)⁻¹ Y, equal to the spec's Y − Y K̂ (I + Y K̂)⁻¹ Y by push-through: it needs
    no inverse of the undamped K̂ and, unlike the difference, no cancellation (at r = m it is
    (K̂ + αI)⁻¹ to rounding even for small α). One LU solve. c_K = c_P = 1/N or 1/r.
    """
    rows = _check_rows(a_s, g_s, vocab)
    y = torch.block_diag(*y_blocks)
    if y.shape != (rows, rows):
        raise ValueError(f"the Y blocks make a {tuple(y.shape)} matrix but there are {rows} gathered "
                         f"rows; pass every rank's Y_i in the order of its rows.")
    scale = prefactor("kid", rows, kernel_scaling=kernel_scaling, total_rows=total_rows)
    eye = torch.eye(rows, dtype=y.dtype, device=y.device)
    matrix = torch.linalg.solve_ex(eye + y @ kernel(a_s, g_s, scale, vocab), y)[0]
    return LowRankFactors(a_s, g_s, matrix, scale, vocab)
