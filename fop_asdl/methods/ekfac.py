"""EKFAC (George et al. 2018) on K-FAC's step: what ``make_gradient_maker("ekfac", ...)`` returns.

ASDL's K-FAC factors A, B come from the step's Fisher pass (:class:`~fop_asdl.curvature.kron_step.
CurvatureStepMaker`: EMA, intervals, micro-batches, ranks). On preconditioner steps (where K-FAC inverts)
each Kron block's eigenbases U_A, U_B are recomputed from the factors the step commits and its rescaling
restarts from K-FAC's own spectrum λ_B λ_Aᵀ; on curvature steps the rescaling moves to the batch's
per-sample estimate ŝ = E_i[(U_Bᵀ G_i U_A)²] (Alg. 1), with the factors' EMA (or replaced without one).
The step is U_B[(U_Bᵀ G U_A) / (s + λ)]U_Aᵀ. BatchNorm/LayerNorm blocks keep K-FAC's unit-wise inverse.

ŝ needs the per-sample inputs and output gradients of the loss pass: between basis refreshes they are
projected chunk by chunk as they arrive; on refresh steps the new basis is known only after the whole
batch, so those steps keep every block's (x, grad_out) until then. All of it is formed before the step's
finiteness check, so a failed step changes nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import asdl
import torch
from asdl.matrices import FISHER_EMP
from torch import Tensor, nn

from . import ekfac_math as em
from ..compat import full_precision
from ..curvature.asdl_kfac import UNSET
from ..curvature.ema import commit_curvature
from ..curvature.inverses import invert_all
from ..curvature.kron_step import CurvaturePlan, CurvatureStepMaker
from ..engine.capture import Chunk
from ..engine.loss import BatchCounts, loss_scale
from ..engine.per_sample import once_per_pass
from ..engine.selection import with_other_uses
from ..engine.vectors import BlockVector, add, scaled

__all__ = ["EkfacGradientMaker"]

Pair = Tuple[Tensor, Optional[Tensor]]
_FOREIGN = {"beta", "beta_range", "eta", "eta_range", "projection_metric", "eps"}


@dataclasses.dataclass
class _Rows:
    """A Kron block's per-sample data of one curvature step: ŝ so far, or its raw chunks (refresh steps)."""

    starts: List[int] = dataclasses.field(default_factory=list)
    chunks: List[Tuple[Tensor, Tensor]] = dataclasses.field(default_factory=list)
    sums: Optional[Pair] = None


@dataclasses.dataclass
class EkfacPlan(CurvaturePlan):
    factors: Dict[str, Pair] = dataclasses.field(default_factory=dict)       # (A, B) the commit installs
    bases: Dict[str, Pair] = dataclasses.field(default_factory=dict)         # new (U_A, U_B)
    spectra: Dict[str, Pair] = dataclasses.field(default_factory=dict)       # their (λ_A, λ_B)
    scales: Dict[str, Pair] = dataclasses.field(default_factory=dict)        # new (s_w, s_b)
    ema_counts: Dict[str, int] = dataclasses.field(default_factory=dict)


