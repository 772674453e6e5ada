"""The training loop of engine_guarantees.ranks_check: on one process (the global batch) or on a gloo rank
(its LOCAL rows of it)."""
from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any, Dict, Optional

import asdl
import torch
import torch.distributed as dist

import fop_asdl
from fop_asdl.distributed import destroy_process_group

from scaffold import independent_net, train

STEPS = 5
LOCAL = 16  # samples per rank: 32 or more in all, more than the 27 inputs of independent_net's Linear


def global_batch(i: int, world_size: int):
    gen = torch.Generator().manual_seed(2000 + i)
    n = LOCAL * world_size
    return torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def run(name: str, options: Dict[str, Any], world_size: int, rank: Optional[int]):
    """(every step's p.grad, maker) of ``name`` trained on the global batches (rank None) or on this rank's
    rows of them."""
    torch.manual_seed(0)
    model = independent_net().double()
    maker = fop_asdl.make_gradient_maker(name, model, asdl.PreconditioningConfig(**options["config"]),
                                         **options.get("maker", {}))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def batches(i):
        x, t = global_batch(i, world_size)
        return (x, t) if rank is None else (x[rank * LOCAL:(rank + 1) * LOCAL], t[rank * LOCAL:(rank + 1) * LOCAL])

    return train(model, maker, opt, range(STEPS), batches), maker


def equivalence(rank: int, world_size: int, store: str, out: str, name: str, options: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=60))
    grads, maker = run(name, json.loads(options), world_size, rank)
    torch.save({"grads": grads, "state": maker.state_dict()}, f"{out}.{rank}")
    destroy_process_group()
