"""The patches ASDL 0.1a5 and torch need, each with the reason it exists; nothing else lives here.

Importing this module applies them once (nothing in site-packages is edited). The fixes that are code of
the package's own live beside what they fix: robust inverses in :mod:`fop_asdl.curvature.inverses`, the
curvature state in :mod:`fop_asdl.curvature.state`, ASDL's K-FAC with its fixes in
:mod:`fop_asdl.curvature.asdl_kfac`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator, List, Optional

import asdl
import asdl.core as _asdl_core
import asdl.operations.operation as _asdl_operation
import asdl.precondition.natural_gradient as _asdl_ng
import asdl.utils as _asdl_utils
import torch
from asdl.matrices import SHAPE_KRON, SHAPE_SWIFT_KRON, SHAPE_UNIT_WISE
from asdl.symmatrix import Kron
from torch import nn

from .curvature import factors as _factors, layer_ops as _layer_ops

__all__ = ["LOW_PRECISION", "compute_dtype", "factor_precision", "full_precision", "kept_requires_grad",
           "quiet_asdl_hooks"]

# --- Fix 1: NVTX ----------------------------------------------------------------------------------
# On a CPU-only PyTorch build torch.cuda.nvtx.range raises "NVTX functions not installed", and ASDL
# enters such ranges in update_preconditioner (once ema_decay is set) and when computing factors.
class _NoNvtx:
    """Stand-in for ``torch.cuda.nvtx``: profiling ranges that do nothing."""

    @staticmethod
    def range(msg: str, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _nvtx_works() -> bool:
    try:
        with torch.cuda.nvtx.range("fop_asdl-probe"):
            pass
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable here"
        return False


def _patch_nvtx() -> None:
    if _nvtx_works():
        return
    for module in (_asdl_ng, _asdl_operation, _asdl_utils):
        module.nvtx = _NoNvtx
    # These methods were wrapped by ``@nvtx.range(...)`` at import time; restore the plain functions.
    for name in ("reduce_scatter_curvature", "reduce_scatter_grad", "all_gather_or_reduce_grad",
                 "all_reduce_all_grad"):
        method = getattr(_asdl_ng.NaturalGradientMaker, name)
        setattr(_asdl_ng.NaturalGradientMaker, name, getattr(method, "__wrapped__", method))


_patch_nvtx()


# --- Fix 14: torch.distributed.nn's default group ----------------------------------------------------
# torch.distributed.nn.functional binds ``group.WORLD`` into default arguments when it is imported, and the
# first torch.optim optimizer of a process imports it (through torch._dynamo). Imported after
# init_process_group, it keeps the group, and gloo's threads, alive past destroy_process_group into the
# interpreter's exit, where a gloo thread can abort the rank (fop_asdl.distributed.group). Imported here,
# before any group exists, it binds None.
if torch.distributed.is_available():
    import torch.distributed.nn  # noqa: F401


# --- Fix 2: SKFAC factors ------------------------------------------------------------------------------
# With swift=True and fewer rows than features, ASDL returns the layer's own input (or output gradient)
# as the factor and then scales it in place, corrupting a tensor autograd saved for the backward pass.
def _patch_swift_factors() -> None:
    from asdl.operations.conv import Conv2d as _Conv2dOp
    from asdl.operations.linear import Linear as _LinearOp

    for op in (_LinearOp, _Conv2dOp):
        for name in ("cov_swift_kron_A", "cov_swift_kron_B"):
            original = getattr(op, name).__func__
            if getattr(original, "_fop_asdl_copies", False):
                continue

            def copying(cls, module, data, _original=original):
                factor = _original(cls, module, data)
                return factor.clone() if factor is data else factor

            copying._fop_asdl_copies = True
            setattr(op, name, classmethod(copying))


_patch_swift_factors()


# --- Fix 2b: curvature under autocast and with low-precision weights --------------------------------
# Under torch.autocast ASDL's hooks see bf16/fp16 activations and output gradients, and autocast (which
# stays on in CPU backward hooks) turns their factor products into half-precision matmuls: factors and
# inverses would lose their precision. With bf16/fp16 weights the hooks see half-precision tensors anyway,
# and torch has no half-precision Cholesky. The hooks run in the factor dtype instead: the maker's
# ``factor_dtype`` inside :func:`factor_precision`, else the parameters' (float32 for bf16/fp16 weights).
LOW_PRECISION = (torch.float16, torch.bfloat16)
#: The factor dtype of the ASDL pass running now. A module global, not a ContextVar: on a GPU, autograd runs
#: the backward hooks in its own device threads, which see no context of the caller.
_factor_dtype: List[Optional[torch.dtype]] = [None]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What a parameter's sums and curvature are computed in: float32 for bf16/fp16, else its own dtype."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


@contextlib.contextmanager
def full_precision(device_type: str):
    """Autocast off for the block: curvature, inverses and the FOP scalars stay in the parameters' dtype."""
    with torch.autocast(device_type, enabled=False):
        yield


