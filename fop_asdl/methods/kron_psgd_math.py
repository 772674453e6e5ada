"""Kronecker-factored PSGD (Li 2018, "Preconditioner on matrix Lie group for SGD") as pure tensor functions.

A block's gradient is the matrix G = [∇W | ∇b] (O × I[+1]); the preconditioner is P = (Q_rᵀQ_r) ⊗ (Q_lᵀQ_l),
acting as G ↦ Q_lᵀQ_l G Q_rᵀQ_r, with upper-triangular Q_l (O×O) and Q_r (I×I). Each update fits Q to one
pair (dX, dG) (a parameter perturbation and the gradient's response, dG ≈ H dX) by a normalised relative
gradient step on Li's criterion E[dGᵀ P dG + dXᵀ P⁻¹ dX], whose minimiser satisfies P E[dG dGᵀ] P = E[dX dXᵀ]:
with dX ~ N(0, I) and dG = H dX for a positive definite H, P = H⁻¹ (exactly reachable when H is itself a
Kronecker product). No host sync: the normalising maxima stay tensors (ASDL reads them with ``float``).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["precondition", "update_factors"]

TINY = 1.2e-38  # Li's offset against a zero normaliser


def update_factors(q_l: Tensor, q_r: Tensor, dx: Tensor, dg: Tensor, step: float) -> Tuple[Tensor, Tensor]:
    """New (Q_l, Q_r) after one step on the pair (dX, dG) (both O×I): Li's dense-dense Kronecker update.

    A = Q_l dG Q_rᵀ and B = Q_l⁻ᵀ dX Q_r⁻¹ (what Q and Q⁻ᵀ make of dG and dX); the relative gradients
    triu(AAᵀ − BBᵀ) and triu(AᵀA − BᵀB) move Q_l and Q_r by steps normalised by their largest entry.
    First the factors are rebalanced (Q_l/ρ, Q_r·ρ: P unchanged) so that neither's scale runs away.
    (ASDL 0.1a5 forms B as Q_l⁻¹ dX Q_r⁻ᵀ: its torch.linalg port dropped the transposes, which fits another
    criterion once Q is no longer symmetric.)
    """
    rho = torch.sqrt(q_l.diagonal().max() / q_r.diagonal().max())
    q_l, q_r = q_l / rho, q_r * rho
    a = q_l @ dg @ q_r.T
    right = torch.linalg.solve_triangular(q_r, dx, upper=True, left=False)  # dX Q_r⁻¹
    b = torch.linalg.solve_triangular(q_l.T, right, upper=False)  # Q_l⁻ᵀ dX Q_r⁻¹
    grad_l = torch.triu(a @ a.T - b @ b.T)
    grad_r = torch.triu(a.T @ a - b.T @ b)
    step_l = step / (grad_l.abs().max() + TINY)
    step_r = step / (grad_r.abs().max() + TINY)
    return q_l - step_l * (grad_l @ q_l), q_r - step_r * (grad_r @ q_r)


def precondition(q_l: Tensor, q_r: Tensor, g: Tensor) -> Tensor:
    """P G = Q_lᵀQ_l G Q_rᵀQ_r, in the cheaper order for the block's shape."""
    return q_l.T @ (q_l @ g @ q_r.T) @ q_r
