"""Host syncs per step of every method, by step kind, counted with fop_asdl.diagnostics.syncs.

    python scripts/bench_syncs.py --model small_cnn --batch-size 32 [--extra-blocks 4] [--device cuda]

Every method of the switch (``make_gradient_maker``) and ASDL's own K-FAC with the package's fixes
(``asdl_kfac``: ``fop_asdl.KfacGradientMaker``) runs ``--steps`` steps on random data, curvature / inverses /
HyLo's refresh every ``--interval`` steps and FNGD's and HyLo's epochs of ``--interval`` steps, so every
step kind occurs: ``coefficients`` / ``weighted`` (fngd: its first epoch forms the coefficients),
``refresh`` / ``between`` (hylo), ``plain`` (sgd), ``curvature`` / ``plain`` (every other method: its
curvature, statistics or preconditioner update every ``--interval`` steps). Reported per method and step
kind: the most syncs any such step did, and where they were called from. ``--extra-blocks N`` appends N
Linear(10, 10) blocks to the model: a count that grows with them grows with the number of blocks. On CUDA,
``torch.cuda.set_sync_debug_mode("warn")`` counts too (``cuda_witness``): the driver's own view, beside the
operator count.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import warnings
from typing import Dict, List

import asdl
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.diagnostics.syncs import HostSyncCounter, cuda_sync_debug
from fop_asdl.models import SmallCNN, resnet18_cifar

warnings.filterwarnings("ignore", message="Using a non-full backward hook")

MODELS = {"small_cnn": (SmallCNN, (1, 28, 28)), "resnet18": (resnet18_cifar, (3, 32, 32))}
METHODS = (*fop_asdl.GRADIENT_MAKERS, "asdl_kfac")
OPTIONS = {"kbfgs": {"lr": 1e-3}}  # K-BFGS's second pass steps back by the optimizer's learning rate


def build(model_name: str, extra_blocks: int) -> nn.Module:
    builder, _ = MODELS[model_name]
    layers: List[nn.Module] = [builder()]
    for _ in range(extra_blocks):
        layers += [nn.Tanh(), nn.Linear(10, 10)]
    return nn.Sequential(*layers) if extra_blocks else layers[0]


def step_kind(method: str, index: int, interval: int) -> str:
    heavy = index % interval == 0
    if method == "sgd":
        return "plain"
    if method == "fngd":
        return "coefficients" if index < interval else "weighted"
    if method == "hylo":
        return "refresh" if heavy else "between"
    return "curvature" if heavy else "plain"


def measure(method: str, args: argparse.Namespace) -> Dict[str, Dict]:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build(args.model, args.extra_blocks).to(device)
    config = asdl.PreconditioningConfig(data_size=args.batch_size, damping=1e-2, ema_decay=0.05,
                                        curvature_upd_interval=args.interval,
                                        preconditioner_upd_interval=args.interval)
    if method == "asdl_kfac":
        maker = fop_asdl.KfacGradientMaker(model, config)
    else:
        options = {"iters_per_epoch": args.interval} if method in ("fngd", "hylo") else OPTIONS.get(method, {})
        maker = fop_asdl.make_gradient_maker(method, model, config, **options)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed + 1)
    shape = MODELS[args.model][1]
    kinds: Dict[str, Dict] = {}
    for i in range(args.steps):
        x = torch.randn(args.batch_size, *shape, generator=gen).to(device)
        t = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)

        with cuda_sync_debug() as witnessed, HostSyncCounter() as counter:
            opt.zero_grad(set_to_none=True)
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(F.cross_entropy, dummy, t)
            maker.forward_and_backward()
            opt.step()
        record = {"syncs": counter.count, "places": counter.by_place()}
        cuda = device.type == "cuda"
        if cuda:
            record["cuda_witness"] = len(witnessed)
        kind = step_kind(method, i, args.interval)
        best = kinds.get(kind)
        if best is not None and cuda:  # the most the witness saw on any step of this kind
            record["cuda_witness"] = best["cuda_witness"] = max(record["cuda_witness"], best["cuda_witness"])
        if best is None or record["syncs"] > best["syncs"]:
            kinds[kind] = record
    return kinds


def main(argv=None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--extra-blocks", type=int, default=0)
    p.add_argument("--interval", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    if args.steps < 2 * args.interval:
        p.error("--steps must cover two intervals (FNGD's coefficient epoch, then a weighted one)")
    results = {m: measure(m, args) for m in args.methods.split(",") if m}
    print(f"# host syncs per step: {args.model} (+{args.extra_blocks} Linear blocks), batch {args.batch_size}, "
          f"{args.device}, torch {torch.__version__}\n")
    print("| method | step kind | syncs | where |\n|---|---|---|---|")
    for method, kinds in results.items():
        for kind, record in kinds.items():
            witness = f" (CUDA: {record['cuda_witness']})" if "cuda_witness" in record else ""
            where = "; ".join(f"{n}× {place}" for place, n in record["places"].items())
            print(f"| {method} | {kind} | {record['syncs']}{witness} | {where} |")
    out = {"command": shlex.join(["python"] + sys.argv), "args": vars(args), "torch": torch.__version__,
           "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"\nwrote {args.out}")
    return out


if __name__ == "__main__":
    main()
