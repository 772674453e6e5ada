"""Every block's input and output gradient from one forward and one backward pass, handed to a method.

While the capture is active, the parameters of each block stop requiring grad during the block's own
forward call, so autograd computes only the gradient that flows to the block's input and skips the
weight-gradient GEMM. When the gradient at a block's output arrives, the capture calls the method's
``accumulate(module, x, grad_out, chunk, previous)`` with the block input, that gradient (both in the
parameters' dtype, float32 for bf16/fp16 weights, autocast off) and the chunk the rows belong to; what it
returns is kept per module and passed back as ``previous`` for the next chunk (micro-batches) or call
(shared weights) of that module.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..compat import compute_dtype
from .shared_ids import SharedIdsFound, shared_ids_message

__all__ = ["Accumulate", "BlockCapture", "Chunk"]


class Chunk(NamedTuple):
    """The rows one forward call sees: ``size`` rows from row ``start`` of this process's batch, of which
    the first ``split`` belong to FOP's B1 (``size`` for methods without sub-batches)."""

    start: int
    size: int
    split: int


#: (module, x, grad_out, chunk, previous record or None) -> the module's new record.
Accumulate = Callable[[nn.Module, Tensor, Tensor, Chunk, Optional[Any]], Any]


class _JoinGraph(torch.autograd.Function):
    """Identity on ``output`` that puts it into the autograd graph through ``anchor``; backward passes the
    gradient through and gives the anchor none."""

    @staticmethod
    def forward(ctx, output: Tensor, anchor: Tensor) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class BlockCapture:
    """Context manager that feeds each block's (x, grad_out) to ``accumulate`` during backward passes.

    ``active`` lets the caller ignore backward passes that are not the loss gradient (ASDL's Monte-Carlo
    Fisher passes).
    """

    def __init__(self, modules: Sequence[nn.Module], accumulate: Accumulate):
        self.modules = list(modules)
        self.accumulate = accumulate
        self.chunk = Chunk(0, 0, 0)
        self.active = True
        self._records: Dict[nn.Module, Any] = {}
        self._handles: list = []
        self._frozen: List[nn.Parameter] = []

    def set_chunk(self, chunk: Chunk) -> None:
        """The next forward call sees ``chunk``."""
        if not 0 <= chunk.split <= chunk.size:
            raise ValueError(f"split {chunk.split} outside a chunk of {chunk.size} samples")
        self.chunk = chunk

    def __enter__(self) -> "BlockCapture":
        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._before_forward))
            self._handles.append(module.register_forward_hook(self._after_forward))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._thaw()

    def take_records(self) -> Dict[nn.Module, Any]:
        """The records, handed over: the graph's hooks keep this capture alive as long as the model output
        lives, and must not keep the records alive with it."""
        records, self._records = self._records, {}
        return records

    def _thaw(self) -> None:
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen.clear()

    def _before_forward(self, module: nn.Module, args: tuple):
        x = args[0]
        if x.dim() == 0 or x.shape[0] != self.chunk.size:
            if isinstance(module, nn.Embedding):  # ids shared by the batch: the maker ignores it and retries
                raise SharedIdsFound(module, tuple(x.shape), self.chunk.size)
            raise ValueError(shared_ids_message(module, tuple(x.shape), self.chunk.size))
        for param in (module.weight, getattr(module, "bias", None)):  # an Embedding has no bias
            if param is not None and param.requires_grad:
                param.requires_grad_(False)
                self._frozen.append(param)
        return None

    def _after_forward(self, module: nn.Module, args: tuple, output: Tensor) -> Optional[Tensor]:
        self._thaw()
        if not torch.is_grad_enabled():
            return None
        if not output.requires_grad:
            # Neither the input (a first layer) nor the frozen parameters require grad, so the output left
            # the graph and the gradient at it (which ASDL's Fisher needs too) would never be formed. Join it
            # to the graph through a free identity rather than making the input require grad, which would
            # have autograd compute an input gradient that nothing uses.
            output = _JoinGraph.apply(output, output.new_zeros((), requires_grad=True))
        x = args[0].detach()  # shares the version counter: in-place changes stay visible
        # The hook holds the input in a box that it empties once it has used it: autograd frees each saved
        # input as soon as its node has run, and the capture must not keep every block's input alive
        # until the whole graph is freed at the end of the step.
        box, chunk = [x], self.chunk
        output.register_hook(
            lambda grad, m=module, v=x._version, c=chunk: self._on_output_grad(m, box, v, c, grad))
        return output

    def _on_output_grad(self, module: nn.Module, box: List[Tensor], version: int, chunk: Chunk,
                        grad_out: Tensor) -> None:
        if not self.active or not box:  # a Fisher pass (not the loss gradient), or the input was used
            return
        x = box.pop()
        if x._version != version:  # autograd no longer saves x for this layer, so it cannot check this
            raise RuntimeError(f"fop_asdl: the input of a {module.__class__.__name__} block was modified in "
                               f"place after the layer used it; the gradient maker needs it intact for the "
                               f"layer's gradient. Make that operation out of place (e.g. relu without "
                               f"inplace=True).")
        # under autocast, or with bf16/fp16 weights, x and grad_out are bf16/fp16; the records are not
        dtype = compute_dtype(module.weight.dtype)
        if x.is_floating_point():  # an Embedding's input is its token ids: kept as they are
            x = x.to(dtype)
        grad_out = grad_out.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            self._records[module] = self.accumulate(module, x, grad_out, chunk, self._records.get(module))
