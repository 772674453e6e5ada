"""The exact damped empirical natural gradient per block, (F + λI)⁻¹ g with F = (1/n) Σ_m u_m u_mᵀ, by SMW.

This is FNGD's exact mode (:mod:`fop_asdl.methods.fngd_math`: the n×n Gram K of the per-sample gradients,
c = (λI + K/n)⁻¹ K1/n, d = Σ_m (1 − c_m)/(λn) u_m) formed on every step, without FNGD's coefficient bank:
the same class with every step a coefficient step, so the math exists once. ASDL 0.1a5's
``SmwEmpNaturalGradientMaker`` computes the same direction (with the Gram over the whole model, not per
block) but needs ``data_size``, has no micro-batches, GradScaler, ranks or kl_clip.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import asdl
import torch
from torch import Tensor, nn

from ..engine.loss import BatchCounts, loss_scale
from ..engine.trust_region import LearningRate, step_factor, validate_kl_clip
from ..engine.vectors import scaled, write_block
from .fngd import FNGDGradientMaker, _Plan
from .second_order import refuse, summed_over_ranks, warn_plain_parameters

__all__ = ["SmwNgGradientMaker"]

_FNGD_ONLY = {name: "it forms the exact Gram on every step, with λ = config.damping fixed; that option belongs "
                    "to 'fngd'." for name in ("iters_per_epoch", "alpha", "damping_mode", "coefficient_epochs",
                                              "scale_mode", "coefficient_scope")}


class SmwNgGradientMaker(FNGDGradientMaker):
    """``p.grad`` of every Linear/Conv2d block holds (F_l + λI)⁻¹ g_l, F_l the empirical Fisher of the block's
    per-sample gradients on this step's batch (the global batch on several ranks), λ = ``config.damping``;
    every other trainable parameter the plain mean gradient (one warning names them).

    Args:
        model, config: ``config.damping`` is λ (> 0); ``ignore_modules`` as for K-FAC.
        conv_gram: how a Conv2d block's Gram is formed (``"auto"``, ``"per_sample"``, ``"pairwise"``; exact).
        micro_batch_size, grad_scaler: as for the other makers (the Gram spans the whole batch).
        kl_clip, lr: the trust region of :mod:`fop_asdl.engine.trust_region`; here ‖Δ_l‖²_F̃ = g_lᵀ Δ_l exactly,
            since Δ_l = F̃_l⁻¹ g_l with F̃_l = F_l + λI of this very step.

    On several ranks the owner of each block forms the Gram of the global batch (FNGD's "global" scope):
    the result equals one process's on the global batch. Nothing persists between steps: the state is the
    step count.
    """

    method_label = "SMW-NG"
    #: Linear and ungrouped Conv2d blocks, as documented (FNGD's math would take every layer type of
    #: engine/selection.py; SENG's sketch, below this class, would not).
    all_layer_types = False

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 conv_gram: str = "auto", micro_batch_size: Optional[int] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None, kl_clip: Optional[float] = None,
                 lr: Optional[LearningRate] = None, **others: Any):
        refuse(self.method_label, others, _FNGD_ONLY)
        self.kl_clip, self._lr = validate_kl_clip(kl_clip, lr)
        self.last_nu: Optional[Tensor] = None
        super().__init__(model, config, iters_per_epoch=1, damping_mode="fixed", scale_mode="ngd",
                         conv_gram=conv_gram, coefficient_scope="global", micro_batch_size=micro_batch_size,
                         grad_scaler=grad_scaler)
        warn_plain_parameters(model, self.blocks, self.method_label)

    def _min_local_batch(self) -> Tuple[int, str]:
        return 1, f"{self.method_label} needs samples"

    def _begin_step(self, batch_size: int) -> _Plan:
        self._step_plan = _Plan(0, {name for name, _ in self.blocks}, {})  # every block, every step
        return self._step_plan

    def _finish(self, plan: _Plan, records: Dict[str, Any], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        groups = super()._finish(plan, records, counts)
        plan.nu = None
        if self.kl_clip is not None and plan.grads:
            # g_lᵀ Δ_l: the rows' sum over this process's samples against the global Δ_l, summed over ranks
            norms = []
            for name, d in plan.grads.items():
                module = self._modules[name]
                local = [self._weighted_sum(module, x, z, torch.ones(x.shape[0], dtype=x.dtype, device=x.device))
                         for x, z in records[name].chunks]
                norms.append(sum((sum(part[i] for part in local) * d[i]).sum() for i in range(2)
                                 if d[i] is not None))
            total = summed_over_ranks(self._sync, [torch.stack(norms)])[0] / counts.normalizer
            plan.nu = step_factor(self.kl_clip, self._lr, list(total), loss_scale(self.grad_scaler, self.device))
        return groups

    def _commit(self, plan: _Plan) -> None:
        nu = getattr(plan, "nu", None)
        for name, d in plan.grads.items():
            write_block(self._modules[name], d if nu is None else scaled(d, nu))
        if nu is not None:
            self.last_nu = nu
        if plan.diagnostics:
            self.last_coefficients = plan.diagnostics

    def state_dict(self) -> Dict[str, Any]:
        """Only the step: the curvature is the step's own batch's, so nothing else persists."""
        return {"step": self.state["step"]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.state["step"] = int(state_dict["step"])

