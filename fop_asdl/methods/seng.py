"""SENG, the sketched empirical natural gradient (Yang, Xu, Wen, Chen, Xu 2021), on SMW-NG's step.

Per Linear/Conv2d block the direction is SMW's d = (1/λ)(g − (1/n) U (λI + K̂/n)⁻¹ K̂1/n) with the exact
per-sample gradients U and the sketched Gram K̂ of :mod:`fop_asdl.methods.seng_math`: FNGD's solve and
weighted sum with a different Gram. Without sketching (``sketching_size`` and ``truncated_rank`` at least
the block's sizes) it is SMW-NG's (F + λI)⁻¹ g exactly, the scale of K-FAC's F̃⁻¹g: a learning rate means the
same for both at the same damping. ASDL 0.1a5's SENG comes out ≈ g/λ (its correction term is 1/n too
small and mixes the samples' inputs and outputs), so it behaves like SGD with the learning rate lr/λ.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import asdl
import torch
from torch import Tensor, nn

from . import seng_math
from .fngd import _Plan
from .second_order import refuse
from .smw_ng import _FNGD_ONLY, SmwNgGradientMaker

__all__ = ["SengGradientMaker"]


_REFUSED = {**_FNGD_ONLY, "kl_clip": (
    "with a sketch its step d = (1/λ)(g − U(λn + K̂)⁻¹Ûᵀĝ) is not F̃⁻¹g for any symmetric F̃ (the sketched Û on "
    "one side, the exact U on the other), so it has no Fisher norm to bound; use 'smw_ng' (SENG without a "
    "sketch), 'diag_ng', 'kfac' or 'fop'.")}


class SengGradientMaker(SmwNgGradientMaker):
    """SMW-NG with SENG's sketched Gram. The sketch is drawn anew on every step from ``seed``'s generator,
    the same draws on every rank (the generator is replicated and saved in ``state_dict()``).

    Args:
        model, config: ``config.damping`` is λ (> 0).
        sketching_size: s, the input columns (bias column included) and output rows kept per block (ASDL's
            name and default, 256).
        truncated_rank: r, the singular triplets kept of each sample's output gradient over positions
            (Conv2d pixels, Linear tokens); None keeps all (ASDL's default 16).
        seed: the sketch's generator.
        conv_gram, micro_batch_size, grad_scaler: as for SMW-NG.

    Cost per step and block (M samples, S positions, I inputs, O outputs): the unfolded patches (M·S·I), M
    SVDs of S×O (when S > r), the Gram M²r²(s + s), one M×M Cholesky, and the weighted sum (SGD's weight
    gradient).
    """

    method_label = "SENG"

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 sketching_size: int = 256, truncated_rank: Optional[int] = 16, seed: int = 0, **kwargs: Any):
        for name, value in (("sketching_size", sketching_size), ("seed", seed),
                            ("truncated_rank", 1 if truncated_rank is None else truncated_rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "seed" else 1):
                raise ValueError(f"{name} must be a{' non-negative' if name == 'seed' else ' positive'} int"
                                 f"{' or None' if name == 'truncated_rank' else ''}, got {value!r}.")
        refuse(self.method_label, {k: v for k, v in kwargs.items() if k in _REFUSED}, _REFUSED)
        super().__init__(model, config, **kwargs)
        self.sketching_size, self.truncated_rank = sketching_size, truncated_rank
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def _begin_step(self, batch_size: int) -> _Plan:
        plan = super()._begin_step(batch_size)
        plan.generator_state = self.generator.get_state()
        plan.sketch = {}  # every block's draws, in block order on every rank (its owner uses them)
        for name, module in self.blocks:
            width = module.weight[0].numel() + (module.bias is not None)
            plan.sketch[name] = (seng_math.draw_features(width, self.sketching_size, self.generator, self.device),
                                 seng_math.draw_features(module.weight.shape[0], self.sketching_size,
                                                         self.generator, self.device))
        return plan

    def _gram(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        conv = None
        if isinstance(module, nn.Conv2d):
            conv = (module.kernel_size, module.stride, module.padding, module.dilation)
        p, z = seng_math.block_rows(x, z, conv, module.bias is not None)
        in_index, out_index = self._step_plan.sketch[self._names[module]]
        return seng_math.sketched_gram(p, z, in_index, out_index, self.truncated_rank, self.conv_gram)

    def _roll_back(self, plan: _Plan) -> None:
        """The draws advanced the generator: put it back."""
        self.generator.set_state(plan.generator_state)

    def state_dict(self) -> Dict[str, Any]:
        """Step and the sketch's generator (the same on every rank)."""
        return {"step": self.state["step"], "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])
        self.state["step"] = int(state_dict["step"])

