"""SGD's gradient maker: the gradient of the user's loss on the whole batch in ``p.grad``, also with
micro-batches, a GradScaler and, on several ranks, one all-reduce of the gradients: what
``make_gradient_maker("sgd", ...)`` returns, so that every method of the switch scales the same way."""
from __future__ import annotations

from typing import Any, List, Optional, Tuple

import asdl
import torch
from torch import Tensor, nn

from ..engine.chunks import (check_calls_registered, chunk_bounds, concat_outputs, detached, ready_batch_size,
                             sliced_calls, summed_loss_backward, user_loss, validate_micro_batch_size)
from ..engine.coverage import Coverage, model_coverage
from ..engine.setup import batch_size_of, prepared_model
from ..engine.loss import LossNormalizer
from ..engine.precision import check_grad_scaler
from ..distributed import make_sync

__all__ = ["PlainGradientMaker"]


class PlainGradientMaker(asdl.GradientMaker):
    """``asdl.GradientMaker`` whose step may run as several micro-batches and over several ranks."""

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 micro_batch_size: Optional[int] = None, grad_scaler: Optional[torch.amp.GradScaler] = None,
                 **options: Any):
        """``config`` is accepted for the one-name swap and not read (plain SGD has no curvature)."""
        if options:
            raise TypeError(f"the 'sgd' gradient maker takes only micro_batch_size and grad_scaler, got "
                            f"{sorted(options)}.")
        super().__init__(prepared_model(model))
        self.micro_batch_size = validate_micro_batch_size(micro_batch_size)
        check_grad_scaler(model, grad_scaler)
        self.grad_scaler = grad_scaler  # backward from the scaled loss; scaler.step() unscales and skips Inf
        self._sync = make_sync(model, [], "auto", two_gradients=False)

    def coverage(self) -> Coverage:
        """Every trainable parameter: the plain gradient (SGD preconditions nothing)."""
        return model_coverage(self.model, "SGD", [], lambda name, module: "", None,
                              "is not preconditioned (SGD preconditions nothing)")

    def forward_and_backward(self) -> Tuple[Any, Tensor]:
        """The gradient of the user's loss on the whole batch in ``p.grad`` (replacing what was there, as
        every maker of the switch does); on any error every ``p.grad`` is as before."""
        check_calls_registered(self)
        batch_size = batch_size_of(self._model_args, self._model_kwargs)
        bounds = chunk_bounds(batch_size, self.micro_batch_size)
        one_pass = len(bounds) == 1 and self._sync.world_size == 1  # autograd of the user's own loss
        if not one_pass:  # the summed-loss passes: the same checks as every other maker's, before any work
            ready_batch_size(self, 1, "The step")
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            if one_pass:
                self.forward()
                loss = self._loss
                (loss if self.grad_scaler is None else self.grad_scaler.scale(loss)).backward()
                self._loss = loss.detach()
                return self._model_output, self._loss
            normalizer = LossNormalizer(self._loss_fn, self._loss_fn_kwargs)
            loss_sum: Optional[Tensor] = None
            outputs: List[Any] = []
            for start, end in bounds:
                with sliced_calls(self, start, end, batch_size):
                    summed_loss_backward(self, self.grad_scaler, end - start)
                    loss = self._loss.detach()
                    pair = user_loss(self, loss) if normalizer.needs_user_loss else (loss, None)
                    normalizer.add(*pair, end - start)
                loss_sum = loss if loss_sum is None else loss_sum + loss
                # A chunk's output must not keep its graph (and the block inputs the hooks hold) alive while
                # the next chunks run: that would make memory grow with the batch, not the micro-batch.
                outputs.append(detached(self._model_output) if self.micro_batch_size else self._model_output)
            (n, _), loss_sum, terms = self._sync.reduce_counts_and_others((batch_size, 0), loss_sum, params,
                                                                          normalizer.terms())
            total = normalizer.resolve(n, terms)
        except BaseException:
            for p, grad in zip(params, saved):
                p.grad = grad
            raise
        for p in params:
            if p.grad is not None:
                p.grad.div_(total)
        self._model_output, self._loss = concat_outputs(outputs), loss_sum / total
        return self._model_output, self._loss
