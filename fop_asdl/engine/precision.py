"""The dtypes a maker computes in, from its blocks' parameters and the options ``factor_dtype`` and
``inverse_dtype`` (kfac-pytorch's names).

bf16/fp16 weights would make every sum, factor and solve half precision: torch has no half-precision
Cholesky (on CPU), and 8 or 11 bits lose the curvature's small eigenvalues that damping is meant to keep.
So blocks with such weights form their sums, curvature, inverses and the method's scalars in float32 and
only the result written to ``p.grad`` takes the parameter's dtype; float32 and float64 models compute in
their own dtype, as before.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..compat import LOW_PRECISION, compute_dtype

__all__ = ["Precision", "block_precision", "check_grad_scaler", "refuse_low_precision"]

#: What torch's solvers (Cholesky, eigh, LU, triangular solves) take on every device.
SOLVER_DTYPES = (torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Precision:
    """compute: the per-sub-batch sums and the method's scalars; factor: the curvature (Kronecker factors,
    Grams, kept rows); inverse: the inverses and solves; low: whether some block's weights are bf16/fp16."""

    compute: torch.dtype
    factor: torch.dtype
    inverse: torch.dtype
    low: bool

    @property
    def widest(self) -> torch.dtype:
        """The dtype of buffers that carry any of them between ranks."""
        return torch.promote_types(torch.promote_types(self.compute, self.factor), self.inverse)


def block_precision(blocks: Sequence[Tuple[str, nn.Module]], label: str, factor_dtype: Optional[torch.dtype] = None,
                    inverse_dtype: Optional[torch.dtype] = None) -> Precision:
    """The precision of a maker over ``blocks`` (name, module); a block parameter that is not a real
    floating-point tensor, or a factor or inverse dtype the solvers do not take, is refused with the fix."""
    dtypes = []
    for name, module in blocks:
        for what, param in (("weight", module.weight), ("bias", getattr(module, "bias", None))):
            if param is None:
                continue
            if not param.is_floating_point():
                raise TypeError(f"{label}: block {name!r} ({type(module).__name__}) has a {param.dtype} {what}; "
                                f"its curvature needs real floating-point parameters (float16, bfloat16, float32 "
                                f"or float64). Convert the module (e.g. module.float()) or list it in "
                                f"PreconditioningConfig.ignore_modules.")
            dtypes.append(param.dtype)
    compute = torch.float32
    for dtype in dtypes:
        compute = torch.promote_types(compute, compute_dtype(dtype))
    factor = _solver_dtype("factor_dtype", factor_dtype, label) or compute
    inverse = _solver_dtype("inverse_dtype", inverse_dtype, label) or factor
    return Precision(compute, factor, inverse, any(d in LOW_PRECISION for d in dtypes))


def _solver_dtype(option: str, dtype: Optional[torch.dtype], label: str) -> Optional[torch.dtype]:
    if dtype is None or dtype in SOLVER_DTYPES:
        return dtype
    why = ("torch has no half-precision Cholesky or eigendecomposition, and 8 or 11 bits lose the small "
           "eigenvalues the damping keeps" if dtype in LOW_PRECISION else "it is not a real floating-point dtype")
    raise TypeError(f"{label}: {option}={dtype} is not supported: the inverse is taken from the curvature and "
                    f"{why}. Use torch.float32 (the default for bf16/fp16 weights) or torch.float64, or leave "
                    f"it None (the parameters' dtype).")


def refuse_low_precision(precision: Precision, label: str, why: str) -> None:
    """A TypeError for a maker that cannot run on bf16/fp16 weights; ``why`` says why and what to use."""
    if precision.low:
        raise TypeError(f"{label} does not take bfloat16/float16 weights: {why}")


def check_grad_scaler(model: nn.Module, grad_scaler: Optional[torch.amp.GradScaler]) -> None:
    """torch's GradScaler refuses to unscale float16 gradients, so a scaled step of float16 weights could only
    end in ``scaler.step``; refuse it when the maker is built, with what works instead."""
    if grad_scaler is not None and grad_scaler.is_enabled() and any(
            p.requires_grad and p.dtype == torch.float16 for p in model.parameters()):
        raise TypeError("grad_scaler with float16 weights: torch's GradScaler does not unscale float16 gradients "
                        "(scaler.step raises 'Attempting to unscale FP16 gradients'). Keep float32 weights and run "
                        "the step under torch.autocast(dtype=torch.float16) with the scaler, or use bfloat16 "
                        "weights, which need no scaler.")
