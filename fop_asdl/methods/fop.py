"""FOPGradientMaker: FOP (FOP_SPEC steps 1-8) behind ASDL's gradient-maker interface."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import asdl
import torch
from torch import Tensor, nn

from ..curvature.inverses import pi_damping
from ..curvature.kron_step import BlockGradients, CurvatureStepMaker
from ..curvature.products import apply_metric, gram
from ..engine.vectors import BlockVector, scaled
from .fop_math import FOPOptions, fop_coefficients

__all__ = ["FOPGradientMaker", "STAT_KEYS"]

STAT_KEYS = ("s", "beta", "eta", "A", "D", "E", "kl_base", "kl_cross", "kl_orth")


class FOPGradientMaker(CurvatureStepMaker):
    """FOP as a drop-in replacement of ``asdl.KfacGradientMaker``.

    Each step splits the batch into B1 (first ⌈n/2⌉ samples) and B2 (the rest), forms their gradients
    g1, g2 from one forward and one backward pass, and writes η (F̃⁻¹ g_avg + β F̃⁻¹ g_perp) into
    ``p.grad`` of every preconditioned block, where g_perp is the part of g1 − g2 that is Fisher-orthogonal
    to g_avg. Every other trainable parameter receives the full-batch gradient g_avg. Curvature, EMA,
    damping and update intervals come from ``config`` exactly as for K-FAC; with ``beta=0.0, eta=None``
    the result is K-FAC's.

    Args beyond ``asdl.KfacGradientMaker``'s (see :class:`fop_asdl.methods.fop_math.FOPOptions`):
        beta: float for a fixed β, or ``"adaptive"`` for β* = D/E per block (eq. 16).
        beta_range: clamp of the adaptive β*.
        eta: ``"adaptive"`` for η* per block (eq. 17), or None for η = 1.
        eta_range: clamp of η*.
        projection_metric: ``"undamped"`` (F) or ``"damped"`` (F̃) for the projection of step 2.
        eps: guard for the denominators.
    and, positional or by name, those of every :class:`~fop_asdl.curvature.kron_step.CurvatureStepMaker`
    (documented there: ASDL's ``fisher_type`` ... ``swift``, and ``micro_batch_size``, ``sub_batches``,
    ``grad_scaler``, ``kl_clip``, ``lr``, ``ema_bias_correction``, ``factor_dtype``, ``inverse_dtype``).

    Under ``torch.autocast`` the forward and backward passes run in bf16/fp16, while the curvature, its
    inverses, the per-sub-batch gradients and the FOP scalars are computed in the parameters' precision;
    with bf16/fp16 weights in float32 (``inverse_dtype``: the scalars are formed with the inverses).

    After each step ``last_stats[block name]`` holds the block's s, β, η, A, D, E and the KL terms as
    0-d tensors (kept on the device, so reading them is the only sync).
    """

    method_label = "FOP"
    stat_keys = STAT_KEYS

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *args: Any,
                 beta: Union[float, str] = "adaptive", beta_range: Tuple[float, float] = (-0.5, 0.5),
                 eta: Optional[str] = "adaptive", eta_range: Tuple[float, float] = (0.0, 2.0),
                 projection_metric: str = "undamped", eps: float = 1e-12, **options: Any):
        self.options = FOPOptions(beta=beta, beta_range=tuple(beta_range), eta=eta,
                                  eta_range=tuple(eta_range), projection_metric=projection_metric, eps=eps)
        super().__init__(model, config, *args, **options)
        self._damping_cache: Dict[nn.Module, Tuple[Union[float, Tensor], Union[float, Tensor]]] = {}

    def _precondition(self, gradients: BlockGradients) -> Dict[str, Tuple[BlockVector, Optional[Tensor]]]:
        """Steps 2-8 for every owned block, all solved together; ``gradients`` is consumed block by block to
        keep memory flat."""
        damped = self.options.projection_metric == "damped"
        results: Dict[str, Tuple[BlockVector, Optional[Tensor]]] = {}
        names, inverse_products, with_metric, with_inverse = [], [], [], []
        for name, module, matrix, _, pair in self._blocks_with_curvature(gradients, results):
            both = scaled(pair, self.grad_scale)  # [g_avg, g_diff]
            del pair
            inv_both = self._inverse(name, matrix, both)  # [F̃⁻¹g_avg, F̃⁻¹g_diff] in one product
            metric_avg = self._metric(name, module, matrix, _slice(both, 0), damped)
            with_metric.append(gram(both, metric_avg))  # ⟨g_a, M g_a⟩, ⟨g_d, M g_a⟩
            with_inverse.append(gram(both, inv_both))   # rows g_a, g_d; columns F̃⁻¹g_a, F̃⁻¹g_d
            names.append(name)
            inverse_products.append(inv_both)
        if names:
            metric, inverse = torch.stack(with_metric), torch.stack(with_inverse)  # (blocks, 2, 1), (blocks, 2, 2)
            coef = fop_coefficients(metric[:, 0, 0], metric[:, 1, 0], inverse[:, 0, 0], inverse[:, 0, 1],
                                    inverse[:, 1, 1], self.options)
            w_avg, w_diff = coef.weight_avg, coef.weight_diff
            kl_base, kl_cross, kl_orth = coef.kl_terms()
            stats = torch.stack((coef.s, coef.beta, coef.eta, coef.A, coef.D, coef.E, kl_base, kl_cross, kl_orth), 1)
            for i, name in enumerate(names):
                inv_w, inv_b = inverse_products[i]
                inverse_products[i] = None
                # η((1 − βs) F̃⁻¹g_avg + β F̃⁻¹g_diff), as fresh tensors so the stacked products can be freed
                weight = torch.addcmul(inv_w[0] * w_avg[i], inv_w[1], w_diff[i])
                bias = None if inv_b is None else torch.addcmul(inv_b[0] * w_avg[i], inv_b[1], w_diff[i])
                results[name] = ((weight, bias), stats[i])
        return results

    # --- the curvature FOP works with: K-FAC's here, EKFAC's in fop_asdl.methods.fop_ekfac ---------------
    def _metric(self, name: str, module: nn.Module, matrix, vec: BlockVector, damped: bool) -> BlockVector:
        """The projection's metric, F v or F̃ v."""
        return apply_metric(matrix, vec, self._metric_damping(module, matrix) if damped else None)

    def _metric_damping(self, module: nn.Module, matrix) -> Tuple[Union[float, Tensor], Union[float, Tensor]]:
        """(d_A, d_B) of the damped metric (device tensors for Kron blocks: no host sync), cached until the
        next inverse update."""
        if module not in self._damping_cache:
            damping = self.config.damping
            self._damping_cache[module] = pi_damping(matrix.kron, damping) if matrix.has_kron else (damping,) * 2
        return self._damping_cache[module]

    def _invert_all(self) -> None:
        super()._invert_all()
        self._damping_cache.clear()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._damping_cache.clear()


def _slice(vec: BlockVector, j: int) -> BlockVector:
    """Entry j of a stack, keeping the stacking dimension."""
    return vec[0][j:j + 1], None if vec[1] is None else vec[1][j:j + 1]
