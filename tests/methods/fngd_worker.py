"""FNGD training pieces shared by test_fngd.py, the fresh process it resumes in (run as a script), and the
gloo ranks of its distributed test."""
from __future__ import annotations

import sys

import torch

from fop_asdl.distributed import destroy_process_group

import scaffold
from scaffold import config, independent_net, init_gloo, restore, train
from scaffold import per_sample_net as net
from scaffold import small_image_batch as batch

T = 3          # iterations per epoch
BATCH = 8      # samples per step (batch's default; per rank in the distributed test)


def build(model_fn=net, **options):
    options.setdefault("iters_per_epoch", T)
    return scaffold.build("fngd", model_fn, config(), **options)


def distributed(rank: int, world_size: int, store: str, out: str) -> None:
    """The ranks' share of each global batch of ``world_size`` · BATCH samples, "global" scope, 2 epochs."""
    init_gloo(rank, world_size, store)
    model, maker, opt = build(independent_net, coefficient_scope="global")
    rows = slice(rank * BATCH, (rank + 1) * BATCH)

    def batches(i):
        x, t = batch(i % T, world_size * BATCH)
        return x[rows], t[rows]

    grads = train(model, maker, opt, range(2 * T), batches)
    torch.save({"grads": grads, "bank": maker.state_dict()["bank"]}, f"{out}.{rank}")
    destroy_process_group()


if __name__ == "__main__":  # resume from argv[1], train steps 4..8, save the parameters to argv[2]
    ckpt_path, out_path = sys.argv[1:3]
    model, maker, opt = restore(torch.load(ckpt_path, weights_only=False), *build())
    train(model, maker, opt, range(4, 9), lambda i: batch(i % T))
    torch.save([p.detach() for p in model.parameters()], out_path)
