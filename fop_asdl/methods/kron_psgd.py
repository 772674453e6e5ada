"""Kronecker-factored PSGD (Li 2018) on the shared step: P G = Q_lᵀQ_l G Q_rᵀQ_r per Linear/Conv2d block.

On an update step (every ``config.preconditioner_upd_interval`` steps) the pair is Li's: dX = v, a fresh
N(0, I) probe of every block's parameters, and dG = H v, the Hessian-vector product of the user's loss on
the batch, by a double backward pass inside the step's forward/backward (``create_graph``), summed over
micro-batches and ranks. Q_l, Q_r take one step on (v, Hv) (:mod:`fop_asdl.methods.kron_psgd_math`) and the
batch's gradient is preconditioned with the new factors, as Li's code does. Other steps are a plain
forward/backward and one preconditioning.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import asdl
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..engine.capture import BlockCapture, Chunk
from ..engine.chunks import as_sum, summed_loss
from ..engine.loss import BatchCounts, loss_scale
from ..distributed import make_sync
from ..engine.per_sample import PerSampleStepMaker
from ..engine.vectors import write_block
from . import kron_psgd_math
from .kbfgs import _matrix, _vector
from .second_order import refuse, summed_over_ranks, warn_plain_parameters

__all__ = ["KronPsgdGradientMaker"]


_REFUSED = {
    "kl_clip": "P = QᵀQ is fitted to the inverse Hessian from Hessian-vector products (not to a Fisher), so ‖Δ‖ in "
               "P⁻¹ is no KL bound; lower the learning rate or precond_lr. 'kfac', 'fop', 'smw_ng' and 'diag_ng' take "
               "kl_clip.",
    "use_functorch": "the Hessian-vector product is a double backward pass inside the step.",
    "fisher_type": "PSGD uses no Fisher."}


@dataclasses.dataclass
class _Plan:
    update: bool
    generator_state: Optional[Tensor] = None
    probes: Dict[str, List[Tensor]] = dataclasses.field(default_factory=dict)   # v per block parameter
    products: Dict[str, List[Tensor]] = dataclasses.field(default_factory=dict)  # Σ over chunks of H_sum v
    factors: Dict[str, Tuple[Tensor, Tensor]] = dataclasses.field(default_factory=dict)
    grads: Dict[str, Tuple[Tensor, Optional[Tensor]]] = dataclasses.field(default_factory=dict)


class KronPsgdGradientMaker(PerSampleStepMaker, asdl.GradientMaker):
    """``p.grad`` of every Linear/Conv2d block holds Q_lᵀQ_l [∇W | ∇b] Q_rᵀQ_r, every other trainable
    parameter the plain mean gradient (one warning names them).

    Args:
        model, config: ``preconditioner_upd_interval`` (how often Q is fitted), ``ignore_modules``.
        precond_lr: Li's normalised step size of the Q updates (ASDL's name and default 0.01).
        init_scale: Q_l = Q_r = init_scale·I at the start (ASDL's name and default 1).
        seed: the probes' generator (replicated on every rank, saved in ``state_dict()``).
        micro_batch_size, grad_scaler: as for the other makers.

    Cost of an update step: the double backward of the Hessian-vector product (about two more backward
    passes, and the memory of a graph built with ``create_graph``), per block two triangular solves and
    O(O³ + I³ + O²I + OI²) products. Other steps: SGD's pass and O(O²I + OI²) per block.

    bf16/fp16 weights: the gradient and H v come from autograd in their dtype (the gradient summed over
    micro-batches in ``p.grad``, as SGD's), H v's sum over micro-batches, Q_l, Q_r, their fit and the
    preconditioning are float32 (torch has no half-precision triangular solve), ``p.grad`` the weights' dtype.
    """

    method_label = "Kronecker PSGD"

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 precond_lr: float = 0.01, init_scale: float = 1.0, seed: int = 0,
                 micro_batch_size: Optional[int] = None, grad_scaler: Optional[torch.amp.GradScaler] = None,
                 **others: Any):
        refuse(self.method_label, others, _REFUSED)
        model = self._init_step(model, micro_batch_size, grad_scaler)
        self.config = config if config is not None else asdl.PreconditioningConfig()
        for name, value in (("precond_lr", precond_lr), ("init_scale", init_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}.")
        interval = self.config.preconditioner_upd_interval or 1
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"config.preconditioner_upd_interval must be an int >= 1, got {interval!r}.")
        super().__init__(model)
        self.precond_lr, self.interval = float(precond_lr), interval
        self._init_per_sample_step(model)
        self._sync = make_sync(model, self.blocks, "auto", two_gradients=False, dtype=self.precision.widest)
        warn_plain_parameters(model, self.blocks, self.method_label)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        #: Per block: (Q_l, Q_r), upper triangular.
        self.factors: Dict[str, Tuple[Tensor, Tensor]] = {}
        for name, module in self.blocks:
            weight = module.weight
            width = weight[0].numel() + (module.bias is not None)
            self.factors[name] = tuple(init_scale * torch.eye(size, dtype=self.precision.factor,
                                                              device=weight.device)
                                       for size in (weight.shape[0], width))

    # --- the step's hooks -------------------------------------------------------------------------------
    @property
    def _step_blocks(self) -> Sequence[Tuple[str, nn.Module]]:
        return self.blocks

    def _captured_blocks(self, plan: _Plan) -> Sequence[Tuple[str, nn.Module]]:
        """None: autograd forms every gradient (the Hessian-vector product needs the weights in the graph)."""
        return []

    def _begin_step(self, batch_size: int) -> _Plan:
        plan = _Plan(self.state["step"] % self.interval == 0)
        if plan.update:
            plan.generator_state = self.generator.get_state()
            for name, module in self.blocks:  # every block's probe, in block order on every rank
                plan.probes[name] = [torch.randn(p.shape, generator=self.generator, dtype=self.precision.factor,
                                                 device=p.device).to(p.dtype) for p in _params(module)]
                plan.products[name] = [torch.zeros_like(p, dtype=self.precision.factor) for p in _params(module)]
        return plan

    def _chunk_backward(self, capture: BlockCapture, plan: _Plan, first: bool) -> None:
        """SGD's pass; on an update step the gradient is taken with ``create_graph`` and differentiated once
        more against the probes: H_sum v of the chunk's summed (scaled) loss."""
        size = capture.chunk.size
        # Fused attention kernels have no double backward (CPU flash attention): the math one on update steps.
        kernel = sdpa_kernel(SDPBackend.MATH) if plan.update else contextlib.nullcontext()
        with summed_loss(self), kernel:
            self.forward()
        loss = self._loss = as_sum(self, self._loss, size)
        scaled = loss if self.grad_scaler is None else self.grad_scaler.scale(loss)
        if not plan.update:
            scaled.backward()
            return
        params = [p for p in self.model.parameters() if p.requires_grad]
        grads = torch.autograd.grad(scaled, params, create_graph=True, allow_unused=True)
        grad_of = dict(zip(params, grads))
        pairs = [(name, j, p, v) for name, module in self.blocks
                 for j, (p, v) in enumerate(zip(_params(module), plan.probes[name])) if grad_of[p] is not None]
        if pairs:
            products = torch.autograd.grad([grad_of[p] for _, _, p, _ in pairs], [p for _, _, p, _ in pairs],
                                           [v for _, _, _, v in pairs], allow_unused=True)
            for (name, j, _, _), hv in zip(pairs, products):
                if hv is not None:
                    plan.products[name][j] = plan.products[name][j] + hv
        for p, g in zip(params, grads):
            if g is not None:
                g = g.detach()
                p.grad = g if p.grad is None else p.grad + g

    def _accumulate(self, module: nn.Module, x: Tensor, grad_out: Tensor, chunk: Chunk, previous: Any) -> Any:
        raise AssertionError("Kronecker PSGD captures no block")

    def _finish(self, plan: _Plan, records: Dict[str, Any], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        names = [name for name, m in self.blocks if m.weight.grad is not None]
        if plan.update:
            if self._sync.world_size > 1 and len(names) != len(self.blocks):
                raise ValueError(f"fop_asdl: blocks {sorted(set(self._modules) - set(names))} took no part in the "
                                 f"loss on rank {self._sync.rank}; with several ranks {self.method_label} needs every "
                                 f"block in every update step (ignore them).")
            parts = iter(summed_over_ranks(self._sync, [t for name in names for t in plan.products[name]]))
            sigma = loss_scale(self.grad_scaler, self.device)
        for name in names:
            module = self._modules[name]
            grad = _matrix(module, module.weight.grad, None if module.bias is None else module.bias.grad)
            grad = grad.to(self.precision.factor)
            module.weight.grad = None  # the commit writes the preconditioned one in its place
            if module.bias is not None:
                module.bias.grad = None
            q_l, q_r = self.factors[name]
            if plan.update:  # dG = H v of the user's loss: the summed loss's, over its normalizer and scale
                hv = [next(parts) / (sigma * counts.normalizer) for _ in plan.products[name]] + [None]
                dx = _matrix(module, *(plan.probes[name] + [None])[:2]).to(self.precision.factor)
                dg = _matrix(module, *hv[:2]).to(self.precision.factor)
                q_l, q_r = plan.factors[name] = kron_psgd_math.update_factors(q_l, q_r, dx, dg, self.precond_lr)
            plan.grads[name] = _vector(module, kron_psgd_math.precondition(q_l, q_r, grad))
        return {"gradient": [t for d in plan.grads.values() for t in d if t is not None],
                "curvature": [t for f in plan.factors.values() for t in f]}

    def _commit(self, plan: _Plan) -> None:
        for name, delta in plan.grads.items():
            write_block(self._modules[name], delta)
        self.factors.update(plan.factors)

    def _roll_back(self, plan: _Plan) -> None:
        """The probes advanced the generator: put it back."""
        if plan.generator_state is not None:
            self.generator.set_state(plan.generator_state)

    # --- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Step, the probes' generator and every block's (Q_l, Q_r) (the same on every rank)."""
        return {"step": self.state["step"], "generator": self.generator.get_state(),
                "factors": {name: {"Q_l": q_l.clone(), "Q_r": q_r.clone()}
                            for name, (q_l, q_r) in self.factors.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        unknown = set(state_dict["factors"]) - set(self._modules)
        if unknown:
            raise KeyError(f"state_dict has factors for blocks this model does not have: {sorted(unknown)}")
        dev = self.device
        dtype = self.precision.factor
        for name, f in state_dict["factors"].items():
            self.factors[name] = (f["Q_l"].to(dev, dtype, copy=True), f["Q_r"].to(dev, dtype, copy=True))
        self.generator.set_state(state_dict["generator"])
        self.state["step"] = int(state_dict["step"])


def _params(module: nn.Module) -> List[Tensor]:
    return [p for p in (module.weight, module.bias) if p is not None]

