"""The tests' shared scaffolding (issue 21): tiny models and batches, the ASDL step idiom and its training loop,
checkpoints, the processes tests start (gloo ranks, worker scripts), fault injection and the comparisons the
tests share. Importable from every test folder (setup.cfg's ``pythonpath = tests``) and from the processes the
tests start (``worker_env``); the dense references the tests share are in dense_refs.py, fixtures and pytest
hooks in conftest.py."""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Callable, List, Optional

import asdl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.data import load_fashion_mnist_subset
from fop_asdl.models import SmallCNN

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def script_module(name: str):
    """The module of ``scripts/<name>.py`` (the scripts are not a package), imported once."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "scripts"))


# -- tiny models and batches --------------------------------------------------------------------------------------

def small_image_batch(i: int, n: int = 8):
    """Batch ``i``: n random 1×6×6 images (float64) and labels of 3 classes."""
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def per_sample_net() -> nn.Module:
    """Every layer FNGD and HyLo precondition: Conv2d (stride, padding, bias), Linear with and without bias;
    BatchNorm too (its parameters get the plain gradient)."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))


def independent_net() -> nn.Module:
    """``per_sample_net`` without BatchNorm: samples are independent, so a batch may be cut into micro-batches
    or ranks."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))


def conv_bn_ln_net() -> nn.Module:
    """Every block type FOP preconditions: Conv2d, BatchNorm2d, Linear, LayerNorm."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def conv_ln_net() -> nn.Module:
    """No BatchNorm: samples are independent, so g1 and g2 are the gradients of the two halves alone."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 6 * 6, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))


class TokenNet(nn.Module):
    """(batch, tokens, 3) -> a Linear embedding, one torch TransformerEncoderLayer (its attention projections
    are blocks), the mean over tokens and a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.body = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(self.embed(x)).mean(1))


class TiedTokenNet(nn.Module):
    """(batch, tokens) ids -> an Embedding whose weight the output head shares (GPT-2's tie), a Linear, the
    mean over tokens and the tied head: one parameter with a block's use and a plain use."""

    VOCAB = 7

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, 5)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, self.VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.emb(tokens))).mean(1))


# -- the ASDL step idiom, training and checkpoints ----------------------------------------------------------------

def config(**kwargs) -> asdl.PreconditioningConfig:
    base = dict(damping=1e-2, ema_decay=0.1, curvature_upd_interval=2, preconditioner_upd_interval=2)
    base.update(kwargs)
    return asdl.PreconditioningConfig(**base)


def token_ce(y, t, reduction="mean"):
    """A custom loss with a reduction argument: cross-entropy over the flattened (B·T) tokens, padding -100."""
    return F.cross_entropy(y.flatten(0, 1), t.flatten(), reduction=reduction)


def step(maker, model, x, t, loss_fn=F.cross_entropy):
    """One ASDL gradient-maker step: the same three calls for FOP, K-FAC and SGD."""
    dummy_y = maker.setup_model_call(model, x)
    maker.setup_loss_call(loss_fn, dummy_y, t)
    return maker.forward_and_backward()


def quiet_maker(name: str, model, cfg, **options):
    """``name``'s maker, its construction warnings (what it does not precondition) silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fop_asdl.make_gradient_maker(name, model, cfg, **options)


def build(name: str, net: Callable[[], nn.Module], cfg, opt_lr: float = 0.05, dtype: torch.dtype = torch.float64,
          quiet: bool = False, **options):
    """Seed 0, ``net()`` in ``dtype``, ``name``'s maker with ``options`` (a ``quiet_maker`` if ``quiet``) and SGD
    with momentum 0.9 at ``opt_lr``: (model, maker, opt)."""
    torch.manual_seed(0)
    model = net().to(dtype)
    maker = (quiet_maker if quiet else fop_asdl.make_gradient_maker)(name, model, cfg, **options)
    return model, maker, torch.optim.SGD(model.parameters(), lr=opt_lr, momentum=0.9)


def train(model, maker, opt, steps, batches=small_image_batch) -> List[List[torch.Tensor]]:
    """``step`` then ``opt.step()`` on ``batches(i)`` for each i in ``steps``; every step's ``p.grad``."""
    grads = []
    for i in steps:
        x, t = batches(i)
        opt.zero_grad(set_to_none=True)
        step(maker, model, x, t)
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return grads


