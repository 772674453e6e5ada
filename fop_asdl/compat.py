"""The few fixes ASDL 0.1a5 needs, each with the reason it exists.

Importing this module applies the NVTX fix once; :class:`KfacGradientMaker` carries the others.
Nothing in site-packages is edited.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Dict

import asdl
import asdl.operations.operation as _asdl_operation
import asdl.precondition.natural_gradient as _asdl_ng
import asdl.utils as _asdl_utils
import torch
from asdl.symmatrix import Kron, SymMatrix, UnitWise
from torch import nn

from .engine.attention import attention_blocks

__all__ = ["KfacGradientMaker", "eager_module", "robust_update_inv", "kron_damping", "batch_size_of",
           "full_precision"]

_INVALID = -1  # ASDL's marker for "not set" (data_size, ema_decay)


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


# --- Fix 2b: curvature under autocast ---------------------------------------------------------------
# Under torch.autocast ASDL's hooks see bf16/fp16 activations and output gradients, and autocast (which
# stays on in CPU backward hooks) turns their factor products into half-precision matmuls: factors and
# inverses would lose their precision. The hooks run in the parameters' precision instead.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@contextlib.contextmanager
def full_precision(device_type: str):
    """Autocast off for the block: curvature, inverses and the FOP scalars stay in the parameters' dtype."""
    with torch.autocast(device_type, enabled=False):
        yield


def _patch_hooks_precision() -> None:
    op_class = _asdl_operation.Operation
    for name in ("forward_post_process", "backward_pre_process"):
        original = getattr(op_class, name)
        if getattr(original, "_fop_asdl_full_precision", False):
            continue

        def in_full_precision(self, tensor, *args, _original=original, **kwargs):
            dtype = self._module.weight.dtype if getattr(self._module, "weight", None) is not None else torch.float32
            args = tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.dtype in _LOW_PRECISION else a
                         for a in args)
            if tensor.dtype in _LOW_PRECISION:
                tensor = tensor.to(dtype)
            with full_precision(tensor.device.type):
                return _original(self, tensor, *args, **kwargs)

        in_full_precision._fop_asdl_full_precision = True
        setattr(op_class, name, in_full_precision)


_patch_hooks_precision()


# --- Fix 3: inverses of factors that are not positive definite --------------------------------------
# ASDL inverts damped factors with a Cholesky factorisation, which raises on factors that rounding left
# indefinite (seen on a small LayerNorm model at damping 1e-2). An eigendecomposition with an
# eigenvalue floor gives a usable inverse instead of ending the run.
def kron_damping(kron: Kron, damping: float, eps: float = 1e-7) -> tuple[float, float]:
    """The π-split damping (d_A, d_B) that ``asdl.Kron.update_inv`` adds to A and B."""
    a_mean = (kron.A.trace() if kron.A_is_square else torch.sum(kron.A ** 2)) / kron.A_dim
    b_mean = (kron.B.trace() if kron.B_is_square else torch.sum(kron.B ** 2)) / kron.B_dim
    pi = float(torch.sqrt(a_mean / b_mean))
    if pi == 0 or pi == float("inf") or pi != pi:
        return damping, damping
    r = damping ** 0.5
    return max(r * pi, eps), max(r / pi, eps)


def _floored_inverse(mat: torch.Tensor, damping: float) -> torch.Tensor:
    """Inverse of ``mat + damping I`` (batched) with eigenvalues floored to stay positive."""
    sym = 0.5 * (mat + mat.transpose(-1, -2)).double()
    eigvals, eigvecs = torch.linalg.eigh(sym)
    eigvals = eigvals + damping
    floor = torch.clamp(eigvals.abs().amax(dim=-1, keepdim=True) * 1e-6, min=max(damping, 1e-12))
    eigvals = torch.maximum(eigvals, floor)
    inv = (eigvecs / eigvals.unsqueeze(-2)) @ eigvecs.transpose(-1, -2)
    return inv.to(mat.dtype)


def _gram(mat: torch.Tensor) -> torch.Tensor:
    """The covariance a (possibly non-square, SKFAC) factor stands for."""
    return mat if mat.shape[0] == mat.shape[1] else mat.T @ mat


