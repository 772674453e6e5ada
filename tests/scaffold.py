"""The tests' shared scaffolding (issue 21): tiny models and batches, the ASDL step idiom and its training loop,
the processes tests start (gloo ranks, worker scripts) and dense references. Importable from every test folder
(setup.cfg's ``pythonpath = tests``) and from the processes the tests start (``worker_env``). Fixtures and
pytest hooks live in conftest.py."""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import List, Optional

import asdl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.data import load_fashion_mnist_subset
from fop_asdl.models import SmallCNN

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def step(maker, model, x, t, loss_fn=F.cross_entropy):
    """One ASDL gradient-maker step: the same three calls for FOP, K-FAC and SGD."""
    dummy_y = maker.setup_model_call(model, x)
    maker.setup_loss_call(loss_fn, dummy_y, t)
    return maker.forward_and_backward()


def small_image_batch(i: int, n: int = 8):
    """Batch ``i``: n random 1×6×6 images (float64) and labels of 3 classes."""
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


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
    are blocks of FOP and K-FAC), the mean over tokens and a Linear head."""

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


def config(**kwargs) -> asdl.PreconditioningConfig:
    base = dict(damping=1e-2, ema_decay=0.1, curvature_upd_interval=2, preconditioner_upd_interval=2)
    base.update(kwargs)
    return asdl.PreconditioningConfig(**base)


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


SUBSET_BATCH, SUBSET_EPOCHS = 250, 12


# -- processes: the environment of a started process, gloo ranks and their share of a global batch ------------

def worker_env(**extra: str) -> dict:
    """The environment of a process a test starts: this checkout's package and tests/ (this module) first on its
    path."""
    path = [str(TESTS), str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}


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


# -- dense references ------------------------------------------------------------------------------------------

def dense_fop(g1, g2, n1: int, n: int, metric, damped, beta="adaptive", eps=1e-12):
    """FOP_SPEC steps 1-8 with dense matrices (β adaptive or fixed, η adaptive, their default clamps), g1 the
    mean gradient of the first n1 of n samples: (the direction, its scalars)."""
    g_avg = (n1 * g1 + (n - n1) * g2) / n
    g_diff = g1 - g2
    s = (g_diff @ metric @ g_avg) / (g_avg @ metric @ g_avg + eps)
    g_perp = g_diff - s * g_avg
    inv = torch.linalg.inv(damped)
    u, v = inv @ g_avg, inv @ g_perp
    big_a, big_d, big_e = g_avg @ u, g_avg @ v, g_perp @ v
    beta = (big_d / big_e).clamp(-0.5, 0.5) if beta == "adaptive" else torch.tensor(beta, dtype=g_avg.dtype)
    g_comb = g_avg + beta * g_perp
    eta = (2 * g_avg @ inv @ g_comb / (g_comb @ inv @ g_comb)).clamp(0.0, 2.0)
    return eta * (u + beta * v), dict(s=s, beta=beta, eta=eta, A=big_a, D=big_d, E=big_e)
