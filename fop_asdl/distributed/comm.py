"""The collectives of the sharded path, on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Each call counts the bytes it moves, as the average over all W ranks of the bytes a rank receives under a
bandwidth-optimal algorithm (ring all-reduce: 2·S·(W−1)/W; reduce to one rank, and broadcast from one:
S·(W−1)/W; an all-gather of S bytes from each rank: S·(W−1); a reduce inside each parity group of g = W/2 ranks: 2·S·(g−1)/W; one rank handing S bytes to
another: S/W), so that benchmarks compare methods without depending on the backend's algorithm. Every
rank counts every transfer, also those it takes no part in, so any rank's count is the average. A
collective that fails or times out (another rank raised, or died) is re-raised with what to look for.
"""
from __future__ import annotations

import weakref
from collections import Counter
from typing import Any, Callable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Communicator", "CollectiveError"]


class CollectiveError(RuntimeError):
    """A collective failed on this rank because another rank did not take part in it."""


class Communicator:
    """Thin wrapper of the default process group: reduce, broadcast, all-reduce, with byte counts."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.bytes: Counter = Counter()  # kind of collective -> bytes received per rank (nominal)

    def _run(self, kind: str, nbytes: float, call: Callable[[], Any]) -> Any:
        self.bytes[kind] += nbytes
        try:
            return call()
        except RuntimeError as error:  # gloo and NCCL raise RuntimeError subclasses on timeouts/closed peers
            raise CollectiveError(
                f"fop_asdl: the {kind} of this step failed on rank {self.rank}: another rank did not join it "
                f"(it raised an error or stopped - see its traceback) or the process group timed out. The step "
                f"changed nothing here. Cause: {error}") from error

    def _share(self, tensor: Tensor) -> float:
        return tensor.numel() * tensor.element_size() * (self.world_size - 1) / self.world_size

    def all_reduce(self, tensor: Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM) -> None:
        self._run("all_reduce", 2 * self._share(tensor), lambda: dist.all_reduce(tensor, op=op))

    def reduce(self, tensor: Tensor, dst: int) -> None:
        self._run("reduce", self._share(tensor), lambda: dist.reduce(tensor, dst=dst))

    def broadcast(self, tensor: Tensor, src: int) -> None:
        self._run("broadcast", self._share(tensor), lambda: dist.broadcast(tensor, src=src))

    def all_gather(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` (same size everywhere), stacked in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        nbytes = tensor.numel() * tensor.element_size() * (self.world_size - 1)
        self._run("all_gather", nbytes, lambda: dist.all_gather(parts, tensor))
        return torch.stack(parts)

    def make_parity_groups(self) -> None:
        """Process groups of the even and of the odd ranks (a collective call: every rank makes both).

        Only torch holds this rank's group (a weak reference here), so that destroying the default group
        frees it and its backend threads with it, even while the maker lives on (see ``group``)."""
        groups = [dist.new_group(list(range(parity, self.world_size, 2))) for parity in (0, 1)]
        self._parity_group = weakref.ref(groups[self.rank % 2])

    def reduce_within_parity(self, tensor: Tensor, even_dst: int, odd_dst: int) -> None:
        """Sum ``tensor`` over this rank's parity group (even or odd ranks) into that group's ``dst``."""
        size = self.world_size // 2
        nbytes = 2 * tensor.numel() * tensor.element_size() * (size - 1) / self.world_size
        dst = odd_dst if self.rank % 2 else even_dst
        group = self._parity_group()
        if group is None:
            raise CollectiveError("fop_asdl: the process group this maker was built in has been destroyed; "
                                  "build the maker again in the new one.")
        self._run("reduce", nbytes, lambda: dist.reduce(tensor, dst=dst, group=group) if size > 1 else None)

    def hand_over(self, tensor: Tensor, src: int, dst: int) -> Optional[Tensor]:
        """``src``'s tensor arrives at ``dst`` (returned there, None elsewhere); call it on every rank."""
        nbytes = tensor.numel() * tensor.element_size() / self.world_size
        if self.rank == src:
            self._run("send", nbytes, lambda: dist.send(tensor, dst=dst))
        elif self.rank == dst:
            received = torch.empty_like(tensor)
            self._run("send", nbytes, lambda: dist.recv(received, src=src))
            return received
        else:
            self.bytes["send"] += nbytes
        return None

    def broadcast_object(self, obj: Optional[Any], src: int) -> Any:
        """A picklable object from ``src`` to every rank (state dicts; not for the hot path)."""
        box: List[Any] = [obj]
        self._run("broadcast_object", 0.0, lambda: dist.broadcast_object_list(box, src=src))
        return box[0]

    @property
    def device(self) -> torch.device:
        """Where this backend's tensors live (NCCL: this rank's GPU)."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
