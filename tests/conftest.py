"""Shared helpers: tiny models, the ASDL training-step idiom, configs."""
from __future__ import annotations

from typing import List, Optional

import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.data import load_fashion_mnist_subset
from fop_asdl.models import SmallCNN


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where no CUDA device is (scripts/gpu_check.sh runs them)."""
    if torch.cuda.is_available():
        return
    built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    skip = pytest.mark.skip(reason=f"needs a CUDA device: torch.cuda.is_available() is False (torch "
                                   f"{torch.__version__}, {built})")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


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


@pytest.fixture
def image_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 1, 6, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 3, (11,), generator=gen)
    return x, t
