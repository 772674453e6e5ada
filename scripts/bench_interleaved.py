"""Step times of several methods interleaved in one process: ratios that process-to-process noise cannot move.

    python scripts/bench_interleaved.py --model small_cnn --batch-size 2048 --methods asdl_kfac,kfac,sgd --rounds 5

``scripts/bench_step.py`` runs every method in a fresh process, as a user's job would; on this project's
2-core VM two processes doing identical work differ by up to 20 % (docs/benchmarks.md), which hides smaller
differences. Here every method has its own model copy, optimizer and maker (bench_step's ``Runner``: same
initial weights, same batches, weights put back after every step) in one process, and each round times one
cycle (``--interval`` steps: a curvature step, then plain steps) of every method, in an order rotated from
round to round, so that slow drifts of the machine fall on all methods alike. Reported per method: the median
over rounds of its mean plain-step and curvature-step times, and per round the ratio of each method's plain
step to the reference's (the first method), with the median and the range of those paired ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

from bench_step import METHODS, MODELS, Runner

_HERE = Path(__file__).resolve().parent


def _cycle_means(runner: Runner, start: int) -> Dict[str, float]:
    """Mean plain-step and curvature-step wall seconds of the steps recorded since ``start``."""
    steps = runner.times[start:]
    plain = [wall for curvature, wall, _ in steps if not curvature]
    heavy = [wall for curvature, wall, _ in steps if curvature]
    return {"plain": statistics.fmean(plain) if plain else float("nan"),
            "curvature": statistics.fmean(heavy) if heavy else float("nan")}


def run(args: argparse.Namespace) -> Dict:
    builder, in_shape, classes, _ = MODELS[args.model]
    torch.manual_seed(args.seed)
    model = builder().to(args.device)
    init = [p.detach().clone() for p in model.parameters()]
    batches = [(torch.randn(args.batch_size, *in_shape, device=args.device),
                torch.randint(0, classes, (args.batch_size,), device=args.device)) for _ in range(2)]
    runners = [Runner(name, model, init, args) for name in args.methods]
    for runner in runners:
        for _ in range(args.warmup_cycles):
            runner.cycle(batches, measure=False)
    rounds: List[Dict[str, Dict[str, float]]] = []
    for index in range(args.rounds):
        order = runners[index % len(runners):] + runners[:index % len(runners)]
        means = {}
        for runner in order:
            start = len(runner.times)
            runner.cycle(batches, measure=True)
            means[runner.name] = _cycle_means(runner, start)
        rounds.append(means)
        print(f"round {index + 1}/{args.rounds}: " + ", ".join(
            f"{name} {m['plain'] * 1e3:.1f}/{m['curvature'] * 1e3:.1f} ms" for name, m in means.items()),
            file=sys.stderr, flush=True)
    reference = args.methods[0]
    summary = {}
    for name in args.methods:
        ratios = [r[name]["plain"] / r[reference]["plain"] for r in rounds]
        summary[name] = {
            "plain_s_median": statistics.median(r[name]["plain"] for r in rounds),
            "curvature_s_median": statistics.median(r[name]["curvature"] for r in rounds),
            f"plain_over_{reference}_median": statistics.median(ratios),
            f"plain_over_{reference}_range": [min(ratios), max(ratios)],
        }
    return {"rounds": rounds, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--methods", default="asdl_kfac,kfac,sgd",
                        help="comma-separated, the first the reference of the ratios; of " + ", ".join(METHODS))
    parser.add_argument("--interval", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup-cycles", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="JSON path (default bench_results/interleaved_MODEL_bBATCH.json)")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or len(args.methods) < 2:
        parser.error(f"--methods needs two or more of {', '.join(METHODS)}; unknown: {', '.join(unknown) or '-'}")
    if args.rounds < 1 or args.interval < 1 or args.warmup_cycles < 0:
        parser.error("--rounds and --interval must be >= 1, --warmup-cycles >= 0")
    # Runner's settings that this script keeps fixed: the CPU, one inversion per cycle, no micro-batches.
    args.device, args.inverse_interval = "cpu", args.interval
    torch.set_num_threads(args.threads)
    started, load = time.time(), os.getloadavg()
    result = run(args)
    result.update({"command": " ".join(["python", "scripts/bench_interleaved.py", *sys.argv[1:]]),
                   "model": args.model, "batch_size": args.batch_size, "interval": args.interval,
                   "threads": args.threads, "load_average_before": load, "seconds": time.time() - started,
                   "torch": torch.__version__})
    reference = args.methods[0]
    print(f"{'method':12s} {'plain ms':>10s} {'curvature ms':>13s}  plain / {reference} (median, range)")
    for name, row in result["summary"].items():
        low, high = row[f"plain_over_{reference}_range"]
        print(f"{name:12s} {row['plain_s_median'] * 1e3:10.1f} {row['curvature_s_median'] * 1e3:13.1f}  "
              f"{row[f'plain_over_{reference}_median']:.3f} ({low:.3f}-{high:.3f})")
    out = Path(args.out or _HERE.parent / "bench_results" / f"interleaved_{args.model}_b{args.batch_size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
