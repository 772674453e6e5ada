"""What the per-sample methods (FNGD, HyLo) share on top of the step: their set-up, one call per block and
pass, and a state that belongs to one rank."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn

from .attention import attention_blocks
from .precision import block_precision
from .capture import Chunk
from .selection import linear_conv_blocks
from .step import SteppedGradientMaker

__all__ = ["PerSampleStepMaker", "once_per_pass"]


class PerSampleStepMaker(SteppedGradientMaker):
    """A :class:`SteppedGradientMaker` over per-sample blocks (``self.blocks``)."""

    #: Linear and ungrouped Conv2d blocks (the per-sample methods of issue 23); FNGD and HyLo, whose math covers
    #: every type :func:`~fop_asdl.engine.selection.supports_per_sample` knows (Conv1d, any Conv2d,
    #: ConvTranspose2d, Embedding), set it True.
    all_layer_types = False

    def _init_per_sample_step(self, model: nn.Module, factor_dtype: Optional[torch.dtype] = None,
                              inverse_dtype: Optional[torch.dtype] = None) -> None:
        """After :meth:`_init_step` and ASDL's constructor: the device, the step counter, ``self.blocks`` (the
        per-sample blocks, the attention projections among them: :mod:`fop_asdl.engine.attention`),
        ``self._modules``, the same by name, and ``self.precision`` (:mod:`fop_asdl.engine.precision`)."""
        self.device = next(model.parameters()).device
        self.state = {"step": 0}
        with attention_blocks(self, model):
            self.blocks = linear_conv_blocks(model, self.config.ignore_modules, self.method_label,
                                             self.all_layer_types)
        self._modules = dict(self.blocks)
        self.precision = block_precision(self.blocks, self.method_label, factor_dtype, inverse_dtype)

    def _once_per_pass(self, starts: List[int], chunk: Chunk, module: nn.Module, needs: str) -> None:
        """:func:`once_per_pass` with this method's label."""
        once_per_pass(starts, chunk, module, self.method_label, needs)

    def _rank_state(self) -> Dict[str, Any]:
        """The head of a state that belongs to this rank: step, world size, rank."""
        return {"step": self.state["step"], "world_size": self._sync.world_size, "rank": self._sync.rank}

    def _check_rank_state(self, state_dict: Dict[str, Any], why: str, what: str, saved: Sequence[str],
                          known: Sequence[str]) -> None:
        """Refuse a state saved by another rank or world size (``why`` says what is per rank), or one with
        ``what`` for blocks (``saved``) this model does not have (``known``)."""
        where = (state_dict.get("world_size", 1), state_dict.get("rank", 0))
        if where != (self._sync.world_size, self._sync.rank):
            raise ValueError(f"this {self.method_label} state belongs to rank {where[1]} of {where[0]}, not rank "
                             f"{self._sync.rank} of {self._sync.world_size}: {why}; resume with the same world "
                             f"size.")
        unknown = set(saved) - set(known)
        if unknown:
            raise KeyError(f"state_dict has {what} for blocks this model does not have: {sorted(unknown)}")


def once_per_pass(starts: List[int], chunk: Chunk, module: nn.Module, label: str, needs: str) -> None:
    """Record the chunk a per-sample block saw; refuse a block that runs twice in one forward pass (shared
    weights), whose rows would mix two calls. Also for a method on another base that reads per-sample rows
    (EKFAC's rescaling)."""
    if chunk.start in starts:
        raise ValueError(f"fop_asdl: a {module.__class__.__name__} block ran more than once in one forward "
                         f"pass; {label} needs {needs}. List it in PreconditioningConfig.ignore_modules.")
    starts.append(chunk.start)
