"""FOPGradientMaker: FOP (FOP_SPEC steps 1-8) behind ASDL's gradient-maker interface."""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import asdl
import torch
from asdl.matrices import FISHER_MC
from asdl.utils import has_reduction
from torch import Tensor, nn

from .attention import attention_blocks  # issue 10
from .blocks import BlockVector, apply_inverse, apply_metric, gram, matrix_tensors
from .chunks import (chunk_bounds, concat_outputs, detached, sliced_calls, summed_loss_backward,
                     validate_micro_batch_size)
from .compat import (_INVALID, KfacGradientMaker, batch_size_of, full_precision, kept_requires_grad,
                     kron_damping, rebuild_inverse, reject_ddp)
from .halves import HalfGradientCapture, add_sums, supports_half_gradients
from .projection import FOPOptions, average_and_difference, fop_coefficients
from .sync import HalfSums, make_sync

__all__ = ["FOPGradientMaker", "ScalableKfacGradientMaker"]

STAT_KEYS = ("s", "beta", "eta", "A", "D", "E", "kl_base", "kl_cross", "kl_orth")


class FOPGradientMaker(KfacGradientMaker):
    """FOP as a drop-in replacement of ``asdl.KfacGradientMaker``.

    Each step splits the batch into B1 (first ⌈n/2⌉ samples) and B2 (the rest), forms their gradients
    g1, g2 from one forward and one backward pass, and writes η (F̃⁻¹ g_avg + β F̃⁻¹ g_perp) into
    ``p.grad`` of every preconditioned block, where g_perp is the part of g1 − g2 that is Fisher-orthogonal
    to g_avg. Every other trainable parameter receives the full-batch gradient g_avg. Curvature, EMA,
    damping and update intervals come from ``config`` exactly as for K-FAC; with ``beta=0.0, eta=None``
    the result is K-FAC's.

    Args beyond ``asdl.KfacGradientMaker``'s (see :class:`fop_asdl.projection.FOPOptions`):
        beta: float for a fixed β, or ``"adaptive"`` for β* = D/E per block (eq. 16).
        beta_range: clamp of the adaptive β*.
        eta: ``"adaptive"`` for η* per block (eq. 17), or None for η = 1.
        eta_range: clamp of η*.
        projection_metric: ``"undamped"`` (F) or ``"damped"`` (F̃) for the projection of step 2.
        eps: guard for the denominators.
        micro_batch_size: run each step as ⌈n / micro_batch_size⌉ forward/backward passes whose gradients
            (per sub-batch) and curvature add up to those of the whole batch; memory is bounded by the
            micro-batch. None: one pass.
        sub_batches: with ``torch.distributed`` initialised, how B1 and B2 are formed: ``"ranks"`` (even
            ranks' batches vs odd ranks'), ``"halves"`` (every rank's first ⌈n/2⌉ samples vs the rest) or
            ``"auto"`` ("ranks" for an even world size, else "halves"). Ignored in one process.
        grad_scaler: a ``torch.amp.GradScaler`` for fp16 autocast: every backward pass starts from the
            scaled loss, so ``p.grad`` holds scaled results for ``scaler.step(optimizer)`` to unscale. A step
            with NaN/Inf then does not raise: it commits nothing, fills the blocks' ``p.grad`` with NaN so that
            ``scaler.step`` skips it, and sets ``last_step_skipped``.

    Under ``torch.autocast`` the forward and backward passes run in bf16/fp16, while the curvature, its
    inverses, the per-sub-batch gradients and the FOP scalars are computed in the parameters' precision.

    After each step ``last_stats[block name]`` holds the block's s, β, η, A, D, E and the KL terms as
    0-d tensors (kept on the device, so reading them is the only sync).
    """

    #: FOP needs g1 and g2; the K-FAC variant below needs only their mean.
    two_gradients = True
    #: Several ranks run the sharded path (fop_asdl.distributed), not ASDL's.
    single_process_only = False

    def __init__(self, model: nn.Module, config: asdl.PreconditioningConfig,
                 fisher_type: str = FISHER_MC, loss_type: str = "cross_entropy",
                 scale: float = 1.0, grad_scale: float = 1.0, n_mc_samples: int = 1, var: float = 1.0,
                 seed: Optional[int] = None, swift: bool = False,
                 beta: Union[float, str] = "adaptive", beta_range: Tuple[float, float] = (-0.5, 0.5),
                 eta: Optional[str] = "adaptive", eta_range: Tuple[float, float] = (0.0, 2.0),
                 projection_metric: str = "undamped", eps: float = 1e-12,
                 micro_batch_size: Optional[int] = None, sub_batches: str = "auto",
                 grad_scaler: Optional[torch.amp.GradScaler] = None):
        self.options = FOPOptions(beta=beta, beta_range=tuple(beta_range), eta=eta,
                                  eta_range=tuple(eta_range), projection_metric=projection_metric, eps=eps)
        self.micro_batch_size = validate_micro_batch_size(micro_batch_size)
        self.grad_scaler = grad_scaler
        self.last_step_skipped = False
        reject_ddp(model)
        with attention_blocks(self, model):  # issue 10 (fop_asdl.attention): attention projections as blocks
            config = _ignoring_unsupported(model, config)
            super().__init__(model, config, fisher_type=fisher_type, loss_type=loss_type, scale=scale,
                             grad_scale=grad_scale, n_mc_samples=n_mc_samples, var=var, seed=seed, swift=swift)
        self._sync = make_sync(model, self.named_modules_for_curvature, sub_batches, self.two_gradients)
        if swift and (self.micro_batch_size is not None or self._sync.world_size > 1):
            raise ValueError("swift=True (SKFAC) keeps per-sample factor matrices that cannot be summed over "
                             "micro-batches or ranks; use swift=False with micro_batch_size or torch.distributed.")
        self.last_stats: Dict[str, Dict[str, Tensor]] = {}
        self._damping_cache: Dict[nn.Module, Tuple[float, float]] = {}
        self._shapes: Optional[Dict[str, Tuple[torch.Size, Optional[torch.Size]]]] = None

    # --- the step ---------------------------------------------------------------------------------
    def forward_and_backward(self) -> Tuple[Any, Tensor]:
        batch_size = self._check_ready()
        step = self.state["step"]
        update_curvature = self.do_update_curvature(step)
        # Without an EMA the new curvature replaces the old, so its inverse must follow at once.
        update_inverse = self.do_update_preconditioner(step) or (update_curvature and not self.do_accumulate)
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        # The old inverses are about to be replaced: free them to make room for the new curvature. Should
        # the step fail, they are rebuilt from the untouched old factors (equal up to rounding).
        dropped: List[str] = []
        try:
            if update_curvature and update_inverse:
                dropped = self._drop_inverses()
            sums, counts, loss_sum, output, curvature = self._local_pass(batch_size, update_curvature)
            with full_precision(self.device.type):
                block_params = {p for _, m in self.named_modules_for_curvature for p in m.parameters()}
                others = [p for p in params if p not in block_params]
                sums, (n1, n2), loss_sum = self._sync.reduce_gradients(sums, counts, loss_sum, others)
                n = n1 + n2
                for p in others:
                    if p.grad is not None:
                        p.grad.div_(n)
                gradients = self._block_gradients(sums, n1, n2)
                new_curvature = self._sync.reduce_curvature(curvature) if update_curvature else {}
                self._scale_curvature(new_curvature, n)
                finite = self._check_finite(gradients, others, new_curvature, loss_sum)
        except BaseException:
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            self._rebuild_inverses(dropped)
            raise
        self._model_output, self._loss = output, loss_sum / n
        self.last_step_skipped = not finite
        if not finite:  # only with a grad_scaler: its step() sees the NaN and skips, update() lowers the scale
            self._rebuild_inverses(dropped)
            for _, module in self.named_modules_for_curvature:
                for param in module.parameters():
                    if param.requires_grad:
                        param.grad = torch.full_like(param, float("nan"))
            return self._model_output, self._loss
        # Nothing below can meet bad data: commit curvature, inverses and the preconditioned gradients.
        with full_precision(self.device.type):
            self._commit_curvature(new_curvature)
            if update_inverse:
                self._invert_all()
            self._write_fop_gradients(gradients)
        self.state["step"] += 1
        return self._model_output, self._loss

    def _check_ready(self) -> int:
        if self._model_fn is None:
            raise RuntimeError("forward_and_backward() needs setup_model_call(model, x, ...) first.")
        if self._loss_fn is None:
            raise RuntimeError("forward_and_backward() needs setup_loss_call(loss_fn, dummy_y, t, ...) "
                               "first (FOP computes the Fisher from a loss call, not a loss repr).")
        if not has_reduction(self._loss_fn):
            raise TypeError(f"The loss function {getattr(self._loss_fn, '__name__', self._loss_fn)!r} has no "
                            f"'reduction' argument; ASDL's Fisher pass calls it with reduction='sum'. Use e.g. "
                            f"torch.nn.functional.cross_entropy or a function with a reduction parameter.")
        batch_size = batch_size_of(self._model_args, self._model_kwargs)
        if batch_size < (2 if self.two_gradients and self._sync.splits_locally else 1):
            raise ValueError(f"FOP splits every batch into two halves and needs at least 2 samples; got a "
                             f"batch of {batch_size}.")
        for where, values in (("model", (*self._model_args, *self._model_kwargs.values())),
                              ("loss", (*self._loss_fn_args, *self._loss_fn_kwargs.values()))):
            for value in values:
                if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] != batch_size:
                    raise ValueError(f"A tensor argument of the {where} call has {value.shape[0]} rows but the "
                                     f"batch has {batch_size}; FOP splits every tensor argument along dim 0.")
        return batch_size

    def _local_pass(self, batch_size: int, update_curvature: bool):
        """This process's sums: one forward and one backward pass per micro-batch (one in all by default).

        Every pass backpropagates the loss *summed* over its samples, so gradients, loss and curvature of
        the chunks (and of the ranks) simply add up; :meth:`forward_and_backward` divides by the counts.
        Returns (block half-sums by name, (n1, n2) here, loss sum, model output, curvature sums by name).
        """
        split = self._sync.local_split(batch_size, self.two_gradients)
        modules = [m for _, m in self.named_modules_for_curvature]
        capture = HalfGradientCapture(modules)
        loss_sum = None
        outputs = []
        with capture, self._fresh_curvature(update_curvature) as curvature:
            for index, (start, end) in enumerate(chunk_bounds(batch_size, self.micro_batch_size)):
                capture.set_chunk(end - start, min(max(split - start, 0), end - start))
                with sliced_calls(self, start, end, batch_size):
                    if update_curvature:
                        self._curvature_chunk(capture, first=index == 0)
                    else:
                        summed_loss_backward(self, self.grad_scaler)
                loss = self._loss.detach()
                loss_sum = loss if loss_sum is None else loss_sum + loss
                # A chunk's output must not keep its graph (and the block inputs the hooks hold) alive while
                # the next chunks run: that would make memory grow with the batch, not the micro-batch.
                outputs.append(detached(self._model_output) if self.micro_batch_size else self._model_output)
        if curvature and self.grad_scaler is not None and self.fisher_maker.is_fisher_emp:
            # The empirical Fisher comes from the scaled loss's own gradients: its output-side factors carry
            # the scale squared.
            scale_squared = self._scaled(torch.ones((), device=self.device)) ** 2
            for matrix in curvature.values():
                output_side = [matrix.kron.B] if matrix.has_kron else []
                output_side += [matrix.unit.data] if matrix.has_unit else []
                for tensor in output_side:
                    tensor.div_(scale_squared)
        names = {m: name for name, m in self.named_modules_for_curvature}
        sums = {names[m]: tuple(halves) for m, halves in capture.take_sums().items()}
        return sums, (split, batch_size - split), loss_sum, concat_outputs(outputs), curvature

    def _scaled(self, loss: Tensor) -> Tensor:
        """The loss the backward pass starts from: times the grad_scaler's scale when there is one."""
        return loss if self.grad_scaler is None else self.grad_scaler.scale(loss)

    @contextlib.contextmanager
    def _fresh_curvature(self, update_curvature: bool) -> Iterator[Dict[str, Any]]:
        """During the block, ASDL's Fisher passes write into fresh matrices, which are yielded (filled on
        exit); the stored curvature stays untouched until the step is known to be finite."""
        new: Dict[str, Any] = {}
        if not update_curvature:
            yield new
            return
        attr = self._fisher_attr
        named = self.named_modules_for_curvature
        stored = {m: getattr(m, attr) for _, m in named if hasattr(m, attr)}
        for module in stored:
            delattr(module, attr)
        try:
            yield new
            new.update({name: getattr(m, attr) for name, m in named if getattr(m, attr, None) is not None})
        finally:
            for _, module in named:
                if module in stored:
                    setattr(module, attr, stored[module])
                elif hasattr(module, attr):
                    delattr(module, attr)

    def _curvature_chunk(self, capture: HalfGradientCapture, first: bool) -> None:
        """ASDL's Fisher pass on one chunk (its forward, Fisher backward(s) and the loss backward), with
        the curvature summed over the chunk's samples (data_size=1) and added to that of earlier chunks."""
        fisher_maker = self.fisher_maker
        fisher_loop = fisher_maker._fisher_loop

        def loop_without_capture(closure):  # Monte-Carlo / exact Fisher backward passes: not the loss
            if not bool(torch.isfinite(fisher_maker._logits).all()):  # sampling from NaN logits fails obscurely
                raise FloatingPointError("FOP step aborted: NaN or Inf in the model output. Nothing was "
                                         "updated; lower the learning rate or raise the damping.")
            capture.active = False
            try:
                fisher_loop(closure)
            finally:
                capture.active = True

        fisher_maker._fisher_loop = loop_without_capture
        if self.grad_scaler is not None:  # ASDL backpropagates fisher_maker._loss: make that the scaled loss
            call_loss = fisher_maker.call_loss

            def scaled_call_loss():
                self._unscaled_loss = call_loss()
                fisher_maker._loss = self._scaled(self._unscaled_loss)
                return fisher_maker._loss

            fisher_maker.call_loss = scaled_call_loss
        seed = fisher_maker.config.seed
        if not first:
            fisher_maker.config.seed = None  # re-seeding each chunk would repeat the first chunk's draws
        scale = self.scale * (self.config.ema_decay if self.do_accumulate else 1.0)
        try:
            with kept_requires_grad(self.model):
                self.delegate_forward_and_backward(fisher_maker, data_size=1, scale=scale, accumulate=not first,
                                                   calc_loss_grad=True, calc_inv=False)
        finally:
            del fisher_maker._fisher_loop
            fisher_maker.__dict__.pop("call_loss", None)
            fisher_maker.config.seed = seed
        if self.grad_scaler is not None:
            self._loss = self._unscaled_loss

    def _block_gradients(self, sums: Dict[str, HalfSums], n1, n2) -> Dict[str, Tuple[BlockVector, BlockVector]]:
        """(g_avg, g_diff) per owned block (g_diff None for K-FAC), as (weight, bias) pairs without the
        stacking dimension, Conv2d weights flattened to the (out, in·kh·kw) matrix ASDL's Kron acts on."""
        shapes = self._block_shapes()
        out = {}
        while sums:  # consume the sums: each block holds two copies of its gradient, not four
            name, (sum1, sum2) = sums.popitem()
            sum1, sum2 = (_flat(s, shapes[name]) for s in (sum1, sum2))
            if not self.two_gradients:
                total = add_sums(sum1, sum2)
                out[name] = (_divided(total, n1 + n2), None)
                continue
            w_avg, w_diff = average_and_difference(sum1[0], sum2[0], n1, n2)
            b_avg, b_diff = (None, None) if sum1[1] is None else average_and_difference(sum1[1], sum2[1], n1, n2)
            out[name] = ((w_avg, b_avg), (w_diff, b_diff))
        return out

    def _scale_curvature(self, curvature: Dict[str, Any], n) -> None:
        """Sums over samples → ASDL's scaling: every stored factor divided by data_size (config.data_size, or
        the global batch size when unset), as ASDL's ``scale / data_size`` does for each factor."""
        if not curvature:
            return
        data_size = n if self.config.data_size == _INVALID else self.config.data_size
        for matrix in curvature.values():
            for tensor in matrix_tensors(matrix):
                tensor.div_(data_size)

    def _check_finite(self, gradients, others: Sequence[nn.Parameter], new_curvature, loss_sum) -> bool:
        """One fused check (one host sync) of loss, gradients and new curvature, agreed by all processes.
        Non-finite values raise, except with a grad_scaler, where they are its signal to skip the step."""
        # g_avg = (S1 + S2)/n is non-finite whenever S1 or S2 is (inf - inf is NaN), so g_diff needs no check;
        # a tensor's sum is non-finite whenever an entry is: one read per tensor.
        groups: List[List[Tensor]] = [[loss_sum], [], []]
        for g_avg, _ in gradients.values():
            groups[1] += [t for t in g_avg if t is not None]
        groups[1] += [p.grad for p in others if p.grad is not None]
        for matrix in new_curvature.values():
            groups[2] += matrix_tensors(matrix)
        finite = [torch.stack([torch.isfinite(t.sum()) for t in group]).all() if group
                  else torch.ones((), dtype=torch.bool, device=loss_sum.device) for group in groups]
        bad = self._sync.any_bad((~torch.stack(finite)).to(torch.int32))
        if not bool(bad.any()):
            return True
        if self.grad_scaler is not None:
            return False
        what = [name for name, flag in zip(("loss", "gradient", "curvature"), bad.tolist()) if flag]
        raise FloatingPointError(f"FOP step aborted: NaN or Inf in the {', '.join(what)}. Nothing was updated "
                                 f"(gradients, curvature and inverses are as before the step); lower the "
                                 f"learning rate or raise the damping.")

    def _commit_curvature(self, new_curvature: Dict[str, Any]) -> None:
        attr = self._fisher_attr
        decay = self.config.ema_decay
        modules = dict(self.named_modules_for_curvature)
        for name, matrix in new_curvature.items():
            module = modules[name]
            stored = getattr(module, attr, None)
            if self.do_accumulate and stored is not None:
                stored.mul_(1.0 - decay)  # the same EMA as ASDL's update_curvature, per factor
                stored += matrix
            else:
                setattr(module, attr, matrix)

    # --- FOP proper (steps 2-8), all owned blocks solved together ------------------------------------
    def _write_fop_gradients(self, gradients: Dict[str, Tuple[BlockVector, Optional[BlockVector]]]) -> None:
        """Steps 2-8 for every owned block, then every block's result into ``p.grad`` on every process.
        ``gradients`` is consumed block by block to keep memory flat."""
        attr = self._fisher_attr
        damped = self.options.projection_metric == "damped"
        results: Dict[str, Tuple[BlockVector, Optional[Tensor]]] = {}
        names, inverse_products, scalars = [], [], []
        for name, module in self.named_modules_for_curvature:
            if name not in gradients:
                continue  # not owned here, or the block took no part in the loss (autograd leaves None too)
            g_avg, g_diff = gradients.pop(name)
            matrix = getattr(module, attr, None)
            if not _has_inverse(matrix):  # no curvature yet for this block: plain gradient, as K-FAC does
                results[name] = (g_avg, None)
                continue
            if g_diff is None:  # K-FAC: F̃⁻¹ g_avg
                results[name] = (_index(apply_inverse(matrix, _scaled(_stack(g_avg), self.grad_scale)), 0), None)
                continue
            both = _scaled(_stack(g_avg, g_diff), self.grad_scale)  # [g_avg, g_diff]
            del g_avg, g_diff
            inv_both = apply_inverse(matrix, both)  # [F̃⁻¹g_avg, F̃⁻¹g_diff] in one product
            metric_avg = apply_metric(matrix, _slice(both, 0),
                                      self._metric_damping(module, matrix) if damped else None)
            with_metric = gram(both, metric_avg)  # ⟨g_a, M g_a⟩, ⟨g_d, M g_a⟩
            with_inverse = gram(both, inv_both)   # rows g_a, g_d; columns F̃⁻¹g_a, F̃⁻¹g_d
            scalars.append(torch.stack([with_metric[0, 0], with_metric[1, 0], with_inverse[0, 0],
                                        with_inverse[0, 1], with_inverse[1, 1]]))
            names.append(name)
            inverse_products.append(inv_both)
        if names:
            table = torch.stack(scalars)  # (blocks, 5)
            coef = fop_coefficients(table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4], self.options)
            w_avg, w_diff = coef.weight_avg, coef.weight_diff
            kl_base, kl_cross, kl_orth = coef.kl_terms()
            stats = torch.stack((coef.s, coef.beta, coef.eta, coef.A, coef.D, coef.E, kl_base, kl_cross, kl_orth), 1)
            for i, name in enumerate(names):
                inv_w, inv_b = inverse_products[i]
                inverse_products[i] = None
                # η((1 − βs) F̃⁻¹g_avg + β F̃⁻¹g_diff), as fresh tensors so the stacked products can be freed
                weight = torch.addcmul(inv_w[0] * w_avg[i], inv_w[1], w_diff[i])
                bias = None if inv_b is None else torch.addcmul(inv_b[0] * w_avg[i], inv_b[1], w_diff[i])
                results[name] = ((weight, bias), stats[i])
        results = self._sync.share(results, self._block_shapes())
        self.last_stats = {}
        for name, module in self.named_modules_for_curvature:
            if name not in results:
                continue
            vector, block_stats = results[name]
            _write(module, vector)
            if block_stats is not None:
                self.last_stats[name] = dict(zip(STAT_KEYS, block_stats.unbind()))

    def _block_shapes(self) -> Dict[str, Tuple[torch.Size, Optional[torch.Size]]]:
        """(weight, bias) shapes of each block's vectors as the FOP math sees them (Conv2d flattened)."""
        if self._shapes is None:
            self._shapes = {}
            for name, module in self.named_modules_for_curvature:
                weight = module.weight.shape
                if isinstance(module, nn.Conv2d):
                    weight = torch.Size((weight[0], weight[1:].numel()))
                bias = None if module.bias is None else module.bias.shape
                self._shapes[name] = (weight, bias)
        return self._shapes

    def _metric_damping(self, module: nn.Module, matrix) -> Tuple[float, float]:
        """(d_A, d_B) of the damped metric, cached until the next inverse update (it costs a sync)."""
        if module not in self._damping_cache:
            damping = self.config.damping
            self._damping_cache[module] = kron_damping(matrix.kron, damping) if matrix.has_kron else (damping,) * 2
        return self._damping_cache[module]

    def _invert_all(self) -> None:
        super()._invert_all()
        self._damping_cache.clear()

    def _drop_inverses(self) -> List[str]:
        """Free the inverses of every block that has them; returns those blocks' names."""
        dropped = []
        for name, module in self.named_modules_for_curvature:
            matrix = getattr(module, self._fisher_attr, None)
            if not _has_inverse(matrix):
                continue
            if matrix.has_kron:
                matrix.kron.A_inv = matrix.kron.B_inv = None
            else:
                matrix.unit.inv = None
            dropped.append(name)
        return dropped

    def _rebuild_inverses(self, names: List[str]) -> None:
        modules = dict(self.named_modules_for_curvature)
        for name in names:
            rebuild_inverse(getattr(modules[name], self._fisher_attr), self.config.damping, name,
                            self._fallback_warned)

    @property
    def assignment(self) -> Dict[str, int]:
        """{block name: owner rank}: the rank that keeps, inverts and applies each block's curvature."""
        return {name: getattr(self._sync, "assignment", {}).get(name, 0)
                for name, _ in self.named_modules_for_curvature}

    def state_dict(self) -> Dict[str, Any]:
        """Step, curvature and inverses of every block; on several ranks gathered from the owners (a
        collective: call it on every rank), so it resumes a run of any world size."""
        state = super().state_dict()
        state["curvature"] = self._sync.gathered_curvature(state["curvature"])
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state of any world size; each rank keeps the curvature of the blocks it owns."""
        super().load_state_dict(state_dict)
        for name, module in self.named_modules_for_curvature:
            if not self._sync.owns(name) and hasattr(module, self._fisher_attr):
                delattr(module, self._fisher_attr)
        self._damping_cache.clear()


class ScalableKfacGradientMaker(FOPGradientMaker):
    """K-FAC on FOP's step machinery (β = 0, η = 1, only the mean gradient formed and communicated):
    what ``make_gradient_maker("kfac", ...)`` returns with ``micro_batch_size`` or on several ranks.
    Its gradients equal ``asdl.KfacGradientMaker``'s."""

    two_gradients = False

    def __init__(self, model: nn.Module, config: asdl.PreconditioningConfig, **kwargs: Any):
        foreign = {"beta", "beta_range", "eta", "eta_range", "projection_metric", "eps"} & set(kwargs)
        if foreign:
            raise TypeError(f"K-FAC takes no FOP options, got {sorted(foreign)}.")
        super().__init__(model, config, beta=0.0, eta=None, **kwargs)


