"""HyLo's per-layer math (HYLO_SPEC §2.1-§2.4) as pure tensor functions.

Nothing here knows about ASDL, hooks, modules or ranks. The three phases the maker wires are separate:

* per rank, on a refresh step: ``linear_rows`` / ``conv2d_rows`` reduce one layer's captured input and
  output gradient to per-sample rows (A_i, G_i); ``kis_select`` or ``kid_select`` keeps r_loc of them;
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
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LocalFactors", "LowRankFactors", "linear_rows", "conv2d_patch_sums", "conv2d_rows", "kernel",
    "jacobian_apply", "jacobian_transpose_apply", "exact_sngd", "kis_probabilities", "kis_select",
    "kid_select", "kis_factors", "kid_factors", "apply_factors", "precondition", "prefactor",
]

IntPair = Union[int, Tuple[int, int]]
REDUCTIONS = ("mean", "sum", "scaled_mean")
TOKEN_REDUCTIONS = ("flatten",) + REDUCTIONS
SCALINGS = ("consistent", "reference")


@dataclass
class LocalFactors:
    """One rank's reduced rows of one layer: what it contributes to the all-gather (§4)."""

    a: Tensor  # (r_loc, d_a)
    g: Tensor  # (r_loc, d_g)
    y: Optional[Tensor]  # (r_loc, r_loc) for KID, None for KIS
    index: Tensor  # which local rows were kept (for logging and tests; not sent)


@dataclass
class LowRankFactors:
    """The stored operator of one layer: V ↦ (1/α)[V − scale · Uˢᵀ M Uˢ V] (§2.3 step 6, §2.4 step 9)."""

    a: Tensor  # (r, d_a)
    g: Tensor  # (r, d_g)
    matrix: Tensor  # M, (r, r)
    scale: float  # c_P


def _choice(name: str, value: str, options: Sequence[str]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}.")
    return value


def _factor_dtype(t: Tensor) -> Tensor:
    """Half-precision captures are factorised in fp32 (§2.6: all factor math in fp32)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_rows(a: Tensor, g: Tensor) -> int:
    if a.dim() != 2 or g.dim() != 2:
        raise ValueError(f"a and g must be 2-D (rows, width), got shapes {tuple(a.shape)} and "
                         f"{tuple(g.shape)}; build them with linear_rows or conv2d_rows.")
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
                conv_reduction: str = "mean") -> Tuple[Tensor, Tensor]:
    """Per-sample rows (A, G) of an nn.Conv2d (groups=1, zero padding), reduced over the S positions.

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
    return _reduce(a_sum, grad_out.sum((2, 3)), positions, bias, conv_reduction)


def kernel(a: Tensor, g: Tensor, scale: float) -> Tensor:
    """scale · (A Aᵀ ∘ G Gᵀ) = scale · U Uᵀ, without forming U."""
    return scale * (a @ a.T) * (g @ g.T)


def jacobian_apply(a: Tensor, g: Tensor, v: Tensor) -> Tensor:
    """U V: entry j is g_jᵀ V a_j."""
    return ((a @ v.T) * g).sum(1)


def jacobian_transpose_apply(a: Tensor, g: Tensor, y: Tensor) -> Tensor:
    """Uᵀ y = Σ_j y_j g_j a_jᵀ, shaped like V."""
    return g.T @ (y[:, None] * a)


def apply_factors(v: Tensor, factors: LowRankFactors, damping: Union[float, Tensor]) -> Tensor:
    """(1/α)[V − c_P Uˢᵀ M Uˢ V] on a combined (d_g, d_a) gradient, in the rows' dtype (M's products in its
    own), returned in V's. Per-step path: no host sync."""
    f = factors
    dtype = f.a.dtype
    y = (f.matrix @ jacobian_apply(f.a, f.g, v.to(dtype)).to(f.matrix.dtype)).to(dtype)
    return ((v.to(dtype) - f.scale * jacobian_transpose_apply(f.a, f.g, y)) / damping).to(v.dtype)


