"""The training loop of engine_guarantees.ranks_check: on one process (the global batch) or on a gloo rank
(its LOCAL rows of it)."""
from __future__ import annotations

import json
from typing import Any, Dict, Optional

import asdl
import torch

from fop_asdl.distributed import destroy_process_group

from scaffold import build, independent_net, init_gloo, train

STEPS = 5
LOCAL = 16  # samples per rank: 32 or more in all, more than the 27 inputs of independent_net's Linear


def global_batch(i: int, world_size: int):
    gen = torch.Generator().manual_seed(2000 + i)
    n = LOCAL * world_size
    return torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def run(name: str, options: Dict[str, Any], world_size: int, rank: Optional[int]):
    """(every step's p.grad, maker) of ``name`` trained on the global batches (rank None) or on this rank's
    rows of them."""
    model, maker, opt = build(name, independent_net, asdl.PreconditioningConfig(**options["config"]), opt_lr=0.1,
                              **options.get("maker", {}))

    def batches(i):
        x, t = global_batch(i, world_size)
        return (x, t) if rank is None else (x[rank * LOCAL:(rank + 1) * LOCAL], t[rank * LOCAL:(rank + 1) * LOCAL])

    return train(model, maker, opt, range(STEPS), batches), maker


def equivalence(rank: int, world_size: int, store: str, out: str, name: str, options: str) -> None:
    init_gloo(rank, world_size, store)
    grads, maker = run(name, json.loads(options), world_size, rank)
    torch.save({"grads": grads, "state": maker.state_dict()}, f"{out}.{rank}")
    destroy_process_group()
