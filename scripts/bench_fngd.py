"""FNGD's step time in its coefficient epoch and after it, against SGD and K-FAC (same model, batch, process).

Every method gets its own copy of the same initial weights, its own SGD optimizer (lr 0.01, momentum 0.9)
and its own gradient maker; ``--batches`` random batches (fixed seed) make one FNGD epoch. Methods:
sgd; kfac (curvature and inverses every ``--interval`` steps, the cost averaged over whole cycles);
fngd_coef (FNGD in its coefficient epoch: Gram, damping and solve every step); fngd (FNGD after its
coefficient epoch, which ran unmeasured first: only the weighted sums). Steps are interleaved round robin
so that drift in machine load hits all methods alike, and after every step, outside the timed region, the
weights are copied back, so every step does the full work at representative values. A step is zero_grad,
setup_model_call, setup_loss_call, forward_and_backward and opt.step(), timed with time.perf_counter.
Prints a table and writes JSON (``--json``).
"""
from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
from typing import Dict

import torch

from bench_common import baseline_maker, restore, timed_step
from fop_asdl import make_gradient_maker
from fop_asdl.models import SmallCNN, resnet32_cifar

MODELS = {"small_cnn": (lambda: SmallCNN(in_channels=1, image_size=28), (1, 28, 28)),
          "resnet32": (resnet32_cifar, (3, 32, 32))}


def build(name: str, model: torch.nn.Module, args: argparse.Namespace):
    if name in ("sgd", "kfac"):
        return baseline_maker(name, model, args.interval)
    steps = 10 ** 9 if name == "fngd_coef" else args.batches  # fngd_coef never leaves its coefficient epoch
    return make_gradient_maker("fngd", model, None, iters_per_epoch=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=4, help="batches per FNGD epoch")
    parser.add_argument("--interval", type=int, default=10, help="K-FAC curvature/inverse interval")
    parser.add_argument("--rounds", type=int, default=10, help="measured steps per method (K-FAC: x interval)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    make_model, shape = MODELS[args.model]
    reference = make_model()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch_size, *shape, generator=gen), torch.randint(0, 10, (args.batch_size,),
                                                                                   generator=gen))
               for _ in range(args.batches)]
    names = ["sgd", "kfac", "fngd_coef", "fngd"]
    runs: Dict[str, dict] = {}
    for name in names:
        model = copy.deepcopy(reference)
        runs[name] = {"model": model, "maker": build(name, model, args),
                      "opt": torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
                      "init": [p.detach().clone() for p in model.parameters()], "times": [], "i": 0}

    def run(name: str, measure: bool) -> None:
        r = runs[name]
        x, t = batches[r["i"] % args.batches]
        r["i"] += 1
        seconds = timed_step(r["maker"], r["model"], r["opt"], x, t)
        restore(list(r["model"].parameters()), r["init"])
        if measure:
            r["times"].append(seconds)

    for _ in range(args.batches):  # warm-up; fills FNGD's bank (its coefficient epoch)
        for name in names:
            run(name, measure=False)
    for name in names:
        runs[name]["i"] = 0
    for _ in range(args.rounds):
        for name in names:
            for _ in range(args.interval if name == "kfac" else 1):  # whole K-FAC cycles
                run(name, measure=True)
    results = {name: {"mean_s": statistics.fmean(r["times"]), "median_s": statistics.median(r["times"]),
                      "steps": len(r["times"])} for name, r in runs.items()}
    sgd = results["sgd"]["mean_s"]
    bank = runs["fngd"]["maker"].bank_bytes()
    print(f"{args.model} b{args.batch_size}, {torch.get_num_threads()} threads, K-FAC interval {args.interval}")
    print("| method | mean step (ms) | median (ms) | x SGD (mean) |")
    print("|---|---|---|---|")
    for name, r in results.items():
        r["x_sgd"] = r["mean_s"] / sgd
        print(f"| {name} | {1e3 * r['mean_s']:.1f} | {1e3 * r['median_s']:.1f} | {r['x_sgd']:.2f} |")
    print(f"FNGD bank: {bank} bytes for {args.batches} iterations "
          f"({bank / args.batches:.0f} per iteration)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": shlex.join([sys.executable] + sys.argv), "args": vars(args), "results": results,
                       "fngd_bank_bytes": bank, "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
