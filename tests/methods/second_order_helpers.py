"""Shared pieces of the tests of SMW-NG, SENG, diagonal NG, K-BFGS and Kronecker PSGD (tests/methods):
tiny float64 nets, the ASDL step idiom, per-sample gradients by an autograd loop."""
from __future__ import annotations

from typing import Callable, List, Optional

import asdl
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl

METHODS = ["smw_ng", "seng", "diag_ng", "kbfgs", "kron_psgd"]
LR = 0.05


def net() -> nn.Module:
    """Conv2d (stride 2, padding 1, bias), Linear + bias, Linear without bias; samples independent."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))


def bn_net() -> nn.Module:
    """``net`` with a BatchNorm2d, whose parameters no method here preconditions."""
    return nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 6), nn.Tanh(), nn.Linear(6, 3, bias=False))


class TokenNet(nn.Module):
    """(batch, tokens, 3) → a Linear embedding, a torch TransformerEncoderLayer (its attention projections are
    blocks), the mean over tokens, a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.body = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(self.embed(x)).mean(1))


BLOCKS = (0, 3, 5)  # net's Conv2d, Linear + bias, Linear


def batch(i: int, n: int = 8):
    gen = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def config(**kwargs) -> asdl.PreconditioningConfig:
    base = dict(damping=1e-2)
    base.update(kwargs)
    return asdl.PreconditioningConfig(**base)


def options(name: str, **extra):
    """What each method needs beyond the config (K-BFGS's lookahead takes the learning rate)."""
    base = {"kbfgs": {"lr": LR}, "seng": {"sketching_size": 4, "truncated_rank": 2}}.get(name, {})
    return {**base, **extra}


def build(name: str, model_fn: Callable[[], nn.Module] = net, cfg: Optional[asdl.PreconditioningConfig] = None,
          **extra):
    torch.manual_seed(0)
    model = model_fn().double()
    maker = fop_asdl.make_gradient_maker(name, model, cfg or config(ema_decay=0.2), **options(name, **extra))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    return model, maker, opt


def step(maker, model, x, t, loss_fn=F.cross_entropy):
    dummy_y = maker.setup_model_call(model, x)
    maker.setup_loss_call(loss_fn, dummy_y, t)
    return maker.forward_and_backward()


def train(model, maker, opt, steps, batches=batch) -> List[List[torch.Tensor]]:
    grads = []
    for i in steps:
        x, t = batches(i)
        opt.zero_grad(set_to_none=True)
        step(maker, model, x, t)
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        opt.step()
    return grads


def block_params(block: nn.Module) -> List[torch.Tensor]:
    return [p for p in (block.weight, block.bias) if p is not None]


def per_sample_gradients(model, x, t, block, loss_fn=F.cross_entropy) -> torch.Tensor:
    """U (M, N_l): the block's gradient of each sample's loss, one autograd pass per sample, [W | b]
    flattened like p.grad."""
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss_fn(model(x[j:j + 1]), t[j:j + 1], reduction="sum"), block_params(block))]) for j in range(x.shape[0])])


def patches(block, x):
    """Homogeneous input rows (n, S, I[+1]) by explicit slicing (no unfold): a Linear's inputs, or every
    output pixel's receptive field of a Conv2d, channel-major like weight.reshape(O, -1)."""
    if isinstance(block, nn.Linear):
        rows = x[:, None, :]
    else:
        (kh, kw), (sh, sw), (ph, pw) = block.kernel_size, block.stride, block.padding
        padded = F.pad(x, (pw, pw, ph, ph))
        out_h = (padded.shape[2] - kh) // sh + 1
        out_w = (padded.shape[3] - kw) // sw + 1
        rows = torch.stack([padded[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw].reshape(x.shape[0], -1)
                            for i in range(out_h) for j in range(out_w)], dim=1)
    if block.bias is not None:
        rows = torch.cat([rows, torch.ones(*rows.shape[:2], 1, dtype=rows.dtype)], dim=2)
    return rows


def block_grad(block) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in block_params(block)])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())
