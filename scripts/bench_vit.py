"""Step time and memory of FOP, K-FAC and AdamW on the model zoo's ViT, one process, at several batch sizes.

Protocol. Fashion-MNIST-shaped random inputs (1x28x28, 10 classes) under a fixed seed: a speed benchmark, the
losses mean nothing. AdamW updates every parameter from the plain gradient; "kfac" and "fop" are the paper's
transformer protocol: the maker preconditions the Linear/Conv blocks (attention projections included,
LayerNorm ignored), SGD momentum updates those, AdamW the rest (fop_asdl.optim.hybrid). Curvature and inverses are
refreshed every ``--interval`` steps; a *cycle* is one curvature step and interval-1 plain steps, and the step
time reported is the mean over ``--cycles`` cycles after one unmeasured warm-up cycle (the median of the plain
steps and of the curvature steps are listed too). Each method runs in a fresh subprocess, so its figures are
its own: ``peak_rss`` is the process's peak resident set (``resource.getrusage``; it includes torch itself and
the allocator's cached blocks), ``live_peak`` the largest live tensor bytes during one extra cycle counted by
``fop_asdl.diagnostics.memory.LiveTensorBytes`` (weights and state that existed before it are not counted; that cycle is
not timed, the counter slows operators down).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

METHODS = ("adamw", "kfac", "fop")
MB = 2 ** 20


def worker(method: str, batch: int, args: argparse.Namespace) -> Dict[str, Any]:
    """One method at one batch size, in this process."""
    import asdl
    import torch
    from torch import nn

    from bench_common import timed_step
    from fop_asdl import make_gradient_maker
    from fop_asdl.optim.hybrid import HybridOptimizer, other_parameters, preconditioned_parameters
    from fop_asdl.diagnostics.memory import LiveTensorBytes
    from fop_asdl.models import VisionTransformer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = VisionTransformer(dim=args.dim, depth=args.depth, heads=args.heads)
    if method == "adamw":
        gm = make_gradient_maker("sgd", model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    else:
        config = asdl.PreconditioningConfig(damping=1.0, ema_decay=0.05, ignore_modules=[nn.LayerNorm],
                                            curvature_upd_interval=args.interval,
                                            preconditioner_upd_interval=args.interval)
        gm = make_gradient_maker(method, model, config)
        opt = HybridOptimizer(torch.optim.SGD(preconditioned_parameters(gm), lr=1e-3, momentum=0.9),
                              torch.optim.AdamW(other_parameters(gm), lr=1e-4, weight_decay=0.05))
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(batch, 1, 28, 28, generator=gen), torch.randint(0, 10, (batch,), generator=gen)

    def one_step() -> float:
        return timed_step(gm, model, opt, x, t)

    for _ in range(args.interval):  # warm-up cycle
        one_step()
    times = [one_step() for _ in range(args.interval * args.cycles)]
    with LiveTensorBytes() as counter:
        for _ in range(args.interval):
            one_step()
    curvature = times[::args.interval]
    plain = [s for i, s in enumerate(times) if i % args.interval]
    return {"method": method, "batch": batch, "step_seconds_mean": statistics.fmean(times),
            "curvature_step_seconds_median": statistics.median(curvature),
            "plain_step_seconds_median": statistics.median(plain) if plain else None,
            "live_peak_bytes": counter.peak, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "parameters": sum(p.numel() for p in model.parameters())}


def table(results: List[Dict[str, Any]]) -> str:
    lines = ["| batch | method | step (s, mean of a cycle) | plain step (s) | curvature step (s) | x AdamW time | "
             "live tensor peak (MiB) | x AdamW | peak RSS (MiB) |", "|---" * 9 + "|"]
    for r in results:
        base = next(b for b in results if b["batch"] == r["batch"] and b["method"] == "adamw")
        plain = "-" if r["plain_step_seconds_median"] is None else f"{r['plain_step_seconds_median']:.3f}"
        lines.append(f"| {r['batch']} | {r['method']} | {r['step_seconds_mean']:.3f} | {plain} | "
                     f"{r['curvature_step_seconds_median']:.3f} | {r['step_seconds_mean'] / base['step_seconds_mean']:.2f} | "
                     f"{r['live_peak_bytes'] / MB:.0f} | {r['live_peak_bytes'] / base['live_peak_bytes']:.2f} | "
                     f"{r['peak_rss_bytes'] / MB:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--interval", type=int, default=10, help="curvature/inverse update interval (steps)")
    parser.add_argument("--cycles", type=int, default=2, help="measured cycles per method")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per method process")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args)))
        return
    forwarded = [f"--{k}={getattr(args, k)}" for k in ("interval", "cycles", "dim", "depth", "heads", "threads")]
    results = []
    for batch in args.batch_sizes:
        for method in METHODS:
            done = subprocess.run([sys.executable, __file__, *forwarded, "--worker", method, str(batch)],
                                  capture_output=True, text=True, check=False)
            if done.returncode:
                raise RuntimeError(f"{method} at batch {batch} failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"done: {method} b{batch}", file=sys.stderr)
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items() if k not in ("json", "worker")},
                                         "command": " ".join(sys.argv), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
