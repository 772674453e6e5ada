"""Micro-batches: one step over n samples run as several forward/backward passes of at most m samples.

Gradient makers register the model call and the loss call once per step (``setup_model_call`` /
``setup_loss_call``); :func:`sliced_calls` temporarily narrows every tensor argument of both calls (dim 0)
to one chunk, so that ASDL's own passes run unchanged on it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["chunk_bounds", "sliced_calls", "summed_loss_backward", "concat_outputs", "detached",
           "validate_micro_batch_size"]


def validate_micro_batch_size(micro_batch_size: Optional[int]) -> Optional[int]:
    """None (one pass per step) or a positive int; anything else is refused at construction."""
    if micro_batch_size is None:
        return None
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}.")
    return micro_batch_size


def chunk_bounds(batch_size: int, micro_batch_size: Optional[int]) -> List[Tuple[int, int]]:
    """[start, end) of each micro-batch: ⌈n / m⌉ chunks of m samples, the last one shorter."""
    step = batch_size if micro_batch_size is None else micro_batch_size
    return [(start, min(start + step, batch_size)) for start in range(0, batch_size, step)]


def _narrow(value: Any, start: int, end: int, batch_size: int) -> Any:
    if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        return value[start:end]
    return value


@contextlib.contextmanager
def sliced_calls(maker: Any, start: int, end: int, batch_size: int) -> Iterator[None]:
    """Within the block, ``maker``'s registered model and loss calls see only samples [start, end)."""
    if (start, end) == (0, batch_size):
        yield
        return
    saved = (maker._model_args, maker._model_kwargs, maker._loss_fn_args, maker._loss_fn_kwargs)
    maker._model_args = tuple(_narrow(v, start, end, batch_size) for v in saved[0])
    maker._model_kwargs = {k: _narrow(v, start, end, batch_size) for k, v in saved[1].items()}
    maker._loss_fn_args = tuple(_narrow(v, start, end, batch_size) for v in saved[2])
    maker._loss_fn_kwargs = {k: _narrow(v, start, end, batch_size) for k, v in saved[3].items()}
    try:
        yield
    finally:
        maker._model_args, maker._model_kwargs, maker._loss_fn_args, maker._loss_fn_kwargs = saved


def summed_loss_backward(maker: Any, grad_scaler: Optional[torch.amp.GradScaler] = None) -> None:
    """``maker``'s model and loss calls with the loss summed over the samples, then its backward pass
    (from the scaled loss with a ``grad_scaler``): sums of chunks and ranks add up, divided by the count
    at the end. ``maker.loss`` stays the unscaled sum."""
    maker._loss_reduction = "sum"
    try:
        maker.forward()
    finally:
        maker._loss_reduction = None
    loss = maker._loss
    (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()


def detached(output: Any) -> Any:
    """``output`` with every tensor (also inside tuples, lists and dicts) detached from its graph."""
    if isinstance(output, Tensor):
        return output.detach()
    if isinstance(output, (tuple, list)):
        return type(output)(detached(o) for o in output)
    if isinstance(output, dict):
        return {key: detached(value) for key, value in output.items()}
    return output


def concat_outputs(outputs: List[Any]) -> Any:
    """The outputs of all micro-batches as one batch (tensors joined along dim 0).

    A single chunk's output is returned as is. Tensors, and tuples/lists/dicts of tensors, are joined;
    any other output type comes back as the list of per-chunk outputs.
    """
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs)
    if isinstance(first, (tuple, list)):
        return type(first)(concat_outputs(list(parts)) for parts in zip(*outputs))
    if isinstance(first, dict):
        return {key: concat_outputs([o[key] for o in outputs]) for key in first}
    return outputs
