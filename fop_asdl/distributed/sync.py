"""Where the sums of one step come together: the single-process case, and the interface the sharded
path (:mod:`fop_asdl.distributed`) implements.

A step makes, on every process, *sums* over its own samples: per curvature block the gradient summed over
the process's share of B1 and of B2, the gradients of all other parameters (in ``p.grad``), the loss, and
on curvature steps the curvature. The sync turns them into global sums at each block's owner, and shares
the owners' results. In one process every block is owned here and nothing moves.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from asdl.symmatrix import SymMatrix
from torch import Tensor, nn

from ..engine.sub_batches import first_half_size
from ..engine.vectors import BlockVector

__all__ = ["HalfSums", "LocalSync", "several_ranks"]

#: Per block: (sum over this process's B1 samples, sum over its B2 samples); None where it has none.
HalfSums = Tuple[Optional[BlockVector], Optional[BlockVector]]


class LocalSync:
    """Single process: every block is owned here; counts are Python ints; nothing is communicated."""

    world_size = 1
    rank = 0
    #: Whether this process's own batch is split into B1 and B2 (so FOP needs 2 samples here).
    splits_locally = True

    def local_split(self, batch_size: int, two_gradients: bool) -> int:
        """How many of this process's samples (the first ones) belong to B1."""
        return first_half_size(batch_size) if two_gradients else batch_size

    def owns(self, name: str) -> bool:
        return True

    def reduce_counts_and_others(self, counts: Tuple[int, int], loss_sum: Tensor, others: Sequence[nn.Parameter],
                                 terms: Sequence[Tensor] = ()) -> Tuple[Tuple, Tensor, Tuple[Tensor, ...]]:
        """The global counts (n1, n2), loss sum and loss-normalizer ``terms``
        (:class:`~fop_asdl.engine.loss.LossNormalizer`); the ``p.grad`` of ``others`` become global sums
        too."""
        return counts, loss_sum, tuple(terms)

    def reduce_block_sums(self, sums: Dict[str, HalfSums]) -> Dict[str, HalfSums]:
        """Global (S1, S2) of the owned blocks (after :meth:`reduce_counts_and_others`)."""
        return sums

    def reduce_curvature(self, curvature: Dict[str, SymMatrix]) -> Dict[str, SymMatrix]:
        """Global curvature sums of the owned blocks."""
        return curvature

    def sum_over_ranks(self, buffer: Tensor) -> Tensor:
        """``buffer`` summed over processes, in place."""
        return buffer

    def rows_at_owners(self, rows: Dict[str, Sequence[Tensor]]) -> Dict[str, List[Tensor]]:
        """At each block's owner, every process's row tensors (same leading size on all of them) stacked in
        rank order along dim 0: the global batch's per-sample data of the block (FNGD's "global" scope)."""
        return {name: list(tensors) for name, tensors in rows.items()}

    def all_gather(self, buffer: Tensor) -> Tensor:
        """Every process's flat ``buffer`` (the same size on all of them), stacked in rank order:
        (world_size, size). HyLo's one collective per refresh (its reduced rows of every block)."""
        return buffer[None]

    def any_bad(self, flags: Tensor) -> Tensor:
        """Element-wise maximum of ``flags`` over processes, so that all of them fail together."""
        return flags

    def share(self, results: Dict[str, Tuple[BlockVector, Tensor]], shapes: Dict[str, Tuple[torch.Size, ...]],
              n_stats: int = 0) -> Dict[str, Tuple[BlockVector, Tensor]]:
        """The owners' (preconditioned gradient, ``n_stats`` per-block stats or None) of every block, on
        every process."""
        return results

    def gathered_curvature(self, local: Dict[str, Dict[str, Tensor]]) -> Dict[str, Dict[str, Tensor]]:
        """The state-dict tensors of every block's curvature, from their owners."""
        return local


def several_ranks() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
