"""Which rank owns (inverts and preconditions) each curvature block.

Greedy longest-processing-time assignment: blocks in decreasing order of estimated cost, each to the rank
with the least work so far. Deterministic (ties go to the earlier block and the lower rank), so every rank
computes the same owners without communicating.
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

from torch import nn

__all__ = ["block_cost", "assign_owners"]


def block_cost(module: nn.Module) -> float:
    """Estimated cost of inverting and applying a block's curvature, in multiply-adds.

    Kron blocks (Linear, Conv2d) invert an in×in and an out×out factor (∝ in³ + out³) and multiply a
    gradient by both (∝ out·in·(in + out)); unit-wise blocks (norm layers) cost a few operations per unit.
    """
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        out_features = module.weight.shape[0]
        in_features = module.weight[0].numel() + (module.bias is not None)
        return float(in_features ** 3 + out_features ** 3 + out_features * in_features * (in_features + out_features))
    return float(8 * module.weight.numel())


def assign_owners(costs: Sequence[Tuple[str, float]], world_size: int) -> Dict[str, int]:
    """{block name: owner rank} balancing the summed cost over ``world_size`` ranks (any size ≥ 1)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    owners: Dict[str, int] = {}
    order = sorted(range(len(costs)), key=lambda i: (-costs[i][1], i))
    for i in order:
        name, cost = costs[i]
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owners[name] = rank
        load[rank] += cost
    return {name: owners[name] for name, _ in costs}
