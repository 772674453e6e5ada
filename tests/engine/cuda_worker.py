"""One rank under ``torchrun --nproc_per_node 1`` on NCCL (test_cuda.py): the package's collectives, and
K-FAC's and FOP's sharded path on them against the one-process step. Writes a JSON report to argv[1]."""
from __future__ import annotations

import json
import os
import sys
from unittest import mock

import torch
import torch.distributed as dist

import fop_asdl
import fop_asdl.distributed as distributed
from fop_asdl.distributed import Communicator, ShardedSync

from scaffold import config, conv_ln_net, small_image_batch, step


def collectives() -> str:
    comm = Communicator()
    x = torch.arange(4, dtype=torch.float64, device=comm.device)
    comm.all_reduce(x)
    comm.broadcast(x, src=0)
    comm.reduce(x, dst=0)
    gathered = comm.all_gather(x)
    if comm.device.type != "cuda" or not torch.equal(gathered.cpu(), torch.arange(4.0).reshape(1, 4).double()):
        return f"wrong: device {comm.device}, gathered {gathered.tolist()}"
    return "ok"


def grads(name: str, sharded: bool):
    torch.manual_seed(0)
    model = conv_ln_net().double().cuda()
    with mock.patch.object(distributed, "several_ranks", return_value=sharded):  # the sharded path at W = 1
        maker = fop_asdl.make_gradient_maker(name, model, config(), fisher_type="fisher_emp")
    assert isinstance(maker._sync, ShardedSync) == sharded
    out = []
    for i in range(3):
        x, t = small_image_batch(i)
        model.zero_grad(set_to_none=True)
        step(maker, model, x.cuda(), t.cuda())
        out += [p.grad.detach().cpu() for p in model.parameters()]
    return out


def main() -> None:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl")
    report = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "collectives": collectives(),
              "sharded_equals_local": {}}
    for name in ("kfac", "fop"):
        local, sharded = grads(name, False), grads(name, True)
        report["sharded_equals_local"][name] = all(torch.allclose(a, b, rtol=1e-9, atol=1e-12)
                                                   for a, b in zip(local, sharded))
    distributed.destroy_process_group()  # a barrier, then no NCCL thread outlives the group
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
