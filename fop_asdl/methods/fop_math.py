"""The FOP scalars (FOP_SPEC steps 1-8, eqs. 13-22) as pure tensor functions.

Nothing here knows about ASDL, modules or ranks. Every argument is a tensor of per-block inner
products (one entry per curvature block), so all blocks are solved together without a host sync.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["FOPOptions", "FOPCoefficients", "fop_coefficients"]

Beta = Union[float, str]


@dataclass(frozen=True)
class FOPOptions:
    """How β and η are chosen; validated once at construction.

    beta: a float gives a fixed β; ``"adaptive"`` gives β* = D/E per block (eq. 16), clamped to
        ``beta_range``; where E ≤ eps the fixed fallback ``0.0`` (the K-FAC direction) is used.
    eta: ``"adaptive"`` gives η* per block (eq. 17), clamped to ``eta_range``; ``None`` gives η = 1.
    projection_metric: ``"undamped"`` projects with the stored curvature F (the authors' choice),
        ``"damped"`` with the damped F̃ whose inverse preconditions.
    eps: guard for the denominators of s, β* and η*.
    """

    beta: Beta = "adaptive"
    beta_range: Tuple[float, float] = (-0.5, 0.5)
    eta: Optional[str] = "adaptive"
    eta_range: Tuple[float, float] = (0.0, 2.0)
    projection_metric: str = "undamped"
    eps: float = 1e-12

    def __post_init__(self) -> None:
        if isinstance(self.beta, str):
            if self.beta != "adaptive":
                raise ValueError(f"beta must be a float or 'adaptive', got {self.beta!r}.")
        elif not isinstance(self.beta, (int, float)) or self.beta != self.beta:
            raise ValueError(f"beta must be a float or 'adaptive', got {self.beta!r}.")
        if self.eta not in ("adaptive", None):
            raise ValueError(f"eta must be 'adaptive' or None (η = 1), got {self.eta!r}.")
        for name in ("beta_range", "eta_range"):
            low, high = getattr(self, name)
            if not low <= high:
                raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}.")
        if self.projection_metric not in ("undamped", "damped"):
            raise ValueError(f"projection_metric must be 'undamped' or 'damped', "
                             f"got {self.projection_metric!r}.")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps!r}.")

    @property
    def adaptive_beta(self) -> bool:
        return isinstance(self.beta, str)


@dataclass
class FOPCoefficients:
    """Per-block scalars of one step; every field is a 1-D tensor with one entry per block."""

    s: Tensor
    beta: Tensor
    eta: Tensor
    A: Tensor
    D: Tensor
    E: Tensor

    @property
    def weight_avg(self) -> Tensor:
        """Coefficient of F̃⁻¹ g_avg in the output η (u + β v) = η((1 − βs) F̃⁻¹g_avg + β F̃⁻¹g_diff)."""
        return self.eta * (1.0 - self.beta * self.s)

    @property
    def weight_diff(self) -> Tensor:
        """Coefficient of F̃⁻¹ g_diff in the output."""
        return self.eta * self.beta

    def kl_terms(self) -> Tuple[Tensor, Tensor, Tensor]:
        """‖Δ‖²_F̃ split into base η²A, cross 2η²βD and orthogonal η²β²E terms (eqs. 19-22)."""
        eta2 = self.eta * self.eta
        return eta2 * self.A, 2.0 * eta2 * self.beta * self.D, eta2 * self.beta * self.beta * self.E


def _safe_ratio(num: Tensor, den: Tensor, eps: float, fallback: Union[float, Tensor]) -> Tensor:
    ok = den > eps
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), fallback)


def fop_coefficients(avg_metric_avg: Tensor, diff_metric_avg: Tensor,
                     avg_inv_avg: Tensor, avg_inv_diff: Tensor, diff_inv_diff: Tensor,
                     options: FOPOptions) -> FOPCoefficients:
    """Solve steps 2-7 for every block at once.

    Args (per-block inner products, M the projection metric F or F̃):
        avg_metric_avg: ⟨g_avg, g_avg⟩_M;  diff_metric_avg: ⟨g_diff, g_avg⟩_M;
        avg_inv_avg: g_avgᵀ F̃⁻¹ g_avg (= A);  avg_inv_diff: g_avgᵀ F̃⁻¹ g_diff;
        diff_inv_diff: g_diffᵀ F̃⁻¹ g_diff.
    """
    eps = options.eps
    # Step 2: s = ⟨g_diff, g_avg⟩_M / (⟨g_avg, g_avg⟩_M + ε), 0 when the denominator is ≤ ε.
    s = torch.where(avg_metric_avg > eps, diff_metric_avg / (avg_metric_avg + eps),
                    torch.zeros_like(avg_metric_avg))
    # Steps 3-4 without forming g_perp = g_diff − s g_avg: v = F̃⁻¹ g_perp = F̃⁻¹ g_diff − s u.
    a = avg_inv_avg
    d = avg_inv_diff - s * a
    e = diff_inv_diff - 2.0 * s * avg_inv_diff + s * s * a
    # Step 5: β* = D / E, clamped; fixed β otherwise.
    if options.adaptive_beta:
        beta = _safe_ratio(d, e, eps, 0.0).clamp(*options.beta_range)
    else:
        beta = torch.full_like(a, float(options.beta))
    # Step 7: η* = 2(A + βD) / (A + 2βD + β²E), clamped; 1 when switched off or ill-defined.
    if options.eta == "adaptive":
        den = a + 2.0 * beta * d + beta * beta * e
        eta = _safe_ratio(2.0 * (a + beta * d), den, eps, 1.0).clamp(*options.eta_range)
    else:
        eta = torch.ones_like(a)
    return FOPCoefficients(s=s, beta=beta, eta=eta, A=a, D=d, E=e)
