"""Shared helpers: tiny models, the ASDL training-step idiom, configs."""
from __future__ import annotations

import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn


def step(maker, model, x, t, loss_fn=F.cross_entropy):
    """One ASDL gradient-maker step: the same three calls for FOP, K-FAC and SGD."""
    dummy_y = maker.setup_model_call(model, x)
    maker.setup_loss_call(loss_fn, dummy_y, t)
    return maker.forward_and_backward()


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


def config(**kwargs) -> asdl.PreconditioningConfig:
    base = dict(damping=1e-2, ema_decay=0.1, curvature_upd_interval=2, preconditioner_upd_interval=2)
    base.update(kwargs)
    return asdl.PreconditioningConfig(**base)


@pytest.fixture
def image_batch():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(11, 1, 6, 6, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 3, (11,), generator=gen)
    return x, t
