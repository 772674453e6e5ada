"""What a gradient maker does with each parameter of the model: ``gm.coverage()``.

A user who swaps one method name for another should see, before trusting a comparison, which parameters
each method preconditions and which it leaves to the plain gradient (and why): the switch never falls
back silently. Each *use* of a parameter (a module holding it) gets one treatment; a parameter held by
several modules (a tied embedding and LM head) lists every use and the other names it is known by.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from ..engine.selection import user_ignores

__all__ = ["Use", "ParameterCoverage", "Coverage", "model_coverage", "kron_description"]

PRECONDITIONED, PLAIN, IGNORED, FROZEN = "preconditioned", "plain gradient", "ignored by the user", "frozen"


@dataclasses.dataclass(frozen=True)
class Use:
    """One module's use of a parameter: ``module`` (its name, ``""`` for the root), the treatment
    (:data:`PRECONDITIONED`, :data:`PLAIN`, :data:`IGNORED` or :data:`FROZEN`) and what it means here
    (the method and its block, or the reason for the plain gradient)."""

    module: str
    treatment: str
    detail: str


@dataclasses.dataclass(frozen=True)
class ParameterCoverage:
    """One trainable or frozen parameter: its first name, element count, every use, the other names."""

    name: str
    numel: int
    uses: Tuple[Use, ...]
    shared_with: Tuple[str, ...] = ()

    @property
    def treatment(self) -> str:
        """The parameter's treatment: its uses' one, or ``"partly preconditioned"`` when they differ."""
        kinds = {use.treatment for use in self.uses}
        if len(kinds) == 1:
            return kinds.pop()
        return "partly preconditioned" if PRECONDITIONED in kinds else PLAIN


@dataclasses.dataclass(frozen=True)
class Coverage:
    """The report of one maker on one model (``gm.coverage()``): per parameter, then a one-line summary."""

    method: str
    parameters: Tuple[ParameterCoverage, ...]

    def counts(self) -> Dict[str, Tuple[int, int]]:
        """treatment -> (parameters, elements)."""
        out: Dict[str, Tuple[int, int]] = {}
        for p in self.parameters:
            n, e = out.get(p.treatment, (0, 0))
            out[p.treatment] = (n + 1, e + p.numel)
        return out

    def summary(self) -> str:
        """``"K-FAC: preconditioned 8 parameters (98.1% of 61,706 elements); plain gradient 2 (1.9%: ...)"``."""
        total = sum(p.numel for p in self.parameters) or 1
        parts = []
        for kind, (n, e) in sorted(self.counts().items(), key=lambda kv: -kv[1][1]):
            reasons = sorted({u.detail for p in self.parameters if p.treatment == kind for u in p.uses
                              if u.treatment != PRECONDITIONED})
            why = f": {'; '.join(reasons)}" if reasons and kind != PRECONDITIONED else ""
            parts.append(f"{kind} {n} parameter{'s' * (n != 1)} ({100 * e / total:.1f}% of the elements{why})")
        return f"{self.method} on {sum(p.numel for p in self.parameters):,} elements: " + "; ".join(parts)

    def as_dict(self) -> Dict[str, Any]:
        """JSON-ready: the summary line and every parameter with its uses."""
        return {"method": self.method, "summary": self.summary(),
                "counts": {k: {"parameters": n, "elements": e} for k, (n, e) in self.counts().items()},
                "parameters": [{"name": p.name, "numel": p.numel, "treatment": p.treatment,
                                "uses": [dataclasses.asdict(u) for u in p.uses],
                                "shared_with": list(p.shared_with)} for p in self.parameters]}


def model_coverage(model: nn.Module, method: str, blocks: Sequence[Tuple[str, nn.Module]],
                   describe: Callable[[str, nn.Module], str], user_rules: Optional[Sequence[Any]],
                   not_covered: str, reasons: Optional[Dict[int, str]] = None) -> Coverage:
    """The report for ``model`` when ``blocks`` are the modules ``method`` preconditions (``describe``
    says how, per block) and ``user_rules`` the user's ``ignore_modules``; ``not_covered`` ends the reason
    given for any other module holding a trainable parameter (e.g. "has no K-FAC curvature"), ``reasons`` (by
    module id) the reason for a module the method found it cannot precondition while stepping."""
    blocks = [(name.replace("/", "."), m) for name, m in blocks]  # ASDL's curvature names use "/"
    block_ids = {id(m): name for name, m in blocks}
    modules = {id(m) for m in model.modules()}
    # Blocks standing in for a module's own parameters (the q, k, v projections of torch's attention)
    proxies = [(name, m) for name, m in blocks if id(m) not in modules]
    names: Dict[int, List[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    uses: Dict[int, List[Use]] = {}
    params: Dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        for param in own:
            params[id(param)] = param
            stand_ins = [(n, m) for n, m in proxies if n.startswith(f"{module_name}.")]
            if stand_ins and param.requires_grad:
                detail = f"{describe(*stand_ins[0])}, through {', '.join(n for n, _ in stand_ins)}"
                uses.setdefault(id(param), []).append(Use(module_name, PRECONDITIONED, detail))
                continue
            uses.setdefault(id(param), []).append(_use(module_name, module, param, own, block_ids, describe,
                                                       user_rules, method, not_covered, reasons or {}))
    report = tuple(ParameterCoverage(names[i][0], params[i].numel(), tuple(u), tuple(names[i][1:]))
                   for i, u in uses.items())
    return Coverage(method, report)


def _use(module_name: str, module: nn.Module, param: nn.Parameter, own: List[nn.Parameter],
         block_ids: Dict[int, str], describe: Callable[[str, nn.Module], str], user_rules: Optional[Sequence[Any]],
         method: str, not_covered: str, reasons: Dict[int, str]) -> Use:
    kind = module.__class__.__name__
    if not param.requires_grad:
        return Use(module_name, FROZEN, "requires_grad=False")
    if id(module) in block_ids:
        return Use(module_name, PRECONDITIONED, describe(module_name, module))
    if id(module) in reasons:
        return Use(module_name, PLAIN, f"{kind} {reasons[id(module)]}")
    if user_ignores(module_name, module, user_rules):
        return Use(module_name, IGNORED, f"{kind} in ignore_modules")
    if next(module.children(), None) is not None:
        return Use(module_name, PLAIN, f"{kind} holds it directly (not a layer {method} knows)")
    if not all(p.requires_grad for p in own):
        return Use(module_name, PLAIN, f"{kind} partially frozen")
    return Use(module_name, PLAIN, f"{kind} {not_covered}")


def kron_description(method: str, module: nn.Module, matrix: Any) -> str:
    """How a Kronecker-curvature method (K-FAC, FOP) preconditions ``module``, whose ASDL matrix is
    ``matrix`` (None before its first curvature step)."""
    kron, unit = getattr(matrix, "kron", None), getattr(matrix, "unit", None)
    kind = module.__class__.__name__
    if kron is not None and kron.A is not None and kron.B is not None:
        return f"{method}, {kind}: Kronecker factors A {_factor_shape(kron.A)}, B {_factor_shape(kron.B)}"
    if unit is not None:
        return f"{method}, {kind}: unit-wise 2x2 per channel"
    return f"{method}, {kind}: its curvature forms on the first curvature step"


def _factor_shape(factor: Any) -> str:
    """A Kronecker factor's shape, with its kind where it is not a matrix (:mod:`fop_asdl.curvature.factors`):
    an Embedding's diagonal, a grouped convolution's stack, one matrix per group."""
    return f"{tuple(factor.shape)}" + {1: " diagonal", 3: " per group"}.get(factor.dim(), "")
