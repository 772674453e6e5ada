"""FOPGradientMaker: FOP (FOP_SPEC steps 1-8) behind ASDL's gradient-maker interface."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import asdl
import torch
from asdl.matrices import FISHER_MC
from asdl.utils import has_reduction
from torch import Tensor, nn

from .blocks import BlockVector, apply_inverse, apply_metric, gram
from .compat import (KfacGradientMaker, batch_size_of, kept_requires_grad, kron_damping, rebuild_inverse,
                     reject_ddp, resolve_data_size)
from .halves import HalfGradientCapture, supports_half_gradients
from .projection import FOPOptions, average_and_difference, fop_coefficients

__all__ = ["FOPGradientMaker"]

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

    After each step ``last_stats[block name]`` holds the block's s, β, η, A, D, E and the KL terms as
    0-d tensors (kept on the device, so reading them is the only sync).
    """

    def __init__(self, model: nn.Module, config: asdl.PreconditioningConfig,
                 fisher_type: str = FISHER_MC, loss_type: str = "cross_entropy",
                 scale: float = 1.0, grad_scale: float = 1.0, n_mc_samples: int = 1, var: float = 1.0,
                 seed: Optional[int] = None, swift: bool = False,
                 beta: Union[float, str] = "adaptive", beta_range: Tuple[float, float] = (-0.5, 0.5),
                 eta: Optional[str] = "adaptive", eta_range: Tuple[float, float] = (0.0, 2.0),
                 projection_metric: str = "undamped", eps: float = 1e-12):
        self.options = FOPOptions(beta=beta, beta_range=tuple(beta_range), eta=eta,
                                  eta_range=tuple(eta_range), projection_metric=projection_metric, eps=eps)
        reject_ddp(model)
        config = _ignoring_unsupported(model, config)
        super().__init__(model, config, fisher_type=fisher_type, loss_type=loss_type, scale=scale,
                         grad_scale=grad_scale, n_mc_samples=n_mc_samples, var=var, seed=seed, swift=swift)
        self.last_stats: Dict[str, Dict[str, Tensor]] = {}
        self._damping_cache: Dict[nn.Module, Tuple[float, float]] = {}

    # --- the step ---------------------------------------------------------------------------------
    def forward_and_backward(self) -> Tuple[Any, Tensor]:
        batch_size = self._check_ready()
        step = self.state["step"]
        update_curvature = self.do_update_curvature(step)
        # Without an EMA the new curvature replaces the old, so its inverse must follow at once.
        update_inverse = self.do_update_preconditioner(step) or (update_curvature and not self.do_accumulate)
        # The old inverses are about to be replaced: free them to make room for the new curvature. Should
        # the step fail, they are rebuilt from the untouched old factors (equal up to rounding).
        dropped: List[str] = []
        params = [p for p in self.model.parameters() if p.requires_grad]
        saved_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        new_curvature: Dict[nn.Module, Any] = {}
        try:
            if update_curvature and update_inverse:
                dropped = self._drop_inverses()
            capture = HalfGradientCapture([m for _, m in self.named_modules_for_curvature], batch_size)
            with capture:
                if update_curvature:
                    data_size = resolve_data_size(self.config, batch_size)
                    new_curvature = self._curvature_pass(capture, data_size)
                    sum_scale = batch_size / data_size  # the pass backpropagates the summed loss
                else:
                    self.forward()
                    self.backward()
                    sum_scale = float(batch_size)  # the user's loss is a mean over the batch
            gradients = self._block_gradients(capture, sum_scale)
            self._raise_if_not_finite(gradients, params, new_curvature)
        except BaseException:
            for p, grad in zip(params, saved_grads):
                p.grad = grad
            self._rebuild_inverses(dropped)
            raise
        # Nothing below can meet bad data: commit curvature, inverses and the preconditioned gradients.
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
        if batch_size < 2:
            raise ValueError(f"FOP splits every batch into two halves and needs at least 2 samples; got a "
                             f"batch of {batch_size}.")
        for where, values in (("model", (*self._model_args, *self._model_kwargs.values())),
                              ("loss", (*self._loss_fn_args, *self._loss_fn_kwargs.values()))):
            for value in values:
                if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] != batch_size:
                    raise ValueError(f"A tensor argument of the {where} call has {value.shape[0]} rows but the "
                                     f"batch has {batch_size}; FOP splits every tensor argument along dim 0.")
        return batch_size

    def _curvature_pass(self, capture: HalfGradientCapture, data_size: int) -> Dict[nn.Module, Any]:
        """ASDL's Fisher pass (one forward, its Fisher backward(s) and the loss backward) into fresh
        matrices, so that the stored curvature stays untouched until the step is known to be finite."""
        attr = self._fisher_attr
        modules = [m for _, m in self.named_modules_for_curvature]
        stored = {m: getattr(m, attr) for m in modules if hasattr(m, attr)}
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
        scale = self.scale * (self.config.ema_decay if self.do_accumulate else 1.0)
        try:
            with kept_requires_grad(self.model):
                self.delegate_forward_and_backward(fisher_maker, data_size=data_size, scale=scale,
                                                   accumulate=False, calc_loss_grad=True, calc_inv=False)
            return {m: getattr(m, attr, None) for m in modules}
        finally:
            del fisher_maker._fisher_loop
            for module in modules:
                if module in stored:
                    setattr(module, attr, stored[module])
                elif hasattr(module, attr):
                    delattr(module, attr)

    def _block_gradients(self, capture: HalfGradientCapture, sum_scale: float
                         ) -> Dict[nn.Module, Tuple[BlockVector, BlockVector]]:
        """(g_avg, g_diff) per block, each as a (weight, bias) pair without the stacking dimension."""
        n1 = capture.n1
        n2 = capture.batch_size - n1
        out = {}
        while capture.sums:  # consume the sums: each block holds two copies of its gradient, not four
            module, ((w1, b1), (w2, b2)) = capture.sums.popitem()
            if isinstance(module, nn.Conv2d):  # ASDL's Kron acts on the (out, in·kh·kw) matrix
                w1, w2 = w1.flatten(1), w2.flatten(1)
            w_avg, w_diff = average_and_difference(w1, w2, n1, n2, sum_scale)
            b_avg, b_diff = (None, None) if b1 is None else average_and_difference(b1, b2, n1, n2, sum_scale)
            out[module] = ((w_avg, b_avg), (w_diff, b_diff))
        return out

    def _raise_if_not_finite(self, gradients, params: Sequence[nn.Parameter], new_curvature) -> None:
        """One fused check (one host sync) of loss, gradients and new curvature."""
        named: List[Tuple[str, Tensor]] = [("loss", self._loss)]
        for module, ((w_avg, b_avg), (w_diff, b_diff)) in gradients.items():
            named += [("gradient", t) for t in (w_avg, b_avg, w_diff, b_diff) if t is not None]
        named += [("gradient", p.grad) for p in params if p.grad is not None]
        for module, matrix in new_curvature.items():
            if matrix is not None:
                named += [("curvature", t) for t in _matrix_tensors(matrix)]
        flags = torch.stack([torch.isfinite(t).all() for _, t in named])
        if bool(flags.all()):
            return
        bad = sorted({name for (name, _), ok in zip(named, flags.tolist()) if not ok})
        raise FloatingPointError(f"FOP step aborted: NaN or Inf in the {', '.join(bad)}. Nothing was updated "
                                 f"(gradients, curvature and inverses are as before the step); lower the "
                                 f"learning rate or raise the damping.")

    def _commit_curvature(self, new_curvature: Dict[nn.Module, Any]) -> None:
        attr = self._fisher_attr
        decay = self.config.ema_decay
        for module, matrix in new_curvature.items():
            if matrix is None:
                continue
            stored = getattr(module, attr, None)
            if self.do_accumulate and stored is not None:
                stored.mul_(1.0 - decay)  # the same EMA as ASDL's update_curvature, per factor
                stored += matrix
            else:
                setattr(module, attr, matrix)

    # --- FOP proper (steps 2-8), all blocks solved together -----------------------------------------
    def _write_fop_gradients(self, gradients) -> None:
        """Steps 2-8 for every block; ``gradients`` is consumed block by block to keep memory flat."""
        attr = self._fisher_attr
        damped = self.options.projection_metric == "damped"
        names, modules, inverse_products, scalars = [], [], [], []
        for name, module in self.named_modules_for_curvature:
            if module not in gradients:
                continue  # the block took no part in the loss: autograd would leave its grad None too
            g_avg, g_diff = gradients.pop(module)
            matrix = getattr(module, attr, None)
            if not _has_inverse(matrix):  # no curvature yet for this block: plain gradient, as K-FAC does
                _write(module, g_avg)
                continue
            both = _scaled(_stack(g_avg, g_diff), self.grad_scale)  # [g_avg, g_diff]
            del g_avg, g_diff
            inv_both = apply_inverse(matrix, both)  # [F̃⁻¹g_avg, F̃⁻¹g_diff] in one product
            metric_avg = apply_metric(matrix, _index(both, 0),
                                      self._metric_damping(module, matrix) if damped else None)
            with_metric = gram(both, metric_avg)  # ⟨g_a, M g_a⟩, ⟨g_d, M g_a⟩
            with_inverse = gram(both, inv_both)   # rows g_a, g_d; columns F̃⁻¹g_a, F̃⁻¹g_d
            scalars.append(torch.stack([with_metric[0, 0], with_metric[1, 0], with_inverse[0, 0],
                                        with_inverse[0, 1], with_inverse[1, 1]]))
            names.append(name)
            modules.append(module)
            inverse_products.append(inv_both)
        self.last_stats = {}
        if not modules:
            return
        table = torch.stack(scalars)  # (blocks, 5)
        coef = fop_coefficients(table[:, 0], table[:, 1], table[:, 2], table[:, 3], table[:, 4], self.options)
        w_avg, w_diff = coef.weight_avg, coef.weight_diff
        for i, module in enumerate(modules):
            inv_w, inv_b = inverse_products[i]
            inverse_products[i] = None
            # η((1 − βs) F̃⁻¹g_avg + β F̃⁻¹g_diff), as fresh tensors so the stacked products can be freed
            weight = torch.addcmul(inv_w[0] * w_avg[i], inv_w[1], w_diff[i])
            bias = None if inv_b is None else torch.addcmul(inv_b[0] * w_avg[i], inv_b[1], w_diff[i])
            _write(module, (weight, bias))
        kl_base, kl_cross, kl_orth = coef.kl_terms()
        columns = (coef.s, coef.beta, coef.eta, coef.A, coef.D, coef.E, kl_base, kl_cross, kl_orth)
        self.last_stats = {name: dict(zip(STAT_KEYS, (c[i] for c in columns))) for i, name in enumerate(names)}

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

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._damping_cache.clear()


def _has_inverse(matrix: Any) -> bool:
    return matrix is not None and (matrix.kron.has_inv if matrix.has_kron else matrix.unit.has_inv)


def _stack(*vectors: BlockVector) -> BlockVector:
    """Stack unstacked block vectors along a new dim 0 (the k of :mod:`fop_asdl.blocks`)."""
    weight = torch.stack([v[0] for v in vectors])
    bias = None if vectors[0][1] is None else torch.stack([v[1] for v in vectors])
    return weight, bias


def _index(vec: BlockVector, j: int) -> BlockVector:
    return vec[0][j:j + 1], None if vec[1] is None else vec[1][j:j + 1]


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


def _matrix_tensors(matrix) -> List[Tensor]:
    out = []
    if matrix.has_kron:
        out += [t for t in (matrix.kron.A, matrix.kron.B) if t is not None]
    if matrix.has_unit and matrix.unit.data is not None:
        out.append(matrix.unit.data)
    return out


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
