"""K-FAC on the shared step: what ``make_gradient_maker("kfac", ...)`` returns with ``micro_batch_size``, a
``grad_scaler`` or several ranks (ASDL's own K-FAC cannot do these)."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import asdl
from torch import Tensor, nn

from ..curvature.products import apply_inverse, gram, has_inverse
from ..engine.vectors import BlockVector, scaled, stacked
from ..curvature.kron_step import BlockGradients, CurvatureStepMaker

__all__ = ["ScalableKfacGradientMaker"]


class ScalableKfacGradientMaker(CurvatureStepMaker):
    """K-FAC as a :class:`~fop_asdl.curvature.kron_step.CurvatureStepMaker`: only the mean gradient is formed and
    communicated, and each block gets F̃⁻¹ g. Its gradients equal ``asdl.KfacGradientMaker``'s."""

    method_label = "K-FAC"
    two_gradients = False
    #: The squared F̃-norm of the step, g_avgᵀ F̃⁻¹ g_avg (FOP's kl_base with β = 0, η = 1).
    stat_keys = ("kl_base",)

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *args: Any,
                 **kwargs: Any):
        foreign = {"beta", "beta_range", "eta", "eta_range", "projection_metric", "eps"} & set(kwargs)
        if foreign:
            raise TypeError(f"K-FAC takes no FOP options, got {sorted(foreign)}.")
        super().__init__(model, config, *args, **kwargs)

    def _precondition(self, gradients: BlockGradients) -> Dict[str, Tuple[BlockVector, Optional[Tensor]]]:
        results: Dict[str, Tuple[BlockVector, Optional[Tensor]]] = {}
        for name, module in self.named_modules_for_curvature:
            if name not in gradients:
                continue  # not owned here, or the block took no part in the loss
            g_avg, _ = gradients.pop(name)
            matrix = getattr(module, self._fisher_attr, None)
            if not has_inverse(matrix):  # no curvature yet for this block: the plain gradient
                results[name] = (g_avg, None)
                continue
            vector = scaled(stacked(g_avg), self.grad_scale)
            weight, bias = apply_inverse(matrix, vector)
            norm = gram(vector, (weight, bias)).reshape(1)
            results[name] = ((weight[0], None if bias is None else bias[0]), norm)
        return results
