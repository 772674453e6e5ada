"""ASDL's Kronecker-factored curvature on the shared step (:mod:`fop_asdl.engine.step`): the base of FOP and K-FAC.

ASDL's Fisher pass runs inside the step's forward/backward passes (one per micro-batch), writing into fresh
matrices that are summed over chunks and ranks and committed (EMA, inverses) only once the step is known to
be finite. The per-block gradient sums come from :mod:`fop_asdl.engine.sub_batches`. Subclasses say what a block's
preconditioned gradient is (:meth:`CurvatureStepMaker._precondition`).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager, Dict, List, Optional, Sequence, Tuple

import asdl
import torch
from asdl.matrices import FISHER_MC
from torch import Tensor, nn

from ..distributed import make_sync
from ..distributed.sync import HalfSums
from ..engine.attention import attention_blocks
from ..engine.capture import BlockCapture, Chunk
from ..engine.chunks import summed_loss_backward
from ..engine.coverage import kron_description
from ..engine.layers import matrix_shapes
from ..engine.loss import BatchCounts, loss_scale
from ..engine.selection import ignoring_unsupported, shared_blocks, with_other_uses
from ..engine.step import SteppedGradientMaker
from ..engine.sub_batches import autograd_sums, average_and_difference_pair, half_sums, sub_batch_factors
from ..engine.trust_region import LearningRate, validate_kl_clip
from ..engine.vectors import BlockVector, add, cast, flat_block, scaled
from .asdl_kfac import UNSET, KfacGradientMaker
from .ema import commit_curvature, scale_curvature
from .fisher_pass import curvature_chunk, fresh_curvature, unscale_empirical
from .inverses import drop_inverses, rebuild_inverses
from .kron_precondition import BlockGradients, KronPreconditioning
from .products import matrix_tensors

__all__ = ["BlockGradients", "CurvatureStepMaker", "CurvaturePlan"]


@dataclasses.dataclass
class CurvaturePlan:
    """What one step of a curvature method does, and what it has produced so far."""

    update_curvature: bool
    update_inverse: bool
    dropped: List[str] = dataclasses.field(default_factory=list)  # blocks whose inverses were freed
    curvature: Dict[str, Any] = dataclasses.field(default_factory=dict)  # this step's sums, by block
    gradients: BlockGradients = dataclasses.field(default_factory=dict)
    #: A plain step's shared results (preconditioned gradient, stats) by block, formed before the check.
    results: Optional[Dict[str, Tuple[BlockVector, Optional[Tensor]]]] = None


class CurvatureStepMaker(KronPreconditioning, SteppedGradientMaker, KfacGradientMaker):
    """``asdl.KfacGradientMaker`` (with the compat fixes) whose step is :class:`SteppedGradientMaker`'s.

    Curvature, EMA, damping and update intervals come from ``config`` exactly as for K-FAC. Subclasses set
    ``two_gradients`` (whether B1 and B2 are kept apart); :meth:`_precondition` is K-FAC's unless overridden.

    Args beyond ``asdl.KfacGradientMaker``'s:
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
        kl_clip: trust-region bound κ (:mod:`fop_asdl.engine.trust_region`): the preconditioned block gradients are
            scaled together by ν = min(1, sqrt(κ / (lr² Σ_l ‖Δ_l‖²_F̃))). None: off (the paper's method).
        lr: the optimizer's learning rate for kl_clip, a float or a zero-argument callable returning the
            current one (e.g. ``lambda: optimizer.param_groups[0]["lr"]``, so a scheduler is followed).
        ema_bias_correction: ASDL's EMA starts from zero, so after k updates each factor holds (1 − (1 − d)^k)
            of its scale (0.05 A and 0.05 B after the first at ``ema_decay`` d = 0.05). True divides every
            factor by that, as Adam does, so the first steps are preconditioned by the curvature itself. The
            count k of each block is kept in ``state_dict()``. Measured harmful at low damping (docs/results.md).
        factor_dtype, inverse_dtype: the dtypes of the Kronecker and unit-wise factors and of the inverses,
            which the method's products and scalars use too (float32 or float64; None: the parameters',
            float32 for bf16/fp16 weights, and ``factor_dtype``'s). kfac-pytorch's names.

    Under ``torch.autocast`` the passes run in bf16/fp16, the curvature, inverses and per-sub-batch sums in
    the parameters' precision; bf16/fp16 weights get all of them in float32 (:mod:`fop_asdl.engine.precision`).

    After each step ``last_stats[block name]`` holds the method's per-block stats (``stat_keys``) as 0-d
    device tensors, and with kl_clip ``last_nu`` holds ν (the same on every rank).
    """

    two_gradients = True
    #: ASDL's layer types (with the package's, fop_asdl.compat fix 12) and ConvTranspose2d, whose gradient the
    #: step turns into the layout its factors act on (ASDL's own preconditioning does not).
    _supported_classes = KfacGradientMaker._supported_classes + (nn.ConvTranspose2d,)
    #: Names of the per-block stats :meth:`_precondition` returns; those starting with "kl_" add up to ‖Δ‖²_F̃.
    stat_keys: Tuple[str, ...] = ()
    #: Several ranks run the sharded path (fop_asdl.distributed), not ASDL's.
    single_process_only = False

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None,
                 fisher_type: str = FISHER_MC, loss_type: str = "cross_entropy",
                 scale: float = 1.0, grad_scale: float = 1.0, n_mc_samples: int = 1, var: float = 1.0,
                 seed: Optional[int] = None, swift: bool = False, micro_batch_size: Optional[int] = None,
                 sub_batches: str = "auto", grad_scaler: Optional[torch.amp.GradScaler] = None,
                 kl_clip: Optional[float] = None, lr: Optional[LearningRate] = None,
                 ema_bias_correction: bool = False, factor_dtype: Optional[torch.dtype] = None,
                 inverse_dtype: Optional[torch.dtype] = None):
        self.kl_clip, self._lr = validate_kl_clip(kl_clip, lr)
        self.ema_bias_correction = bool(ema_bias_correction)
        self._ema_updates: Dict[str, int] = {}  # per block: EMA updates committed so far
        self.last_nu: Optional[Tensor] = None
        self.last_stats: Dict[str, Dict[str, Tensor]] = {}
        model = self._init_step(model, micro_batch_size, grad_scaler)
        config = config if config is not None else asdl.PreconditioningConfig()
        self._user_ignore_modules = list(config.ignore_modules or [])
        with attention_blocks(self, model):  # attention projections as blocks (fop_asdl.engine.attention)
            config = ignoring_unsupported(model, config, self.method_label, self.all_layer_types)
            super().__init__(model, config, fisher_type=fisher_type, loss_type=loss_type, scale=scale,
                             grad_scale=grad_scale, n_mc_samples=n_mc_samples, var=var, seed=seed, swift=swift,
                             factor_dtype=factor_dtype, inverse_dtype=inverse_dtype)
        self._sync = make_sync(model, self.named_modules_for_curvature, sub_batches, self.two_gradients,
                               dtype=self.precision.widest)
        if swift and (self.micro_batch_size is not None or self._sync.world_size > 1):
            raise ValueError("swift=True (SKFAC) keeps per-sample factor matrices that cannot be summed over "
                             "micro-batches or ranks; use swift=False with micro_batch_size or torch.distributed.")
        self._shapes: Optional[Dict[str, Tuple[torch.Size, Optional[torch.Size]]]] = None
        self._shared_blocks = shared_blocks(model, self.named_modules_for_curvature)
        #: Whether the stored inverses were built from the stored factors (False after a curvature update
        #: without inversion, and after loading a state): only then can a failed step rebuild dropped ones.
        self._inverses_match_curvature = True

    # --- the step's hooks -----------------------------------------------------------------------------
    @property
    def _step_blocks(self) -> Sequence[Tuple[str, nn.Module]]:
        return self.named_modules_for_curvature

    @property
    def autograd_records(self) -> bool:  # type: ignore[override]
        """K-FAC needs only each block's whole-batch gradient, which autograd forms anyway; in bf16/fp16 for
        such weights, so those blocks are captured and summed in float32."""
        return not self.two_gradients and not self.precision.low

    def _captured_blocks(self, plan: CurvaturePlan) -> Sequence[Tuple[str, nn.Module]]:
        """FOP, curvature steps and bf16/fp16 weights: every block. K-FAC's plain steps: the blocks known to
        have other uses (:func:`~fop_asdl.engine.selection.with_other_uses`); autograd's sums for the rest."""
        if self.two_gradients or plan.update_curvature or not self.autograd_records:
            return self._step_blocks
        return self._shared_blocks

    def _record_from_autograd(self, module: nn.Module) -> List[Optional[BlockVector]]:
        return [autograd_sums(module), None]

    def _describe_block(self, name: str, module: nn.Module) -> str:
        return kron_description(self.method_label, module, getattr(module, self._fisher_attr, None))

    def _min_local_batch(self) -> Tuple[int, str]:
        if self.two_gradients and self._sync.splits_locally:
            return 2, f"{self.method_label} splits every batch into two halves"
        return 1, f"{self.method_label} needs samples"

    def _local_split(self, batch_size: int) -> int:
        return self._sync.local_split(batch_size, self.two_gradients)

    def _begin_step(self, batch_size: int) -> CurvaturePlan:
        step = self.state["step"]
        update_curvature = self.do_update_curvature(step)
        # Without an EMA the new curvature replaces the old, so its inverse must follow at once.
        update_inverse = self.do_update_preconditioner(step) or (update_curvature and not self.do_accumulate)
        plan = CurvaturePlan(update_curvature, update_inverse)
        # The old inverses are about to be replaced: free them to make room for the new curvature. Should
        # the step fail, they are rebuilt bit for bit from the untouched old factors, which only works if they
        # were built from those factors (not when the curvature has moved on since the last inversion).
        if update_curvature and update_inverse and self._inverses_match_curvature:
            plan.dropped = drop_inverses((name, getattr(m, self._fisher_attr, None))
                                         for name, m in self.named_modules_for_curvature)
        return plan

    def _pass_context(self, plan: CurvaturePlan) -> ContextManager:
        return fresh_curvature(self, plan.curvature) if plan.update_curvature else contextlib.nullcontext()

    def _chunk_backward(self, capture: BlockCapture, plan: CurvaturePlan, first: bool) -> None:
        if plan.update_curvature:
            curvature_chunk(self, capture, first)
        else:
            summed_loss_backward(self, self.grad_scaler, capture.chunk.size)

    def _accumulate(self, module: nn.Module, x: Tensor, grad_out: Tensor, chunk: Chunk,
                    previous: Optional[List[Optional[BlockVector]]]) -> List[Optional[BlockVector]]:
        new = half_sums(module, x, grad_out, chunk.split)
        # Chunks of a micro-batched step, and modules called more than once (shared weights), add up.
        return new if previous is None else [add(a, b) for a, b in zip(previous, new)]

    def _finish(self, plan: CurvaturePlan, records: Dict[str, List[Optional[BlockVector]]],
                counts: BatchCounts) -> Dict[str, List[Tensor]]:
        if plan.curvature and self.fisher_maker.is_fisher_emp:
            unscale_empirical(plan.curvature, counts.backprop_scale(loss_scale(self.grad_scaler, self.device)),
                              dict(self.named_modules_for_curvature))
        sums = self._sync.reduce_block_sums({name: tuple(halves) for name, halves in records.items()})
        plan.gradients = self._block_gradients(sums, *counts.weights())
        plan.curvature = self._sync.reduce_curvature(plan.curvature) if plan.update_curvature else {}
        scale_curvature(plan.curvature, counts.n if self.config.data_size == UNSET else self.config.data_size)
        if not (plan.update_curvature or plan.update_inverse):
            # A plain step's products F̃⁻¹g need only the committed inverses: launched before the finiteness
            # check's host sync, the device works through them while the host waits, rather than idling while
            # the host launches them one by one after it (ASDL's step has no sync to hide them behind). A
            # non-finite gradient gives a non-finite product (NaN and Inf propagate through F̃⁻¹), so the
            # products are what is checked; stats may be NaN by design (a block without curvature).
            plan.results = self._sync.share(self._precondition(plan.gradients), self._block_shapes(),
                                            len(self.stat_keys))
            return {"gradient": [t for vector, _ in plan.results.values() for t in vector if t is not None]}
        # g_avg = (S1 + S2)/n is non-finite whenever S1 or S2 is (inf - inf is NaN), so g_diff needs no check.
        return {"gradient": [t for g_avg, _ in plan.gradients.values() for t in g_avg if t is not None],
                "curvature": [t for matrix in plan.curvature.values() for t in matrix_tensors(matrix)]}

    def _commit(self, plan: CurvaturePlan) -> None:
        if plan.update_curvature:  # every block was captured: a plain part beside its own means other uses
            self._shared_blocks = with_other_uses(self._step_blocks, self._shared_blocks)
        commit_curvature(dict(self.named_modules_for_curvature), self._fisher_attr, plan.curvature,
                         self.config.ema_decay, self.do_accumulate, self.ema_bias_correction, self._ema_updates)
        if plan.curvature:
            self._inverses_match_curvature = plan.update_inverse
        if plan.update_inverse:
            self._invert_all()
        self._write_results(self._results(plan))

    def _roll_back(self, plan: CurvaturePlan) -> None:
        modules = dict(self.named_modules_for_curvature)
        rebuild_inverses({name: getattr(modules[name], self._fisher_attr) for name in plan.dropped},
                         self.config.damping, self._fallback_warned, self.precision.inverse)
        plan.dropped = []

    def _block_gradients(self, sums: Dict[str, HalfSums], n1, n2) -> BlockGradients:
        """(g_avg, [g_avg; g_diff]) per owned block (the stack None for K-FAC; FOP's g_avg a view of it) from
        the sums over B1 and B2 divided by their weights ``n1``, ``n2`` (:meth:`BatchCounts.weights`), as
        (weight, bias) pairs, Conv2d weights flattened to the (out, in·kh·kw) matrix ASDL's Kron acts on, in
        the dtype the inverses are applied in."""
        shapes = self._block_shapes()
        dtype = self.precision.inverse
        factors = sub_batch_factors(n1, n2, dtype, self.device) if self.two_gradients and sums else None
        out = {}
        while sums:  # consume the sums: each block holds two copies of its gradient, not four
            name, (sum1, sum2) = sums.popitem()
            sum1, sum2 = (None if s is None else cast(flat_block(s, shapes[name]), dtype) for s in (sum1, sum2))
            if not self.two_gradients:
                out[name] = (add(sum1, sum2), None)
                continue
            pair = tuple(None if s1 is None else average_and_difference_pair(s1, s2, factors)
                         for s1, s2 in zip(sum1, sum2))
            out[name] = (tuple(None if t is None else t[0] for t in pair), pair)
        if not self.two_gradients and out:  # the means: one multi-tensor division (one kernel on a GPU)
            torch._foreach_div_([t for g_avg, _ in out.values() for t in g_avg if t is not None], n1 + n2)
        return out

    # --- shapes and state ----------------------------------------------------------------------------
    def _block_shapes(self) -> Dict[str, Tuple[torch.Size, Optional[torch.Size]]]:
        """(weight, bias) shapes of each block's vectors as the FOP math sees them (convolutions flattened)."""
        if self._shapes is None:
            self._shapes = {name: matrix_shapes(module) for name, module in self.named_modules_for_curvature}
        return self._shapes

    @property
    def assignment(self) -> Dict[str, int]:
        """{block name: owner rank}: the rank that keeps, inverts and applies each block's curvature."""
        return {name: getattr(self._sync, "assignment", {}).get(name, 0)
                for name, _ in self.named_modules_for_curvature}

    def state_dict(self) -> Dict[str, Any]:
        """Step, curvature and inverses of every block; on several ranks gathered from the owners (a
        collective: call it on every rank), so it resumes a run of any world size."""
        state = super().state_dict()
        for name, count in self._ema_updates.items():  # travels with its block's tensors to every rank
            if name in state["curvature"]:
                state["curvature"][name]["ema_updates"] = torch.tensor(count)
        state["curvature"] = self._sync.gathered_curvature(state["curvature"])
        return state

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state of any world size; each rank keeps the curvature of the blocks it owns."""
        self._inverses_match_curvature = False  # the saved inverses may predate the saved factors
        super().load_state_dict(state_dict)
        self._ema_updates = {name: int(tensors["ema_updates"]) for name, tensors in state_dict["curvature"].items()
                             if "ema_updates" in tensors and self._sync.owns(name)}
        for name, module in self.named_modules_for_curvature:
            if not self._sync.owns(name) and hasattr(module, self._fisher_attr):
                delattr(module, self._fisher_attr)