@contextlib.contextmanager
def factor_precision(dtype: torch.dtype) -> Iterator[None]:
    """ASDL's curvature hooks compute their factors in ``dtype`` during the block."""
    saved, _factor_dtype[0] = _factor_dtype[0], dtype
    try:
        yield
    finally:
        _factor_dtype[0] = saved


def _patch_hooks_precision(op_class: type) -> None:
    for name in ("forward_post_process", "backward_pre_process"):
        original = vars(op_class)[name]
        if getattr(original, "_fop_asdl_full_precision", False):
            continue

        def in_full_precision(self, tensor, *args, _original=original, **kwargs):
            weight = getattr(self._module, "weight", None)
            dtype = _factor_dtype[0] or compute_dtype(tensor.dtype if weight is None else weight.dtype)
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            with full_precision(tensor.device.type):
                return _original(self, tensor, *args, **kwargs)

        in_full_precision._fop_asdl_full_precision = True
        setattr(op_class, name, in_full_precision)


# ASDL's operations, and the package's Embedding operation (fix 12), which overrides both hooks
_patch_hooks_precision(_asdl_operation.Operation)
_patch_hooks_precision(_layer_ops.Embedding)


@contextlib.contextmanager
def kept_requires_grad(model: nn.Module):
    """ASDL's Fisher loop switches requires_grad off and back on without try/finally: an error inside it
    would leave the whole model frozen. Restore every flag on the way out."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


#: ASDL's layer types and those the package adds (Fix 12): Conv1d, ConvTranspose2d, GroupNorm.
_ASDL_CLASSES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm,
                 nn.GroupNorm, nn.Embedding)


# --- Fix 4: ASDL rejects subclasses of its layer types by their class name ------------------------
def _patch_class_name_check() -> None:
    """``NaturalGradientMaker.computational_cost`` asserts ``str(module)`` starts with a supported class
    name, so any Linear subclass (``out_proj`` is a ``NonDynamicallyQuantizableLinear``) fails the maker's
    constructor; check the type instead. The cost itself is ASDL's (numel ** 0.3)."""
    if getattr(_asdl_ng.NaturalGradientMaker.computational_cost, "_fop_asdl_isinstance", False):
        return

    def computational_cost(self, shape, module: nn.Module) -> float:
        if not isinstance(module, _ASDL_CLASSES):
            raise TypeError(f"ASDL has no curvature for {type(module).__name__}; list it in "
                            f"PreconditioningConfig.ignore_modules.")
        if not self.is_module_for_inv_and_precondition(module):
            return 0
        return module.weight.numel() ** 0.3

    computational_cost._fop_asdl_isinstance = True
    _asdl_ng.NaturalGradientMaker.computational_cost = computational_cost


_patch_class_name_check()


