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
import dataclasses
import warnings
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

import asdl
import torch
from asdl.utils import has_reduction
from torch import Tensor, nn

from .attention import attention_blocks
from .capture import BlockCapture, Chunk
from .chunks import (chunk_bounds, concat_outputs, detached, loss_arguments, rows_per_sample, sliced_calls,
                     summed_loss_backward, user_loss, validate_micro_batch_size)
from ..compat import batch_size_of, eager_module, full_precision
from .sub_batches import supports_half_gradients
from .loss import BatchCounts, LossNormalizer
from ..distributed.sync import LocalSync, several_ranks

__all__ = ["SteppedGradientMaker", "ignoring_unsupported", "linear_conv_blocks", "make_sync", "shared_blocks",
           "supports_per_sample", "user_ignores"]

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

    def setup_model_call(self, model_fn: Any, *args: Any, **kwargs: Any) -> Any:
        """ASDL's ``setup_model_call``; a ``torch.compile``d module is called eagerly (compat.eager_module)."""
        return super().setup_model_call(eager_module(model_fn, warn=False), *args, **kwargs)

    def _init_per_sample_step(self, model: nn.Module, micro_batch_size: Optional[int],
                              grad_scaler: Optional[torch.amp.GradScaler]) -> None:
        """The set-up FNGD and HyLo share: the step's attributes, ``self.blocks`` (their per-sample Linear and
        Conv2d blocks, the attention projections among them: :mod:`fop_asdl.engine.attention`) and ``self._modules``,
        the same by name."""
        self.micro_batch_size = validate_micro_batch_size(micro_batch_size)
        self.grad_scaler = grad_scaler
        self.last_step_skipped = False
        self.device = next(model.parameters()).device
        self.state = {"step": 0}
        with attention_blocks(self, model):
            self.blocks = linear_conv_blocks(model, self.config.ignore_modules, self.method_label)
        self._modules = dict(self.blocks)

    def _once_per_pass(self, starts: List[int], chunk: Chunk, module: nn.Module, needs: str) -> None:
        """Record the chunk a per-sample block saw; refuse a block that runs twice in one forward pass (shared
        weights), whose rows would mix two calls."""
        if chunk.start in starts:
            raise ValueError(f"fop_asdl: a {module.__class__.__name__} block ran more than once in one forward "
                             f"pass; {self.method_label} needs {needs}. List it in "
                             f"PreconditioningConfig.ignore_modules.")
        starts.append(chunk.start)

    # --- per-rank state (FNGD's bank, HyLo's generator) ---------------------------------------------------
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
        batch_size = self._check_ready()
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

    def _check_ready(self) -> int:
        if self._model_fn is None:
            raise RuntimeError("forward_and_backward() needs setup_model_call(model, x, ...) first.")
        if self._loss_fn is None and self._dummy_loss is None:
            raise RuntimeError("forward_and_backward() needs setup_loss_call(loss_fn, dummy_y, t, ...) or "
                               "setup_loss_repr(dummy_y[...]) first.")
        if self._loss_fn is not None and not has_reduction(self._loss_fn):
            raise TypeError(f"The loss function {getattr(self._loss_fn, '__name__', self._loss_fn)!r} has no "
                            f"'reduction' argument; the step calls it with reduction='sum' (and the user's own "
                            f"to divide exactly as the user does). Use e.g. torch.nn.functional.cross_entropy or "
                            f"a function with a reduction parameter.")
        batch_size = batch_size_of(self._model_args, self._model_kwargs)
        fewest, why = self._min_local_batch()
        if batch_size < fewest:
            raise ValueError(f"{why} and needs at least {fewest} samples; got a batch of {batch_size}.")
        for value in (*self._model_args, *self._model_kwargs.values()):
            if rows_per_sample(value, batch_size, flattened=False) == 0:
                raise ValueError(f"A tensor argument of the model call has {value.shape[0]} rows but the batch "
                                 f"has {batch_size}; the step splits every tensor argument along dim 0.")
        for name, value in loss_arguments(self):
            if rows_per_sample(value, batch_size, flattened=True) == 0:
                raise ValueError(f"The loss call's tensor argument {name} has {value.shape[0]} rows, neither the "
                                 f"batch's {batch_size} nor a multiple of it (k rows per sample, sample-major, "
                                 f"as t.view(-1) of (B, T) targets); the step splits it with the batch.")
        return batch_size

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
                    normalizer.add(loss, user_loss(self) if normalizer.needs_user_loss else None, end - start)
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
        # A tensor's sum is non-finite whenever an entry is: one read per tensor.
        names = ["loss", *groups]
        checked: List[List[Tensor]] = [[loss_sum], *(list(t) for t in groups.values())]
        plain = [p.grad for p in others if p.grad is not None]
        if "gradient" in groups:
            checked[names.index("gradient")] += plain
        else:
            names.append("gradient")
            checked.append(plain)
        finite = [torch.stack([torch.isfinite(t.sum()) for t in group]).all() if group
                  else torch.ones((), dtype=torch.bool, device=loss_sum.device) for group in checked]
        bad = self._sync.any_bad((~torch.stack(finite)).to(torch.int32))
        if not bool(bad.any()):
            return True
        if self.grad_scaler is not None:
            return False
        what = [name for name, flag in zip(names, bad.tolist()) if flag]
        raise FloatingPointError(f"{self.method_label} step aborted: NaN or Inf in the {', '.join(what)}. Nothing "
                                 f"was updated (gradients and the method's state are as before the step); lower "
                                 f"the learning rate or raise the damping.")