def _inverse_is_usable(matrix: SymMatrix, damping: float) -> bool:
    """Finite inverses of positive definite damped blocks (one host sync, at inverse updates only).

    ASDL's unit-wise inverse (torch.inverse) does not fail on an indefinite 2×2 block, and a negative
    trace makes its π-damping NaN, so success of ``update_inv`` alone proves nothing.
    """
    inverses = [matrix.kron.A_inv, matrix.kron.B_inv] if matrix.has_kron else []
    inverses += [matrix.unit.inv] if matrix.has_unit else []
    if any(inv is None for inv in inverses):  # ASDL leaves the inverse of an all-zero factor unset
        return False
    checks = []
    if matrix.has_kron:
        checks += [torch.isfinite(matrix.kron.A_inv).all(), torch.isfinite(matrix.kron.B_inv).all()]
    if matrix.has_unit:
        eye = torch.eye(2, dtype=matrix.unit.data.dtype, device=matrix.unit.data.device)
        info = torch.linalg.cholesky_ex(matrix.unit.data + damping * eye).info
        checks += [(info == 0).all(), torch.isfinite(matrix.unit.inv).all()]
    return bool(torch.stack(checks).all())


@contextlib.contextmanager
def _diagonals_kept(matrix: SymMatrix):
    """ASDL inverts by adding the damping to a factor's diagonal in place and subtracting it again, which
    moves the diagonal's last bits. The diagonals are put back exactly (an O(n) copy), so the curvature
    after an inversion is bit for bit the one before, and an inverse rebuilt from it is the same."""
    tensors = [t for t in ((matrix.kron.A, matrix.kron.B) if matrix.has_kron else ()) if t is not None
               and t.ndim == 2 and t.shape[0] == t.shape[1]]
    diagonals = [t.diagonal() for t in tensors] + ([matrix.unit.data.diagonal(dim1=1, dim2=2)]
                                                   if matrix.has_unit else [])
    saved = [d.clone() for d in diagonals]
    try:
        yield
    finally:
        for diagonal, original in zip(diagonals, saved):
            diagonal.copy_(original)


def robust_update_inv(matrix: SymMatrix, damping: float, name: str, warned: set) -> None:
    """``matrix.update_inv(damping)`` with an eigenvalue-floor fallback, warning once per block. The
    factors come out bit-identical (:func:`_diagonals_kept`)."""
    try:
        with _diagonals_kept(matrix):
            matrix.update_inv(damping)
        if _inverse_is_usable(matrix, damping):
            return
    except torch.linalg.LinAlgError:
        pass
    if name not in warned:
        warned.add(name)
        warnings.warn(f"fop_asdl: curvature of block '{name}' is not positive definite after damping "
                      f"{damping:g}; using an eigenvalue-floored inverse for it.", RuntimeWarning)
    if matrix.has_kron:
        kron = matrix.kron
        damping_a, damping_b = kron_damping(kron, damping)
        kron.A_inv = _floored_inverse(_gram(kron.A), damping_a)
        kron.B_inv = _floored_inverse(_gram(kron.B), damping_b)
    if matrix.has_unit:
        matrix.unit.inv = _floored_inverse(matrix.unit.data, damping)


# --- Fix 4: state_dict ----------------------------------------------------------------------------
# ASDL's state_dict() keeps only the step counter, so a resumed run restarts with no curvature.
_KRON_KEYS = ("A", "B", "A_inv", "B_inv")
_UNIT_KEYS = ("data", "inv")


def _curvature_to_dict(matrix: SymMatrix) -> Dict[str, torch.Tensor]:
    out = {}
    if matrix.has_kron:
        out.update({f"kron.{k}": getattr(matrix.kron, k) for k in _KRON_KEYS
                    if getattr(matrix.kron, k) is not None})
    if matrix.has_unit:
        out.update({f"unit.{k}": getattr(matrix.unit, k) for k in _UNIT_KEYS
                    if getattr(matrix.unit, k) is not None})
    return {k: v.detach().clone() for k, v in out.items()}


def _curvature_from_dict(tensors: Dict[str, torch.Tensor], device: torch.device) -> SymMatrix:
    get = {k: v.to(device).clone() for k, v in tensors.items()}
    kron = unit = None
    if any(k.startswith("kron.") for k in get):
        kron = Kron(get.get("kron.A"), get.get("kron.B"), get.get("kron.A_inv"), get.get("kron.B_inv"))
    if any(k.startswith("unit.") for k in get):
        unit = UnitWise(get.get("unit.data"), get.get("unit.inv"))
    return SymMatrix(kron=kron, unit=unit)


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