def _has_inverse(matrix: Any) -> bool:
    return matrix is not None and (matrix.kron.has_inv if matrix.has_kron else matrix.unit.has_inv)


def _stack(*vectors: BlockVector) -> BlockVector:
    """Stack unstacked block vectors along a new dim 0 (the k of :mod:`fop_asdl.blocks`)."""
    weight = torch.stack([v[0] for v in vectors])
    bias = None if vectors[0][1] is None else torch.stack([v[1] for v in vectors])
    return weight, bias


def _slice(vec: BlockVector, j: int) -> BlockVector:
    """Entry j of a stack, keeping the stacking dimension."""
    return vec[0][j:j + 1], None if vec[1] is None else vec[1][j:j + 1]


def _index(vec: BlockVector, j: int) -> BlockVector:
    """Entry j of a stack, without the stacking dimension."""
    return vec[0][j], None if vec[1] is None else vec[1][j]


def _flat(vec: Optional[BlockVector], shape: Tuple[torch.Size, Optional[torch.Size]]) -> Optional[BlockVector]:
    """A block's (weight, bias) sum reshaped as the FOP math sees it (Conv2d weight as a matrix)."""
    return None if vec is None else (vec[0].reshape(shape[0]), vec[1])


def _divided(vec: BlockVector, n) -> BlockVector:
    return vec[0] / n, None if vec[1] is None else vec[1] / n


