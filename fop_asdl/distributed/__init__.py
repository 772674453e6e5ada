"""Where each step's sums meet: the sync interface and its single-process implementation (``sync``), the
sharded path on ``torch.distributed`` (``sharded``: the step's reductions and broadcasts), who owns each
block (``assignment``), the collectives (``comm``) and their buffers (``packing``). The makers get their
sync from :func:`make_sync` and use it by themselves when ``torch.distributed`` runs several ranks.
``destroy_process_group`` (``group``) ends a run so that no backend thread outlives the group."""
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..compat import compute_dtype

from .assignment import assign_owners, block_cost
from .comm import CollectiveError, Communicator
from .group import destroy_process_group
from .sharded import ShardedSync, resolve_sub_batches
from .sync import LocalSync, several_ranks

__all__ = ["assign_owners", "block_cost", "CollectiveError", "Communicator", "LocalSync", "ShardedSync",
           "destroy_process_group", "make_sync", "resolve_sub_batches", "several_ranks"]


def make_sync(model: nn.Module, named_modules: Sequence[Tuple[str, nn.Module]], sub_batches: str,
              two_gradients: bool, costs: Optional[Dict[str, float]] = None,
              dtype: Optional[torch.dtype] = None) -> LocalSync:
    """The sharded sync (:mod:`fop_asdl.distributed`) when ``torch.distributed`` runs several ranks, else
    the local one; ``costs`` (by block name) balance the owners where K-FAC's cost model does not fit.
    Its buffers are in ``dtype``, by default the parameters' (float32 for bf16/fp16: counts and sums in 8
    bits would not be exact)."""
    if sub_batches not in ("auto", "ranks", "halves"):
        raise ValueError(f"sub_batches must be 'auto', 'ranks' or 'halves', got {sub_batches!r}.")
    if not several_ranks():
        return LocalSync()
    if dtype is None:
        dtype = compute_dtype(next((p.dtype for p in model.parameters() if p.requires_grad),
                                   torch.get_default_dtype()))
    return ShardedSync(named_modules, sub_batches, two_gradients, dtype, costs)
