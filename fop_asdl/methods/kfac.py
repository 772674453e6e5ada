"""K-FAC on the shared step: what ``make_gradient_maker("kfac", ...)`` returns with ``micro_batch_size``, a
``grad_scaler`` or several ranks (ASDL's own K-FAC cannot do these)."""
from __future__ import annotations

from typing import Any, Optional

import asdl
from torch import nn

from ..curvature.kron_step import CurvatureStepMaker

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