class EkfacMixin:
    """EKFAC's curvature on a :class:`CurvatureStepMaker`: bases, rescaling, state; the method on top says
    what to do with them (:meth:`_kfe_inverse`, :meth:`_kfe_metric`)."""

    #: Eigenbases of dense 2-D factors and per-sample rows of Linear and ungrouped Conv2d only: an Embedding's
    #: diagonal factor, a grouped convolution's stacks and the other convolutions get the plain gradient.
    all_layer_types = False

    def _init_ekfac(self) -> None:
        self._bases: Dict[str, Pair] = {}    # (U_A, U_B) of every Kron block, on every rank
        self._scales: Dict[str, Pair] = {}   # (s_w, s_b) of the blocks owned here
        self._inverse_diags: Dict[str, Pair] = {}
        self._names = {m: name for name, m in self.named_modules_for_curvature}
        self._blocks = dict(self.named_modules_for_curvature)
        self._kron = [name for name, m in self.named_modules_for_curvature if isinstance(m, (nn.Linear, nn.Conv2d))]

    # --- the step's hooks -------------------------------------------------------------------------------
    def _begin_step(self, batch_size: int) -> EkfacPlan:
        """K-FAC's schedule, without freeing the old inverses: only the unit-wise blocks have any (a 2×2 per
        unit), too little to be worth freeing, so a failed step has no inverse to rebuild."""
        step = self.state["step"]
        update_curvature = self.do_update_curvature(step)
        update_inverse = self.do_update_preconditioner(step) or (update_curvature and not self.do_accumulate)
        self._step_plan = EkfacPlan(update_curvature, update_inverse)
        return self._step_plan

    def _accumulate(self, module: nn.Module, x: Tensor, grad_out: Tensor, chunk: Chunk,
                    previous: Optional[Tuple[Any, Optional[_Rows]]]) -> Tuple[Any, Optional[_Rows]]:
        base, rows = previous if previous is not None else (None, None)
        base = super()._accumulate(module, x, grad_out, chunk, base)
        plan = self._step_plan
        if not plan.update_curvature or not isinstance(module, (nn.Linear, nn.Conv2d)):
            return base, rows
        rows = rows if rows is not None else _Rows()
        once_per_pass(rows.starts, chunk, module, self.method_label,
                      "one per-sample gradient per call for its rescaling")
        basis = self._bases.get(self._names[module])
        if plan.update_inverse:  # the basis changes this step: keep the data until it is known
            rows.chunks.append((x, grad_out))
        elif basis is not None:
            part = em.rescaling(*em.sample_rows(module, x, grad_out), *basis, module.bias is not None)
            rows.sums = add(rows.sums, part)
        return base, rows

    def _finish(self, plan: EkfacPlan, records: Dict[str, Any], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        rows = {name: r[1] for name, r in records.items() if r[1] is not None}
        groups = super()._finish(plan, {name: r[0] for name, r in records.items()}, counts)
        if plan.update_inverse:
            self._refresh_bases(plan)
        estimates = self._estimates(plan, rows, counts) if plan.update_curvature else {}
        self._next_scales(plan, estimates)
        groups["eigenbases"] = [t for pair in plan.bases.values() for t in pair]
        groups["rescaling"] = [t for pair in plan.scales.values() for t in pair if t is not None]
        return groups

    def _record_from_autograd(self, module: nn.Module) -> Tuple[Any, None]:
        """K-FAC's record, without per-sample rows: only curvature steps estimate ŝ, and they capture every
        block (:meth:`CurvatureStepMaker._captured_blocks`), so a plain step takes autograd's sums as K-FAC."""
        return super()._record_from_autograd(module), None

    def _commit(self, plan: EkfacPlan) -> None:
        if plan.update_curvature:  # as K-FAC's: blocks found to have other uses stay captured on plain steps
            self._shared_blocks = with_other_uses(self._step_blocks, self._shared_blocks)
        refreshed = {name: plan.curvature.pop(name) for name in plan.factors}
        # unit-wise blocks, and Kron blocks between refreshes
        commit_curvature(self._blocks, self._fisher_attr, plan.curvature, self.config.ema_decay,
                         self.do_accumulate, self.ema_bias_correction, self._ema_updates)
        for name, (a, b) in plan.factors.items():  # exactly the factors whose eigenbases were formed
            matrix = refreshed[name]
            matrix.kron.A, matrix.kron.B = a, b
            setattr(self._blocks[name], self._fisher_attr, matrix)
        self._ema_updates.update(plan.ema_counts)
        self._bases.update(plan.bases)
        self._scales.update(plan.scales)
        for name in plan.scales:
            self._inverse_diags.pop(name, None)
        if plan.update_inverse:
            self._invert_all()
        self._write_results(self._results(plan))

    def _invert_all(self) -> None:
        """K-FAC's inverses for the unit-wise blocks only (one host sync for all, :func:`invert_all`): a Kron
        block uses its eigenbases."""
        with full_precision(self.device.type):
            named = [(name, getattr(module, self._fisher_attr, None)) for name, module in
                     self.named_modules_for_curvature]
            invert_all([(name, matrix) for name, matrix in named if matrix is not None and not matrix.has_kron],
                       self.config.damping, self._fallback_warned, self.precision.inverse)

    # --- EKFAC proper -----------------------------------------------------------------------------------
    def _next_factors(self, name: str, module: nn.Module, new: Any) -> Optional[Pair]:
        """(A, B) of a Kron block after this step's commit, by the arithmetic of
        :func:`~fop_asdl.curvature.ema.commit_curvature` (ASDL's per-factor EMA, optionally bias-corrected),
        without touching the stored ones."""
        stored = getattr(module, self._fisher_attr, None)
        if new is None:
            return None if stored is None else (stored.kron.A, stored.kron.B)
        decay, keep, factor = self.config.ema_decay, 1.0 - self.config.ema_decay, None
        if self.do_accumulate and self.ema_bias_correction:
            k = self._ema_updates.get(name, 0) + 1 if stored is not None else 1
            corrected, previous = 1.0 - (1.0 - decay) ** k, 1.0 - (1.0 - decay) ** (k - 1)
            keep, factor = (1.0 - decay) * previous / corrected, 1.0 / corrected
            self._step_plan.ema_counts[name] = k
        fresh = [t if factor is None else t * factor for t in (new.kron.A, new.kron.B)]
        if self.do_accumulate and stored is not None:
            return stored.kron.A * keep + fresh[0], stored.kron.B * keep + fresh[1]
        return fresh[0], fresh[1]

    def _refresh_bases(self, plan: EkfacPlan) -> None:
        """New eigenbases of the owned Kron blocks (one batched eigendecomposition per factor size), shared
        with every rank, which needs them for its share of ŝ."""
        names, factors = [], []
        for name in self._kron:
            if not self._sync.owns(name):
                continue
            pair = self._next_factors(name, self._blocks[name], plan.curvature.get(name))
            if pair is None:
                continue
            if name in plan.curvature:
                plan.factors[name] = pair
            names.append(name)
            factors += list(pair)
        decomposed = em.eigenbases(factors)
        for i, name in enumerate(names):
            (lam_a, u_a), (lam_b, u_b) = decomposed[2 * i], decomposed[2 * i + 1]
            plan.bases[name], plan.spectra[name] = (u_a, u_b), (lam_a, lam_b)
        if self._sync.world_size > 1:  # a block without factors yet arrives as zeros: used by no owner
            shapes = {name: tuple(torch.Size([d, d]) for d in self._block_shapes()[name][0]) for name in self._kron}
            shared = self._sync.share({name: ((u_b, u_a), None) for name, (u_a, u_b) in plan.bases.items()},
                                      shapes)
            plan.bases.update({name: (vec[1], vec[0]) for name, (vec, _) in shared.items()})

    def _estimates(self, plan: EkfacPlan, rows: Dict[str, _Rows], counts: BatchCounts) -> Dict[str, Pair]:
        """ŝ of the owned blocks: every rank's Σ_i (U_Bᵀ G_i U_A)² summed at the owner, as a mean over the
        user's per-sample terms (the backpropagated loss carries σ / r against them) divided like the
        factors (config.data_size, else the batch)."""
        sums: Dict[str, Tuple[Pair, None]] = {}
        for name, record in rows.items():
            module = self._blocks[name]
            basis, bias = plan.bases.get(name, self._bases.get(name)), module.bias is not None
            if record.sums is not None:
                sums[name] = (record.sums, None)
            elif record.chunks and basis is not None:
                total = None
                for x, grad_out in record.chunks:
                    total = add(total, em.rescaling(*em.sample_rows(module, x, grad_out), *basis, bias))
                sums[name] = (total, None)
            record.chunks.clear()
        reduced = self._sync.reduce_block_sums(sums)
        data_size = counts.n if self.config.data_size == UNSET else self.config.data_size
        # squared: σ = s / r is what a backpropagated per-sample gradient carries (engine/loss.py)
        divisor = counts.backprop_scale(loss_scale(self.grad_scaler, self.device)) ** 2 * data_size
        return {name: scaled(add(*pair), 1.0 / divisor) for name, pair in reduced.items()}

    def _next_scales(self, plan: EkfacPlan, estimates: Dict[str, Pair]) -> None:
        """s after this step: from K-FAC's spectrum on a new basis (else the stored s), moved to ŝ by the
        factors' EMA, or replaced by it without one."""
        # an estimate needs a basis of this owner's (a block without factors has none, nor any s)
        names = set(plan.spectra) | (set(estimates) & set(self._scales))
        for name in sorted(names):
            if name in plan.spectra:
                lam_a, lam_b = plan.spectra[name]
                start = em.kron_spectrum(lam_b, lam_a, self._blocks[name].bias is not None)
            else:
                start = self._scales[name]
            estimate = estimates.get(name)
            if estimate is None:
                plan.scales[name] = start
            elif not self.do_accumulate:
                plan.scales[name] = estimate
            else:
                decay = self.config.ema_decay
                plan.scales[name] = (start[0] * (1 - decay) + estimate[0] * decay,
                                     None if start[1] is None else start[1] * (1 - decay) + estimate[1] * decay)

    def _inverse_diag(self, name: str) -> Pair:
        """1/(s + λ), formed once per new s."""
        if name not in self._inverse_diags:
            s_w, s_b = self._scales[name]
            damping = self.config.damping
            self._inverse_diags[name] = (1.0 / (s_w + damping), None if s_b is None else 1.0 / (s_b + damping))
        return self._inverse_diags[name]

    def _has_curvature(self, name: str, matrix: Any) -> bool:
        return self._kfe_ready(name) if name in self._kron else super()._has_curvature(name, matrix)

    def _inverse(self, name: str, matrix: Any, vec: BlockVector) -> BlockVector:
        return self._kfe_inverse(name, vec) if name in self._kron else super()._inverse(name, matrix, vec)

    def _kfe_ready(self, name: str) -> bool:
        return name in self._bases and name in self._scales

    def _kfe_inverse(self, name: str, vec: BlockVector) -> BlockVector:
        """F̃⁻¹ v = U diag(1/(s + λ)) Uᵀ v for a stack v."""
        u_a, u_b = self._bases[name]
        return em.kfe_apply(vec, u_a, u_b, *self._inverse_diag(name))

    def _kfe_metric(self, name: str, vec: BlockVector, damped: bool) -> BlockVector:
        """F v = U diag(s) Uᵀ v, or F̃ v with s + λ."""
        u_a, u_b = self._bases[name]
        s_w, s_b = self._scales[name]
        damping = self.config.damping if damped else 0.0
        return em.kfe_apply(vec, u_a, u_b, s_w + damping, None if s_b is None else s_b + damping)

    def _describe_block(self, name: str, module: nn.Module) -> str:
        """K-FAC's description (:meth:`coverage`), and for a Kron block how EKFAC uses its factors."""
        text = super()._describe_block(name, module)
        return f"{text}; steps in the factors' eigenbases, rescaled by s" if self._names[module] in self._kron else text

    # --- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """K-FAC's state (factors, unit-wise inverses) and every Kron block's U_A, U_B, s_w, s_b, gathered from
        the owners (a collective on several ranks)."""
        state = super().state_dict()
        local = {}
        for name, (u_a, u_b) in self._bases.items():
            if self._sync.owns(name) and name in self._scales:
                s_w, s_b = self._scales[name]
                tensors = {"U_A": u_a, "U_B": u_b, "s_w": s_w} | ({} if s_b is None else {"s_b": s_b})
                local[name] = {k: v.detach().clone() for k, v in tensors.items()}
        state["ekfac"] = self._sync.gathered_curvature(local)
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Every rank keeps every block's bases (it needs them for ŝ) and the rescaling of the blocks it owns."""
        unknown = set(state_dict.get("ekfac", {})) - set(self._names.values())
        if unknown:
            raise KeyError(f"state_dict has EKFAC bases for blocks this model does not have: {sorted(unknown)}")
        super().load_state_dict(state_dict)
        saved = state_dict.get("ekfac", {})
        self._bases = {name: (t["U_A"].to(self.device).clone(), t["U_B"].to(self.device).clone())
                       for name, t in saved.items()}
        self._scales = {name: (t["s_w"].to(self.device).clone(),
                               t["s_b"].to(self.device).clone() if "s_b" in t else None)
                        for name, t in saved.items() if self._sync.owns(name)}
        self._inverse_diags.clear()


class EkfacGradientMaker(EkfacMixin, CurvatureStepMaker):
    """EKFAC behind ASDL's gradient-maker interface: ``p.grad`` of every Kron block holds
    U_B[(U_Bᵀ G U_A) / (s + λ)]U_Aᵀ (and its bias U_B[(U_Bᵀ b) / (s_b + λ)]), every unit-wise block K-FAC's
    F̃⁻¹g, every other trainable parameter the mean gradient; λ is ``config.damping``.

    Takes ``asdl.KfacGradientMaker``'s options (``fisher_type`` must be ``"fisher_emp"``, ASDL's EKFAC's only
    one: s is estimated from the loss's own per-sample gradients) and those of every
    :class:`CurvatureStepMaker`: ``micro_batch_size``, ``sub_batches``, ``grad_scaler``, ``kl_clip`` (its F̃
    is U diag(s + λ) Uᵀ, so ‖Δ‖²_F̃ = Σ (Uᵀg)² / (s + λ)), ``lr``, ``ema_bias_correction``.

    On several ranks the factors and s are sharded per block as K-FAC's, and U_A, U_B are replicated (every
    rank projects its own samples for ŝ). After each step ``last_stats[block]["kl_base"]`` holds ‖Δ‖²_F̃.
    """

    method_label = "EKFAC"
    two_gradients = False
    stat_keys = ("kl_base",)

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None,
                 fisher_type: str = FISHER_EMP, **kwargs: Any):
        foreign = _FOREIGN & set(kwargs) | ({"swift"} if kwargs.get("swift") else set())
        if foreign:
            raise TypeError(f"EKFAC does not take {sorted(foreign)}: FOP's options belong to 'fop' (FOP over "
                            f"EKFAC is make_gradient_maker('fop', ..., curvature='ekfac')), and swift factors are "
                            f"not square, so they have no eigenbasis.")
        if fisher_type != FISHER_EMP:
            raise ValueError(f"EKFAC estimates its rescaling s from the per-sample gradients of the loss the step "
                             f"backpropagates, so its factors must be those of the same empirical Fisher: "
                             f"fisher_type must be 'fisher_emp' (ASDL's EKFAC takes only that one), got "
                             f"{fisher_type!r}.")
        super().__init__(model, config if config is not None else asdl.PreconditioningConfig(),
                         fisher_type=fisher_type, **kwargs)
        self._init_ekfac()
