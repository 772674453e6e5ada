"""One step machinery for every method: capture, micro-batches, sums to their owners, one finiteness check,
then commit or roll back.

:class:`SteppedGradientMaker` is a mixin for an ``asdl.GradientMaker`` subclass. Its
:meth:`~SteppedGradientMaker.forward_and_backward` is the template every method shares:

1. check the registered calls and the batch (:meth:`_min_local_batch`);
2. ``plan = self._begin_step(batch_size)``: what this step does (e.g. whether curvature or coefficients are
   formed); anything it changes must be undone by ``_roll_back(plan)``;
3. one forward and one backward pass per micro-batch inside ``self._pass_context(plan)``, each run by
   ``self._chunk_backward(capture, plan, first)`` (default: the summed loss's backward), while a
   :class:`~fop_asdl.engine.capture.BlockCapture` calls ``self._accumulate(module, x, grad_out, chunk, previous)``
   for every block in ``self._step_blocks``, with ``chunk.split`` rows of B1 (``self._local_split``);
4. the counts, the loss and the plain gradients of all parameters outside blocks are reduced over ranks
   and divided by the global count;
5. ``groups = self._finish(plan, records, counts)``: the method reduces its records, computes what it
   will commit (kept in ``plan``) and returns ``{group name: tensors}`` to check;
6. one fused finiteness check of the loss, the plain gradients and those groups (one host sync, agreed
   by all ranks). Non-finite values raise ``FloatingPointError`` — or, with a ``grad_scaler``, skip the step:
   ``_roll_back(plan)`` and NaN in the blocks' ``p.grad`` so that ``scaler.step`` skips it;
7. ``self._commit(plan)`` writes the blocks' ``p.grad`` and the method's state (nothing there may fail on
   data), then ``state["step"] += 1``.

On any exception before the commit every ``p.grad`` is restored and ``_roll_back(plan)`` runs, so the
parameters, their gradients and the method's state are as before the step. A new method implements
``_step_blocks``, ``_begin_step``, ``_accumulate``, ``_finish``, ``_commit`` and ``_roll_back`` (and, if it
needs them, ``_min_local_batch``, ``_local_split``, ``_pass_context``, ``_chunk_backward``,
``_captured_blocks``), sets
``micro_batch_size``, ``grad_scaler``, ``_sync`` (:func:`make_sync`), ``device`` and ``state``, and lives
in one file.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .capture import BlockCapture, Chunk
from .coverage import Coverage, model_coverage
from .chunks import (chunk_bounds, concat_outputs, detached, ready_batch_size, sliced_calls, summed_loss_backward,
                     user_loss, validate_micro_batch_size)
from ..compat import full_precision
from ..distributed.sync import LocalSync
from .loss import BatchCounts, LossNormalizer
from .precision import check_grad_scaler
from .setup import eager_module, prepared_model
from .shared_ids import SharedIdsFound, ignore_shared_ids, shared_ids_reason

__all__ = ["SteppedGradientMaker"]

class SteppedGradientMaker:
    """The shared step (see the module docstring); mixed into an ``asdl.GradientMaker`` subclass."""

    #: Name used in error messages.
    method_label = "FOP"
    micro_batch_size: Optional[int]
    grad_scaler: Optional[torch.amp.GradScaler]
    _sync: LocalSync
    device: torch.device
    state: Dict[str, Any]
    last_step_skipped: bool
    #: (module, shape of its ids) of every Embedding found called on ids shared by the batch
    #: (:mod:`fop_asdl.engine.shared_ids`): ignored since, with the plain gradient.
    _shared_ids: List[Tuple[nn.Module, Tuple[int, ...]]]

    def __new__(cls, *args: Any, **kwargs: Any):
        maker = super().__new__(cls)
        maker._init_call = (args, kwargs)  # to rebuild the maker if a block turns out to see shared ids
        maker._shared_ids = []
        return maker

    def _init_step(self, model: nn.Module, micro_batch_size: Optional[int],
                   grad_scaler: Optional[torch.amp.GradScaler]) -> nn.Module:
        """The preamble of every maker's constructor: micro-batches and the GradScaler checked and kept; the
        module to work on (:func:`~fop_asdl.engine.setup.prepared_model`) returned."""
        self.micro_batch_size = validate_micro_batch_size(micro_batch_size)
        check_grad_scaler(model, grad_scaler)
        self.grad_scaler = grad_scaler
        self.last_step_skipped = False
        return prepared_model(model)

    #: The user's ``ignore_modules`` when ``config`` holds more (K-FAC's copy also ignores unsupported layers).
    _user_ignore_modules: Optional[Sequence[Any]] = None

    def coverage(self) -> Coverage:
        """Per parameter of the model: preconditioned (by which block, how), the plain gradient (and why),
        ignored by the user or frozen, with the other names of a shared one; ``.summary()`` is one line."""
        rules = self._user_ignore_modules if self._user_ignore_modules is not None else self.config.ignore_modules
        return model_coverage(self.model, self.method_label, self._step_blocks, self._describe_block, rules,
                              f"has no {self.method_label} curvature",
                              {id(m): shared_ids_reason(shape) for m, shape in self._shared_ids})

    def _describe_block(self, name: str, module: nn.Module) -> str:
        """How this method preconditions the block ``name`` (for :meth:`coverage`)."""
        return f"{self.method_label} block ({module.__class__.__name__})"

    def setup_model_call(self, model_fn: Any, *args: Any, **kwargs: Any) -> Any:
        """ASDL's ``setup_model_call``; a ``torch.compile``d module is called eagerly (setup.eager_module)."""
        return super().setup_model_call(eager_module(model_fn, warn=False), *args, **kwargs)

    # --- what a method provides ------------------------------------------------------------------------
    @property
    def _step_blocks(self) -> Sequence[Tuple[str, nn.Module]]:
        """(name, module) of every block whose (x, grad_out) the capture hands to :meth:`_accumulate`."""
        raise NotImplementedError

    def _min_local_batch(self) -> Tuple[int, str]:
        """(fewest samples per process, why), for the error message."""
        return 1, f"{self.method_label} needs samples"

    def _local_split(self, batch_size: int) -> int:
        """How many of this process's samples (the first ones) belong to B1; all for most methods."""
        return batch_size

    def _begin_step(self, batch_size: int) -> Any:
        """The step's plan; whatever this changes, :meth:`_roll_back` undoes."""
        raise NotImplementedError

    def _captured_blocks(self, plan: Any) -> Sequence[Tuple[str, nn.Module]]:
        """The blocks captured this step (all by default). The others among ``_step_blocks`` get their
        gradients from autograd and are reduced with the plain parameters, so a method that needs no
        per-sample data on a step pays no capture there (HyLo between refreshes)."""
        return self._step_blocks

    #: Whether the method's blocks may be of every layer type of :mod:`fop_asdl.engine.layers` (and Embedding);
    #: False where its math covers only ASDL 0.1a5's own (Linear, ungrouped Conv2d, norms: EKFAC; per-sample
    #: methods: Linear and Conv2d), the others left to the plain gradient with the reason in its warning.
    all_layer_types = True

    #: Blocks outside :meth:`_captured_blocks` hand autograd's gradient sums to :meth:`_finish` as their records
    #: (:meth:`_record_from_autograd`) instead of joining the plain gradients: a method that needs only each
    #: block's whole-batch sum (K-FAC) pays no capture and keeps autograd's fused kernels (BatchNorm's too).
    autograd_records = False

    def _record_from_autograd(self, module: nn.Module) -> Any:
        """The record of a block from its parameters' ``.grad`` (the summed loss's gradient of this process)."""
        raise NotImplementedError

    def _pass_context(self, plan: Any) -> ContextManager:
        """Entered around all forward/backward passes of the step."""
        return contextlib.nullcontext()

    def _chunk_backward(self, capture: BlockCapture, plan: Any, first: bool) -> None:
        """One micro-batch's forward and backward pass (the registered calls already sliced to it)."""
        summed_loss_backward(self, self.grad_scaler, capture.chunk.size)

    def _accumulate(self, module: nn.Module, x: Tensor, grad_out: Tensor, chunk: Chunk,
                    previous: Optional[Any]) -> Any:
        """A block's record after one more call: ``grad_out`` is the gradient of the summed (scaled) loss."""
        raise NotImplementedError

    def _finish(self, plan: Any, records: Dict[str, Any], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        """Reduce the records (sums over this process's samples of the summed loss), prepare the commit in
        ``plan``; the tensors to check, by group name. ``counts`` says what the sums are divided by."""
        raise NotImplementedError

    def _commit(self, plan: Any) -> None:
        """Write the blocks' ``p.grad`` and the method's new state; must not fail on data."""
        raise NotImplementedError

    def _roll_back(self, plan: Any) -> None:
        """Undo what :meth:`_begin_step` changed."""
        raise NotImplementedError

    # --- the template ---------------------------------------------------------------------------------
    def forward_and_backward(self) -> Tuple[Any, Tensor]:
        try:
            return self._forward_and_backward()
        except SharedIdsFound as found:  # rolled back: nothing of the attempt remains
            ignore_shared_ids(self, found)
        return self.forward_and_backward()

    def _forward_and_backward(self) -> Tuple[Any, Tensor]:
        batch_size = ready_batch_size(self, *self._min_local_batch())
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        plan = None
        try:
            plan = self._begin_step(batch_size)
            records, counts, loss_sum, output, normalizer = self._local_pass(batch_size, plan)
            with full_precision(self.device.type):
                block_params = {p for _, m in self._captured_blocks(plan) for p in m.parameters()}
                if self.autograd_records:
                    block_params |= self._take_autograd_records(plan, records)
                # Parameters outside blocks, and the uses outside blocks of a block's shared parameter (a tied
                # embedding and LM head): autograd's gradient, which the commit adds to the blocks' results.
                plain = [p for p in params if p not in block_params or p.grad is not None]
                (n1, n2), loss_sum, terms = self._sync.reduce_counts_and_others(counts, loss_sum, plain,
                                                                                normalizer.terms())
                batch = BatchCounts(n1, n2, normalizer.resolve(n1 + n2, terms))
                for p in plain:
                    if p.grad is not None:
                        p.grad.div_(batch.normalizer)
                loss = loss_sum / batch.normalizer
                groups = self._finish(plan, records, batch)
                del records
                finite = self._check_finite(loss, plain, groups)
        except BaseException:
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            if plan is not None:
                self._roll_back(plan)
            raise
        self._model_output, self._loss = output, loss
        self.last_step_skipped = not finite
        if not finite:  # only with a grad_scaler: its step() sees the NaN and skips, update() lowers the scale
            self._roll_back(plan)
            for _, module in self._step_blocks:
                for param in module.parameters():
                    if param.requires_grad:
                        param.grad = torch.full_like(param, float("nan"))
            return self._model_output, self._loss
        with full_precision(self.device.type):  # nothing below can meet bad data
            self._commit(plan)
        self.state["step"] += 1
        return self._model_output, self._loss

    def _take_autograd_records(self, plan: Any, records: Dict[str, Any]) -> set:
        """Autograd's gradient sums of the blocks outside ``_captured_blocks`` become their records (and leave
        ``p.grad``); the parameters of those blocks."""
        captured = {m for _, m in self._captured_blocks(plan)}
        taken = set()
        for name, module in self._step_blocks:
            weight = getattr(module, "weight", None)  # None: a norm layer without affine parameters
            if module in captured or weight is None or weight.grad is None:
                continue
            records[name] = self._record_from_autograd(module)
            for param in module.parameters():
                param.grad = None
                taken.add(param)
        return taken

    def _local_pass(self, batch_size: int, plan: Any):
        """This process's records: one forward and one backward pass per micro-batch (one in all by default).

        Every pass backpropagates the loss *summed* over its samples, so gradients and loss of the chunks
        (and of the ranks) simply add up; the user's own loss on each chunk's output gives the normalizer
        (:mod:`fop_asdl.engine.loss`). Returns (records by block name, (n1, n2) here, loss sum, output,
        normalizer).
        """
        split = self._local_split(batch_size)
        captured = self._captured_blocks(plan)
        capture = BlockCapture([m for _, m in captured], self._accumulate)
        normalizer = LossNormalizer(self._loss_fn, self._loss_fn_kwargs)
        loss_sum = None
        outputs = []
        with capture, self._pass_context(plan):
            for index, (start, end) in enumerate(chunk_bounds(batch_size, self.micro_batch_size)):
                capture.set_chunk(Chunk(start, end - start, min(max(split - start, 0), end - start)))
                with sliced_calls(self, start, end, batch_size):
                    self._chunk_backward(capture, plan, index == 0)
                    loss = self._loss.detach()
                    pair = user_loss(self, loss) if normalizer.needs_user_loss else (loss, None)
                    normalizer.add(*pair, end - start)
                loss_sum = loss if loss_sum is None else loss_sum + loss
                # A chunk's output must not keep its graph (and the block inputs the hooks hold) alive while
                # the next chunks run: that would make memory grow with the batch, not the micro-batch.
                outputs.append(detached(self._model_output) if self.micro_batch_size else self._model_output)
        names = {m: name for name, m in captured}
        records = {names[m]: record for m, record in capture.take_records().items()}
        return records, (split, batch_size - split), loss_sum, concat_outputs(outputs), normalizer

    def _check_finite(self, loss_sum: Tensor, others: Sequence[nn.Parameter],
                      groups: Dict[str, List[Tensor]]) -> bool:
        """One fused check (one host sync) of loss, plain gradients and the method's tensors, agreed by all
        processes. Non-finite values raise, except with a grad_scaler, where they are its signal to skip."""
        # A tensor's largest magnitude is non-finite exactly when an entry is (NaN propagates; no overflow as
        # a sum may have): one multi-tensor kernel per group rather than two kernels per tensor.
        names = ["loss", *groups]
        checked: List[List[Tensor]] = [[loss_sum], *(list(t) for t in groups.values())]
        plain = [p.grad for p in others if p.grad is not None]
        if "gradient" in groups:
            checked[names.index("gradient")] += plain
        else:
            names.append("gradient")
            checked.append(plain)
        finite = [torch.isfinite(torch.stack([m.float() for m in torch._foreach_norm(group, float("inf"))])).all()
                  if group else torch.ones((), dtype=torch.bool, device=loss_sum.device) for group in checked]
        bad = self._sync.any_bad((~torch.stack(finite)).to(torch.int32))
        if not bool(bad.any()):
            return True
        if self.grad_scaler is not None:
            return False
        what = [name for name, flag in zip(names, bad.tolist()) if flag]
        raise FloatingPointError(f"{self.method_label} step aborted: NaN or Inf in the {', '.join(what)}. Nothing "
                                 f"was updated (gradients and the method's state are as before the step); lower "
                                 f"the learning rate or raise the damping.")