def checkpoint(model, maker, opt) -> dict:
    return {"model": model.state_dict(), "maker": maker.state_dict(), "opt": opt.state_dict()}


def restore(state: dict, model, maker, opt):
    """Load a ``checkpoint`` into (model, maker, opt); returns them."""
    model.load_state_dict(state["model"])
    maker.load_state_dict(state["maker"])
    opt.load_state_dict(state["opt"])
    return model, maker, opt


def assert_same_parameters(model, saved) -> None:
    """The model's parameters equal ``saved`` (a list of tensors, another process's), bit for bit."""
    for p, q in zip(model.parameters(), saved):
        assert torch.equal(p.detach(), q)


SUBSET_BATCH, SUBSET_EPOCHS = 250, 12


def subset_accuracy(name: str, config: Optional[asdl.PreconditioningConfig], lr: float, **options):
    """Train a SmallCNN with ``name``'s maker on the Fashion-MNIST subset shipped in the package (seed 0,
    batch 250, 12 epochs: 240 steps, SGD momentum 0.9); (test accuracy, maker). FNGD and HyLo get
    ``iters_per_epoch`` = 20."""
    torch.manual_seed(0)
    data = load_fashion_mnist_subset()
    model = SmallCNN()
    if name in ("fngd", "hylo"):
        options.setdefault("iters_per_epoch", -(-len(data.x_train) // SUBSET_BATCH))
    maker = fop_asdl.make_gradient_maker(name, model, config, **options)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(SUBSET_EPOCHS):
        for idx in torch.randperm(len(data.x_train), generator=gen).split(SUBSET_BATCH):
            opt.zero_grad(set_to_none=True)
            _, loss = step(maker, model, data.x_train[idx], data.y_train[idx])
            opt.step()
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        return (model(data.x_test).argmax(1) == data.y_test).float().mean().item(), maker


# -- processes: worker scripts, gloo ranks and their share of a global batch --------------------------------------

def worker_env(**extra: str) -> dict:
    """The environment of a process a test starts: this checkout's package and tests/ (this module) first on its
    path."""
    path = [str(TESTS), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


def resumed_in_fresh_process(script: Path, tmp_path: Path, *args: str) -> List[torch.Tensor]:
    """Run the worker ``script`` with ``args``, then the checkpoint tmp_path/ckpt.pt and the file it saves its
    parameters to: those parameters."""
    subprocess.run([sys.executable, str(script), *args, str(tmp_path / "ckpt.pt"), str(tmp_path / "params.pt")],
                   check=True, cwd=script.parent, env=worker_env())
    return torch.load(tmp_path / "params.pt")


def spawn_ranks(fn: Callable, world_size: int, tmp_path: Path, *args) -> list:
    """``fn(rank, world_size, store, out, *args)`` on ``world_size`` spawned processes; what each rank saved to
    ``f"{out}.{rank}"``."""
    store, out = str(tmp_path / "store"), str(tmp_path / "out")
    mp.start_processes(fn, args=(world_size, store, out, *args), nprocs=world_size, join=True, start_method="spawn")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world_size)]


def init_gloo(rank: int, world_size: int, store: str, timeout_s: float = 60.0) -> None:
    """Join a gloo group of ``world_size`` ranks through the file ``store``, one thread per rank."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


LOCAL = 4  # samples per rank of the sharded-equivalence runs


def local_rows(rank: int, world_size: int) -> torch.Tensor:
    return torch.arange(rank * LOCAL, (rank + 1) * LOCAL)


def single_process_order(mode: str, world_size: int) -> torch.Tensor:
    """The global batch as one process sees it: B1 first, B2 second, exactly as the ranks form them."""
    if mode == "ranks":
        ranks = list(range(0, world_size, 2)) + list(range(1, world_size, 2))
        return torch.cat([local_rows(r, world_size) for r in ranks])
    half = LOCAL // 2
    first = [local_rows(r, world_size)[:half] for r in range(world_size)]
    second = [local_rows(r, world_size)[half:] for r in range(world_size)]
    return torch.cat(first + second)


# -- faults ---------------------------------------------------------------------------------------------------------

class InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss whose gradients overflow."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class UserError(Exception):
    pass


def failing_loss(y, t, reduction="mean"):
    raise UserError("the user's loss failed")


def failing_step(maker, model, x, t, fault: str) -> None:
    """A step with ``fault`` raises its error: "nan_input" (a NaN in sample 3) and "inf_gradient" (a finite loss
    whose gradients overflow) the clear FloatingPointError, "loss_raises" the user's loss's own error."""
    call, loss_fn = model, F.cross_entropy
    expected = pytest.raises(FloatingPointError, match="Nothing was updated")
    if fault == "nan_input":
        x = x.clone()
        x[3] = float("nan")
    elif fault == "inf_gradient":
        def overflowing(inp):
            return InfGradient.apply(model(inp))
        call = overflowing
    elif fault == "loss_raises":
        loss_fn, expected = failing_loss, pytest.raises(UserError)
    else:
        raise ValueError(fault)
    dummy = maker.setup_model_call(call, x)
    maker.setup_loss_call(loss_fn, dummy, t)
    with expected:
        maker.forward_and_backward()


# -- comparisons ----------------------------------------------------------------------------------------------------

def assert_equal_nested(a, b, where: str = "") -> None:
    """Nested state (tensors, dicts, lists, tuples, other values) equal bit for bit: the same structure and
    types, tensors of the same dtype and values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_equal_nested(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_close_steps(actual, expected, rtol: float) -> None:
    """Step by step, every tensor of ``actual`` within ``rtol`` of ``expected``'s, relative to that step's
    largest entry."""
    for k, (a_step, e_step) in enumerate(zip(actual, expected)):
        scale = max(float(g.abs().max()) for g in e_step)
        for a, e in zip(a_step, e_step):
            torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale, msg=lambda m: f"step {k}: {m}")


def max_relative_error(actual, expected) -> float:
    """The largest ‖a − e‖ / ‖e‖ over the pairs of tensors."""
    return max(float((a - e).norm() / e.norm()) for a, e in zip(actual, expected))


def state_tensors(state) -> List[torch.Tensor]:
    """Every tensor of a nested state."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in state_tensors(v)]
    return [t for v in state for t in state_tensors(v)] if isinstance(state, (list, tuple)) else []


# -- the runner -----------------------------------------------------------------------------------------------------

#: A slice of the packaged real Fashion-MNIST subset: 600 train / 200 test images.
SLICE = ["subset_size=600", "test_size=200", "base_batch=100", "eval_batch_size=100"]
TIMING = {"train_seconds", "train_seconds_total", "eval_seconds", "load_average"}


def epoch_records(run_dir: Path) -> list:
    """A run's epoch records."""
    return [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]


def assert_resumed_run_equal(whole: Path, split: Path, epochs: int, keys) -> list:
    """An interrupted and resumed run (``split``) against the uninterrupted one (``whole``): ``epochs`` records,
    the same but for their timings, and checkpoint entries ``keys`` equal bit for bit; the records."""
    expected, resumed = epoch_records(whole), epoch_records(split)
    assert len(expected) == len(resumed) == epochs
    for a, b in zip(expected, resumed):
        assert {k: v for k, v in a.items() if k not in TIMING} == {k: v for k, v in b.items() if k not in TIMING}
    states = [torch.load(run / "checkpoint.pt", weights_only=True) for run in (whole, split)]
    for key in keys:
        assert_equal_nested(states[0][key], states[1][key], key)
    return expected
