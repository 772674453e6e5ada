"""K-BFGS's per-layer updates (Goldfarb, Ren and Bahamou, NeurIPS 2020) as pure tensor functions.

A layer's Hessian block is approximated as G ⊗ A: A = E[ã ãᵀ] of its (homogeneous) inputs, G a BFGS
estimate of the Hessian with respect to its pre-activations h. The direction is Δ = H_g ∇W̃ H_a with
H_g ≈ G⁻¹ and H_a ≈ (A + λ_A I)⁻¹. Every function returns new tensors (ASDL 0.1a5's ``bfgs_inv_update_``
updates a symmetrised copy and returns nothing, so its inverses never move) and makes no host sync: the
branches of the damping and the skip of a degenerate pair are ``torch.where``.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch
from torch import Tensor

__all__ = ["bfgs_inverse_update", "damped_inverse", "double_damping", "hessian_action_update"]

Scalar = Union[float, Tensor]


def bfgs_inverse_update(h: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """BFGS on the inverse: H⁺ = (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ, ρ = 1/sᵀy; H itself when sᵀy ≤ 0
    (no curvature along s, e.g. s = y = 0 when the parameters did not move).

    H⁺ is unchanged when s and y are scaled together, so they are first scaled by the power of two that
    brings the larger to [0.5, 1): exact (bit-identical results where nothing over- or underflows), and ρ²
    no longer overflows for a tiny pair (s, y ~ 1e-10 in float32, as behind a training-mode BatchNorm,
    where ḡ = 0 and y is rounding)."""
    _, exponent = torch.frexp(torch.maximum(s.abs().max(), y.abs().max()))
    exponent = exponent.clamp(-100, 100)  # 2**±100 is a normal float32; the pair's own range is kept
    s, y = torch.ldexp(s, -exponent), torch.ldexp(y, -exponent)
    sy = s @ y
    rho = torch.where(sy > 0, 1.0 / torch.where(sy > 0, sy, 1.0), 0.0)
    hy = h @ y
    return (h - rho * (torch.outer(s, hy) + torch.outer(hy, s))
            + (rho * rho * (y @ hy) + rho) * torch.outer(s, s))


def double_damping(h: Tensor, s: Tensor, y: Tensor, mu1: float, mu2: Scalar) -> Tuple[Tensor, Tensor]:
    """The paper's double damping (DD) of a pair (s, y) for the inverse H:

    Powell's damping on H: if sᵀy < μ1 yᵀHy, s̃ = θ1 s + (1 − θ1) H y with θ1 = (1 − μ1) yᵀHy / (yᵀHy − sᵀy);
    then on H⁻¹ with the identity in Powell's place: if s̃ᵀy < μ2 s̃ᵀs̃, ỹ = θ2 y + (1 − θ2) s̃ with
    θ2 = (1 − μ2) s̃ᵀs̃ / (s̃ᵀs̃ − s̃ᵀy). Afterwards s̃ᵀỹ ≥ μ2 s̃ᵀs̃ > 0 whenever s̃ ≠ 0."""
    hy = h @ y
    yhy, sy = y @ hy, s @ y
    low = sy < mu1 * yhy
    theta1 = torch.where(low, (1 - mu1) * yhy / torch.where(low, yhy - sy, 1.0), 1.0)
    s = theta1 * s + (1 - theta1) * hy
    ss, sy = s @ s, s @ y
    low = sy < mu2 * ss
    theta2 = torch.where(low, (1 - mu2) * ss / torch.where(low, ss - sy, 1.0), 1.0)
    return s, theta2 * y + (1 - theta2) * s


def hessian_action_update(h_a: Tensor, a: Tensor, damping: Scalar, a_mean: Tensor) -> Tensor:
    """The paper's Hessian-action BFGS step for H_a ≈ (A + λ_A I)⁻¹: the pair s = H_a ā, y = (A + λ_A I) s
    (the mean homogeneous input ā), which needs no damping: sᵀy = sᵀ(A + λ_A I)s > 0."""
    s = h_a @ a_mean
    return bfgs_inverse_update(h_a, s, a @ s + damping * s)


def damped_inverse(a: Tensor, damping: Scalar) -> Tensor:
    """(A + λ_A I)⁻¹ by Cholesky, without error checks (NaN for an indefinite matrix, caught by the
    step's finiteness check): the first H_a."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    chol, _ = torch.linalg.cholesky_ex(a + damping * eye)
    return torch.cholesky_inverse(chol)
