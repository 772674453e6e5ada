"""Shampoo (Gupta, Koren and Singer 2018) on the shared step: what ``make_gradient_maker("shampoo", ...)``
returns.

Shampoo needs only each step's mean gradient G, so the step captures nothing: autograd's gradients, summed
over micro-batches and ranks and divided by the user's loss normaliser (:mod:`fop_asdl.engine.step`), are
its input. Per parameter (:mod:`fop_asdl.methods.shampoo_math` for the blocks), on curvature steps
L ← L + G Gᵀ and R ← R + Gᵀ G (or ASDL's EMA), on preconditioner steps the roots (L + εI)^(−1/4) and
(R + εI)^(−1/4), and every step the update L^(−1/4) G R^(−1/4), optionally grafted to the norm of SGD's or
Adagrad's step. Everything is formed before the step's finiteness check and committed after it.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import asdl
import torch
from torch import Tensor, nn

from . import shampoo_math as sm
from ..compat import compute_dtype
from ..distributed import make_sync
from ..engine.coverage import Coverage, model_coverage
from ..engine.loss import BatchCounts, loss_scale
from ..engine.selection import user_ignores
from ..engine.step import SteppedGradientMaker

__all__ = ["ShampooGradientMaker"]

GRAFTINGS = (None, "sgd", "adagrad")
_NO_EMA = -1  # ASDL's Shampoo sums its statistics when config.ema_decay is -1 (the paper's Σ)


@dataclasses.dataclass
class _Plan:
    update_stats: bool
    update_roots: bool
    stats: Dict[str, List[Tuple[Tensor, Optional[Tensor]]]] = dataclasses.field(default_factory=dict)
    roots: Dict[str, List[Tuple[Tensor, Optional[Tensor]]]] = dataclasses.field(default_factory=dict)
    graft: Dict[str, Tensor] = dataclasses.field(default_factory=dict)
    updates: Dict[str, Tensor] = dataclasses.field(default_factory=dict)


class ShampooGradientMaker(SteppedGradientMaker, asdl.PreconditionedGradientMaker):
    """Shampoo behind ASDL's gradient-maker interface: ``p.grad`` of every trainable parameter (outside
    ``config.ignore_modules``) holds its Shampoo update, scaled like a gradient for the optimizer.

    Args:
        model: the bare model (not DDP-wrapped).
        config: ``damping`` is the paper's ε (the roots are of L + εI: the paper's L₀ = εI); ``ema_decay``
            -1 sums the statistics (the paper), else L ← (1 − d) L + d G Gᵀ (ASDL's EMA);
            ``curvature_upd_interval`` / ``preconditioner_upd_interval`` (and ASDL's schedules) say when
            the statistics and the roots are updated; ``ignore_modules`` as for K-FAC.
        block_size: ASDL's name: every dimension is cut into blocks of at most this many rows/columns, each
            with its own factors (-1 or None: whole matrices).
        grafting: None (Shampoo's own step), ``"sgd"`` or ``"adagrad"``: each parameter's update keeps
            Shampoo's direction and takes the norm of that method's step (Agarwal et al. 2020), as the
            AlgoPerf-winning recipe does. Until the first roots exist the update is that method's step (the
            plain gradient without grafting).
        grafting_eps: Adagrad's ε in G / (√h + ε) (h: Σ G², or ASDL's EMA of G², updated every step).
        micro_batch_size, grad_scaler: as for every maker of the switch (:mod:`fop_asdl.engine.step`).

    The roots come from an eigendecomposition in float32 (float64 for a float64 model). Several ranks
    all-reduce the gradients once per step and then hold the same replicated state, each computing every
    root (no sharding: each rank equals one process).
    """

    method_label = "Shampoo"

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, *,
                 block_size: Optional[int] = -1, grafting: Optional[str] = None, grafting_eps: float = 1e-8,
                 micro_batch_size: Optional[int] = None, grad_scaler: Optional[torch.amp.GradScaler] = None,
                 **unknown: Any):
        if unknown:
            raise TypeError(_refusal(unknown))
        model = self._init_step(model, micro_batch_size, grad_scaler)
        config = config if config is not None else asdl.PreconditioningConfig()
        if block_size is not None and block_size != -1 and (
                isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive int, or -1/None for whole matrices; got "
                             f"{block_size!r}.")
        if grafting not in GRAFTINGS:
            raise ValueError(f"grafting must be one of {GRAFTINGS}, got {grafting!r}.")
        if not (isinstance(config.damping, (int, float)) and config.damping > 0):
            raise ValueError(f"config.damping is Shampoo's ε (roots of L + εI) and must be > 0, got "
                             f"{config.damping!r}.")
        if not (isinstance(grafting_eps, (int, float)) and grafting_eps > 0):
            raise ValueError(f"grafting_eps must be > 0, got {grafting_eps!r}.")
        super().__init__(model, config)
        self.block_size = None if block_size in (None, -1) else block_size
        self.grafting, self.grafting_eps, self.epsilon = grafting, float(grafting_eps), float(config.damping)
        self.device = next(model.parameters()).device
        self.state = {"step": 0}
        self._params = self._preconditioned(model, config)
        self._sync = make_sync(model, [], "auto", two_gradients=False)
        self._stats: Dict[str, List[Tuple[Tensor, Optional[Tensor]]]] = {}
        self._roots: Dict[str, List[Tuple[Tensor, Optional[Tensor]]]] = {}
        self._graft: Dict[str, Tensor] = {}

    def _preconditioned(self, model: nn.Module, config) -> List[Tuple[str, nn.Parameter, sm.Layout]]:
        """(name, parameter, layout) of every trainable parameter outside ``ignore_modules``; one warning
        names the others (they receive the plain mean gradient)."""
        ignored = {id(p) for name, m in model.named_modules() if user_ignores(name, m, config.ignore_modules)
                   for p in m.parameters()}
        for holder, module in model.named_modules():
            for key, param in module.named_parameters(recurse=False):
                if param.requires_grad and id(param) not in ignored and not param.is_floating_point():
                    raise TypeError(f"{self.method_label}: block {holder!r} ({type(module).__name__}) has a "
                                    f"{param.dtype} {key}; its statistics need real floating-point parameters "
                                    f"(float16, bfloat16, float32 or float64). Convert the module (e.g. "
                                    f"module.float()) or list it in PreconditioningConfig.ignore_modules.")
        out, plain = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in ignored:
                plain.append(name)
            else:
                out.append((name, param, sm.layout_of(param.shape, self.block_size)))
        if plain:
            warnings.warn("fop_asdl: Shampoo does not precondition " + ", ".join(plain) + " (ignore_modules); "
                          "they receive the plain mean gradient.", UserWarning)
        return out

    def coverage(self) -> Coverage:
        """Shampoo preconditions parameters, not layers: every trainable parameter outside ``ignore_modules``
        is preconditioned, whichever module holds it (one held directly, a norm layer's, an embedding's)."""
        preconditioned = {id(p) for _, p, _ in self._params}
        holders = [(name, m) for name, m in self.model.named_modules()
                   if any(id(p) in preconditioned for p in m.parameters(recurse=False))]
        return model_coverage(self.model, self.method_label, holders, self._describe_block, self.config.ignore_modules,
                              "holds no parameter Shampoo preconditions")

    def _describe_block(self, name: str, module: nn.Module) -> str:
        layouts = {id(p): layout for _, p, layout in self._params}
        shapes = ", ".join(f"{key} as a vector" if layouts[id(p)].vector else f"{key} as a {layouts[id(p)].shape} "
                           f"matrix" for key, p in module.named_parameters(recurse=False) if id(p) in layouts)
        b = self.block_size
        cut = f"factors of at most {b}×{b}" if b else "whole-dimension factors"
        return f"{self.method_label}, {module.__class__.__name__}: {shapes}, {cut}"

    # --- the step's hooks -------------------------------------------------------------------------------
    @property
    def _step_blocks(self) -> Sequence[Tuple[str, nn.Module]]:
        return [("", self.model)]  # a skipped step (GradScaler) fills every p.grad with NaN

    def _captured_blocks(self, plan: _Plan) -> Sequence[Tuple[str, nn.Module]]:
        return []  # the mean gradient is all Shampoo needs: autograd's, no capture

    def _begin_step(self, batch_size: int) -> _Plan:
        step = self.state["step"]
        return _Plan(self.do_update_curvature(step), self.do_update_preconditioner(step))

    def _accumulate(self, *args: Any) -> Any:
        raise AssertionError("Shampoo captures no block")

    def _finish(self, plan: _Plan, records: Dict[str, Any], counts: BatchCounts) -> Dict[str, List[Tensor]]:
        # p.grad is the user's mean gradient times the GradScaler's scale σ: the statistics need G itself
        sigma = None if self.grad_scaler is None else loss_scale(self.grad_scaler, self.device)
        grads, blocks = {}, {}
        for name, param, layout in self._params:
            if param.grad is None:
                continue  # took no part in the loss: autograd leaves None, so does Shampoo
            g = param.grad.to(compute_dtype(param.dtype))  # bf16/fp16 weights: statistics and roots in float32
            g = g if sigma is None else g / sigma
            grads[name] = g
            blocks[name] = sm.split(g.reshape(layout.shape), layout)
            if plan.update_stats:
                new = [sm.statistics(b, layout.vector) for b in blocks[name]]
                old = self._stats.get(name)
                plan.stats[name] = [tuple(self._accumulated(o, n) for o, n in zip(old_pair, new_pair))
                                    for old_pair, new_pair in zip(old or [(None, None)] * len(new), new)]
        if plan.update_roots:
            self._new_roots(plan)
        for name, param, layout in self._params:
            if name in grads:
                update = self._update(name, grads[name], blocks.pop(name), layout, plan)
                update = update if sigma is None else update * sigma
                plan.updates[name] = update.reshape(param.shape).to(param.dtype)
        state = [t for pairs in (*plan.stats.values(), *plan.roots.values()) for pair in pairs for t in pair
                 if t is not None]
        return {"gradient": list(plan.updates.values()), "curvature": state + list(plan.graft.values())}

    def _new_roots(self, plan: _Plan) -> None:
        """The roots of every parameter's (new or stored) statistics, equal sizes in one call."""
        stats = {name: plan.stats.get(name, self._stats.get(name)) for name, _, _ in self._params}
        stats = {name: pairs for name, pairs in stats.items() if pairs is not None}
        flat: List[Tuple[Tensor, int]] = []
        for name, pairs in stats.items():
            for left, right in pairs:
                flat.append((left, 2 if right is None else 4))  # order 1: −1/2; order 2: −1/4 per factor
                if right is not None:
                    flat.append((right, 4))
        roots = iter(sm.inverse_roots(flat, self.epsilon))
        for name, pairs in stats.items():
            plan.roots[name] = [(next(roots), None if right is None else next(roots)) for _, right in pairs]

    def _update(self, name: str, g: Tensor, blocks: List[Tensor], layout: sm.Layout, plan: _Plan) -> Tensor:
        """The parameter's Shampoo update (grafted), as its (m, n) matrix."""
        matrix = g.reshape(layout.shape)
        graft = matrix
        if self.grafting == "adagrad":
            h = self._accumulated(self._graft.get(name), matrix * matrix)
            plan.graft[name] = h
            graft = matrix / (h.sqrt() + self.grafting_eps)
        roots = plan.roots.get(name, self._roots.get(name))
        if roots is None:  # no statistics yet: the grafted method's step (the plain gradient without grafting)
            return graft
        update = sm.merge([sm.precondition(b, left, right) for b, (left, right) in zip(blocks, roots)], layout)
        if self.grafting is None:
            return update
        norm = torch.linalg.vector_norm(update)
        return update * (torch.linalg.vector_norm(graft) / norm.clamp_min(torch.finfo(norm.dtype).tiny))

    def _accumulated(self, old: Optional[Tensor], new: Optional[Tensor]) -> Optional[Tensor]:
        """ASDL's Shampoo statistics: a sum (ema_decay -1, from zero) or (1 − d)·old + d·new (from zero)."""
        if new is None:
            return None
        decay = self.config.ema_decay
        if decay == _NO_EMA:
            return new if old is None else old + new
        return new * decay if old is None else old * (1 - decay) + new * decay

    def _commit(self, plan: _Plan) -> None:
        self._stats.update(plan.stats)
        self._roots.update(plan.roots)
        self._graft.update(plan.graft)
        for name, param, _ in self._params:
            if name in plan.updates:
                param.grad = plan.updates[name]

    def _roll_back(self, plan: _Plan) -> None:
        """Nothing to undo: the state changes only in :meth:`_commit`."""

    # --- state ------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """Step, statistics, roots and Adagrad accumulators of every parameter (the same on every rank)."""
        def copied(pairs):
            return [[t.detach().clone() if t is not None else None for t in pair] for pair in pairs]

        return {"step": self.state["step"], "block_size": self.block_size,
                "statistics": {name: copied(pairs) for name, pairs in self._stats.items()},
                "roots": {name: copied(pairs) for name, pairs in self._roots.items()},
                "graft": {name: h.detach().clone() for name, h in self._graft.items()}}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state of any world size; refuse one for other parameters or another ``block_size``."""
        if state_dict.get("block_size", self.block_size) != self.block_size:
            raise ValueError(f"this Shampoo state was saved with block_size={state_dict['block_size']}, but this "
                             f"maker has block_size={self.block_size}: its factors have other shapes.")
        layouts = {name: layout for name, _, layout in self._params}
        for key in ("statistics", "roots", "graft"):
            unknown = set(state_dict.get(key, {})) - set(layouts)
            if unknown:
                raise KeyError(f"state_dict has Shampoo {key} for parameters this model does not precondition: "
                               f"{sorted(unknown)}")

        def loaded(pairs):
            return [tuple(None if t is None else t.to(self.device).clone() for t in pair) for pair in pairs]

        self._stats = {name: loaded(pairs) for name, pairs in state_dict.get("statistics", {}).items()}
        self._roots = {name: loaded(pairs) for name, pairs in state_dict.get("roots", {}).items()}
        self._graft = {name: h.to(self.device).clone() for name, h in state_dict.get("graft", {}).items()}
        self.state["step"] = int(state_dict["step"])


def _refusal(unknown: Dict[str, Any]) -> str:
    reasons = []
    if "kl_clip" in unknown or "lr" in unknown:
        reasons.append("kl_clip bounds the Fisher norm of a step F̃⁻¹g, but Shampoo's L^(−1/4) G R^(−1/4) is no "
                       "inverse of a curvature it holds (its preconditioner is an inverse fourth root), so there is "
                       "no norm to bound; lower the learning rate, or use grafting")
    known = "block_size, grafting, grafting_eps, micro_batch_size, grad_scaler"
    return (f"Shampoo does not take {sorted(unknown)}" + (": " + "; ".join(reasons) if reasons else "")
            + f". It takes {known} (and config).")
