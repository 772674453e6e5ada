"""HyLo training pieces shared by test_hylo.py, the fresh process it resumes in (run as a script), and the
gloo ranks of its distributed tests."""
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
INTERVAL = 2   # refresh on steps 0, 2, 4, ...
CLIP = {"kl_clip": 1e-4, "lr": 0.05}  # small enough that ν < 1 on every step


def build(model_fn=net, damping=0.1, **options):
    options.setdefault("iters_per_epoch", T)
    options.setdefault("compression_ratio", 0.5)
    options.setdefault("switch_policy", "epochs")
    if options["switch_policy"] == "epochs":
        options.setdefault("kid_windows", ((0, 1), (2, 3)))  # KID, KIS, KID epochs
    return scaffold.build("hylo", model_fn, config(damping=damping, curvature_upd_interval=INTERVAL), **options)


def distributed(rank: int, world_size: int, store: str, out: str, method: str, options: dict) -> None:
    """The ranks' share of each global batch of ``world_size`` · BATCH samples, ρ = 1, 5 steps; bytes per step."""
    init_gloo(rank, world_size, store)
    model, maker, opt = build(independent_net, compression_ratio=1.0, switch_policy=method, **options)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    grads, traffic = [], []
    for i in range(5):
        before = dict(maker._sync.comm.bytes)
        x, t = batch(i, world_size * BATCH)
        grads += train(model, maker, opt, [i], lambda _: (x[rows], t[rows]))
        traffic.append({k: v - before.get(k, 0) for k, v in maker._sync.comm.bytes.items()})
    torch.save({"grads": grads, "traffic": traffic, "assignment": maker._sync.assignment}, f"{out}.{rank}")
    destroy_process_group()


if __name__ == "__main__":  # resume from argv[1], train steps 4..8, save the parameters to argv[2]
    ckpt_path, out_path = sys.argv[1:3]
    model, maker, opt = restore(torch.load(ckpt_path, weights_only=False), *build(switch_policy="gradient"))
    train(model, maker, opt, range(4, 9))
    torch.save([p.detach() for p in model.parameters()], out_path)
