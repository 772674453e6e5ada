"""Per-block mean / min / max of FOP's β and η over the steps of an epoch, without a host sync per step.

``FOPGradientMaker.last_stats`` holds 0-d device tensors after every step. Reading them each step would
stall the device every step; instead they are folded into running device tensors and read once per epoch.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor

__all__ = ["BlockStats", "STAT_NAMES"]

STAT_NAMES = ("beta", "eta")


class BlockStats:
    """Accumulates ``last_stats`` step by step; :meth:`read` returns the epoch's summary and resets."""

    def __init__(self) -> None:
        # Per set of blocks (normally one): sum, min, max of shape (blocks, 2), and the step count.
        self._groups: Dict[Tuple[str, ...], Tuple[Tensor, Tensor, Tensor, int]] = {}

    def add(self, last_stats: Mapping[str, Mapping[str, Tensor]]) -> None:
        if not last_stats:
            return
        names = tuple(last_stats)
        values = torch.stack([torch.stack([last_stats[n][k] for k in STAT_NAMES]) for n in names]).detach()
        if names not in self._groups:
            self._groups[names] = (values.clone(), values.clone(), values.clone(), 1)
            return
        total, low, high, steps = self._groups[names]
        total += values
        torch.minimum(low, values, out=low)
        torch.maximum(high, values, out=high)
        self._groups[names] = (total, low, high, steps + 1)

    def read(self) -> Dict[str, Dict[str, Dict[str, float]]]:
        """{block: {"beta"|"eta": {"mean", "min", "max", "steps"}}} over the steps since the last read."""
        acc: Dict[str, Dict[str, List[float]]] = {}  # block -> stat -> [sum, min, max, steps]
        for names, (total, low, high, steps) in self._groups.items():
            total_l, low_l, high_l = total.tolist(), low.tolist(), high.tolist()  # the one sync per epoch
            for i, name in enumerate(names):
                for j, stat in enumerate(STAT_NAMES):
                    a = acc.setdefault(name, {}).setdefault(stat, [0.0, math.inf, -math.inf, 0])
                    a[0] += total_l[i][j]
                    a[1] = min(a[1], low_l[i][j])
                    a[2] = max(a[2], high_l[i][j])
                    a[3] += steps
        self._groups = {}
        return {
            name: {
                stat: {"mean": a[0] / a[3], "min": a[1], "max": a[2], "steps": int(a[3])}
                for stat, a in stats.items()
            }
            for name, stats in acc.items()
        }
