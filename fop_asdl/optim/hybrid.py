"""The paper's transformer protocol: the blocks a maker preconditions follow its gradients under one
optimizer (SGD with momentum, say), every other parameter (LayerNorm, embeddings, class token, ...) AdamW.

``preconditioned_parameters(gm)`` and ``other_parameters(gm)`` split the model's trainable parameters for any
ASDL gradient maker (FOP, K-FAC, ASDL's own); :class:`HybridOptimizer` steps the two optimizers as one, so
that torch's LR schedulers, ``zero_grad`` and checkpoints see a single optimizer::

    gm = fop_asdl.make_gradient_maker("fop", model, asdl.PreconditioningConfig(ignore_modules=[nn.LayerNorm]))
    opt = HybridOptimizer(torch.optim.SGD(preconditioned_parameters(gm), lr=0.05, momentum=0.9),
                          torch.optim.AdamW(other_parameters(gm), lr=1e-3, weight_decay=0.05))
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from ..engine.attention import routing_of

__all__ = ["preconditioned_parameters", "other_parameters", "HybridOptimizer"]


def _block_parameters(gm: Any) -> set:
    """The user's parameters inside the maker's curvature blocks (an attention projection stands for the rows
    of the packed parameters it covers, so those count as preconditioned)."""
    routing = routing_of(gm)
    out = set()
    for _, module in getattr(gm, "named_modules_for_curvature", ()):
        real = routing.real_parameters(module) if routing is not None else []
        out.update(real or module.parameters())
    return out


def preconditioned_parameters(gm: Any) -> List[nn.Parameter]:
    """Trainable parameters whose gradient the maker preconditions, in ``gm.model.parameters()`` order."""
    blocks = _block_parameters(gm)
    return [p for p in gm.model.parameters() if p.requires_grad and p in blocks]


def other_parameters(gm: Any) -> List[nn.Parameter]:
    """Every other trainable parameter (they receive the plain mean gradient), in model order."""
    blocks = _block_parameters(gm)
    return [p for p in gm.model.parameters() if p.requires_grad and p not in blocks]


class HybridOptimizer(torch.optim.Optimizer):
    """Optimizers over disjoint parameters, stepped as one. Its ``param_groups`` are theirs (the same dicts),
    so an LR scheduler on it scales every group from its own base lr."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        if len(optimizers) < 2:
            raise ValueError("HybridOptimizer joins at least two optimizers; use the optimizer itself otherwise.")
        params = [p for o in optimizers for g in o.param_groups for p in g["params"]]
        if len({id(p) for p in params}) != len(params):
            raise ValueError("The optimizers share parameters, which would be updated twice; build them from "
                             "preconditioned_parameters(gm) and other_parameters(gm).")
        self.optimizers = list(optimizers)
        super().__init__([g for o in optimizers for g in o.param_groups], {})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:  # evaluated once, not once per optimizer
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        parts = state_dict["optimizers"]
        if len(parts) != len(self.optimizers):
            raise ValueError(f"state_dict holds {len(parts)} optimizers, this HybridOptimizer {len(self.optimizers)}.")
        for optimizer, part in zip(self.optimizers, parts):
            optimizer.load_state_dict(part)
