"""The one-name swap trial: K-FAC's settings, then FOP with nothing else changed, then FOP with kl_clip.

    python scripts/swap_trial.py --data-dir ../shared/data [--epochs 8] [--kl-clip 0.001] [--json PATH]

A LayerNorm MLP-Mixer (``fop_asdl.models.Mixer``) on MNIST, SGD momentum 0.9, lr 0.05, damping 0.1, EMA 0.1,
curvature and inverses every 5 steps, batch 250: settings tuned for K-FAC. Each run reports its test
accuracy after every epoch, or the step at which it stopped (``FloatingPointError``: NaN/Inf in the loss,
gradients or curvature). Without ``--data-dir`` (or ``FOP_DATA``) it runs on the packaged Fashion-MNIST
subset instead, which is what the test suite does at a smaller scale.
"""
from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from typing import Dict, List, Optional

import asdl
import torch
import torch.nn.functional as F

import fop_asdl
from fop_asdl.data import load_dataset
from fop_asdl.data.arrays import load_fashion_mnist_subset
from fop_asdl.models import Mixer

warnings.filterwarnings("ignore", message="Using a non-full backward hook")


def train(method: str, data, epochs: int, batch_size: int, lr: float, kl_clip: Optional[float],
          seed: int) -> Dict:
    """One run; returns per-epoch test accuracy, ν on the first steps (kl_clip) and where it stopped."""
    torch.manual_seed(seed)
    model = Mixer()
    config = asdl.PreconditioningConfig(damping=0.1, ema_decay=0.1, curvature_upd_interval=5,
                                        preconditioner_upd_interval=5)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    extra = {} if kl_clip is None else {"kl_clip": kl_clip, "lr": lambda: opt.param_groups[0]["lr"]}
    gm = fop_asdl.make_gradient_maker(method, model, config, **extra)
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    record: Dict = {"method": method, "lr": lr, "kl_clip": kl_clip, "accuracy": [], "nu": [], "failed_at": None}
    start, step_index = time.perf_counter(), 0
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            x, t = data.x_train[idx], data.y_train[idx]
            opt.zero_grad(set_to_none=True)
            dummy_y = gm.setup_model_call(model, x)
            gm.setup_loss_call(F.cross_entropy, dummy_y, t)
            try:
                gm.forward_and_backward()
            except FloatingPointError as error:
                record["failed_at"] = {"step": step_index, "error": str(error).split(".")[0]}
                record["seconds"] = time.perf_counter() - start
                return record
            if kl_clip is not None and step_index < 200 and step_index % 10 == 0:
                record["nu"].append([step_index, float(gm.last_nu)])
            opt.step()
            step_index += 1
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(xb).argmax(1) == tb).sum())
                          for xb, tb in zip(data.x_test.split(1000), data.y_test.split(1000)))
        record["accuracy"].append(correct / len(data.y_test))
    record["seconds"] = time.perf_counter() - start
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("FOP_DATA"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--kl-clip", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_results/swap_trial.json")
    args = p.parse_args()
    data = load_dataset("mnist", args.data_dir) if args.data_dir else load_fashion_mnist_subset()
    runs: List[Dict] = []
    for method, kl_clip in (("kfac", None), ("fop", None), ("fop", args.kl_clip), ("kfac", args.kl_clip)):
        runs.append(train(method, data, args.epochs, args.batch_size, args.lr, kl_clip, args.seed))
        r = runs[-1]
        ending = (f"stopped at step {r['failed_at']['step']}: {r['failed_at']['error']}" if r["failed_at"]
                  else f"test accuracy {r['accuracy'][-1]:.4f}")
        print(f"| {method} | {kl_clip if kl_clip is not None else 'off'} | {args.lr} | "
              f"{' '.join(f'{a:.3f}' for a in r['accuracy'])} | {ending} | {r['seconds']:.0f} s |", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "dataset": "mnist" if args.data_dir else "fashion_mnist_subset",
                   "runs": runs}, f, indent=1)


if __name__ == "__main__":
    main()
