"""HyLoGradientMaker: hybrid low-rank natural gradient (Mu et al., SC22; HYLO_SPEC) on the shared step.

Per Linear, convolution (Conv1d, Conv2d with any groups, ConvTranspose2d) and Embedding block, on a refresh
step (every ``config.curvature_upd_interval`` steps) the capture hands each block's input and output gradient
to :mod:`fop_asdl.methods.hylo_math`: per-sample rows (A, G), r_loc of them kept by KIS or KID, one
all-gather of every block's kept rows (and KID's Y_i), the owner's r×r matrix M, broadcast. Every step then
preconditions the block's current mean gradient with the stored (stale) factors, V ↦ (1/α)[V − c Uˢᵀ M Uˢ V];
between refreshes nothing is captured (the blocks' gradients come from autograd and travel in the one
gradient all-reduce).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import asdl
import torch
from torch import Tensor, nn

from . import hylo_math
from ..engine.capture import Chunk
from ..engine.layers import CONVS, as_2d, conv_input, embedding_tokens, geometry, to_conv_layout
from ..engine.sub_batches import half_sums
from ..engine.loss import BatchCounts, loss_scale
from .hylo_refresh import owner_costs, refresh_factors
from .hylo_schedule import DEFAULT_SWITCH_THRESHOLD, SwitchPolicy, local_rows
from ..distributed import make_sync
from ..engine.per_sample import PerSampleStepMaker
from ..engine.selection import shared_blocks
from ..distributed.packing import pack, pack_vectors, unpack, unpack_vectors
from ..engine.vectors import BlockVector, add, scaled, shapes_of, write_block
from ..engine.trust_region import LearningRate, step_factor, validate_kl_clip

__all__ = ["HyLoGradientMaker"]

_SEED_MIX = 0x9E3779B97F4A7C15  # rank r draws from seed + r·φ·2⁶⁴ (mod 2⁶⁴): one seed, a stream per rank


@dataclasses.dataclass
class _Record:
    """A block's refresh-step data so far: each chunk's (A, G) rows and the summed (weight, bias) gradient."""

    starts: List[int]
    rows: List[Tuple[Tensor, Tensor]]
    grad: Optional[BlockVector] = None


@dataclasses.dataclass
class _Plan:
    refresh: bool
    method: str                                 # "kis" or "kid": what this refresh uses
    generator_state: Optional[Tensor] = None    # KIS draws advance the generator; roll-back restores it
    raw: Dict[str, BlockVector] = dataclasses.field(default_factory=dict)      # mean gradients V
    grads: Dict[str, BlockVector] = dataclasses.field(default_factory=dict)    # what p.grad gets
    preconditioned: Set[str] = dataclasses.field(default_factory=set)        # blocks with factors
    factors: Dict[str, hylo_math.LowRankFactors] = dataclasses.field(default_factory=dict)
    nu: Optional[Tensor] = None                 # kl_clip's ν, applied at the commit


class HyLoGradientMaker(PerSampleStepMaker, asdl.GradientMaker):
    """HyLo behind ASDL's gradient-maker interface: ``p.grad`` of every Linear, convolution and Embedding block
    holds the low-rank SMW natural gradient, every other trainable parameter (BatchNorm, LayerNorm, GroupNorm,
    ignored layers) the plain mean gradient.

    Args:
        model: the bare model (not DDP-wrapped).
        config: ``damping`` is α; ``curvature_upd_interval`` the refresh interval; ``ignore_modules``.
        compression_ratio: ρ; r_loc = max(1, ⌊ρ·rows⌋) rows kept per rank (1.0: exact SNGD with KIS).
        switch_policy: ``"gradient"`` (eq. 10 with KID warm-up and after LR decays; needs
            ``iters_per_epoch`` and :meth:`on_epoch_start`), ``"epochs"`` (``kid_windows``), ``"kid"``,
            ``"kis"``, or a :class:`~fop_asdl.methods.hylo_schedule.SwitchPolicy`.
        switch_threshold: η of eq. 10 (not reported by the paper; 0.5, see docs/methods/hylo.md).
        kid_windows: half-open KID epoch windows of ``"epochs"``, e.g. ((0, 10), (35, 40)).
        iters_per_epoch: T, steps per epoch (epoch = step // T).
        kernel_scaling, conv_reduction, kis_probability, kis_reweight, kid_skeleton: see :mod:`fop_asdl.methods.hylo_math`.
        token_reduction: a Linear on token sequences (m, T, d): ``"mean"`` reduces its T positions per
            sample as ``conv_reduction`` does a Conv2d's (rows = m); ``"flatten"`` makes every token a sample
            (the spec's MKOR port: rows = m·T, which made a refresh on a 16-token mixer cost 147 s and
            7.5 GB); ``"sum"``, ``"scaled_mean"`` as for conv.
        target_damping: α_T of the authors' schedule α ← (1−κ)α + κα_T, once per refresh from step
            ``damping_warmup_steps``, κ = min(1, 2|log10(α_0/α_T)|/``damping_decay_updates``). None: constant α.
        seed: KIS's generator; rank r draws from a stream derived from (seed, r), stored in the state.
        kl_clip, lr: the trust region of :mod:`fop_asdl.engine.trust_region`, as for K-FAC and FOP: the
            preconditioned blocks scaled together by ν = min(1, sqrt(κ / (lr² Σ_l V_lᵀ Δ_l))), where
            V_lᵀ Δ_l = ‖Δ_l‖²_F̃ because Δ_l = F̃_l⁻¹ V_l with the stored factors; ``last_nu`` holds ν.
        micro_batch_size, grad_scaler: as for the other makers (refresh rows span the whole local batch).
        factor_dtype, inverse_dtype: the dtypes of the rows (A, G) and of the kernel solves (KIS's Cholesky,
            KID's Y_i) and M (float32 or float64; None: the parameters', float32 for bf16/fp16; factor_dtype's).
    """

    method_label = "HyLo"
    all_layer_types = True

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 compression_ratio: float = 0.1, switch_policy: Union[str, SwitchPolicy] = "gradient",
                 switch_threshold: float = DEFAULT_SWITCH_THRESHOLD, kid_windows: Sequence[Tuple[int, int]] = (),
                 iters_per_epoch: Optional[int] = None, kernel_scaling: str = "consistent",
                 conv_reduction: str = "mean", token_reduction: str = "mean", kis_probability: str = "norm_sq", kis_reweight: bool = False,
                 kid_skeleton: str = "norm_sort", target_damping: Optional[float] = None,
                 damping_decay_updates: int = 50, damping_warmup_steps: int = 0, seed: int = 0,
                 micro_batch_size: Optional[int] = None, grad_scaler: Optional[torch.amp.GradScaler] = None,
                 kl_clip: Optional[float] = None, lr: Optional[LearningRate] = None,
                 factor_dtype: Optional[torch.dtype] = None, inverse_dtype: Optional[torch.dtype] = None):
        model = self._init_step(model, micro_batch_size, grad_scaler)
        self.kl_clip, self._lr = validate_kl_clip(kl_clip, lr)
        self.last_nu: Optional[Tensor] = None
        self.config = config if config is not None else asdl.PreconditioningConfig()
        self.policy = (switch_policy if isinstance(switch_policy, SwitchPolicy) else
                       SwitchPolicy(switch_policy, threshold=switch_threshold, kid_windows=tuple(kid_windows)))
        if self.policy.policy in ("gradient", "epochs") and iters_per_epoch is None:
            raise TypeError(f"switch_policy={self.policy.policy!r} picks KID or KIS per epoch, so it needs "
                            f"iters_per_epoch=T (steps per epoch, e.g. len(train_loader)); or use "
                            f"switch_policy='kis' or 'kid'.")
        for name, value, low in (("iters_per_epoch", 1 if iters_per_epoch is None else iters_per_epoch, 1),
                                 ("damping_decay_updates", damping_decay_updates, 1),
                                 ("damping_warmup_steps", damping_warmup_steps, 0), ("seed", seed, 0),
                                 ("curvature_upd_interval", self.config.curvature_upd_interval, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
        local_rows(compression_ratio, 1)  # validates ρ
        for name, value, allowed in (("kernel_scaling", kernel_scaling, hylo_math.SCALINGS),
                                     ("conv_reduction", conv_reduction, hylo_math.REDUCTIONS),
                                     ("token_reduction", token_reduction, hylo_math.TOKEN_REDUCTIONS),
                                     ("kis_probability", kis_probability, ("norm_sq", "norm")),
                                     ("kid_skeleton", kid_skeleton, ("norm_sort", "pivoted_qr"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        for name, value in (("config.damping", self.config.damping), ("target_damping", target_damping)):
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a number > 0 (α of (F + αI)⁻¹), got {value!r}.")
        super().__init__(model)
        self.compression_ratio, self.iters_per_epoch = float(compression_ratio), iters_per_epoch
        self.kernel_scaling, self.conv_reduction, self.kid_skeleton = kernel_scaling, conv_reduction, kid_skeleton
        self.token_reduction = token_reduction
        self.kis_probability, self.kis_reweight = kis_probability, bool(kis_reweight)
        self.damping, self.target_damping = float(self.config.damping), target_damping
        self.damping_decay_updates, self.damping_warmup_steps = damping_decay_updates, damping_warmup_steps
        self._init_per_sample_step(model, factor_dtype, inverse_dtype)
        #: Blocks captured between refreshes too: their weights have other uses (found by structure, and on
        #: refreshes by a plain gradient beside the block's own).
        self._shared_blocks = shared_blocks(model, self.blocks)
        self._sync = make_sync(model, self.blocks, "auto", two_gradients=False,
                               costs=owner_costs(self.blocks, self.compression_ratio), dtype=self.precision.widest)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed((seed + self._sync.rank * _SEED_MIX) % 2 ** 64)
        #: Per block: the stored operator and the α it was built with (precondition must use that α).
        self.factors: Dict[str, Tuple[hylo_math.LowRankFactors, float]] = {}
        self.method: Optional[str] = None  # what built the stored factors
        self.lr_decay_epochs: List[int] = []
        self.epoch_grad_norms: List[Union[Tensor, float]] = []  # ‖Δ_e‖ of completed epochs ("gradient")
        self._epoch_sum: Dict[str, BlockVector] = {}

    def on_epoch_start(self, epoch: int, lr_decayed: bool = False) -> None:
        """Tell the "gradient" policy that the LR decays at ``epoch`` (0-based): KID from there on for
        ``kid_epochs_after_lr_decay`` epochs. Call it before the epoch's first step."""
        if lr_decayed and epoch not in self.lr_decay_epochs:
            self.lr_decay_epochs.append(int(epoch))

    # --- the step's hooks -------------------------------------------------------------------------------
    @property
    def _step_blocks(self) -> Sequence[Tuple[str, nn.Module]]:
        return self.blocks

    def _captured_blocks(self, plan: _Plan) -> Sequence[Tuple[str, nn.Module]]:
        """All blocks on a refresh; between refreshes only those whose weights are shared with other uses
        (tied weights), whose own part autograd cannot tell apart from the others' (and all with bf16/fp16
        weights, whose autograd sums would be half precision)."""
        return self.blocks if plan.refresh or self.precision.low else self._shared_blocks

    def _begin_step(self, batch_size: int) -> _Plan:
        step = self.state["step"]
        refresh = step % self.config.curvature_upd_interval == 0
        plan = _Plan(refresh, self._method_of(step) if refresh else "kis")
        if refresh and plan.method == "kis":
            plan.generator_state = self.generator.get_state()
        self._step_plan = plan  # read by _accumulate, which the capture calls
        return plan

    def _method_of(self, step: int) -> str:
        """KID or KIS for this refresh (§2.5); reads the last two epochs' ‖Δ‖ off the device (refresh only)."""
        epoch = step // self.iters_per_epoch if self.iters_per_epoch else 0
        norms = self.epoch_grad_norms
        for i in range(max(0, len(norms) - 2), len(norms)):
            norms[i] = float(norms[i])
        return self.policy.method(epoch, self.lr_decay_epochs, norms[-2:])

    def _accumulate(self, module: nn.Module, x: Tensor, grad_out: Tensor, chunk: Chunk,
                    previous: Optional[_Record]) -> _Record:
        record = previous if previous is not None else _Record([], [])
        self._once_per_pass(record.starts, chunk, module, "one row per sample and call")
        record.grad = add(record.grad, half_sums(module, x, grad_out, x.shape[0])[0])
        if not self._step_plan.refresh:  # a shared block between refreshes: only its own gradient
            return record
        record.rows.append(_rows(module, x, grad_out, self.conv_reduction, self.token_reduction,
                                 self.precision.factor))
        return record

    def _finish(self, plan: _Plan, records: Dict[str, _Record], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        plan.raw = self._mean_block_gradients(records, counts.normalizer)
        if plan.refresh:
            plan.factors = refresh_factors(self, plan.method, {name: records[name].rows for name in plan.raw},
                                           counts.per_sample)
        else:  # the blocks that were not captured: autograd's gradient, already reduced and divided
            for name, module in self.blocks:
                if name not in plan.raw and module.weight.grad is not None:
                    plan.raw[name] = _take_gradient(module)  # the commit writes the preconditioned one
        norms = []  # V_lᵀ Δ_l of the preconditioned blocks, for kl_clip
        for name, v in plan.raw.items():
            stored = (plan.factors[name], self.damping) if name in plan.factors else self.factors.get(name)
            if stored is None:
                plan.grads[name] = v
                continue
            plan.grads[name] = delta = _precondition(self._modules[name], v, *stored)
            plan.preconditioned.add(name)
            if self.kl_clip is not None:
                norms.append(sum((a * b).sum() for a, b in zip(v, delta) if a is not None))
        plan.nu = step_factor(self.kl_clip, self._lr, norms, loss_scale(self.grad_scaler, self.device))
        return {"gradient": [t for d in plan.grads.values() for t in d if t is not None],
                "factors": [t for f in plan.factors.values() for t in (f.a, f.g, f.matrix)]}

    def _commit(self, plan: _Plan) -> None:
        if plan.refresh:  # a weight used outside its block (e.g. functionally) has a plain gradient part here
            found = [(name, m) for name, m in self.blocks if m.weight.grad is not None
                     and (name, m) not in self._shared_blocks]
            self._shared_blocks = self._shared_blocks + found
        for name, d in plan.grads.items():
            if plan.nu is not None and name in plan.preconditioned:
                d = scaled(d, plan.nu)  # a new tensor: ν in place would scale V too
            write_block(self._modules[name], d)
        if plan.nu is not None:
            self.last_nu = plan.nu
        if plan.refresh:
            self.factors.update({name: (f, self.damping) for name, f in plan.factors.items()})
            self.method = plan.method
            if self.target_damping is not None and self.state["step"] >= self.damping_warmup_steps:
                kappa = min(1.0, 2 * abs(math.log10(self.damping / self.target_damping)) / self.damping_decay_updates)
                self.damping = (1 - kappa) * self.damping + kappa * self.target_damping
        if self.policy.policy == "gradient":  # Δ_e += V; at an epoch's last step ‖Δ_e‖ joins the history
            _add_to(self._epoch_sum, plan.raw)
            if (self.state["step"] + 1) % self.iters_per_epoch == 0:
                self.epoch_grad_norms = self.epoch_grad_norms[-1:] + [_norm(self._epoch_sum)]
                self._epoch_sum = {}

    def _roll_back(self, plan: _Plan) -> None:
        """Only the KIS generator moved before the commit."""
        if plan.generator_state is not None:
            self.generator.set_state(plan.generator_state)

    # --- HyLo proper ------------------------------------------------------------------------------------
    def _mean_block_gradients(self, records: Dict[str, _Record], n: Any) -> Dict[str, BlockVector]:
        """The captured blocks' gradients V, their sums over all ranks in one all-reduce divided by the
        loss's normalizer ``n``."""
        names = [name for name, _ in self.blocks if name in records]
        if self._sync.world_size > 1 and (names or self._step_plan.refresh):
            captured = self._captured_blocks(self._step_plan)
            if len(names) != len(captured):
                missing = sorted({name for name, _ in captured} - set(names))
                raise ValueError(f"fop_asdl: blocks {missing} took no part in the loss on rank {self._sync.rank}; "
                                 f"with several ranks HyLo needs every block on every refresh (ignore them).")
            layout = [shapes_of(records[name].grad) for name in names]
            flat = pack_vectors([records[name].grad for name in names], layout, records[names[0]].grad[0].dtype,
                                self.device)
            self._sync.sum_over_ranks(flat)
            out = dict(zip(names, unpack_vectors(flat, layout)[0]))
        else:
            out = {name: records[name].grad for name in names}
        return {name: (w / n, None if b is None else b / n) for name, (w, b) in out.items()}

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Step, α, mode, the stored factors, the KIS generator and the switching history; with several
        ranks this rank's (the generator differs per rank): load it into the same rank."""
        return {**self._rank_state(), "damping": self.damping, "method": self.method,
                "generator": self.generator.get_state(),
                "factors": {name: {"a": f.a.clone(), "g": f.g.clone(), "matrix": f.matrix.clone(),
                                   "scale": f.scale, "vocab": f.vocab, "damping": alpha}
                            for name, (f, alpha) in self.factors.items()},
                "lr_decay_epochs": list(self.lr_decay_epochs),
                "epoch_grad_norms": [float(v) for v in self.epoch_grad_norms],
                "epoch_sum": {name: tuple(None if t is None else t.clone() for t in v)
                              for name, v in self._epoch_sum.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._check_rank_state(state_dict, "each rank keeps its own KIS generator", "factors",
                               state_dict["factors"], self._modules)
        dev, factor, inverse = self.device, self.precision.factor, self.precision.inverse
        self.factors = {name: (hylo_math.LowRankFactors(f["a"].to(dev, factor), f["g"].to(dev, factor),
                                                        f["matrix"].to(dev, inverse), f["scale"],
                                                        int(f.get("vocab", 0))),
                               float(f["damping"])) for name, f in state_dict["factors"].items()}
        self.generator.set_state(state_dict["generator"])
        self.damping, self.method = float(state_dict["damping"]), state_dict["method"]
        self.lr_decay_epochs = [int(e) for e in state_dict["lr_decay_epochs"]]
        self.epoch_grad_norms = [float(v) for v in state_dict["epoch_grad_norms"]]
        self._epoch_sum = {name: tuple(None if t is None else t.to(dev).clone() for t in v)
                           for name, v in state_dict["epoch_sum"].items()}
        self.state["step"] = int(state_dict["step"])


def _add_to(total: Dict[str, BlockVector], raw: Dict[str, BlockVector]) -> None:
    """total += raw, block by block (a new block's vector copied)."""
    for name, v in raw.items():
        if name not in total:
            total[name] = (v[0].clone(), None if v[1] is None else v[1].clone())
            continue
        for t, u in zip(total[name], v):
            if t is not None:
                t.add_(u)


def _norm(vectors: Dict[str, BlockVector]) -> Tensor:
    """The norm of all blocks' vectors together, a device scalar."""
    return torch.stack([t.square().sum() for v in vectors.values() for t in v if t is not None]).sum().sqrt()


def _precondition(module: nn.Module, v: BlockVector, factors: hylo_math.LowRankFactors, damping: float
                  ) -> BlockVector:
    """The stored operator on a block's gradient; an Embedding's (V, D) weight is the transposed (D × V) matrix
    of HyLo's (d_g × d_a) layout, its rows being the one-hot inputs."""
    if isinstance(module, nn.Embedding):
        return hylo_math.precondition(v[0].T, None, factors, damping)[0].T, None
    return hylo_math.precondition(v[0], v[1], factors, damping)


def _take_gradient(module: nn.Module) -> BlockVector:
    """A block's autograd gradient as its block vector (a ConvTranspose2d's weight in W' layout), taken out
    of ``p.grad``."""
    bias = getattr(module, "bias", None)
    vector = (to_conv_layout(module, module.weight.grad), None if bias is None else bias.grad)
    module.weight.grad = None
    if bias is not None:
        bias.grad = None
    return vector


def _rows(module: nn.Module, x: Tensor, grad_out: Tensor, conv_reduction: str, token_reduction: str,
          dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """A block call's per-sample rows (A, G) in ``dtype``, the maker's factor dtype
    (:mod:`fop_asdl.methods.hylo_rows`); a convolution as the Conv2d it is seen as (:mod:`fop_asdl.engine.layers`)."""
    bias = getattr(module, "bias", None) is not None
    grad_out = grad_out.to(dtype)
    if x.is_floating_point():  # an Embedding's input is its token ids
        x = x.to(dtype)
    if isinstance(module, CONVS):
        g = geometry(module)
        return hylo_math.conv2d_rows(as_2d(module, conv_input(module, x)), as_2d(module, grad_out), g.kernel,
                                     g.stride, g.padding, g.dilation, bias=bias, conv_reduction=conv_reduction,
                                     groups=g.groups)
    if isinstance(module, nn.Embedding):
        return hylo_math.embedding_rows(*embedding_tokens(module, x), grad_out, token_reduction)
    return hylo_math.linear_rows(x, grad_out, bias, token_reduction=token_reduction)
