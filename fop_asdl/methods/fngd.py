"""FNGDGradientMaker: inverse-free fast natural gradient (Ou et al.; FNGD_SPEC) on the shared step.

Per Linear, convolution (Conv1d, Conv2d with any groups, ConvTranspose2d) and Embedding block the damped
empirical-Fisher natural gradient is a weighted sum of the per-sample gradients, d = Σ_m w_m u_m (SMW, spec
§2.1). In the coefficient epochs every step forms the block's Gram K,
its damping λ and the weights w (:mod:`fop_asdl.methods.fngd_math`) and stores w in a bank under the iteration index b of
the epoch; later epochs reuse bank[block][b] (by position in the batch) and only form d, which costs what
SGD's weight gradient costs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import asdl
import torch
from torch import Tensor, nn

from . import fngd_math
from ..engine.capture import Chunk
from ..engine.layers import CONVS, as_2d, conv_input, conv_weight_shape, embedding_tokens, geometry
from ..engine.loss import BatchCounts, loss_scale
from ..distributed import make_sync
from ..engine.per_sample import PerSampleStepMaker
from ..distributed.packing import pack_vectors, unpack_vectors
from ..engine.vectors import BlockVector, add, scaled, shapes_of, write_block

__all__ = ["FNGDGradientMaker"]

COEFFICIENT_SCOPES = ("local", "global")


@dataclasses.dataclass
class _Record:
    """A block's data of one step: the chunks' (x, grad_out) on coefficient steps, else Σ w_m u_m so far."""

    starts: List[int]
    chunks: List[Tuple[Tensor, Tensor]]
    total: Optional[Tuple[Tensor, Optional[Tensor]]] = None


@dataclasses.dataclass
class _Plan:
    index: int                                  # b, the iteration within the epoch
    compute: Set[str]                           # blocks whose coefficients this step forms
    reused: Dict[str, Tensor]                   # this rank's stored w of the other blocks
    new_bank: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    grads: Dict[str, Tuple[Tensor, Optional[Tensor]]] = dataclasses.field(default_factory=dict)
    diagnostics: Dict[str, Dict[str, Tensor]] = dataclasses.field(default_factory=dict)


class FNGDGradientMaker(PerSampleStepMaker, asdl.GradientMaker):
    """FNGD behind ASDL's gradient-maker interface: ``p.grad`` of every Linear, convolution and Embedding block
    holds Σ_m w_m u_m, every other trainable parameter (BatchNorm, LayerNorm, GroupNorm, ignored layers) the mean
    gradient.

    Args:
        model: the bare model (not DDP-wrapped).
        config: ``damping`` is λ for ``damping_mode="fixed"``; ``ignore_modules`` as for K-FAC.
        iters_per_epoch: T, steps per epoch; step t is iteration t mod T of epoch t div T (required).
        alpha: α of λ = α‖K‖_F for ``damping_mode="frobenius"`` (eq. 14 as printed, K without 1/M). The
            default 0.1 keeps mean |c| at 0.001-0.005 and max |c| below 0.04 on the small CNN and ResNet-32 at
            batch 128 (docs/methods/fngd.md).
        damping_mode: ``"frobenius"`` (per block, per coefficient step) or ``"fixed"``.
        coefficient_epochs: epochs that form coefficients; later ones reuse the last epoch's.
        scale_mode: ``"ngd"`` (w = (1 − c)/(λM), the exact damped NGD direction) or ``"sgd_like"``
            (w = (1 − c)/M, the lr on SGD's scale).
        conv_gram: ``"auto"`` (the cheaper exact strategy per layer), ``"per_sample"`` or ``"pairwise"``.
        coefficient_scope: on several ranks, ``"local"`` (each rank's own m×m Gram; d averaged over ranks) or
            ``"global"`` (the block's owner forms the N×N Gram of the global batch; equals one process).
        micro_batch_size: passes of at most this many samples; the Gram still spans the whole batch.
        grad_scaler: a ``torch.amp.GradScaler``: ``p.grad`` holds scaled results for ``scaler.step``, and a
            non-finite step is skipped (NaN in ``p.grad``, ``last_step_skipped``) instead of raising.
        factor_dtype: the dtype of the Gram K (float32 or float64; None: the parameters', float32 for
            bf16/fp16 weights, whose rows and sums are float32 too).
        inverse_dtype: the dtype of the solve for w and of the bank (float32 or float64; None: ``factor_dtype``'s).

    A layer whose per-sample gradients all vanish (K = 0, so λ = 0 under "frobenius") gets w = 0: its d is 0
    whatever w is, and a zero in the bank cannot blow up a later epoch in which the layer is alive.
    After a coefficient step ``last_coefficients[block]`` holds λ, mean c and max |c| as 0-d tensors.
    """

    method_label = "FNGD"
    all_layer_types = True

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 iters_per_epoch: Optional[int] = None, alpha: float = 0.1, damping_mode: str = "frobenius",
                 coefficient_epochs: int = 1, scale_mode: str = "ngd", conv_gram: str = "auto",
                 coefficient_scope: str = "local", micro_batch_size: Optional[int] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None, kl_clip: Optional[float] = None,
                 lr: Any = None, factor_dtype: Optional[torch.dtype] = None,
                 inverse_dtype: Optional[torch.dtype] = None):
        if kl_clip is not None or lr is not None:  # lr is read only by kl_clip
            raise TypeError("FNGD does not take kl_clip: after its coefficient epochs it reuses stored weights, so "
                            "its step is not F̃⁻¹g for any F̃ of the batch and has no Fisher norm to bound; lower "
                            "the learning rate, or use 'kfac', 'fop' or 'hylo', which take kl_clip.")
        model = self._init_step(model, micro_batch_size, grad_scaler)
        if iters_per_epoch is None:
            raise TypeError("FNGD reuses the coefficients of iteration b of its coefficient epochs in every later "
                            "epoch, so it needs iters_per_epoch=T (the number of steps per epoch, e.g. "
                            "len(train_loader)).")
        for name, value, low in (("iters_per_epoch", iters_per_epoch, 1), ("coefficient_epochs", coefficient_epochs, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}.")
        for name, value, allowed in (("damping_mode", damping_mode, fngd_math.DAMPING_MODES),
                                     ("scale_mode", scale_mode, fngd_math.SCALE_MODES),
                                     ("conv_gram", conv_gram, fngd_math.GRAM_STRATEGIES),
                                     ("coefficient_scope", coefficient_scope, COEFFICIENT_SCOPES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        self.config = config if config is not None else asdl.PreconditioningConfig()
        damping = alpha if damping_mode == "frobenius" else self.config.damping
        if not (isinstance(damping, (int, float)) and damping > 0):
            what = "alpha" if damping_mode == "frobenius" else "config.damping (λ of damping_mode='fixed')"
            raise ValueError(f"{what} must be a number > 0, got {damping!r}.")
        super().__init__(model)
        self.iters_per_epoch, self.coefficient_epochs = iters_per_epoch, coefficient_epochs
        self.damping, self.damping_mode, self.scale_mode = float(damping), damping_mode, scale_mode
        self.conv_gram, self.coefficient_scope = conv_gram, coefficient_scope
        self._init_per_sample_step(model, factor_dtype, inverse_dtype)
        self._names = {m: name for name, m in self.blocks}
        self._sync = make_sync(model, self.blocks, "auto", two_gradients=False, dtype=self.precision.widest)
        #: bank[block][b]: this rank's w of iteration b (its slice of the global batch in "global" scope).
        self.bank: Dict[str, Dict[int, Tensor]] = {name: {} for name, _ in self.blocks}
        self.last_coefficients: Dict[str, Dict[str, Tensor]] = {}

    # --- the step's hooks -------------------------------------------------------------------------------
    @property
    def _step_blocks(self) -> Sequence[Tuple[str, nn.Module]]:
        return self.blocks

    def _min_local_batch(self) -> Tuple[int, str]:
        return 2, "FNGD weighs the samples of a batch against each other (its Gram is M×M)"

    def _begin_step(self, batch_size: int) -> _Plan:
        step = self.state["step"]
        index = step % self.iters_per_epoch
        coefficient_epoch = step // self.iters_per_epoch < self.coefficient_epochs
        compute, reused = set(), {}
        for name, _ in self.blocks:
            stored = self.bank[name].get(index)
            if coefficient_epoch or stored is None or stored.shape[0] != batch_size:
                compute.add(name)  # a missing entry, or one for another batch size, is formed anew
            else:
                reused[name] = stored
        self._step_plan = _Plan(index, compute, reused)  # read by _accumulate, which the capture calls
        return self._step_plan

    def _accumulate(self, module: nn.Module, x: Tensor, grad_out: Tensor, chunk: Chunk,
                    previous: Optional[_Record]) -> _Record:
        record = previous if previous is not None else _Record([], [])
        self._once_per_pass(record.starts, chunk, module, "one per-sample gradient per call")
        x, grad_out = _as_rows(module, x, grad_out)
        w = self._step_plan.reused.get(self._names[module])
        if w is None:  # coefficient step: the Gram needs every chunk
            record.chunks.append((x, grad_out))
        else:  # sharing step: Σ w_m u_m chunk by chunk, nothing kept
            part = self._weighted_sum(module, x, grad_out, w[chunk.start:chunk.start + chunk.size])
            record.total = add(record.total, part)
        return record

    def _finish(self, plan: _Plan, records: Dict[str, _Record], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        # The rows carry the backpropagated loss's scale against the user's per-sample terms: the GradScaler's
        # s, and 1 / r for a loss normalised by more than its samples (fop_asdl.engine.loss).
        scale = counts.backprop_scale(loss_scale(self.grad_scaler, self.device))
        computed = [name for name, _ in self.blocks if name in plan.compute and name in records]
        if computed:
            data = {name: tuple(torch.cat(part) for part in zip(*records[name].chunks)) for name in computed}
            plan.new_bank = self._coefficients(data, scale, plan.diagnostics)
            for name in computed:
                module = self._modules[name]
                x, z = data.pop(name)
                records[name].total = self._weighted_sum(module, x, z, plan.new_bank[name])
        # d = Σ w_m u_m of the backpropagated rows; p.grad holds the user's d, times s with a GradScaler
        grads = {name: scaled(record.total, counts.per_sample) for name, record in records.items()}
        plan.grads = self._summed_over_ranks(grads)
        return {"gradient": [t for d in plan.grads.values() for t in d if t is not None],
                "coefficients": list(plan.new_bank.values())}

    def _commit(self, plan: _Plan) -> None:
        for name, d in plan.grads.items():
            write_block(self._modules[name], d)
        for name, w in plan.new_bank.items():
            self.bank[name][plan.index] = w
        if plan.diagnostics:
            self.last_coefficients = plan.diagnostics

    def _roll_back(self, plan: _Plan) -> None:
        """Nothing to undo: the bank changes only in :meth:`_commit`."""

    # --- FNGD proper ------------------------------------------------------------------------------------
    def _coefficients(self, data: Dict[str, Tuple[Tensor, Tensor]], scale: Union[float, Tensor],
                      diagnostics: Dict[str, Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """This rank's w of every block in ``data``: Grams of the (local or global) batch, one batched solve;
        λ, mean c and max |c| of the blocks solved here go to ``diagnostics``."""
        world = self._sync.world_size
        globally = self.coefficient_scope == "global" and world > 1
        if globally:
            owned = self._rows_at_owners(data)  # the global batch's (x, z) of each block at its owner
        names = list(owned if globally else data)
        sources = owned if globally else data
        weights: Dict[str, Tensor] = {}
        factor, inverse = self.precision.factor, self.precision.inverse
        if names:
            grams = torch.stack([self._gram(self._modules[name], *(t.to(factor) for t in sources[name]))
                                 for name in names])
            grams = grams.to(inverse) / scale ** 2  # z carries the loss scale σ: K does σ², and λ must not
            coef = fngd_math.fngd_coefficients(grams, self.damping, damping_mode=self.damping_mode,
                                         scale_mode=self.scale_mode, min_damping=torch.finfo(grams.dtype).tiny)
            dead = torch.linalg.matrix_norm(grams) == 0  # K = 0: u = 0, so d = 0 whatever w; store w = 0
            w = torch.where(dead[:, None], torch.zeros_like(coef.w), coef.w)
            for i, name in enumerate(names):
                weights[name] = w[i]
                diagnostics[name] = {"damping": coef.damping[i], "mean_c": coef.c[i].mean(),
                                                "max_abs_c": coef.c[i].abs().max()}
        if globally:
            m, rank = next(iter(data.values()))[0].shape[0], self._sync.rank
            shared = self._sync.share({name: ((w, None), None) for name, w in weights.items()},
                                      {name: (torch.Size([world * m]), None) for name, _ in self.blocks})
            weights = {name: shared[name][0][0][rank * m:(rank + 1) * m].to(inverse, copy=True) for name in data}
        return weights

    def _rows_at_owners(self, data: Dict[str, Tuple[Tensor, Tensor]]) -> Dict[str, Tuple[Tensor, Tensor]]:
        """Every block's global (x, z) at its owner; an Embedding's token ids travel apart, as float64 (exact),
        since one buffer with the output gradients would hold them in their (maybe 16-bit) dtype."""
        ids = {name: [x.double()] for name, (x, _) in data.items() if not x.is_floating_point()}
        owned = self._sync.rows_at_owners({name: [xz[1]] if name in ids else list(xz) for name, xz in data.items()})
        owned_ids = self._sync.rows_at_owners(ids) if ids else {}
        return {name: (owned_ids[name][0].long(), rows[0]) if name in owned_ids else tuple(rows)
                for name, rows in owned.items()}

    def _gram(self, module: nn.Module, x: Tensor, z: Tensor) -> Tensor:
        bias = getattr(module, "bias", None) is not None
        if isinstance(module, CONVS):
            g = geometry(module)
            return fngd_math.conv2d_gram(x, z, conv_weight_shape(module), g.stride, g.padding, g.dilation, bias=bias,
                                         groups=g.groups, strategy=self.conv_gram)
        if isinstance(module, nn.Embedding):
            return fngd_math.embedding_gram(*embedding_tokens(module, x), z)
        return fngd_math.linear_gram(x, z, bias, strategy=self.conv_gram)

    @staticmethod
    def _weighted_sum(module: nn.Module, x: Tensor, z: Tensor, w: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        """Σ_m w_m u_m, in the rows' dtype (the sums'; w may be kept in a wider one)."""
        bias = getattr(module, "bias", None) is not None
        w = w.to(z.dtype)  # the output gradients' (an Embedding's x holds token ids)
        if isinstance(module, CONVS):
            g = geometry(module)
            return fngd_math.conv2d_weighted_sum(x, z, w, conv_weight_shape(module), g.stride, g.padding, g.dilation,
                                                 bias=bias, groups=g.groups)
        if isinstance(module, nn.Embedding):
            return fngd_math.embedding_weighted_sum(*embedding_tokens(module, x), z, w, module.num_embeddings), None
        return fngd_math.linear_weighted_sum(x, z, w, bias)

    def _summed_over_ranks(self, grads: Dict[str, Tuple[Tensor, Optional[Tensor]]]
                           ) -> Dict[str, Tuple[Tensor, Optional[Tensor]]]:
        """Σ over ranks of every block's d in one buffer ("global"), or its mean ("local")."""
        world = self._sync.world_size
        if world == 1:
            return grads
        names = [name for name, _ in self.blocks]
        missing = [name for name in names if grads.get(name) is None]
        if missing:
            raise ValueError(f"fop_asdl: blocks {missing} took no part in the loss on rank {self._sync.rank}; "
                             f"with several ranks FNGD needs every block in every step (ignore them).")
        layout = [shapes_of(grads[name]) for name in names]
        flat = pack_vectors([grads[name] for name in names], layout, grads[names[0]][0].dtype, self.device)
        self._sync.sum_over_ranks(flat)
        if self.coefficient_scope == "local":
            flat = flat / world
        return dict(zip(names, unpack_vectors(flat, layout)[0]))

    # --- state --------------------------------------------------------------------------------------------
    def bank_bytes(self) -> int:
        """Bytes the coefficient bank holds on this rank (Σ over blocks and iterations of M floats)."""
        return sum(w.numel() * w.element_size() for entries in self.bank.values() for w in entries.values())

    def state_dict(self) -> Dict[str, Any]:
        """Step and coefficient bank; with several ranks this rank's own (load it into the same rank)."""
        return {**self._rank_state(), "bank": {name: {b: w.detach().clone() for b, w in entries.items()}
                                               for name, entries in self.bank.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._check_rank_state(state_dict, "each rank's bank holds the coefficients of its own samples",
                               "coefficients", state_dict["bank"], self.bank)
        dtype = self.precision.inverse
        self.bank = {name: {int(b): w.to(self.device, dtype, copy=True)
                            for b, w in state_dict["bank"].get(name, {}).items()} for name in self.bank}
        self.state["step"] = int(state_dict["step"])


def _as_rows(module: nn.Module, x: Tensor, z: Tensor) -> Tuple[Tensor, Tensor]:
    """A block's call as :mod:`fop_asdl.methods.fngd_math` takes it: a Linear's token dimensions folded into one
    (M, T, I); a convolution as the Conv2d it is seen as (:mod:`fop_asdl.engine.layers`); an Embedding's
    ids (M, T) with its output gradients (M, T, D)."""
    if isinstance(module, nn.Linear) and x.dim() > 3:
        return x.reshape(x.shape[0], -1, x.shape[-1]), z.reshape(z.shape[0], -1, z.shape[-1])
    if isinstance(module, CONVS):
        return as_2d(module, conv_input(module, x)), as_2d(module, z)
    if isinstance(module, nn.Embedding):
        return x.reshape(x.shape[0], -1), z.reshape(z.shape[0], -1, z.shape[-1])
    return x, z