def _scaled(vec: BlockVector, factor: float) -> BlockVector:
    if factor == 1:
        return vec
    return vec[0] * factor, None if vec[1] is None else vec[1] * factor


def _write(module: nn.Module, vec: BlockVector) -> None:
    """Put a block vector (unstacked) into the grads of the module's parameters."""
    weight, bias = vec
    module.weight.grad = weight.reshape(module.weight.shape).contiguous()
    if bias is not None:
        module.bias.grad = bias.reshape(module.bias.shape).contiguous()


def _user_ignores(name: str, module: nn.Module, ignore_modules: Optional[Sequence[Any]]) -> bool:
    for rule in ignore_modules or ():
        if isinstance(rule, type) and isinstance(module, rule):
            return True
        if isinstance(rule, str) and rule in name:
            return True
        if rule is module:
            return True
    return False


def _ignoring_unsupported(model: nn.Module, config: asdl.PreconditioningConfig) -> asdl.PreconditioningConfig:
    """A copy of ``config`` that also ignores layers FOP cannot precondition, with one warning naming them.

    Their parameters (and any parameter owned directly by a container module) receive g_avg.
    """
    ignore = list(config.ignore_modules or [])
    unsupported = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if not any(p.requires_grad for p in own) or _user_ignores(name, module, config.ignore_modules):
            continue
        is_leaf = next(module.children(), None) is None
        partially_frozen = not all(p.requires_grad for p in own)
        if not is_leaf or not supports_half_gradients(module) or partially_frozen:
            unsupported.append(f"{name or '<root>'} ({module.__class__.__name__}"
                               f"{', partially frozen' if partially_frozen else ''})")
            if is_leaf:
                ignore.append(module)
    if unsupported:
        warnings.warn("fop_asdl: no FOP curvature for " + ", ".join(unsupported)
                      + "; their parameters receive the plain full-batch gradient g_avg.", UserWarning)
    return dataclasses.replace(config, ignore_modules=ignore)
