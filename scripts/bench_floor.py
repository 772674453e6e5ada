"""The floor of FOP's step time relative to K-FAC's, set by the work FOP_SPEC prescribes.

Per curvature block FOP needs, beyond K-FAC's F̃⁻¹ g_avg, one more F̃⁻¹ product (for g_diff) and one F
product (the projection metric): two more products of the same shapes as K-FAC's preconditioning. This
script measures, on the same model, batch and interval as ``bench_step.py``, K-FAC's median plain and
curvature step times and the time of one preconditioning pass over all blocks (ASDL's own
``precondition()``), and prints the resulting lower bounds:

    plain-step floor = (plain + 2·P) / plain
    mean-step floor  = ((I−1)·plain + curvature + I·2·P) / ((I−1)·plain + curvature)   (interval I)

Any exact implementation of the spec on this machine is at or above these ratios.

    python scripts/bench_floor.py [--model small_cnn resnet18] [--repeats 5] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from bench_step import MODELS, Runner

warnings.filterwarnings("ignore", message="Using a non-full backward hook")


def measure(model_name: str, interval: int, repeats: int, seed: int) -> Dict[str, float]:
    builder, in_shape, classes, batch = MODELS[model_name]
    args = argparse.Namespace(batch_size=batch, interval=interval, inverse_interval=interval, device="cpu")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = builder().train()
    batches: List[Tuple[torch.Tensor, torch.Tensor]] = [
        (torch.randn(batch, *in_shape, generator=gen), torch.randint(0, classes, (batch,), generator=gen))]
    runner = Runner("kfac", model, [p.detach().clone() for p in model.parameters()], args)
    runner.cycle(batches, measure=False)  # warm-up: curvature and inverses exist
    runner.cycle(batches, measure=True)
    plain = statistics.median(wall for curv, wall, _ in runner.times if not curv)
    curvature = statistics.median(wall for curv, wall, _ in runner.times if curv)
    products = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.gm.precondition()
        products.append(time.perf_counter() - start)
    product = statistics.median(products)
    cycle = (interval - 1) * plain + curvature
    return {"batch": batch, "interval": interval, "kfac_plain_s": plain, "kfac_curvature_s": curvature,
            "preconditioning_s": product, "plain_floor": (plain + 2 * product) / plain,
            "mean_floor": (cycle + interval * 2 * product) / cycle}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", choices=sorted(MODELS), default=["small_cnn", "resnet18"])
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_results/floor.json")
    args = p.parse_args()
    results = {name: measure(name, args.interval, args.repeats, args.seed) for name in args.model}
    print("| model, batch | K-FAC plain ms | K-FAC curvature ms | one preconditioning pass ms "
          "| FOP/K-FAC floor, plain steps | FOP/K-FAC floor, mean step |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name}, {r['batch']} | {r['kfac_plain_s'] * 1e3:.1f} | {r['kfac_curvature_s'] * 1e3:.1f} "
              f"| {r['preconditioning_s'] * 1e3:.1f} | {r['plain_floor']:.3f} | {r['mean_floor']:.3f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