def batch_size_of(args: tuple, kwargs: dict) -> int:
    """Dim 0 of the first tensor among the model-call arguments (ASDL's batch convention)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    raise ValueError("The model call has no tensor argument with a batch dimension; pass the inputs "
                     "to setup_model_call(model, x, ...).")


class KfacGradientMaker(asdl.KfacGradientMaker):
    """ASDL's K-FAC with the fixes above: full state_dict, robust inverses, data_size from the batch.

    ASDL requires ``config.data_size``; when it is left unset (-1) the batch size of each step is used,
    which is what a mean loss means.
    """

    #: ASDL's own distributed path cannot run here; subclasses with a sharded path of their own say False.
    single_process_only = True

    def __init__(self, model: nn.Module, config: asdl.PreconditioningConfig, *args: Any, **kwargs: Any):
        reject_ddp(model)
        if self.single_process_only:
            reject_multi_process()
        with attention_blocks(self, model):  # attention projections as blocks (fop_asdl.engine.attention)
            super().__init__(model, config, *args, **kwargs)
        self._fallback_warned: set = set()

    # ASDL reads config.data_size in update_curvature; resolve it per step without touching the user's config.
    def update_curvature(self) -> None:
        user_config = self.config
        batch_size = batch_size_of(self._model_args, self._model_kwargs)
        self.config = dataclasses.replace(user_config, data_size=resolve_data_size(user_config, batch_size))
        try:
            with kept_requires_grad(self.model):
                if self.do_accumulate:
                    super().update_curvature()
                else:
                    # ASDL inverts inside the pass with a bare Cholesky; keep the factors, invert robustly.
                    self.delegate_forward_and_backward(self.fisher_maker, data_size=self.config.data_size,
                                                       scale=self.scale, accumulate=False, calc_loss_grad=True,
                                                       calc_inv=False)
                    self._invert_all()
        finally:
            self.config = user_config

    def update_preconditioner(self, *args: Any, **kwargs: Any) -> None:
        if self.do_accumulate:
            self._invert_all()

    def _invert_all(self) -> None:
        with full_precision(self.device.type):
            for name, module in self.named_modules_for_curvature:
                matrix = getattr(module, self._fisher_attr, None)
                if matrix is not None:
                    robust_update_inv(matrix, self.config.damping, name, self._fallback_warned)

    def precondition(self, *args: Any, **kwargs: Any) -> None:
        with full_precision(self.device.type):  # the gradients are fp32; so stays F̃⁻¹ g under autocast
            super().precondition(*args, **kwargs)

    def state_dict(self) -> Dict[str, Any]:
        curvature = {}
        for name, module in self.named_modules_for_curvature:
            matrix = getattr(module, self._fisher_attr, None)
            if matrix is not None:
                curvature[name] = _curvature_to_dict(matrix)
        return {"step": self.state["step"], "curvature": curvature,
                "fallback_warned": sorted(self._fallback_warned)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        modules = dict(self.named_modules_for_curvature)
        unknown = set(state_dict.get("curvature", {})) - set(modules)
        if unknown:
            raise KeyError(f"state_dict has curvature for blocks this model does not have: {sorted(unknown)}")
        for name, module in modules.items():
            tensors = state_dict.get("curvature", {}).get(name)
            if tensors is None:
                if hasattr(module, self._fisher_attr):
                    delattr(module, self._fisher_attr)
            else:
                setattr(module, self._fisher_attr, _curvature_from_dict(tensors, self.device))
        self.state["step"] = int(state_dict["step"])
        self._fallback_warned = set(state_dict.get("fallback_warned", ()))


def reject_ddp(model: nn.Module) -> None:
    """ASDL's makers need the bare module: DDP would all-reduce raw gradients behind their back."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        raise TypeError("The model is wrapped in DistributedDataParallel, which would all-reduce raw "
                        "gradients behind the gradient maker. Pass the bare model (model.module); this "
                        "version trains in one process (a sharded torchrun path is planned).")


def eager_module(model: Any, warn: bool = True) -> Any:
    """The eager module inside a ``torch.compile``d one (``model._orig_mod``, the same parameters), else
    ``model``. The per-layer hooks of the step machinery (frozen weights during a block's forward, hooks on its
    output) cannot run inside a compiled graph, so its steps run the model eagerly: the same gradients."""
    if type(model).__name__ != "OptimizedModule" or not isinstance(getattr(model, "_orig_mod", None), nn.Module):
        return model
    if warn:
        warnings.warn("fop_asdl: the gradient maker runs this torch.compile'd model's eager module "
                      "(model._orig_mod, the same parameters): its per-layer hooks cannot run inside a compiled "
                      "graph. The gradients are the eager model's; compilation speeds up nothing here.",
                      UserWarning)
    return model._orig_mod


def reject_multi_process() -> None:
    """ASDL 0.1a5's own distributed path needs CUDA/NCCL and mixes raw and preconditioned gradients; until
    the sharded path exists, refuse to run per rank without any synchronisation."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise NotImplementedError("torch.distributed is initialised with more than one rank, but this version "
                                  "of fop_asdl trains in a single process; run one process per job.")


def resolve_data_size(config: asdl.PreconditioningConfig, batch_size: int) -> int:
    """``config.data_size`` when set, otherwise the step's batch size."""
    return batch_size if config.data_size == _INVALID else config.data_size

