"""HyLo's step time and peak memory against SGD and K-FAC (same model, batch, process), at one interval.

Every method gets its own copy of the same initial weights, its own SGD optimizer (lr 0.01, momentum 0.9)
and its own gradient maker: sgd; kfac (``make_gradient_maker("kfac")``, curvature and inverses every
``--interval`` steps, damping 1e-3); hylo_kis and hylo_kid (``make_gradient_maker("hylo")`` with
``switch_policy="kis"`` / ``"kid"``, ρ = ``--ratio``, refresh every ``--interval`` steps, damping 1.0).
Methods run whole cycles of ``--interval`` steps (one refresh or curvature step, then plain steps),
interleaved round robin by cycle so that drift in machine load hits all alike; after every step, outside
the timed region, the weights are copied back. A step is zero_grad, setup_model_call, setup_loss_call,
forward_and_backward and opt.step(), timed with time.perf_counter. ``hylo`` is the paper's mix, KID in
``--kid-share`` of the epochs: mean = share·mean(hylo_kid) + (1 − share)·mean(hylo_kis).
Peak memory: :class:`fop_asdl.diagnostics.memory.LiveTensorBytes` over one refresh/curvature step and one plain step
of each method, after the timing (it slows the operators, so it is never timed). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
from typing import Dict

import asdl
import torch

from bench_common import baseline_maker, restore, timed_step
from fop_asdl import make_gradient_maker
from fop_asdl.diagnostics.memory import LiveTensorBytes
from fop_asdl.models import SmallCNN, resnet18_cifar

MODELS = {"small_cnn": (lambda: SmallCNN(in_channels=1, image_size=28), (1, 28, 28)),
          "resnet18": (resnet18_cifar, (3, 32, 32))}
NAMES = ("sgd", "kfac", "hylo_kis", "hylo_kid")
MIB = 2.0 ** 20


def build(name: str, model: torch.nn.Module, args: argparse.Namespace):
    if name in ("sgd", "kfac"):
        return baseline_maker(name, model, args.interval)
    return make_gradient_maker("hylo", model, asdl.PreconditioningConfig(damping=1.0, curvature_upd_interval=args.interval),
                               compression_ratio=args.ratio, switch_policy=name.split("_")[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--interval", type=int, default=10, help="refresh / curvature interval")
    parser.add_argument("--ratio", type=float, default=0.1, help="HyLo's compression ratio ρ")
    parser.add_argument("--kid-share", type=float, default=0.25, help="share of KID epochs in the hylo mix")
    parser.add_argument("--cycles", type=int, default=2, help="measured cycles of INTERVAL steps per method")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    make_model, shape = MODELS[args.model]
    reference = make_model()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch_size, *shape, generator=gen)
    t = torch.randint(0, 10, (args.batch_size,), generator=gen)
    load_before = os.getloadavg()
    runs: Dict[str, dict] = {}
    for name in NAMES:
        model = copy.deepcopy(reference)
        runs[name] = {"model": model, "maker": build(name, model, args), "refresh": [], "plain": [], "n": 0,
                      "opt": torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                      "init": [p.detach().clone() for p in model.parameters()]}

    def run(name: str, measure: bool) -> None:
        r = runs[name]
        refresh, r["n"] = r["n"] % args.interval == 0, r["n"] + 1
        seconds = timed_step(r["maker"], r["model"], r["opt"], x, t)
        restore(list(r["model"].parameters()), r["init"])
        if measure:
            r["refresh" if refresh else "plain"].append(seconds)

    for name in NAMES:  # warm-up: a refresh (allocates factors and inverses) and a plain step each
        for _ in range(2):
            run(name, measure=False)
    for _ in range(args.cycles):  # every cycle of INTERVAL steps holds one refresh/curvature step
        for name in NAMES:
            for _ in range(args.interval):
                run(name, measure=True)
    results = {}
    for name, r in runs.items():
        times = r["refresh"] + r["plain"]
        results[name] = {"mean_s": statistics.fmean(times), "refresh_s": statistics.fmean(r["refresh"]),
                         "plain_s": statistics.fmean(r["plain"]), "steps": len(times)}
    share = args.kid_share
    results["hylo"] = {key: share * results["hylo_kid"][key] + (1 - share) * results["hylo_kis"][key]
                       for key in ("mean_s", "refresh_s", "plain_s")}
    for name in NAMES:  # peak live tensor bytes of a refresh/curvature step and of a plain step
        for kind in ("refresh", "plain"):
            while (runs[name]["n"] % args.interval == 0) != (kind == "refresh"):
                run(name, measure=False)
            with LiveTensorBytes() as counter:
                run(name, measure=False)
            results[name][f"peak_{kind}_mib"] = counter.peak / MIB
    hylo_state = sum(tensor.numel() * tensor.element_size() for f, _ in runs["hylo_kis"]["maker"].factors.values()
                     for tensor in (f.a, f.g, f.matrix))
    kfac = results["kfac"]["mean_s"]
    print(f"# bench_hylo: {args.model} b{args.batch_size}, interval {args.interval}, ρ = {args.ratio}, "
          f"{torch.get_num_threads()} threads, {args.cycles} cycles per method; `{shlex.join(sys.argv)}`")
    load = {"before": load_before, "after": os.getloadavg()}  # 1/5/15-min: other jobs on the cores inflate times
    print(f"load average before {load['before'][0]:.2f}, after {load['after'][0]:.2f} (1 min); the ratios are "
          "measured in one process, interleaved")
    print("| method | mean step (ms) | refresh/curvature step (ms) | plain step (ms) | x K-FAC (mean) "
          "| peak refresh (MiB) | peak plain (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        r["x_kfac"] = r["mean_s"] / kfac
        peaks = [f"{r[k]:.1f}" if k in r else "-" for k in ("peak_refresh_mib", "peak_plain_mib")]
        label = f"hylo ({100 * share:.0f} % KID)" if name == "hylo" else name
        print(f"| {label} | {1e3 * r['mean_s']:.1f} | {1e3 * r['refresh_s']:.1f} | {1e3 * r['plain_s']:.1f} "
              f"| {r['x_kfac']:.2f} | " + " | ".join(peaks) + " |")
    print(f"HyLo stored factors (A^s, G^s, M of every block): {hylo_state / MIB:.2f} MiB")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"command": shlex.join([sys.executable] + sys.argv), "args": vars(args), "results": results,
                       "hylo_state_bytes": hylo_state, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "load_average": load}, f, indent=1)


if __name__ == "__main__":
    main()
