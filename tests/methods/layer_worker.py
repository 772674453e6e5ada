"""Ranks of test_layer_types.py: every maker on AllNet (every new layer type) on a rank of a gloo group."""
from __future__ import annotations

import asdl
import torch

from fop_asdl.distributed import destroy_process_group

import layer_refs as ref
import scaffold
from scaffold import LOCAL, init_gloo, local_rows, single_process_order

STEPS = 4
#: Options with which the sharded run equals one process (HyLo keeps every row: a rank's KIS draw is its own).
MAKERS = {"kfac": dict(fisher_type="fisher_emp"), "fop": dict(fisher_type="fisher_emp", sub_batches="halves"),
          "fngd": dict(iters_per_epoch=2, coefficient_scope="global"),
          "hylo": dict(switch_policy="kis", compression_ratio=1.0)}


def global_batch(i: int, world_size: int):
    gen = torch.Generator().manual_seed(2000 + i)
    n = LOCAL * world_size
    return torch.randint(0, ref.V, (n, ref.T), generator=gen), torch.randint(0, ref.C, (n,), generator=gen)


def train(name: str, rows=None, order=None, world_size: int = 2):
    """STEPS steps of SGD with momentum (curvature every 2nd step, EMA): every step's gradients, on this
    rank's ``rows`` of each global batch, or on all of it in ``order`` (one process)."""
    config = asdl.PreconditioningConfig(damping=ref.DAMPING, ema_decay=0.5, curvature_upd_interval=2,
                                        preconditioner_upd_interval=2)
    model, maker, opt = scaffold.build(name, ref.AllNet, config, opt_lr=0.1, quiet=True, **MAKERS[name])
    index = rows if rows is not None else order

    def batches(i):
        ids, t = global_batch(i, world_size)
        return ids[index], t[index]

    return scaffold.train(model, maker, opt, range(STEPS), batches)


def single(name: str, world_size: int):
    order = single_process_order("halves", world_size) if name == "fop" else torch.arange(LOCAL * world_size)
    return train(name, order=order, world_size=world_size)


def ranks(rank: int, world_size: int, store: str, out: str) -> None:
    init_gloo(rank, world_size, store)
    results = {name: train(name, rows=local_rows(rank, world_size), world_size=world_size) for name in MAKERS}
    torch.save(results, f"{out}.{rank}")
    destroy_process_group()