def precondition(grad_weight: Tensor, grad_bias: Optional[Tensor], factors: LowRankFactors,
                 damping: Union[float, Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """Precondition a layer's current mean gradient with the stored (possibly stale) factors.

    The bias is preconditioned jointly as the last column; ``damping`` must be the α the factors
    were built with. Per-step path: no host sync.
    """
    v = grad_weight.reshape(grad_weight.shape[0], -1)
    if grad_bias is not None:
        v = torch.cat([v, grad_bias.reshape(-1, 1)], 1)
    if v.shape != (factors.g.shape[1], factors.a.shape[1]):
        raise ValueError(f"gradient of shape {tuple(v.shape)} (bias as last column) does not match the "
                         f"factors' (d_g, d_a) = ({factors.g.shape[1]}, {factors.a.shape[1]}); was the "
                         f"bias flag the same when the rows were built?")
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
                total_rows: Optional[int] = None, reweighted: bool = False) -> LowRankFactors:
    """Owner, KIS (§2.3 step 5): M = (c K̂ + αI)⁻¹ by Cholesky, from the gathered rows.

    c = 1/r: exact SNGD on the sampled sub-batch. With ``reweighted`` rows (an unbiased estimate of
    UᵀU) the consistent c is 1/N and needs ``total_rows`` = N; "reference" always uses 1/r. A failed
    factorisation (NaN/Inf rows) gives a NaN M rather than an exception, so that the step's finiteness
    check reports it on every rank alike (no host sync here).
    """
    _check_damping(damping)
    rows = _check_rows(a_s, g_s)
    scale = prefactor("kis", rows, kernel_scaling=kernel_scaling, total_rows=total_rows, reweighted=reweighted)
    eye = torch.eye(rows, dtype=a_s.dtype, device=a_s.device)
    chol, info = torch.linalg.cholesky_ex(kernel(a_s, g_s, scale) + damping * eye)
    matrix = torch.where(info == 0, torch.cholesky_inverse(chol), torch.full_like(chol, math.nan))
    return LowRankFactors(a_s, g_s, matrix, scale)


def exact_sngd(a: Tensor, g: Tensor, v: Tensor, damping: float) -> Tensor:
    """The reference operator (§2.2): (F + αI)⁻¹ V with F = (1/N) UᵀU, by SMW on all N rows."""
    return apply_factors(v, kis_factors(a, g, damping), damping)


def kis_probabilities(a: Tensor, g: Tensor, probability: str = "norm_sq") -> Tensor:
    """P(j) ∝ ‖a_j‖²‖g_j‖² = ‖û_j‖² (code, default) or ‖a_j‖‖g_j‖ (paper text); uniform if all zero or
    any is NaN/Inf (multinomial would raise; the rows' NaN then reaches the finiteness check)."""
    _choice("kis_probability", probability, ("norm_sq", "norm"))
    scores = a.square().sum(1) * g.square().sum(1)
    if probability == "norm":
        scores = scores.sqrt()
    total = scores.sum()
    return torch.where(torch.isfinite(total) & (total > 0), scores / total.clamp_min(torch.finfo(scores.dtype).tiny),
                       torch.full_like(scores, 1.0 / scores.numel()))


def kis_select(a: Tensor, g: Tensor, rank: int, generator: torch.Generator, *,
               probability: str = "norm_sq", reweight: bool = False) -> LocalFactors:
    """Per rank, KIS (§2.3 steps 1-3): draw ``rank`` rows with P(j) ∝ score from ``generator``.

    Default: without replacement and no reweighting (the authors' code). ``reweight=True`` is the
    RandNLA estimator: with replacement, row j scaled by 1/sqrt(rank·p_j) (pass ``reweighted=True``
    to ``kis_factors``).
    """
    rows = _check_rows(a, g)
    _check_rank(rank, rows)
    p = kis_probabilities(a, g, probability)
    # a floor of the smallest normal number keeps multinomial valid when fewer than `rank` rows score > 0
    index = torch.multinomial(p + torch.finfo(p.dtype).tiny, rank, replacement=reweight,
                              generator=generator)
    a_s, g_s = a[index], g[index]
    if reweight:
        a_s = a_s / (rank * p[index]).clamp_min(torch.finfo(p.dtype).tiny).sqrt()[:, None]
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
               total_rows: Optional[int] = None, skeleton: str = "norm_sort") -> LocalFactors:
    """Per rank, KID (Alg. 2, §2.4 steps 1-6): keep ``rank`` skeleton rows and Y_i = W (E + αI)⁻¹ Wᵀ.

    The local Gram is scaled by c_Q = 1/N ("consistent", needs ``total_rows`` = N) or 1 ("reference").
    Skeleton: rows sorted by ‖a‖²‖g‖² (the authors' code) or column-pivoted QR of the Gram.
    """
    _choice("kernel_scaling", kernel_scaling, SCALINGS)
    _choice("kid_skeleton", skeleton, ("norm_sort", "pivoted_qr"))
    _check_damping(damping)
    m = _check_rows(a, g)
    _check_rank(rank, m)
    gram_scale = _consistent_scale(kernel_scaling, total_rows, 1.0)
    scores = a.square().sum(1) * g.square().sum(1)
    order = torch.argsort(scores, descending=True, stable=True)
    if skeleton == "pivoted_qr":
        order = order[_pivot_order(kernel(a[order], g[order], gram_scale), rank)]
    a, g = a[order], g[order]
    q = kernel(a, g, gram_scale)
    eye = torch.eye(m, dtype=a.dtype, device=a.device)
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
                total_rows: Optional[int] = None) -> LowRankFactors:
    """Owner, KID (eq. 8, §2.4 step 8): M = Y − Y (K̂⁻¹ + Y)⁻¹ Y with Y = blockdiag(Y_1..Y_P).

    Computed as M = (I + Y K̂)⁻¹ Y, equal to the spec's Y − Y K̂ (I + Y K̂)⁻¹ Y by push-through: it needs
    no inverse of the undamped K̂ and, unlike the difference, no cancellation (at r = m it is
    (K̂ + αI)⁻¹ to rounding even for small α). One LU solve. c_K = c_P = 1/N or 1/r.
    """
    rows = _check_rows(a_s, g_s)
    y = torch.block_diag(*y_blocks)
    if y.shape != (rows, rows):
        raise ValueError(f"the Y blocks make a {tuple(y.shape)} matrix but there are {rows} gathered "
                         f"rows; pass every rank's Y_i in the order of its rows.")
    scale = prefactor("kid", rows, kernel_scaling=kernel_scaling, total_rows=total_rows)
    eye = torch.eye(rows, dtype=y.dtype, device=y.device)
    matrix = torch.linalg.solve_ex(eye + y @ kernel(a_s, g_s, scale), y)[0]
    return LowRankFactors(a_s, g_s, matrix, scale)
