"""Micro-batches: one step over n samples run as several forward/backward passes of at most m samples.

Gradient makers register the model call and the loss call once per step (``setup_model_call`` /
``setup_loss_call``); :func:`sliced_calls` temporarily narrows every tensor argument of both calls (dim 0)
to one chunk, so that ASDL's own passes run unchanged on it.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
from asdl.utils import has_reduction
from torch import Tensor

from ..compat import LOW_PRECISION
from .setup import batch_size_of

__all__ = ["PER_CLASS_ARGUMENTS", "chunk_bounds", "check_calls_registered", "ready_batch_size", "loss_arguments",
           "rows_per_sample", "sliced_calls", "summed_loss", "summed_loss_backward", "as_sum", "user_loss",
           "concat_outputs", "detached", "validate_micro_batch_size"]


def validate_micro_batch_size(micro_batch_size: Optional[int]) -> Optional[int]:
    """None (one pass per step) or a positive int; anything else is refused at construction."""
    if micro_batch_size is None:
        return None
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}.")
    return micro_batch_size


def check_calls_registered(maker: Any) -> None:
    """The clear error when ``forward_and_backward()`` comes before ASDL's ``setup_model_call`` or
    ``setup_loss_call``/``setup_loss_repr``."""
    if maker._model_fn is None:
        raise RuntimeError("forward_and_backward() needs setup_model_call(model, x, ...) first.")
    if maker._loss_fn is None and maker._dummy_loss is None:
        raise RuntimeError("forward_and_backward() needs setup_loss_call(loss_fn, dummy_y, t, ...) or "
                           "setup_loss_repr(dummy_y[...]) first.")


def ready_batch_size(maker: Any, fewest: int, why: str) -> int:
    """The batch size of ``maker``'s registered model call, after the clear errors a step gives before any work:
    the calls registered, a loss that takes ``reduction``, at least ``fewest`` samples (``why`` says why), and
    every tensor argument of the model and loss calls splitting along dim 0 with the batch."""
    check_calls_registered(maker)
    if maker._loss_fn is not None and not has_reduction(maker._loss_fn):
        raise TypeError(f"The loss function {getattr(maker._loss_fn, '__name__', maker._loss_fn)!r} has no "
                        f"'reduction' argument; the step calls it with reduction='sum' (and the user's own "
                        f"to divide exactly as the user does). Use e.g. torch.nn.functional.cross_entropy or "
                        f"a function with a reduction parameter.")
    batch_size = batch_size_of(maker._model_args, maker._model_kwargs)
    if batch_size < fewest:
        raise ValueError(f"{why} and needs at least {fewest} samples; got a batch of {batch_size}.")
    for value in (*maker._model_args, *maker._model_kwargs.values()):
        if rows_per_sample(value, batch_size, flattened=False) == 0:
            raise ValueError(f"A tensor argument of the model call has {value.shape[0]} rows but the batch "
                             f"has {batch_size}; the step splits every tensor argument along dim 0.")
    for name, value in loss_arguments(maker):
        if rows_per_sample(value, batch_size, flattened=True) == 0:
            raise ValueError(f"The loss call's tensor argument {name} has {value.shape[0]} rows, neither the "
                             f"batch's {batch_size} nor a multiple of it (k rows per sample, sample-major, "
                             f"as t.view(-1) of (B, T) targets); the step splits it with the batch.")
    return batch_size


def chunk_bounds(batch_size: int, micro_batch_size: Optional[int]) -> List[Tuple[int, int]]:
    """[start, end) of each micro-batch: ⌈n / m⌉ chunks of m samples, the last one shorter."""
    step = batch_size if micro_batch_size is None else micro_batch_size
    return [(start, min(start + step, batch_size)) for start in range(0, batch_size, step)]


#: Loss arguments indexed by class, not by sample: never split.
PER_CLASS_ARGUMENTS = ("weight", "pos_weight")


def rows_per_sample(value: Any, batch_size: int, flattened: bool) -> Optional[int]:
    """k when ``value`` is a tensor with k rows per sample (k = 1: one row per sample; with ``flattened``,
    k·B rows in sample-major order, as ``t.view(-1)`` of (B, T) targets gives for a token-level loss),
    None when it is not split along dim 0, 0 when its rows fit neither."""
    if not isinstance(value, Tensor) or value.ndim == 0:
        return None
    rows = value.shape[0]
    if rows == batch_size:
        return 1
    return rows // batch_size if flattened and rows % batch_size == 0 and rows > 0 else 0


def _narrow(value: Any, start: int, end: int, batch_size: int, flattened: bool) -> Any:
    k = rows_per_sample(value, batch_size, flattened)
    return value[start * k:end * k] if k else value


def loss_arguments(maker: Any) -> Iterator[Tuple[str, Any]]:
    """(name, value) of the loss call's arguments that are split with the batch (positional ones named by
    position)."""
    for index, value in enumerate(maker._loss_fn_args):
        yield f"#{index}", value
    for key, value in maker._loss_fn_kwargs.items():
        if key not in PER_CLASS_ARGUMENTS:
            yield key, value


@contextlib.contextmanager
def sliced_calls(maker: Any, start: int, end: int, batch_size: int) -> Iterator[None]:
    """Within the block, ``maker``'s registered model and loss calls see only samples [start, end): every
    tensor argument with one row per sample, and the loss's with k rows per sample (flattened tokens)."""
    if (start, end) == (0, batch_size):
        yield
        return
    saved = (maker._model_args, maker._model_kwargs, maker._loss_fn_args, maker._loss_fn_kwargs)
    maker._model_args = tuple(_narrow(v, start, end, batch_size, False) for v in saved[0])
    maker._model_kwargs = {k: _narrow(v, start, end, batch_size, False) for k, v in saved[1].items()}
    maker._loss_fn_args = tuple(_narrow(v, start, end, batch_size, True) for v in saved[2])
    maker._loss_fn_kwargs = {k: v if k in PER_CLASS_ARGUMENTS else _narrow(v, start, end, batch_size, True)
                             for k, v in saved[3].items()}
    try:
        yield
    finally:
        maker._model_args, maker._model_kwargs, maker._loss_fn_args, maker._loss_fn_kwargs = saved


