"""The comparison sweep: methods × batch sizes × learning-rate grid × seeds, with a fair lr per method.

Methods do not share a best learning rate (FOP's adaptive η makes its step ~2× K-FAC's at the same lr),
so each method gets its own grid. For every batch size and method, the first seed runs every lr of the
grid; the best one (fewest epochs to the target; on a tie, or when no lr reaches it, the best test
accuracy) is kept and the remaining seeds run at that lr only.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List

from ..data import ArrayDataset
from .config import ExperimentConfig
from .distributed import Topology
from .protocol import RunSpec
from .train import train_run

__all__ = ["MethodResult", "run_compare", "select_best"]


@dataclass
class MethodResult:
    """One method at one batch size: the lr search on the first seed, and all seeds at the chosen lr."""

    batch_size: int
    method: str
    grid: List[Dict[str, Any]]  # summaries of the first seed, one per lr of the grid
    best_lr: float
    runs: List[Dict[str, Any]]  # summaries at best_lr, one per seed (the first seed's included)


def select_best(summaries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Fewest epochs to target first; then (tie, or never reached) the best test accuracy; then grid order."""

    def key(s: Dict[str, Any]) -> tuple:
        epochs = s["epochs_to_target"]
        return (epochs is None, epochs or 0, -(s["best_accuracy"] or 0.0))

    return min(summaries, key=key)


def run_compare(
    config: ExperimentConfig,
    data: ArrayDataset,
    topo: Topology,
    out: Path,
    resume: bool = False,
    progress: bool = False,
) -> List[MethodResult]:
    """Run the sweep, each run in ``out/b<batch>/<method>/lr<lr>_seed<seed>``; on resume, finished runs are
    reused."""
    first, *others = config.seeds

    def run(method: str, batch: int, lr: float, seed: int) -> Dict[str, Any]:
        spec = RunSpec(config, method, batch, lr, seed)
        summary = train_run(spec, data, topo, out / spec.name, resume=resume, progress=progress)
        if topo.is_main:
            print(_one_line(spec, summary), file=sys.stderr, flush=True)
        return summary

    results = []
    for batch in config.batch_sizes:
        for method in config.methods:
            grid = [run(method, batch, lr, first) for lr in config.lr_grid[method]]
            best = select_best(grid)
            best_lr = best["run"]["base_lr"]
            runs = [best] + [run(method, batch, best_lr, seed) for seed in others]
            results.append(MethodResult(batch, method, grid, best_lr, runs))
    return results


def _one_line(spec: RunSpec, s: Dict[str, Any]) -> str:
    reached = (
        f"target at epoch {s['epochs_to_target']} ({s['train_seconds_to_target']:.1f} s)"
        if s["epochs_to_target"] is not None
        else "target not reached"
    )
    return (
        f"{spec.name}: best {100 * s['best_accuracy']:.1f} %, {reached}"
        f"{', diverged' if s['diverged'] else ''}, {s['train_seconds']:.1f} s training"
    )
