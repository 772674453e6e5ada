"""Processes of test_second_order_guarantees.py: a fresh process resuming a checkpoint (run as a script), and
gloo ranks training on their share of each global batch."""
from __future__ import annotations

import sys

import torch

from fop_asdl.distributed import destroy_process_group

from scaffold import init_gloo, restore
from second_order_helpers import METHODS, batch, build, config, train

#: The config of every guarantee test: EMA on, curvature and preconditioner every other step.
CONFIG = dict(ema_decay=0.2, curvature_upd_interval=2, preconditioner_upd_interval=2)
LOCAL = 4  # samples per rank
CLIPPED = {"smw_ng": {"kl_clip": 1e-4, "lr": 0.05}, "diag_ng": {"kl_clip": 1e-4, "lr": 0.05}}


def make(name: str, **extra):
    return build(name, cfg=config(**CONFIG), quiet=True, **extra)


def global_batch(i: int, world_size: int):
    return batch(i, LOCAL * world_size)


def runs():
    """(label, method, options) of every distributed run."""
    return [(name, name, {}) for name in METHODS] + [(f"{n}+kl_clip", n, o) for n, o in CLIPPED.items()]


def distributed(rank: int, world_size: int, store: str, out: str) -> None:
    """Every run on this rank's rows of each global batch: per-step grads, state, nominal bytes per step."""
    init_gloo(rank, world_size, store)
    rows = slice(rank * LOCAL, (rank + 1) * LOCAL)
    results = {}
    for label, name, options in runs():
        model, maker, opt = make(name, **options)
        grads = train(model, maker, opt, range(4), lambda i: tuple(v[rows] for v in global_batch(i, world_size)))
        results[label] = {"grads": grads, "state": maker.state_dict(),
                          "bytes": sum(maker._sync.comm.bytes.values()) / 4}
    torch.save(results, f"{out}.{rank}")
    destroy_process_group()


if __name__ == "__main__":  # resume argv[2] with method argv[1], train steps 3..5, save the parameters to argv[3]
    method, ckpt_path, out_path = sys.argv[1:4]
    model, maker, opt = restore(torch.load(ckpt_path, weights_only=False), *make(method))
    train(model, maker, opt, range(3, 6))
    torch.save([p.detach() for p in model.parameters()], out_path)
