"""pytorch-optimizer's ScalableShampoo with a checkpoint of tensors only.

ScalableShampoo keeps each parameter's statistics and roots in Python objects (``PreConditioner``,
``Graft``), which ``torch.load(weights_only=True)`` refuses. This subclass writes their tensors instead and
rebuilds the objects on load, so a resumed run continues bit-identically; the arithmetic is the library's.
Imported only when the method runs (pytorch-optimizer is an optional extra).
"""

from __future__ import annotations

from typing import Any, Dict

from pytorch_optimizer import ScalableShampoo
from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting, build_graft
from pytorch_optimizer.optimizer.utils.preconditioner import PreConditioner

__all__ = ["GraftedShampoo"]


class GraftedShampoo(ScalableShampoo):
    """ScalableShampoo grafted to RMSProp, whose ``state_dict`` holds tensors, lists and numbers only."""

    def __init__(self, params, **kwargs: Any):
        super().__init__(params, graft_type=LayerWiseGrafting.RMSPROP, **kwargs)

    def state_dict(self) -> Dict[str, Any]:
        out = super().state_dict()
        out["state"] = {key: _tensors(value) for key, value in out["state"].items()}
        return out

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})
        for group, saved_group in zip(self.param_groups, state_dict["param_groups"]):
            _, beta2 = group["betas"]
            for p, key in zip(group["params"], saved_group["params"]):
                if key in saved:
                    self.state[p] = self._rebuilt(p, beta2, saved[key])

    def _rebuilt(self, p, beta2: float, saved: Dict[str, Any]) -> Dict[str, Any]:
        """The objects ``init_group`` makes for ``p`` (library 4.1.0's arguments), then the saved tensors."""
        pre = PreConditioner(
            p, beta2, self.inverse_exponent_override, self.block_size, self.skip_preconditioning_rank_lt,
            self.no_preconditioning_for_layers_with_dim_gt, self.shape_interpretation,
            self.pre_conditioner_type, self.matrix_eps, self.use_svd)
        pre.statistics = _to(saved["statistics"], p)
        pre.pre_conditioners = _to(saved["pre_conditioners"], p)
        graft = build_graft(p, self.graft_type, self.diagonal_eps)
        graft.momentum = _to(saved["graft_momentum"], p)
        if saved["graft_statistics"] is not None:
            graft.statistics = _to(saved["graft_statistics"], p)
        return {"momentum": _to(saved["momentum"], p), "pre_conditioner": pre, "graft": graft}


def _tensors(state: Dict[str, Any]) -> Dict[str, Any]:
    pre, graft = state["pre_conditioner"], state["graft"]
    return {
        "momentum": state["momentum"],
        "statistics": pre.statistics,
        "pre_conditioners": pre.pre_conditioners,
        "graft_momentum": graft.momentum,
        "graft_statistics": getattr(graft, "statistics", None),
    }


def _to(value: Any, p) -> Any:
    """A saved tensor (or list of them) on ``p``'s device, its own dtype kept (float64 statistics stay)."""
    if isinstance(value, list):
        return [v.to(p.device, copy=True) for v in value]
    return value.to(p.device, copy=True)