def user_ignores(name: str, module: nn.Module, ignore_modules: Optional[Sequence[Any]]) -> bool:
    """Whether ``PreconditioningConfig.ignore_modules`` names this module (by type, name part or identity)."""
    for rule in ignore_modules or ():
        if isinstance(rule, type) and isinstance(module, rule):
            return True
        if isinstance(rule, str) and rule in name:
            return True
        if rule is module:
            return True
    return False


def make_sync(model: nn.Module, named_modules: Sequence[Tuple[str, nn.Module]], sub_batches: str,
              two_gradients: bool, costs: Optional[Dict[str, float]] = None) -> LocalSync:
    """The sharded sync (:mod:`fop_asdl.distributed`) when ``torch.distributed`` runs several ranks, else
    the local one; ``costs`` (by block name) balance the owners where K-FAC's cost model does not fit."""
    if sub_batches not in ("auto", "ranks", "halves"):
        raise ValueError(f"sub_batches must be 'auto', 'ranks' or 'halves', got {sub_batches!r}.")
    if not several_ranks():
        return LocalSync()
    from ..distributed.sharded import ShardedSync  # the library's single-process path never imports it

    dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.get_default_dtype())
    return ShardedSync(named_modules, sub_batches, two_gradients, dtype, costs)


def ignoring_unsupported(model: nn.Module, config: asdl.PreconditioningConfig, label: str
                          ) -> asdl.PreconditioningConfig:
    """A copy of ``config`` that also ignores layers without ASDL curvature, with one warning naming them.

    Their parameters (and any parameter owned directly by a container module) receive the plain gradient.
    """
    ignore = list(config.ignore_modules or [])
    unsupported = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if not any(p.requires_grad for p in own) or user_ignores(name, module, config.ignore_modules):
            continue
        is_leaf = next(module.children(), None) is None
        partially_frozen = not all(p.requires_grad for p in own)
        if not is_leaf or not supports_half_gradients(module) or partially_frozen:
            unsupported.append(f"{name or '<root>'} ({module.__class__.__name__}"
                               f"{', partially frozen' if partially_frozen else ''})")
            if is_leaf:
                ignore.append(module)
    if unsupported:
        warnings.warn(f"fop_asdl: no {label} curvature for " + ", ".join(unsupported)
                      + "; their parameters receive the plain full-batch gradient g_avg.", UserWarning)
    return dataclasses.replace(config, ignore_modules=ignore)


def shared_blocks(model: nn.Module, blocks: Sequence[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    """The blocks with a parameter that another module of ``model`` holds too (a tied embedding and LM
    head): autograd's gradient of such a parameter mixes the uses, so a method must capture the block to
    tell its own part apart."""
    holders: Dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    return [(name, m) for name, m in blocks if any(holders.get(id(p), 0) > 1 for p in m.parameters(recurse=False))]


def supports_per_sample(module: nn.Module) -> bool:
    """Whether the per-sample math of FNGD (:mod:`fop_asdl.methods.fngd_math`) and HyLo (:mod:`fop_asdl.methods.hylo_math`) covers
    this layer: Linear, and Conv2d without groups, string padding or a non-zero padding mode."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def linear_conv_blocks(model: nn.Module, ignore_modules: Optional[Sequence[Any]], label: str
                       ) -> List[Tuple[str, nn.Module]]:
    """Trainable Linear and Conv2d layers a per-sample method (FNGD, HyLo) preconditions: those
    :func:`supports_per_sample` covers and not partially frozen; one warning names the others."""
    blocks, unsupported = [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or user_ignores(name, module, ignore_modules):
            continue
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        if supports_per_sample(module) and all(p.requires_grad for p in own):
            blocks.append((name, module))
        else:
            unsupported.append(f"{name} ({module.__class__.__name__})")
    if unsupported:
        warnings.warn(f"fop_asdl: {label} cannot precondition " + ", ".join(unsupported) + " (grouped, string "
                      "padding or partially frozen); their parameters receive the plain mean gradient.", UserWarning)
    return blocks
