"""Shared pieces of the tests of SMW-NG, SENG, diagonal NG, K-BFGS and Kronecker PSGD (tests/methods):
tiny float64 nets, the ASDL step idiom, per-sample gradients by an autograd loop."""
from __future__ import annotations

from typing import Callable, Optional

import asdl
import torch
import torch.nn.functional as F
from torch import nn

import scaffold
from dense_refs import block_grad, block_params, per_sample_gradients
# scaffold's nets and batches under the names these tests use: ``net`` has samples independent, ``bn_net`` is
# ``net`` with a BatchNorm2d (which no method here preconditions)
from scaffold import TokenNet, step, train
from scaffold import independent_net as net
from scaffold import per_sample_net as bn_net
from scaffold import small_image_batch as batch

METHODS = ["smw_ng", "seng", "diag_ng", "kbfgs", "kron_psgd"]
LR = 0.05
BLOCKS = (0, 3, 5)  # net's Conv2d, Linear + bias, Linear


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
    return scaffold.build(name, model_fn, cfg or config(ema_decay=0.2), opt_lr=LR,
                          **options(name, **extra))


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



__all__ = ["METHODS", "LR", "BLOCKS", "config", "options", "build", "patches", "net", "bn_net", "TokenNet", "batch",
           "step", "train", "block_grad", "block_params", "per_sample_gradients"]
