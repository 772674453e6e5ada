"""Where a method's plain (or curvature) step spends its time: ``torch.profiler`` over a few steps of
``scripts/bench_step.py``'s runner, the top operators by self device time (CUDA) or self CPU time, beside
the step time, per method, written as JSON. Profile before changing code (the brief's rule).

    python scripts/profile_step.py --model resnet18 --batch-size 2048 --device cuda --methods asdl_kfac,kfac
    python scripts/profile_step.py --model small_cnn --batch-size 256 --methods kfac,ekfac --kind curvature

Every method runs in this one process, one after the other (the profile's shares, not absolute times, are
the point; ``bench_step.py`` times each method in its own process). ``--kind plain`` profiles
``--steps`` plain steps after the curvature step that starts each cycle; ``--kind curvature`` that many
curvature steps (interval 1).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Dict, List

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import MODELS, Runner  # noqa: E402  (the same model, maker and step as the benchmark)


def profile_method(name: str, args: argparse.Namespace) -> Dict:
    builder, in_shape, classes, _ = MODELS[args.model]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = builder().to(device).train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch_size, *in_shape, generator=gen).to(device)
    t = torch.randint(0, classes, (args.batch_size,), generator=gen).to(device)
    args.interval = 1 if args.kind == "curvature" else args.steps + 1
    args.inverse_interval = args.interval
    runner = Runner(name, model, [p.detach().clone() for p in model.parameters()], args)
    for _ in range(2 if args.kind == "curvature" else args.interval):  # warm-up: a whole cycle, caches
        runner.step(x, t)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    if args.kind == "plain":
        runner.step(x, t)  # the cycle's curvature step, unprofiled (interval = steps + 1)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            runner.step(x, t)
        if device.type == "cuda":
            torch.cuda.synchronize()
    step_ms = (time.perf_counter() - start) / args.steps * 1e3
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    top: List[Dict] = [{"op": e.key, "calls": e.count // args.steps, f"{key}_ms_per_step":
                        getattr(e, key) / 1e3 / args.steps, "self_cpu_ms_per_step": e.self_cpu_time_total / 1e3 /
                        args.steps} for e in events[:args.top]]
    launches = sum(e.count for e in prof.key_averages() if e.key.startswith(("cudaLaunchKernel", "cuLaunchKernel")))
    ops = compute_ops(prof) / args.steps
    print(f"=== {name}: {args.kind} step {step_ms:.1f} ms (profiled), kernel launches per step "
          f"{launches / args.steps:.0f}, compute operators per step {ops:.0f}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.top, max_name_column_width=50))
    return {"step_ms_profiled": step_ms, "kernel_launches_per_step": launches / args.steps,
            "compute_ops_per_step": ops, "top": top}


#: Operators that make no kernel: views, metadata and allocations.
NO_KERNEL = {"aten::" + op for op in (
    "as_strided view view_as _reshape_alias _unsafe_view reshape flatten unflatten alias detach t transpose mT "
    "permute unsqueeze squeeze expand expand_as select slice narrow split split_with_sizes unbind chunk numpy_T "
    "resolve_conj lift_fresh empty empty_like empty_strided new_empty to _local_scalar_dense").split()}


def computes(name: str) -> bool:
    return name.startswith("aten::") and name not in NO_KERNEL


def compute_ops(prof: profile) -> int:
    """Aten operators that compute (no view, no allocation) and call no other such operator directly (a
    ``matmul`` counts as its ``mm``; a ``mul`` whose scalar is first copied counts with that copy): on a GPU
    roughly the kernels a step launches, counted on any device (the CPU's count does not depend on the load;
    a ``_foreach`` operator counts once per tensor on the CPU, once per kernel on CUDA)."""
    return sum(1 for e in prof.events() if computes(e.name) and not any(computes(c.name) for c in e.cpu_children))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--methods", default="asdl_kfac,kfac")
    p.add_argument("--kind", choices=["plain", "curvature"], default="plain")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default bench_results/profile_MODEL_bBATCH_KIND.json)")
    args = p.parse_args()
    args.batch_size = args.batch_size or MODELS[args.model][3]
    results = {name: profile_method(name, args) for name in args.methods.split(",") if name}
    out = args.out or f"bench_results/profile_{args.model}_b{args.batch_size}_{args.kind}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
                   "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None, "results": results},
                  f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