def summed_loss_backward(maker: Any, grad_scaler: Optional[torch.amp.GradScaler], samples: int) -> None:
    """``maker``'s model and loss calls with the loss summed over the chunk's ``samples``, then its backward
    pass (from the scaled loss with a ``grad_scaler``): sums of chunks and ranks add up, divided by the
    loss's normalizer at the end (:mod:`fop_asdl.engine.loss`). ``maker.loss`` stays the unscaled sum."""
    with summed_loss(maker):
        maker.forward()
    loss = maker._loss = as_sum(maker, maker._loss, samples)
    (loss if grad_scaler is None else grad_scaler.scale(loss)).backward()


def as_sum(maker: Any, loss: Tensor, samples: int) -> Tensor:
    """The chunk's loss as a sum: a loss call already sums; a loss repr (the model's own loss, which
    cannot be asked to sum) is taken as a mean over the chunk's samples."""
    return loss if maker._loss_fn is not None else loss * samples


@contextlib.contextmanager
def summed_loss(maker: Any) -> Iterator[None]:
    """Within the block ``maker`` calls the loss with reduction='sum'. ASDL writes that into the registered
    loss kwargs and leaves it there; they are restored, so the user's own reduction stays registered."""
    kwargs = maker._loss_fn_kwargs
    saved = dict(kwargs)
    maker._loss_reduction = "sum"
    try:
        yield
    finally:
        maker._loss_reduction = None
        kwargs.clear()
        kwargs.update(saved)


def user_loss(maker: Any, loss_sum: Tensor) -> Tuple[Tensor, Tensor]:
    """(S_c, M_c), what a chunk's normaliser is read off: the user's loss call with the user's own reduction
    on ``maker``'s last model output, without autograd, and the chunk's summed loss ``loss_sum``. A bf16/fp16
    output is read in float32, as autocast computes losses, and S_c once more from it: in bf16 S_c / M_c is
    off by up to 2⁻⁸ (a batch of 250 read as 249 samples)."""
    output, widened = maker._model_output, []

    def widen(tensor: Tensor) -> Tensor:
        if tensor.dtype not in LOW_PRECISION:
            return tensor
        widened.append(tensor)
        return tensor.float()

    maker._model_output = _map_structure(output, widen)
    try:
        with torch.no_grad():
            mean = maker._call_loss_fn().detach()
            if widened:
                with summed_loss(maker):
                    loss_sum = maker._call_loss_fn().detach()
    finally:
        maker._model_output = output
    return loss_sum, mean


def _map_structure(output: Any, leaf: Callable[[Tensor], Any]) -> Any:
    """``output`` with ``leaf`` applied to every tensor inside tuples, lists, namedtuples, dicts (and their
    subclasses, e.g. a ``ModelOutput``) and dataclasses; anything else as is."""
    if isinstance(output, Tensor):
        return leaf(output)
    if isinstance(output, (tuple, list)):
        parts = [_map_structure(o, leaf) for o in output]
        return type(output)._make(parts) if hasattr(output, "_make") else type(output)(parts)
    if isinstance(output, dict):
        return _rebuilt_dict(output, {key: _map_structure(value, leaf) for key, value in output.items()})
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return dataclasses.replace(output, **{f.name: _map_structure(getattr(output, f.name), leaf)
                                              for f in dataclasses.fields(output) if f.init})
    return output


def _rebuilt_dict(template: dict, values: dict) -> dict:
    if type(template) is dict:
        return values
    return type(template)(**values) if dataclasses.is_dataclass(template) else type(template)(values)


def detached(output: Any) -> Any:
    """``output`` with every tensor (in any structure :func:`concat_outputs` joins) detached from its graph."""
    return _map_structure(output, Tensor.detach)


def concat_outputs(outputs: List[Any]) -> Any:
    """The outputs of all micro-batches as one batch of the same structure (tensors joined along dim 0).

    A single chunk's output is returned as is. Tensors inside tuples, lists, namedtuples, dicts (a
    ``ModelOutput`` too) and dataclasses are joined; any other output type comes back as the list of
    per-chunk outputs.
    """
    if len(outputs) == 1:
        return outputs[0]
    first = outputs[0]
    if isinstance(first, Tensor):
        return torch.cat(outputs) if first.ndim > 0 else torch.stack(outputs)
    if isinstance(first, (tuple, list)):
        parts = [concat_outputs(list(p)) for p in zip(*outputs)]
        return type(first)._make(parts) if hasattr(first, "_make") else type(first)(parts)
    if isinstance(first, dict):
        return _rebuilt_dict(first, {key: concat_outputs([o[key] for o in outputs]) for key in first})
    if dataclasses.is_dataclass(first) and not isinstance(first, type):
        return dataclasses.replace(first, **{f.name: concat_outputs([getattr(o, f.name) for o in outputs])
                                             for f in dataclasses.fields(first) if f.init})
    if first is None:
        return None
    return outputs
