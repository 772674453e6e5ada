"""Quick offline comparison of SGD, K-FAC and FOP: SmallCNN on the packaged Fashion-MNIST subset.

Every method starts from the same initial weights, sees the same batches in the same order and uses the same
SGD optimizer (momentum 0.9); only the gradient maker and the learning rate differ. Prints a markdown
table; ``--json PATH`` also writes the results. A method whose loss turns NaN/Inf is reported as diverged.

    python scripts/quick_compare.py [--epochs 12] [--methods sgd kfac fop] [--lr kfac=0.02] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional

import asdl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fop_asdl
from fop_asdl.data import ArrayDataset, load_fashion_mnist_subset
from fop_asdl.models import SmallCNN

try:
    from tqdm import tqdm
except ImportError:  # tqdm is optional
    tqdm = None

# ASDL 0.1a5 registers non-full backward hooks; PyTorch warns about them on every curvature pass.
warnings.filterwarnings("ignore", message="Using a non-full backward hook")

#: Rates for these defaults (batch 500, damping 1.0, ema_decay 0.05, interval 5): sgd 0.2 diverged and
#: 0.1 was no better than 0.05. ASDL's EMA starts from zero and scales both Kronecker factors, so the first
#: curvature is 0.05² of the Fisher; damping 1.0 keeps those early steps bounded (at damping 1e-3, K-FAC
#: needs lr ~2e-4). FOP's adaptive η (up to 2) makes its step larger than K-FAC's at the same rate.
DEFAULT_LR: Dict[str, float] = {"sgd": 0.05, "kfac": 0.02, "fop": 0.02}


def progress(n: int, desc: str) -> Iterable[int]:
    """``range(n)`` with a progress bar on stderr (tqdm if installed, else a dot per epoch)."""
    if tqdm is not None:
        return tqdm(range(n), desc=desc, file=sys.stderr, leave=False)
    return _plain_progress(n, desc)


def _plain_progress(n: int, desc: str) -> Iterator[int]:
    print(f"{desc} ({n} epochs) ", end="", file=sys.stderr, flush=True)
    try:
        for i in range(n):
            yield i
            print(".", end="", file=sys.stderr, flush=True)
    finally:  # also when the loop stops early
        print(file=sys.stderr, flush=True)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    model.train()
    return correct / len(x)


def train_step(gm: asdl.GradientMaker, opt: torch.optim.Optimizer, model: nn.Module, x: Tensor,
               y: Tensor) -> bool:
    """One step; False when it diverged (NaN/Inf loss or parameters), so the run stops, not crashes."""
    opt.zero_grad(set_to_none=True)
    dummy_y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, dummy_y, y)
    try:
        _, loss = gm.forward_and_backward()
    except FloatingPointError:  # FOP refuses a NaN/Inf step instead of returning it
        return False
    if not torch.isfinite(loss):
        return False
    opt.step()
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train(method: str, data: ArrayDataset, args: argparse.Namespace, lr: float) -> Dict[str, Any]:
    """Train one SmallCNN with ``method``; return its per-epoch test accuracy and training time."""
    torch.manual_seed(args.seed)  # same initial weights (and MC-Fisher samples) for every method
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    config = asdl.PreconditioningConfig(data_size=args.batch_size, damping=args.damping, ema_decay=0.05,
                                        curvature_upd_interval=args.interval,
                                        preconditioner_upd_interval=args.interval)
    gm = fop_asdl.make_gradient_maker(method, model, None if method == "sgd" else config)
    order = torch.Generator().manual_seed(args.seed)  # same batches for every method
    n, bs = len(data.x_train), args.batch_size
    accs: List[float] = []
    train_seconds = 0.0
    diverged = False
    for _ in progress(args.epochs, method):
        start = time.perf_counter()
        perm = torch.randperm(n, generator=order)
        batches = (perm[i:i + bs] for i in range(0, n - bs + 1, bs))  # drop the last partial batch
        diverged = not all(train_step(gm, opt, model, data.x_train[idx], data.y_train[idx])
                           for idx in batches)
        train_seconds += time.perf_counter() - start
        if diverged:
            break
        accs.append(accuracy(model, data.x_test, data.y_test))
    return {"method": method, "lr": lr, "diverged": diverged, "test_acc_per_epoch": accs,
            "final_test_acc": None if diverged else accs[-1], "best_test_acc": max(accs, default=None),
            "train_seconds": train_seconds}


def markdown_table(results: List[Dict[str, Any]]) -> str:
    def pct(value: Optional[float]) -> str:
        return "diverged" if value is None else f"{100 * value:.1f}%"

    lines = ["| method | lr | final test acc | best test acc | train time (s) |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['lr']:g} | {pct(r['final_test_acc'])} | {pct(r['best_test_acc'])} "
              f"| {r['train_seconds']:.1f} |" for r in results]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--methods", nargs="+", default=["sgd", "kfac", "fop"],
                        choices=sorted(fop_asdl.GRADIENT_MAKERS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help=f"override a learning rate (defaults {DEFAULT_LR})")
    parser.add_argument("--damping", type=float, default=1.0)
    parser.add_argument("--interval", type=int, default=5,
                        help="curvature and preconditioner update interval (steps)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    lrs = dict(DEFAULT_LR)
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in lrs:
            parser.error(f"--lr {item!r}: the method must be one of {sorted(lrs)}.")
        lrs[name] = float(value)

    data = load_fashion_mnist_subset()
    results = [train(method, data, args, lrs[method]) for method in args.methods]
    print(markdown_table(results))
    if args.json is not None:
        config = {**vars(args), "lr": {m: lrs[m] for m in args.methods}, "json": str(args.json)}
        args.json.write_text(json.dumps({"config": config, "results": results}, indent=2))


if __name__ == "__main__":
    main()
