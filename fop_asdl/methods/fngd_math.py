"""FNGD's per-layer math (FNGD_SPEC §2.1-§2.5) as pure tensor functions.

Nothing here knows about ASDL, hooks or modules. Every function takes a layer's input ``x`` and the
gradient ``grad_out`` of the SUMMED loss at the layer's output, so row m of ``grad_out`` is the
per-sample z_m (no ×M). The per-sample gradient of (weight[, bias]) is u_m = Σ_s z_ms x̃_msᵀ, where s
runs over tokens or conv output positions (one position for a plain Linear) and x̃ ends with a 1 when
the layer has a bias. The Gram K = [u_m·u_n], the coefficients w with U w = (λI + F)⁻¹ g, and the
weighted sum d = Σ_m w_m u_m are all computed from (x, z); no value-dependent host sync anywhere.
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["FNGDCoefficients", "gram_costs", "choose_gram_strategy", "linear_gram", "conv2d_gram", "embedding_gram",
           "fngd_coefficients", "linear_weighted_sum", "conv2d_weighted_sum", "embedding_weighted_sum"]

IntPair = Union[int, Sequence[int]]
GRAM_STRATEGIES = ("auto", "per_sample", "pairwise")
DAMPING_MODES = ("frobenius", "fixed")
SCALE_MODES = ("ngd", "sgd_like")
DEFAULT_CHUNK_ELEMS = 1 << 24  # pairwise strategy: elements of one (rows·S) × (M·S) block


def gram_costs(batch: int, positions: int, in_features: int, out_features: int, groups: int = 1) -> Tuple[int, int]:
    """Flops of the weight part of K for (per_sample, pairwise), from the spec §2.2 table.

    per_sample: 2·M·S·O·I (form every u_m) + 2·M²·O·I (their Gram); pairwise: 2·M²·S²·(I + O).
    I excludes the bias row: the bias part B Bᵀ (B_m = Σ_s z_ms) costs the same in both and is left out.
    With ``groups`` G the weight is G blocks of (O/G)×(I/G): the per-sample terms shrink by G.
    """
    m, s, i, o = batch, positions, in_features, out_features
    return (2 * m * s * o * i + 2 * m * m * o * i) // groups, 2 * m * m * s * s * (i + o)


def choose_gram_strategy(batch: int, positions: int, in_features: int, out_features: int, groups: int = 1) -> str:
    """The cheaper exact strategy by :func:`gram_costs`; a tie goes to the bounded-memory pairwise one."""
    per_sample, pairwise = gram_costs(batch, positions, in_features, out_features, groups)
    return "pairwise" if pairwise <= per_sample else "per_sample"


def _per_sample_gram(p: Tensor, z: Tensor, chunk_elems: int, groups: int = 1) -> Tensor:
    """Strategy (a): U_m = Z_mᵀ P_m by one bmm (M·O·I extra memory; per group with groups), then K = Ũ Ũᵀ."""
    if groups == 1:
        u = torch.bmm(z.transpose(1, 2), p).flatten(1)
    else:
        m, s = p.shape[:2]
        u = torch.einsum("msgo,msgi->mgoi", z.reshape(m, s, groups, -1), p.reshape(m, s, groups, -1)).flatten(1)
    return u @ u.T


def _pairwise_gram(p: Tensor, z: Tensor, chunk_elems: int, groups: int = 1) -> Tensor:
    """Strategy (b): K_mn = Σ_{s,t} (P_m P_nᵀ)_st (Z_m Z_nᵀ)_st, in row blocks to bound memory; with groups
    the sum over groups g of that product for each group's channels.

    With one position (plain Linear) this is eq. 12, K = (ZZᵀ)∘(XXᵀ)."""
    m, s = p.shape[:2]
    if groups == 1:
        pf, zf = p.reshape(m * s, -1), z.reshape(m * s, -1)
    else:  # (G, M·S, width / G)
        pf, zf = (t.reshape(m * s, groups, -1).transpose(0, 1) for t in (p, z))
    rows = max(1, chunk_elems // (m * s * s * groups))
    blocks = []
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        prod = (pf[..., start * s:stop * s, :] @ pf.transpose(-1, -2)).mul_(
            zf[..., start * s:stop * s, :] @ zf.transpose(-1, -2))
        blocks.append(prod.view(-1, stop - start, s, m, s).sum((0, 2, 4)))
    return torch.cat(blocks)


_GRAM: Dict[str, Callable[..., Tensor]] = {"per_sample": _per_sample_gram, "pairwise": _pairwise_gram}


def _gram(p: Tensor, z: Tensor, bias: bool, strategy: str, chunk_elems: int, groups: int = 1) -> Tensor:
    """K for patches p (M, S, I) and output gradients z (M, S, O), channels of group g the g-th 1/G of
    I and of O (groups > 1: the weight is block-diagonal over groups); the bias adds B Bᵀ."""
    if strategy not in GRAM_STRATEGIES:
        raise ValueError(f"strategy must be one of {GRAM_STRATEGIES}, got {strategy!r}.")
    if not (isinstance(chunk_elems, int) and chunk_elems >= 1):
        raise ValueError(f"chunk_elems must be a positive int, got {chunk_elems!r}.")
    if strategy == "auto":
        strategy = choose_gram_strategy(p.shape[0], p.shape[1], p.shape[2], z.shape[2], groups)
    k = _GRAM[strategy](p, z, chunk_elems, groups)
    if bias:
        b = z.sum(1)
        k = k + b @ b.T
    return k


def _check_batch(x: Tensor, grad_out: Tensor) -> None:
    if x.dim() == 0 or grad_out.dim() == 0 or x.shape[0] != grad_out.shape[0]:
        raise ValueError(f"x has shape {tuple(x.shape)} but grad_out has {tuple(grad_out.shape)}: their "
                         "batch sizes differ; pass the layer input and the output gradient of the same "
                         "batch (one row per sample).")


def _check_linear(x: Tensor, grad_out: Tensor) -> None:
    _check_batch(x, grad_out)
    if x.dim() not in (2, 3) or grad_out.dim() != x.dim() or x.shape[:-1] != grad_out.shape[:-1]:
        raise ValueError(f"Linear needs x (M, I) with grad_out (M, O), or x (M, T, I) with grad_out "
                         f"(M, T, O); got {tuple(x.shape)} and {tuple(grad_out.shape)}. Fold extra "
                         "token dimensions into T.")


def _check_weights(w: Tensor, batch: int) -> None:
    if w.shape != (batch,):
        raise ValueError(f"w must have shape ({batch},), one weight per sample of the batch, "
                         f"got {tuple(w.shape)}.")


def _pair(value: IntPair, name: str) -> Tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (tuple, list)) \
        else ()
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}; resolve "
                         "padding='same'/'valid' to numbers and pad the input yourself for a "
                         "non-zero padding_mode.")
    return pair  # type: ignore[return-value]


def _conv_geometry(x: Tensor, grad_out: Tensor, weight_shape: Sequence[int], stride: IntPair,
                   padding: IntPair, dilation: IntPair, groups: int):
    """Validated (kernel, stride, padding, dilation) pairs of a Conv2d with ``groups`` groups."""
    if not (isinstance(groups, int) and groups >= 1):
        raise ValueError(f"groups must be a positive int, got {groups!r}.")
    _check_batch(x, grad_out)
    if x.dim() != 4 or grad_out.dim() != 4 or len(weight_shape) != 4:
        raise ValueError(f"Conv2d needs x (M, C_in, H, W), grad_out (M, C_out, H_out, W_out) and a 4-d "
                         f"weight_shape; got {tuple(x.shape)}, {tuple(grad_out.shape)}, "
                         f"{tuple(weight_shape)}.")
    c_out, c_in, kh, kw = (int(v) for v in weight_shape)
    if x.shape[1] != c_in * groups or c_out % groups:
        raise ValueError(f"x has {x.shape[1]} channels but weight_shape[1] = {c_in} with groups={groups} "
                         f"(and {c_out} output channels): pass the layer weight's shape and its groups.")
    st, pd, dl = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    out = tuple((x.shape[2 + i] + 2 * pd[i] - dl[i] * ((kh, kw)[i] - 1) - 1) // st[i] + 1 for i in range(2))
    if tuple(grad_out.shape[1:]) != (c_out, *out):
        raise ValueError(f"grad_out has shape {tuple(grad_out.shape)} but this conv on x {tuple(x.shape)} "
                         f"outputs (M, {c_out}, {out[0]}, {out[1]}): pass the gradient at this layer's "
                         "output and the layer's own stride, padding and dilation.")
    return (kh, kw), st, pd, dl


def linear_gram(x: Tensor, grad_out: Tensor, bias: bool, *, strategy: str = "auto",
                chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """K (M×M) of a Linear layer's per-sample (weight[, bias]) gradients, never forming U by default.

    x (M, I) with grad_out (M, O): eq. 12, K = (ZZᵀ)∘(XXᵀ + [11ᵀ]). x (M, T, I) with grad_out
    (M, T, O): u_m sums over tokens (spec §2.2) and K is the conv-style Gram with S = T, by
    ``strategy`` ("auto" | "per_sample" | "pairwise", see :func:`gram_costs`).
    """
    _check_linear(x, grad_out)
    if x.dim() == 2:
        x, grad_out = x.unsqueeze(1), grad_out.unsqueeze(1)
    return _gram(x, grad_out, bias, strategy, chunk_elems)


def conv2d_gram(x: Tensor, grad_out: Tensor, weight_shape: Sequence[int], stride: IntPair = 1,
                padding: IntPair = 0, dilation: IntPair = 1, *, bias: bool, groups: int = 1,
                strategy: str = "auto", chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """Exact K (M×M) of a Conv2d layer's per-sample (weight[, bias]) gradients (eq. 13, summed over
    output positions), which eq. 12 cannot give. Uses unfolded patches: run it only when K is needed.

    ``strategy``: "per_sample" (U_m = Z_m P_mᵀ, then ŨŨᵀ), "pairwise" (spatial Grams, chunked), or
    "auto", the cheaper by :func:`gram_costs` with S = H_out·W_out and I = C_in·k_h·k_w. With ``groups``
    u_m is block-diagonal and K the sum of the groups' Grams.
    """
    kernel, st, pd, dl = _conv_geometry(x, grad_out, weight_shape, stride, padding, dilation, groups)
    p = F.unfold(x, kernel, dilation=dl, padding=pd, stride=st).transpose(1, 2)  # (M, S, C_in·kh·kw)
    return _gram(p, grad_out.flatten(2).transpose(1, 2), bias, strategy, chunk_elems, groups)


class FNGDCoefficients(NamedTuple):
    """Eq. 9 for one layer (or a batch of layers): d = Σ_m w_m u_m."""

    c: Tensor        # (..., M): c = (λI + K/M)⁻¹ s; |c| ≪ 1 means FNGD ≈ SGD (paper's tuning rule)
    w: Tensor        # (..., M): (1 − c)/(λM) for scale_mode "ngd", (1 − c)/M for "sgd_like"
    damping: Tensor  # (...,): the λ used


def fngd_coefficients(gram: Tensor, damping: Union[float, Tensor], *, damping_mode: str = "frobenius",
                      scale_mode: str = "ngd", min_damping: float = 0.0) -> FNGDCoefficients:
    """Coefficients w with U w = (λI + UUᵀ/M)⁻¹ g (SMW, eqs. 6-9), from K = UᵀU alone.

    gram: K (..., M, M), the Gram of the SUMMED-loss per-sample gradients (not divided by M).
    damping: α for "frobenius", λ = α‖K‖_F with K exactly as passed (eq. 14 as printed, no 1/M);
        λ itself for "fixed". A float or a tensor broadcastable to K.shape[:-2].
    scale_mode: "ngd" keeps the 1/λ of eq. 9 (exact damped NGD); "sgd_like" drops it (§2.3), so the
        step is on SGD's scale (λ → ∞ gives d → g).
    min_damping: floor on λ, so that a layer with K = 0 still gets finite weights.
    Solved by a batched Cholesky without error checks (no host sync); an indefinite system gives NaN.
    """
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"gram must be (..., M, M), got {tuple(gram.shape)}.")
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}.")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}.")
    if isinstance(damping, (int, float)) and not damping > 0:
        raise ValueError(f"damping must be > 0 (α for 'frobenius', λ for 'fixed'), got {damping!r}.")
    m = gram.shape[-1]
    # A number is filled in on the device: as_tensor would copy it from the host, a stream sync on CUDA.
    lam = (torch.as_tensor(damping, dtype=gram.dtype, device=gram.device) if isinstance(damping, torch.Tensor)
           else torch.full((), damping, dtype=gram.dtype, device=gram.device))
    if damping_mode == "frobenius":
        lam = lam * torch.linalg.matrix_norm(gram)
    lam = torch.broadcast_to(lam, gram.shape[:-2]).clamp_min(min_damping)
    eye = torch.eye(m, dtype=gram.dtype, device=gram.device)
    chol, _ = torch.linalg.cholesky_ex(gram / m + lam[..., None, None] * eye)
    c = torch.cholesky_solve(gram.mean(-1).unsqueeze(-1), chol).squeeze(-1)  # s = K1/M
    scale = lam * m if scale_mode == "ngd" else torch.full_like(lam, m)
    return FNGDCoefficients(c, (1 - c) / scale[..., None], lam)


def linear_weighted_sum(x: Tensor, grad_out: Tensor, w: Tensor,
                        bias: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """d = Σ_m w_m u_m as (weight (O, I), bias (O,) or None): the weight-gradient GEMM with w_m in
    place of SGD's 1/M (§2.5), the weights applied to the smaller of x and grad_out (z_m ⊗ w_m x_m =
    w_m z_m ⊗ x_m). x (M, I) or (M, T, I), grad_out to match."""
    _check_linear(x, grad_out)
    _check_weights(w, x.shape[0])
    per_sample = w.view(-1, *[1] * (grad_out.dim() - 1))
    z2d = grad_out.reshape(-1, grad_out.shape[-1])
    if x.shape[-1] < grad_out.shape[-1]:
        d_w = z2d.T @ (x * per_sample).reshape(-1, x.shape[-1])
        d_b = grad_out.reshape(x.shape[0], -1, grad_out.shape[-1]).sum(1).T @ w if bias else None
        return d_w, d_b
    zw = (grad_out * per_sample).reshape(-1, grad_out.shape[-1])
    return zw.T @ x.reshape(-1, x.shape[-1]), (zw.sum(0) if bias else None)


def conv2d_weighted_sum(x: Tensor, grad_out: Tensor, w: Tensor, weight_shape: Sequence[int],
                        stride: IntPair = 1, padding: IntPair = 0, dilation: IntPair = 1, *, bias: bool,
                        groups: int = 1) -> Tuple[Tensor, Optional[Tensor]]:
    """d = Σ_m w_m u_m as (weight, bias or None) of a Conv2d, by the weight-gradient convolution with x or
    grad_out (the smaller) scaled per sample (§2.5), so no patches are unfolded in the sharing epochs."""
    _, st, pd, dl = _conv_geometry(x, grad_out, weight_shape, stride, padding, dilation, groups)
    _check_weights(w, x.shape[0])
    shape = tuple(int(v) for v in weight_shape)
    per_sample = w.view(-1, 1, 1, 1)
    if x.numel() < grad_out.numel():  # weigh the smaller tensor: the result is the same sum
        d_w = torch.nn.grad.conv2d_weight(x * per_sample, shape, grad_out, st, pd, dl, groups)
        return d_w, (grad_out.sum((2, 3)).T @ w if bias else None)
    zw = grad_out * per_sample
    d_w = torch.nn.grad.conv2d_weight(x, shape, zw, st, pd, dl, groups)
    return d_w, (zw.sum((0, 2, 3)) if bias else None)


def _check_tokens(ids: Tensor, keep: Tensor, grad_out: Tensor) -> None:
    _check_batch(ids, grad_out)
    if ids.dim() != 2 or keep.shape != ids.shape or grad_out.shape[:2] != ids.shape or grad_out.dim() != 3:
        raise ValueError(f"an Embedding needs ids (M, T), keep (M, T) and grad_out (M, T, D); got "
                         f"{tuple(ids.shape)}, {tuple(keep.shape)} and {tuple(grad_out.shape)}.")


def embedding_gram(ids: Tensor, keep: Tensor, grad_out: Tensor, *, chunk_elems: int = DEFAULT_CHUNK_ELEMS) -> Tensor:
    """K (M×M) of an Embedding's per-sample gradients u_m = Σ_t keep_mt e_{id_mt} z_mtᵀ: the Gram of the Linear
    on one-hot rows that it is, K_mn = Σ_{t,s} [id_mt = id_ns] (keep z)_mt·(keep z)_ns, the pairwise form with
    XXᵀ the token-equality matrix, so no one-hot (or V-wide) tensor is formed; in row blocks of samples.

    ids (M, T) token ids, keep (M, T) 0 where the row of the id gets no gradient (``padding_idx``), else 1."""
    _check_tokens(ids, keep, grad_out)
    m, t = ids.shape
    flat_ids, zf = ids.reshape(-1), (grad_out * keep[..., None]).reshape(m * t, -1)
    rows = max(1, chunk_elems // (m * t * t))
    blocks = []
    for start in range(0, m, rows):
        stop = min(m, start + rows)
        same = (flat_ids[start * t:stop * t, None] == flat_ids[None, :]).to(zf.dtype)
        blocks.append(same.mul_(zf[start * t:stop * t] @ zf.T).view(stop - start, t, m, t).sum((1, 3)))
    return torch.cat(blocks)


def embedding_weighted_sum(ids: Tensor, keep: Tensor, grad_out: Tensor, w: Tensor, num_embeddings: int) -> Tensor:
    """d = Σ_m w_m u_m of an Embedding, (V, D): SGD's index_add of the output-gradient rows, weighted by w_m."""
    _check_tokens(ids, keep, grad_out)
    _check_weights(w, ids.shape[0])
    rows = (grad_out * (keep * w[:, None])[..., None]).reshape(-1, grad_out.shape[-1])
    return rows.new_zeros(num_embeddings, rows.shape[1]).index_add_(0, ids.reshape(-1), rows)
