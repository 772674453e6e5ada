"""EKFAC's per-block math (George et al. 2018) as pure tensor functions.

A Kron block (Linear, Conv2d) has K-FAC's factors A (inputs) and B (output gradients) with eigenbases U_A,
U_B. Its per-sample gradient is G_i = Σ_p d_ip a_ipᵀ over the positions p of sample i (one position for a
plain Linear, the tokens of a sequence, the output pixels of a Conv2d with a_ip its unfolded patch), and
EKFAC's curvature is U diag(s) Uᵀ with U = U_B ⊗ U_A and s = E_i[(U_Bᵀ G_i U_A)²] (Alg. 1). The bias,
as ASDL's K-FAC treats it (B alone, no input column), is its own block in U_B with s_b = E_i[(U_Bᵀ b_i)²],
b_i = Σ_p d_ip. Nothing here knows about ASDL, hooks or modules' state.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["sample_rows", "eigenbases", "kron_spectrum", "rescaling", "kfe_apply"]

#: rows·out·in elements of one batched (U_Bᵀ G_i U_A) product, to bound memory with many positions
CHUNK_ELEMS = 1 << 24

Pair = Tuple[Tensor, Optional[Tensor]]


def sample_rows(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tuple[Tensor, Tensor]:
    """(a (n, P, in), d (n, P, out)): a block call's inputs and output gradients per sample and position,
    a Conv2d's inputs as unfolded patches in the (out, in·kh·kw) order of its flattened weight."""
    n = x.shape[0]
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)
        return patches.transpose(1, 2), grad_out.flatten(2).transpose(1, 2)
    return x.reshape(n, -1, x.shape[-1]), grad_out.reshape(n, -1, grad_out.shape[-1])


def eigenbases(factors: Sequence[Tensor]) -> List[Tuple[Tensor, Tensor]]:
    """(eigenvalues clamped at 0, eigenvectors) of every symmetric factor, factors of one size and dtype in
    one batched call. A non-finite factor gets NaN (the step's finiteness check catches it); the
    eigendecomposition only ever sees finite matrices, and one that does not converge is redone in
    float64."""
    batches: dict = {}
    for index, factor in enumerate(factors):
        batches.setdefault((factor.shape[-1], factor.dtype), []).append(index)
    out: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(factors)
    for (size, dtype), indices in batches.items():
        stack = torch.stack([factors[i] for i in indices])
        stack = 0.5 * (stack + stack.transpose(1, 2))
        finite = torch.isfinite(stack).flatten(1).all(1)
        eye = torch.eye(size, dtype=dtype, device=stack.device).expand_as(stack)
        safe = torch.where(finite[:, None, None], stack, eye)
        try:
            values, vectors = torch.linalg.eigh(safe)
        except torch.linalg.LinAlgError:
            values, vectors = (t.to(dtype) for t in torch.linalg.eigh(safe.double()))
        nan = torch.full_like(values, float("nan"))
        values = torch.where(finite[:, None], values.clamp_min(0), nan)
        vectors = torch.where(finite[:, None, None], vectors, nan[:, :, None].expand_as(vectors))
        for j, i in enumerate(indices):
            out[i] = (values[j], vectors[j])
    return out  # type: ignore[return-value]


def kron_spectrum(lam_b: Tensor, lam_a: Tensor, bias: bool) -> Pair:
    """K-FAC's own diagonal in its eigenbasis, (λ_B λ_Aᵀ, λ_B): EKFAC with this s is K-FAC (§3)."""
    return torch.outer(lam_b, lam_a), (lam_b.clone() if bias else None)


def rescaling(a: Tensor, d: Tensor, u_a: Tensor, u_b: Tensor, bias: bool,
              chunk_elems: int = CHUNK_ELEMS) -> Pair:
    """(Σ_i (U_Bᵀ G_i U_A)², Σ_i (U_Bᵀ b_i)² or None) over the samples of (a, d) (:func:`sample_rows`),
    without forming any G_i when there is one position: (U_Bᵀ d_i a_iᵀ U_A)² = (U_Bᵀd_i)² ((U_Aᵀa_i)²)ᵀ. With
    several, in the cheaper order: the rows projected before the per-sample sum over positions
    (n·P·(in² + out²) multiply-adds), or G_i formed and projected (n·out·in·(out + in))."""
    n, positions, n_in = a.shape
    n_out = d.shape[-1]
    bias_part = ((d.sum(1) @ u_b) ** 2).sum(0) if bias else None
    if positions == 1:
        return ((d[:, 0] @ u_b) ** 2).T @ ((a[:, 0] @ u_a) ** 2), bias_part
    project_rows = positions * (n_in * n_in + n_out * n_out) <= n_out * n_in * (n_out + n_in)
    if project_rows:
        a, d = a @ u_a, d @ u_b  # the rows in the eigenbases
    weight = a.new_zeros(n_out, n_in)
    rows = max(1, chunk_elems // max(1, n_out * n_in))
    for start in range(0, n, rows):
        projected = torch.bmm(d[start:start + rows].transpose(1, 2), a[start:start + rows])
        if not project_rows:
            projected = torch.matmul(u_b.T, torch.matmul(projected, u_a))
        weight += (projected * projected).sum(0)
    return weight, bias_part


def kfe_apply(vec: Pair, u_a: Tensor, u_b: Tensor, diag_w: Tensor, diag_b: Optional[Tensor]) -> Pair:
    """U diag(·) Uᵀ v for a stack v = (weight (k, out, in), bias (k, out) or None): U_B[(U_Bᵀ W U_A) ∘ diag_w]U_Aᵀ
    and U_B[(U_Bᵀ b) ∘ diag_b]. diag = 1/(s + λ) is EKFAC's F̃⁻¹, s or s + λ its curvature."""
    weight = torch.matmul(u_b.T, torch.matmul(vec[0], u_a)) * diag_w
    weight = torch.matmul(u_b, torch.matmul(weight, u_a.T))
    bias = None
    if vec[1] is not None:
        bias = torch.matmul(vec[1] @ u_b * diag_b, u_b.T)
    return weight, bias
