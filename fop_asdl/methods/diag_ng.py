"""The diagonal empirical natural gradient, (diag F + λ)⁻¹ g per Linear/Conv2d block, on the shared step.

diag F = (1/n) Σ_m u_m ⊙ u_m from the per-sample gradients (:mod:`fop_asdl.methods.diag_ng_math`), formed
every ``config.curvature_upd_interval`` steps and kept as ASDL keeps a curvature: replaced, or with
``config.ema_decay`` d an EMA F ← (1 − d) F + d F_new started from zero (``ema_bias_correction`` divides by
1 − (1 − d)^k, as K-FAC's option does). Every step divides the block's mean gradient by F + λ.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import asdl
import torch
from torch import Tensor, nn

from ..engine.capture import Chunk
from ..engine.loss import BatchCounts, loss_scale
from ..distributed import make_sync
from ..engine.per_sample import PerSampleStepMaker
from ..engine.sub_batches import half_sums
from ..engine.trust_region import LearningRate, step_factor, validate_kl_clip
from ..engine.vectors import add, scaled, write_block
from . import diag_ng_math
from .second_order import refuse, summed_over_ranks, warn_plain_parameters

__all__ = ["DiagNgGradientMaker"]

Vector = Tuple[Tensor, Optional[Tensor]]

_REFUSED = {"fisher_type": "its diagonal is the empirical Fisher's, from the per-sample gradients of the loss; "
                           "there is no Monte-Carlo or exact variant."}


@dataclasses.dataclass
class _Record:
    starts: List[int]
    grad: Optional[Vector] = None
    squares: Optional[Vector] = None


@dataclasses.dataclass
class _Plan:
    curvature: bool
    diagonals: Dict[str, Vector] = dataclasses.field(default_factory=dict)  # the new EMA state
    grads: Dict[str, Vector] = dataclasses.field(default_factory=dict)
    nu: Optional[Tensor] = None


class DiagNgGradientMaker(PerSampleStepMaker, asdl.GradientMaker):
    """``p.grad`` of every Linear/Conv2d block holds g / (diag F + λ), every other trainable parameter the
    plain mean gradient (one warning names them).

    Args:
        model, config: ``damping`` λ (> 0), ``ema_decay`` (−1: each new diagonal replaces the old),
            ``curvature_upd_interval``, ``ignore_modules``.
        ema_bias_correction: divide the zero-started EMA by 1 − (1 − d)^k after k updates.
        kl_clip, lr: the trust region of :mod:`fop_asdl.engine.trust_region`; ‖Δ‖²_F̃ = Σ g²/(diag F + λ) with
            the diagonal the step divides by.
        micro_batch_size, grad_scaler: as for the other makers.

    Cost per curvature step: SGD's weight gradient again for plain Linear blocks ((z²)ᵀ(x²)), the per-sample
    gradients (M·O·I, in bounded chunks) for Conv2d and token Linear blocks. Several ranks sum the
    gradients and squares in one all-reduce and keep the same (replicated) diagonals.
    """

    method_label = "diag-NG"

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 ema_bias_correction: bool = False, micro_batch_size: Optional[int] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None, kl_clip: Optional[float] = None,
                 lr: Optional[LearningRate] = None, **others: Any):
        refuse(self.method_label, others, _REFUSED)
        model = self._init_step(model, micro_batch_size, grad_scaler)
        self.kl_clip, self._lr = validate_kl_clip(kl_clip, lr)
        self.config = config if config is not None else asdl.PreconditioningConfig()
        damping, decay = self.config.damping, self.config.ema_decay
        if not (isinstance(damping, (int, float)) and damping > 0):
            raise ValueError(f"config.damping must be a number > 0 (λ of diag F + λ), got {damping!r}.")
        if not (decay == -1 or (isinstance(decay, (int, float)) and 0 < decay <= 1)):
            raise ValueError(f"config.ema_decay must be in (0, 1] or -1 (no EMA), got {decay!r}.")
        interval = self.config.curvature_upd_interval or 1
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"config.curvature_upd_interval must be an int >= 1, got {interval!r}.")
        super().__init__(model)
        self.damping, self.ema_decay, self.interval = float(damping), decay, interval
        self.ema_bias_correction = bool(ema_bias_correction)
        self.last_nu: Optional[Tensor] = None
        self._init_per_sample_step(model)
        self._sync = make_sync(model, self.blocks, "auto", two_gradients=False)
        warn_plain_parameters(model, self.blocks, self.method_label)
        #: Per block: the stored (zero-started) EMA of diag F as (weight, bias), and its update count.
        self.diagonals: Dict[str, Vector] = {}
        self.updates: Dict[str, int] = {}

    # --- the step's hooks -------------------------------------------------------------------------------
    @property
    def _step_blocks(self) -> Sequence[Tuple[str, nn.Module]]:
        return self.blocks

    def _begin_step(self, batch_size: int) -> _Plan:
        self._step_plan = _Plan(self.state["step"] % self.interval == 0)
        return self._step_plan

    def _accumulate(self, module: nn.Module, x: Tensor, grad_out: Tensor, chunk: Chunk,
                    previous: Optional[_Record]) -> _Record:
        record = previous if previous is not None else _Record([])
        self._once_per_pass(record.starts, chunk, module, "one per-sample gradient per call")
        record.grad = add(record.grad, half_sums(module, x, grad_out, x.shape[0])[0])
        if self._step_plan.curvature:
            conv = None
            if isinstance(module, nn.Conv2d):
                conv = (module.kernel_size, module.stride, module.padding, module.dilation)
            elif x.dim() > 3:  # tokens in several dimensions: one
                x, grad_out = x.flatten(1, -2), grad_out.flatten(1, -2)
            squares = diag_ng_math.squared_gradient_sums(x, grad_out, module.bias is not None, conv)
            record.squares = add(record.squares, squares)
        return record

    def _finish(self, plan: _Plan, records: Dict[str, _Record], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        names = [name for name, _ in self.blocks if name in records]
        if self._sync.world_size > 1 and len(names) != len(self.blocks):
            raise ValueError(f"fop_asdl: blocks {sorted(set(self._modules) - set(names))} took no part in the loss "
                             f"on rank {self._sync.rank}; with several ranks {self.method_label} needs every block "
                             f"in every step (ignore them).")
        parts = [t for name in names for v in (records[name].grad, records[name].squares or (None, None))
                 for t in v if t is not None]
        parts = iter(summed_over_ranks(self._sync, parts))
        sigma = loss_scale(self.grad_scaler, self.device)
        # squares of the backpropagated rows carry (σ/r)²: F_new = Σ ũ² r² / (σ² n) = Σ ũ² n / (σ N)²
        square_scale = counts.n / (sigma * counts.normalizer) ** 2
        norms = []
        for name in names:
            weight = self._modules[name].weight
            grad = tuple(None if t is None else next(parts) / counts.normalizer for t in records[name].grad)
            stored = self.diagonals.get(name)
            if plan.curvature:
                new = tuple(None if t is None else next(parts).view(p.shape) * square_scale
                            for t, p in zip(records[name].squares, (weight, self._modules[name].bias)))
                stored = plan.diagonals[name] = self._ema(stored, new)
            if stored is None:  # no curvature yet (curvature steps are 0, k, 2k, ...: only after a load)
                plan.grads[name] = grad
                continue
            divisor = self._correction(name, plan.curvature)
            plan.grads[name] = delta = tuple(
                None if g is None else g / (f / divisor + self.damping) for g, f in zip(grad, stored))
            if self.kl_clip is not None:
                norms.append(sum((g * d).sum() for g, d in zip(grad, delta) if g is not None))
        plan.nu = step_factor(self.kl_clip, self._lr, norms, sigma)
        return {"gradient": [t for d in plan.grads.values() for t in d if t is not None],
                "curvature": [t for f in plan.diagonals.values() for t in f if t is not None]}

    def _ema(self, stored: Optional[Vector], new: Vector) -> Vector:
        """ASDL's curvature update: replace (ema_decay −1), else (1 − d)·stored + d·new from zero."""
        if self.ema_decay == -1:
            return new
        d = self.ema_decay
        if stored is None:
            return tuple(None if t is None else d * t for t in new)
        return tuple(None if t is None else (1 - d) * s + d * t for s, t in zip(stored, new))

    def _correction(self, name: str, updating: bool) -> float:
        if self.ema_decay == -1 or not self.ema_bias_correction:
            return 1.0
        k = self.updates.get(name, 0) + (1 if updating else 0)
        return 1.0 - (1.0 - self.ema_decay) ** k

    def _commit(self, plan: _Plan) -> None:
        for name, delta in plan.grads.items():
            write_block(self._modules[name], delta if plan.nu is None else scaled(delta, plan.nu))
        if plan.nu is not None:
            self.last_nu = plan.nu
        for name, diagonal in plan.diagonals.items():
            self.diagonals[name] = diagonal
            self.updates[name] = self.updates.get(name, 0) + 1

    def _roll_back(self, plan: _Plan) -> None:
        """Nothing to undo: the diagonals change only in :meth:`_commit`."""

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Step and every block's stored diagonal (the same on every rank)."""
        return {"step": self.state["step"],
                "diagonals": {name: {"weight": w.clone(), "bias": None if b is None else b.clone(),
                                     "updates": self.updates[name]} for name, (w, b) in self.diagonals.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        unknown = set(state_dict["diagonals"]) - set(self._modules)
        if unknown:
            raise KeyError(f"state_dict has diagonals for blocks this model does not have: {sorted(unknown)}")
        dev = self.device
        self.diagonals = {name: (f["weight"].to(dev).clone(), None if f["bias"] is None else f["bias"].to(dev).clone())
                          for name, f in state_dict["diagonals"].items()}
        self.updates = {name: int(f["updates"]) for name, f in state_dict["diagonals"].items()}
        self.state["step"] = int(state_dict["step"])

