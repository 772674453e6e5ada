"""Process topology: one process, or one rank of a ``torchrun`` launch (environment WORLD_SIZE > 1).

Under torchrun the runner initialises ``torch.distributed`` (gloo on CPU, nccl on CUDA) and feeds each rank
a contiguous slice of every global batch; the gradient makers synchronise across ranks themselves (no DDP
wrapper, which would all-reduce raw gradients behind them). Only rank 0 writes files and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from ..distributed.group import destroy_process_group
from .config import ConfigError

__all__ = ["Topology", "start", "agree", "stop"]

T = TypeVar("T")


@dataclass(frozen=True)
class Topology:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch_size: int) -> int:
        """This rank's share b = batch / world_size; it takes samples [rank·b, (rank+1)·b) of each batch."""
        if batch_size % self.world_size:
            raise ConfigError(
                "batch_sizes", f"batch size {batch_size} is not divisible by the {self.world_size} ranks."
            )
        return batch_size // self.world_size


def start(device: str) -> Topology:
    """Pick the device (``"auto"``: cuda if available); join the process group when launched by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = torch.cuda.is_available() if device == "auto" else torch.device(device).type == "cuda"
    if world_size == 1:
        return Topology(
            0, 1, torch.device("cuda" if use_cuda else "cpu") if device == "auto" else torch.device(device)
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Topology(dist.get_rank(), world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def agree(topo: Topology, value: T) -> T:
    """Rank 0's ``value`` on every rank (e.g. an output folder named after rank 0's clock)."""
    if topo.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def stop(finished: bool) -> None:
    """Leave the process group (after a barrier when the run ``finished``; after an error a peer may never
    reach it) so that no gloo thread outlives it into the interpreter's exit."""
    destroy_process_group(barrier=finished)
