"""ASDL's Fisher pass inside the package's step: K-FAC's curvature from ASDL's own code, one chunk at a time.

On a curvature step every micro-batch runs ASDL's ``FisherMaker`` pass (its forward, its Monte-Carlo or exact
Fisher backward passes and the loss's backward), with three changes: the curvature is summed over the
chunk's samples (``data_size=1``), in the maker's factor dtype, and written into fresh matrices that add up
over chunks (the stored curvature stays untouched until the step is known to be finite:
:func:`fresh_curvature`); the loss ASDL
backpropagates is the summed (and GradScaler-scaled) loss the step's sums need; and the block capture is
off during the Fisher backward passes, which are not the loss's gradient. Nothing here reads the device:
non-finite logits reach the step's one fused check (:func:`finite_sampling`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, Union

import asdl
import torch
from asdl.fisher import FisherMCCrossEntropy
from asdl.grad_maker import DummyObject, GetFirstItem
from asdl.symmatrix import SymMatrix
from torch import Tensor, nn

from ..compat import factor_precision, kept_requires_grad, quiet_asdl_hooks
from ..engine.capture import BlockCapture
from ..engine.chunks import as_sum

__all__ = ["curvature_chunk", "finite_sampling", "fisher_logits", "fresh_curvature", "sampling_logits",
           "unscale_empirical"]


@contextlib.contextmanager
def fresh_curvature(maker: Any, new: Dict[str, SymMatrix]) -> Iterator[None]:
    """During the block, ASDL's Fisher passes write into fresh matrices, which fill ``new`` (by block name)
    on exit; the stored curvature is put back untouched."""
    attr = maker._fisher_attr
    named = maker.named_modules_for_curvature
    stored = {m: getattr(m, attr) for _, m in named if hasattr(m, attr)}
    for module in stored:
        delattr(module, attr)
    try:
        yield
        new.update({name: getattr(m, attr) for name, m in named if getattr(m, attr, None) is not None})
    finally:
        for _, module in named:
            if module in stored:
                setattr(module, attr, stored[module])
            elif hasattr(module, attr):
                delattr(module, attr)


def curvature_chunk(maker: Any, capture: BlockCapture, first: bool) -> None:
    """ASDL's Fisher pass on one chunk, its curvature added to that of earlier chunks; ``maker._loss`` is the
    chunk's summed, unscaled loss afterwards."""
    fisher_maker = maker.fisher_maker
    fisher_loop = fisher_maker._fisher_loop
    label = maker.method_label

    def loop_without_capture(closure):  # Monte-Carlo / exact Fisher backward passes: not the loss
        logits = fisher_maker._logits
        if not isinstance(logits, Tensor) or logits.ndim == 0:
            what = "a 0-d tensor (a loss?)" if isinstance(logits, Tensor) else f"a {type(logits).__name__}"
            raise TypeError(f"{label}'s Fisher needs the model's logits as a tensor, but the model output gives "
                            f"{what}; pass them to the loss call (setup_loss_call(loss_fn, dummy_y['logits'], t)) "
                            f"or name them with setup_logits_repr(dummy_y[...]).")
        capture.active = False
        try:
            with finite_sampling(fisher_maker, logits):
                fisher_loop(closure)
        finally:
            capture.active = True

    unscaled = []
    call_loss = fisher_maker.call_loss

    def summed_call_loss():  # ASDL backpropagates fisher_maker._loss: make that the summed, scaled loss
        unscaled.append(as_sum(maker, call_loss(), capture.chunk.size))
        scaler = maker.grad_scaler
        fisher_maker._loss = unscaled[-1] if scaler is None else scaler.scale(unscaled[-1])
        return fisher_maker._loss

    fisher_maker._fisher_loop = loop_without_capture
    fisher_maker.call_loss = summed_call_loss
    seed = fisher_maker.config.seed
    if not first:
        fisher_maker.config.seed = None  # re-seeding each chunk would repeat the first chunk's draws
    scale = maker.scale * (maker.config.ema_decay if maker.do_accumulate else 1.0)
    user_logits, maker._dummy_logits = maker._dummy_logits, fisher_logits(maker)
    try:
        with kept_requires_grad(maker.model), quiet_asdl_hooks(), factor_precision(maker.precision.factor):
            maker.delegate_forward_and_backward(fisher_maker, data_size=1, scale=scale, accumulate=not first,
                                                calc_loss_grad=True, calc_inv=False)
    finally:
        maker._dummy_logits = user_logits
        del fisher_maker._fisher_loop
        fisher_maker.__dict__.pop("call_loss", None)
        fisher_maker.config.seed = seed
    maker._loss = unscaled[-1]


@contextlib.contextmanager
def finite_sampling(fisher_maker: Any, logits: Tensor) -> Iterator[None]:
    """ASDL's Monte-Carlo Fisher samples from the logits: NaN or +Inf there make ``torch.distributions``
    refuse them (after a host sync per chunk: its argument validation) or ``multinomial`` fail obscurely.
    During the block the sampler sees :func:`sampling_logits` and validation is off. Non-finite logits
    still make the loss NaN, which the step's one fused check reports (or, with a GradScaler, skips)."""
    validate = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    sampled = isinstance(fisher_maker, FisherMCCrossEntropy)
    if sampled:
        fisher_maker._logits = sampling_logits(logits)
    try:
        yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(validate)
        if sampled:
            fisher_maker._logits = logits


def sampling_logits(logits: Tensor) -> Tensor:
    """The logits wherever they define a distribution (finite, or −Inf: a masked class is never drawn), so
    every value and gradient is as before; NaN and +Inf entries, and rows with no finite entry, become 0.
    Elementwise on the device: no host sync."""
    stand_in = torch.where(torch.isnan(logits) | torch.isposinf(logits), 0.0, logits)
    return torch.where(torch.isneginf(stand_in).all(-1, keepdim=True), 0.0, stand_in)


def fisher_logits(maker: asdl.GradientMaker) -> DummyObject:
    """The logits ASDL's Fisher samples from: those the user named with ``setup_logits_repr``, else the
    first model-output argument of the loss call (``dummy_y["logits"]``, ``dummy_y.logits.view(-1, V)``:
    what the loss compares with the targets), else ASDL's default (the output, or its first item)."""
    ops = maker._dummy_logits._operators
    user_named = not (len(ops) == 1 and isinstance(ops[0], GetFirstItem))
    if user_named or maker._loss_fn is None:
        return maker._dummy_logits
    for value in (*maker._loss_fn_args, *maker._loss_fn_kwargs.values()):
        if isinstance(value, DummyObject):
            return value
    return maker._dummy_logits


def unscale_empirical(curvature: Dict[str, SymMatrix], backprop_scale: Union[float, Tensor],
                      modules: Dict[str, nn.Module]) -> None:
    """The empirical Fisher comes from the backpropagated loss's own per-sample gradients: its output-side
    factors carry that loss's scale σ squared against the user's per-sample terms; divide it out. The
    output side is B (the weight's rows), except for an Embedding, whose rows are token ids (A)."""
    square = backprop_scale ** 2
    for name, matrix in curvature.items():
        output_side = [] if not matrix.has_kron else [
            matrix.kron.A if isinstance(modules[name], nn.Embedding) else matrix.kron.B]
        output_side += [matrix.unit.data] if matrix.has_unit else []
        for tensor in output_side:
            tensor.div_(square)