@contextlib.contextmanager
def quiet_asdl_hooks() -> Iterator[None]:
    """ASDL 0.1a5 registers non-full module backward hooks, so torch warns (FutureWarning) on every curvature
    pass that they are deprecated: the user can do nothing about it. Silenced around ASDL's passes only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using a non-full backward hook", category=FutureWarning)
        yield


# --- Fix 12: more layer types -----------------------------------------------------------------------
# ASDL 0.1a5 has no operation for Conv1d, ConvTranspose2d or GroupNorm, a Conv2d operation that refuses
# dilation and ignores groups and the padding mode, and an Embedding operation with wrong factors
# (fop_asdl/curvature/layer_ops.py says what and why). Its operation lookup, its lists of supported layers
# and K-FAC's shapes (GroupNorm unit-wise, as BatchNorm and LayerNorm) take the package's operations for
# these layers. A ConvTranspose2d's gradient must be turned into the layout its factors act on, which ASDL's
# own preconditioning does not do: it is a block of the package's makers only (their _supported_classes).
def _patch_layer_types() -> None:
    original = _asdl_core.get_op_class
    if getattr(original, "_fop_asdl_layers", False):
        return

    def get_op_class(module: nn.Module):
        return _layer_ops.op_class(module) or original(module)

    get_op_class._fop_asdl_layers = True
    _asdl_core.get_op_class = get_op_class
    extra = (nn.Conv1d, nn.GroupNorm)
    _asdl_core._supported_module_classes = tuple(_asdl_core._supported_module_classes) + extra + (nn.ConvTranspose2d,)
    _asdl_ng.NaturalGradientMaker._supported_classes = tuple(_asdl_ng.NaturalGradientMaker._supported_classes) + extra

    def kfac_init(self, model, config, fisher_type=_asdl_ng.FISHER_MC, loss_type=_asdl_ng.LOSS_CROSS_ENTROPY,
                  scale=1, grad_scale=1, n_mc_samples=1, var=1., seed=None, swift=False):
        fisher_shape = [SHAPE_SWIFT_KRON if swift else SHAPE_KRON, (nn.BatchNorm1d, SHAPE_UNIT_WISE),
                        (nn.BatchNorm2d, SHAPE_UNIT_WISE), (nn.LayerNorm, SHAPE_UNIT_WISE),
                        (nn.GroupNorm, SHAPE_UNIT_WISE)]
        _asdl_ng.NaturalGradientMaker.__init__(self, model, config, fisher_type=fisher_type, fisher_shape=fisher_shape,
                                               loss_type=loss_type, scale=scale, grad_scale=grad_scale,
                                               n_mc_samples=n_mc_samples, var=var, seed=seed)

    asdl.KfacGradientMaker.__init__ = kfac_init


_patch_layer_types()


# --- Fix 13: diagonal and per-group Kronecker factors ------------------------------------------------
# An Embedding's token-count factor is diagonal (stored as a vector) and a grouped convolution has one
# factor pair per group (stacked): ASDL's Kron inverts and multiplies dense 2-D factors only. Those kinds
# go to fop_asdl/curvature/factors.py; dense factors stay with ASDL's own code.
def _patch_kron_kinds() -> None:
    original_inv, original_mvp = Kron.update_inv, Kron.mvp
    if getattr(original_inv, "_fop_asdl_kinds", False):
        return

    def plain(kron: Kron, a, b) -> bool:
        return all(t is None or _factors.is_plain(t) for t in (a, b))

    def update_inv(self, damping=1e-7, calc_A_inv=True, calc_B_inv=True, eps=1e-7, replace=False):
        if plain(self, self.A, self.B):
            return original_inv(self, damping, calc_A_inv, calc_B_inv, eps, replace)
        d_a, d_b = _factors.pi_damping(self.A, self.B, damping, eps)
        for name, d, wanted in (("A", d_a, calc_A_inv), ("B", d_b, calc_B_inv)):
            factor = getattr(self, name)
            if wanted and not torch.all(factor == 0):  # as ASDL: no inverse of an all-zero factor
                inverse, usable = _factors.damped_inverse(factor, d)
                if not bool(usable):  # as ASDL's Cholesky: an indefinite factor raises
                    raise torch.linalg.LinAlgError(f"the damped {name} factor is not positive definite")
                setattr(self, name + "_inv", inverse)
                if replace:
                    setattr(self, name, None)

    def mvp(self, vec_weight, vec_bias=None, use_inv=False, inplace=False):
        a, b = (self.A_inv, self.B_inv) if use_inv else (self.A, self.B)
        if plain(self, a, b):
            return original_mvp(self, vec_weight, vec_bias, use_inv, inplace)
        w = vec_weight.reshape(1, vec_weight.shape[0], -1)
        mvp_w = _factors.left(b, _factors.right(w, a)).view_as(vec_weight)
        if inplace:
            vec_weight.copy_(mvp_w)
        if vec_bias is None:
            return mvp_w
        mvp_b = _factors.left(b, vec_bias.reshape(1, -1, 1)).view_as(vec_bias)
        if inplace:
            vec_bias.copy_(mvp_b)
        return mvp_w, mvp_b

    update_inv._fop_asdl_kinds = True
    Kron.update_inv, Kron.mvp = update_inv, mvp


_patch_kron_kinds()
