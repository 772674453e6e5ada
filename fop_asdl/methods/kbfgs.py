"""K-BFGS (Goldfarb, Ren and Bahamou, NeurIPS 2020) on the shared step: Δ = H_g ∇W̃ H_a per Linear/Conv2d block.

On an update step (every ``config.preconditioner_upd_interval`` steps) the block's A = E[ã ãᵀ] joins its EMA,
the direction is formed with the current H_g, H_a, and then, as in the authors' code, a second forward and
backward pass on the same batch at θ − lr·Δ gives the pair s = h̄⁺ − h̄ (mean pre-activations), y = ḡ⁺ − ḡ
(mean pre-activation gradients per sample): H_g takes one damped BFGS step with it (double damping,
:mod:`fop_asdl.methods.kbfgs_math`), H_a one Hessian-action BFGS step. The first H_a is (A + λ_A I)⁻¹, the
first H_g the identity. Everything is committed only once the step is known to be finite.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import asdl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine.capture import Chunk
from ..engine.loss import BatchCounts, loss_scale
from ..distributed import make_sync
from ..engine.per_sample import PerSampleStepMaker
from ..engine.precision import refuse_low_precision
from ..engine.sub_batches import half_sums
from ..engine.trust_region import LearningRate, validate_kl_clip
from ..engine.vectors import add, write_block
from . import kbfgs_math, seng_math
from .second_order import refuse, summed_over_ranks, warn_plain_parameters

__all__ = ["KronBfgsGradientMaker"]

Vector = Tuple[Tensor, Optional[Tensor]]

_REFUSED = {
    "kl_clip": "its H_g is a BFGS estimate of the Hessian's output-side factor, built from gradient differences "
               "along the path, not a Fisher of the batch: ‖Δ‖ in H⁻¹ is no KL bound. Lower the learning rate or "
               "raise the damping; 'kfac', 'fop', 'smw_ng' and 'diag_ng' take kl_clip.",
    "minibatch_hessian_action": "H_a always takes the Hessian-action BFGS step (ASDL's option selects it).",
    "fisher_type": "K-BFGS uses no Fisher."}
_LOW_PRECISION = ("its (s, y) pair is the difference of two passes at θ and θ − lr·Δ; with bf16/fp16 weights "
                  "both run in half precision and the move is mostly below the weights' rounding, so the pair "
                  "would measure rounding. Keep the weights in float32 and run the step under torch.autocast "
                  "(K-BFGS then takes both passes in full precision), or use 'kfac', 'fop', 'smw_ng' or "
                  "'diag_ng', which take bf16/fp16 weights.")


@dataclasses.dataclass
class _Record:
    starts: List[int]
    grad: Optional[Vector] = None
    a: Optional[Tensor] = None       # Σ ã ãᵀ over rows (samples × positions)
    a_sum: Optional[Tensor] = None   # Σ ã
    z_sum: Optional[Tensor] = None   # Σ z (the summed loss's output gradient)
    positions: int = 1               # S, rows per sample (Conv2d output pixels, Linear tokens)


@dataclasses.dataclass
class _Plan:
    update: bool
    batch_size: int
    autocast: bool                   # the step's passes run under autocast
    lookahead: bool = False          # the capture is on the lookahead pass
    grads: Dict[str, Vector] = dataclasses.field(default_factory=dict)
    factors: Dict[str, Tuple[Tensor, Tensor, Tensor]] = dataclasses.field(default_factory=dict)  # A, H_a, H_g


class KronBfgsGradientMaker(PerSampleStepMaker, asdl.GradientMaker):
    """``p.grad`` of every Linear/Conv2d block holds H_g ∇W̃ H_a (W̃ = [W | b]), every other trainable
    parameter the plain mean gradient (one warning names them).

    Args:
        model, config: ``damping`` λ = λ_A λ_G split as ASDL does (λ_A = λ_G = √λ; a Conv2d with S output
            pixels √(λS) and √(λ/S)); ``ema_decay`` d of A ← (1 − d)A + d A_new (−1: A is the batch's;
            the paper's β = 0.9 is d = 0.1), started from the first batch's A;
            ``preconditioner_upd_interval``; ``ignore_modules``.
        lr: the learning rate (a float, or a callable returning the current one) of the lookahead θ − lr·Δ
            that gives the (s, y) pairs. Required.
        mu1: μ1 of Powell's damping on H_g (ASDL's name; the paper's 0.2).
        mu2: μ2 of the second damping; None: λ_G.
        micro_batch_size, grad_scaler: as for the other makers (the lookahead pass is micro-batched too).

    Cost of an update step: one more forward and backward pass (no weight gradients: only the blocks' mean
    inputs and output gradients are taken), A = ÃᵀÃ as K-FAC's (unfolded patches for a Conv2d), and per
    block O(O² + I²) for the two BFGS updates and O(O²I + OI²) for the direction; no inversion after step
    0. Several ranks sum every sum in one all-reduce per pass and keep the same (replicated) factors.
    """

    method_label = "K-BFGS"

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 lr: Optional[LearningRate] = None, mu1: float = 0.2, mu2: Optional[float] = None,
                 micro_batch_size: Optional[int] = None, grad_scaler: Optional[torch.amp.GradScaler] = None,
                 **others: Any):
        refuse(self.method_label, others, _REFUSED)
        model = self._init_step(model, micro_batch_size, grad_scaler)
        if lr is None:
            raise TypeError("K-BFGS takes its (s, y) pairs from a second pass at θ − lr·Δ on the same batch (as "
                            "the authors' code does), so it needs the learning rate: lr=<float> or "
                            "lr=lambda: optimizer.param_groups[0]['lr'].")
        _, self._lr = validate_kl_clip(1.0, lr)  # validates lr only
        self.config = config if config is not None else asdl.PreconditioningConfig()
        damping, decay = self.config.damping, self.config.ema_decay
        if not (isinstance(damping, (int, float)) and damping > 0):
            raise ValueError(f"config.damping must be a number > 0 (λ = λ_A·λ_G), got {damping!r}.")
        if not (decay == -1 or (isinstance(decay, (int, float)) and 0 < decay <= 1)):
            raise ValueError(f"config.ema_decay must be in (0, 1] or -1 (A is the batch's), got {decay!r}.")
        if not 0 < mu1 < 1 or (mu2 is not None and not mu2 > 0):
            raise ValueError(f"mu1 must be in (0, 1) and mu2 > 0 or None, got mu1={mu1!r}, mu2={mu2!r}.")
        interval = self.config.preconditioner_upd_interval or 1
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"config.preconditioner_upd_interval must be an int >= 1, got {interval!r}.")
        super().__init__(model)
        self.damping, self.ema_decay, self.interval = float(damping), decay, interval
        self.mu1, self.mu2 = float(mu1), mu2
        self._init_per_sample_step(model)
        refuse_low_precision(self.precision, self.method_label, _LOW_PRECISION)
        self._sync = make_sync(model, self.blocks, "auto", two_gradients=False)
        warn_plain_parameters(model, self.blocks, self.method_label)
        #: Per block: (A, H_a, H_g).
        self.factors: Dict[str, Tuple[Tensor, Tensor, Tensor]] = {}

    # --- the step's hooks -------------------------------------------------------------------------------
    @property
    def _step_blocks(self) -> Sequence[Tuple[str, nn.Module]]:
        return self.blocks

    def _begin_step(self, batch_size: int) -> _Plan:
        autocast = torch.is_autocast_enabled(self.device.type)
        self._step_plan = _Plan(self.state["step"] % self.interval == 0, batch_size, autocast)
        return self._step_plan

    def _accumulate(self, module: nn.Module, x: Tensor, grad_out: Tensor, chunk: Chunk,
                    previous: Optional[_Record]) -> _Record:
        record = previous if previous is not None else _Record([])
        self._once_per_pass(record.starts, chunk, module, "one mean input per call")
        plan = self._step_plan
        if not plan.lookahead:
            record.grad = add(record.grad, half_sums(module, x, grad_out, x.shape[0])[0])
        if plan.update:
            if not plan.lookahead:
                p = self._rows(module, x, grad_out)
                record.a = _added(record.a, p.T @ p)
            conv = isinstance(module, nn.Conv2d)
            rows = grad_out.numel() // grad_out.shape[1 if conv else -1]
            record.positions = rows // x.shape[0]
            record.a_sum = _added(record.a_sum, _input_sum(module, x, rows))
            record.z_sum = _added(record.z_sum, grad_out.sum((0, 2, 3)) if conv
                                  else grad_out.reshape(rows, -1).sum(0))
        return record

    def _finish(self, plan: _Plan, records: Dict[str, _Record], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        names = self._every_block(records)
        parts = iter(summed_over_ranks(self._sync, [t for name in names for t in (
            *records[name].grad, records[name].a, records[name].a_sum, records[name].z_sum) if t is not None]))
        n, normalizer = counts.n, counts.normalizer
        sums: Dict[str, Tuple[Tensor, ...]] = {}
        for name in names:
            module = self._modules[name]
            grad = _matrix(module, *(None if t is None else next(parts) / normalizer for t in records[name].grad))
            if plan.update:
                a_new, a_sum, z_sum = next(parts), next(parts), next(parts)
                positions = records[name].positions
                rows = n * positions
                a_new = a_new / rows
                stored = self.factors.get(name)
                a = a_new if stored is None or self.ema_decay == -1 else \
                    (1 - self.ema_decay) * stored[0] + self.ema_decay * a_new
                h_a = kbfgs_math.damped_inverse(a, self._dampings(module, positions)[0]) if stored is None \
                    else stored[1]
                h_g = torch.eye(grad.shape[0], dtype=grad.dtype, device=grad.device) if stored is None else stored[2]
                plan.factors[name] = (a, h_a, h_g)
                sums[name] = (a_sum / rows, z_sum, positions)
            elif name in self.factors:
                a, h_a, h_g = self.factors[name]
            else:  # no factors yet (a state without this block): the plain gradient
                plan.grads[name] = _vector(module, grad)
                continue
            plan.grads[name] = _vector(module, h_g @ grad @ h_a)
        if plan.update:
            self._update_inverses(plan, sums, counts)
        return {"gradient": [t for d in plan.grads.values() for t in d if t is not None],
                "curvature": [t for f in plan.factors.values() for t in f]}

    def _update_inverses(self, plan: _Plan, sums: Dict[str, Tuple[Tensor, ...]], counts: BatchCounts) -> None:
        """The lookahead pass, then one BFGS step of every block's H_g (pair (s, y)) and H_a (Hessian action).

        The pair is a difference of two passes' means: both must be in full precision, or under bf16/fp16
        autocast rounding is all it measures. The lookahead always is; under autocast the step's own means
        are taken again by one more full-precision pass at θ."""
        sigma = loss_scale(self.grad_scaler, self.device)
        rate = float(self._lr() if callable(self._lr) else self._lr)
        passes = [self._lookahead(plan, step) for step in ([None] if plan.autocast else []) + [rate / sigma]]
        moved = passes[-1][1]
        parts = iter(summed_over_ranks(self._sync, [t for records, _ in passes for name in sums
                                                    for t in (records[name].a_sum, records[name].z_sum)]))
        measured = [{name: (next(parts), next(parts)) for name in sums} for _ in passes]
        for name, (a_mean, z_sum, positions) in sums.items():
            module = self._modules[name]
            a, h_a, h_g = plan.factors[name]
            rows = counts.n * positions
            if plan.autocast:
                a_mean, z_sum = measured[0][name][0] / rows, measured[0][name][1]
            a_ahead, z_ahead = measured[-1][name][0] / rows, measured[-1][name][1]
            weights = _matrix(module, module.weight.detach(), None if module.bias is None else module.bias.detach())
            s = moved[name] @ a_ahead - weights @ a_mean  # h̄⁺ − h̄
            y = (z_ahead - z_sum) / (positions * sigma * counts.normalizer)  # ḡ⁺ − ḡ, per sample
            damping_a, damping_g = self._dampings(module, positions)
            s, y = kbfgs_math.double_damping(h_g, s, y, self.mu1, damping_g if self.mu2 is None else self.mu2)
            plan.factors[name] = (a, kbfgs_math.hessian_action_update(h_a, a, damping_a, a_mean),
                                  kbfgs_math.bfgs_inverse_update(h_g, s, y))

    def _lookahead(self, plan: _Plan, step: Optional[float]) -> Tuple[Dict[str, _Record], Dict[str, Tensor]]:
        """The blocks' sums of one more full-precision pass on this batch with every trainable parameter moved
        by −step·p.grad (the preconditioned one for blocks; not moved for None), and the blocks' moved
        [W | b]; parameters, their gradients and BatchNorm statistics are put back bit for bit afterwards."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        moves = {}
        for name, delta in plan.grads.items():
            for param, value in zip(self._modules[name].parameters(), delta):
                moves[param] = value
        saved_grads = [p.grad for p in params]
        saved_params = [p.detach().clone() for p in params]
        with _kept_statistics(self.model):
            try:
                with torch.no_grad():
                    for p in params:
                        move = moves.get(p)
                        if p.grad is not None:
                            move = p.grad if move is None else move + p.grad
                        if move is not None and step is not None:
                            p.sub_(step * move.view_as(p))
                        p.grad = None
                    moved = {name: _matrix(m, m.weight, m.bias).clone() for name, m in self.blocks
                             if name in plan.grads}
                plan.lookahead = True
                with torch.autocast(self.device.type, enabled=False):
                    return self._local_pass(plan.batch_size, plan)[0], moved
            finally:
                plan.lookahead = False
                with torch.no_grad():
                    for p, value, grad in zip(params, saved_params, saved_grads):
                        p.copy_(value)
                        p.grad = grad

    def _commit(self, plan: _Plan) -> None:
        for name, delta in plan.grads.items():
            write_block(self._modules[name], delta)
        self.factors.update(plan.factors)

    def _roll_back(self, plan: _Plan) -> None:
        """Nothing to undo: the factors change only in :meth:`_commit` (the lookahead restores its own)."""

    # --- helpers --------------------------------------------------------------------------------------
    def _every_block(self, records: Dict[str, _Record]) -> List[str]:
        names = [name for name, _ in self.blocks if name in records]
        if self._sync.world_size > 1 and len(names) != len(self.blocks):
            raise ValueError(f"fop_asdl: blocks {sorted(set(self._modules) - set(names))} took no part in the loss "
                             f"on rank {self._sync.rank}; with several ranks {self.method_label} needs every block "
                             f"in every step (ignore them).")
        return names

    @staticmethod
    def _rows(module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        """The block's ã rows over samples × positions (a Conv2d's unfolded patches)."""
        if x.dim() > 3 and not isinstance(module, nn.Conv2d):
            x, z = x.flatten(1, -2), z.flatten(1, -2)
        p, _ = seng_math.block_rows(x, z, _conv(module), module.bias is not None)
        return p.reshape(-1, p.shape[-1])

    def _dampings(self, module: nn.Module, positions: int) -> Tuple[float, float]:
        """(λ_A, λ_G): √λ each; a Conv2d with S output pixels √(λS) and √(λ/S) (ASDL's split)."""
        root = math.sqrt(self.damping)
        if not isinstance(module, nn.Conv2d):
            return root, root
        return root * math.sqrt(positions), root / math.sqrt(positions)

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Step and every block's A, H_a, H_g (the same on every rank)."""
        return {"step": self.state["step"],
                "factors": {name: {"A": a.clone(), "H_a": h_a.clone(), "H_g": h_g.clone()}
                            for name, (a, h_a, h_g) in self.factors.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        unknown = set(state_dict["factors"]) - set(self._modules)
        if unknown:
            raise KeyError(f"state_dict has factors for blocks this model does not have: {sorted(unknown)}")
        dev = self.device
        self.factors = {name: (f["A"].to(dev).clone(), f["H_a"].to(dev).clone(), f["H_g"].to(dev).clone())
                        for name, f in state_dict["factors"].items()}
        self.state["step"] = int(state_dict["step"])


def _conv(module: nn.Module) -> Optional[Tuple[Any, Any, Any, Any]]:
    if not isinstance(module, nn.Conv2d):
        return None
    return module.kernel_size, module.stride, module.padding, module.dilation


def _input_sum(module: nn.Module, x: Tensor, rows: int) -> Tensor:
    """Σ ã over the ``rows`` (samples × positions), without unfolding the batch: unfold is linear, so a
    Conv2d's patches of Σ_m x_m are the sums of its patches."""
    conv = _conv(module)
    if conv is None:
        total = x.reshape(-1, x.shape[-1]).sum(0)
    else:
        kernel, stride, padding, dilation = conv
        total = F.unfold(x.sum(0, keepdim=True), kernel, dilation=dilation, padding=padding, stride=stride)[0].sum(1)
    if module.bias is None:
        return total
    return torch.cat([total, total.new_full((1,), rows)])


def _added(total: Optional[Tensor], part: Tensor) -> Tensor:
    return part if total is None else total + part


def _matrix(module: nn.Module, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """[W | b] as (O, I·k_h·k_w [+1])."""
    weight = weight.reshape(weight.shape[0], -1)
    return weight if bias is None else torch.cat([weight, bias.reshape(-1, 1)], dim=1)


def _vector(module: nn.Module, matrix: Tensor) -> Vector:
    """(weight, bias) of a [W | b] matrix, in the parameters' shapes."""
    if module.bias is None:
        return matrix.reshape(module.weight.shape), None
    return matrix[:, :-1].reshape(module.weight.shape), matrix[:, -1].contiguous()


@contextlib.contextmanager
def _kept_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm's running statistics as they were before the block (the lookahead's forward moves them)."""
    saved = [(b, b.clone()) for m in model.modules() if isinstance(m, _BatchNorm) for b in m.buffers()]
    try:
        yield
    finally:
        for buffer, value in saved:
            buffer.copy_(value)

