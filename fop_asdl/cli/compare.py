"""The comparison sweep: methods × batch sizes × search points × seeds, with an equal search budget.

Methods do not share a best learning rate (FOP's adaptive η makes its step ~2× K-FAC's at the same lr) nor a
best damping, so each method has its own search space, and every method gets the same number of trials
(:mod:`.search`). For every batch size and method, the first seed runs every trial; the best one (fewest
epochs to the target; on a tie, or when no trial reaches it, the best test accuracy) is kept and the
remaining seeds run at that point only.
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
from .search import Point, edges, method_points
from .train import train_run

__all__ = ["MethodResult", "run_compare", "select_best"]


@dataclass
class MethodResult:
    """One method at one batch size: its search on the first seed, and all seeds at the chosen point."""

    batch_size: int
    method: str
    search: List[Dict[str, Any]]  # summaries of the first seed, one per trial
    best_point: Point  # the chosen trial's {"lr": base lr, other hyperparameter: value}
    edges: List[str]  # "<name> low|high": the chosen value is the lowest / highest tried
    runs: List[Dict[str, Any]]  # summaries at best_point, one per seed (the first seed's included)


def select_best(summaries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Fewest epochs to target first; then (tie, or never reached) the best test accuracy; then trial
    order."""

    def key(s: Dict[str, Any]) -> tuple:
        epochs = s["epochs_to_target"]
        return (epochs is None, epochs or 0, -(s["best_accuracy"] or 0.0))

    return min(summaries, key=key)


def run_compare(
    config: ExperimentConfig,
    data: ArrayDataset,
    topo: Topology,
    out: Path,
    environment: Dict[str, Any],
    resume: bool = False,
    progress: bool = False,
) -> List[MethodResult]:
    """Run the sweep, each run in ``out/<RunSpec.name>``; on resume, finished runs are reused."""
    first, *others = config.seeds

    def run(method: str, batch: int, point: Point, seed: int) -> Dict[str, Any]:
        spec = RunSpec.at(config, method, batch, point, seed)
        summary = train_run(spec, data, topo, out / spec.name, environment, resume=resume, progress=progress)
        if topo.is_main:
            print(_one_line(spec, summary), file=sys.stderr, flush=True)
        return summary

    results = []
    for batch in config.batch_sizes:
        for method in config.methods:
            points = method_points(config, method)
            search = [run(method, batch, point, first) for point in points]
            best = select_best(search)
            best_point = best["run"]["point"]
            runs = [best] + [run(method, batch, best_point, seed) for seed in others]
            results.append(MethodResult(batch, method, search, best_point, edges(best_point, points), runs))
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
