"""ASDL's own K-FAC with the package's fixes (``fop_asdl.KfacGradientMaker``): full state_dict, robust
inverses, ``data_size`` from the batch, full precision under autocast. Single process, weights in float32 or
float64; the switch's ``"kfac"`` is K-FAC on the package's step (:mod:`fop_asdl.methods.kfac`)."""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import asdl
import torch
from torch import nn

from ..compat import full_precision, kept_requires_grad, quiet_asdl_hooks
from ..engine.attention import attention_blocks
from ..engine.precision import block_precision, refuse_low_precision
from ..engine.setup import batch_size_of, reject_ddp
from .inverses import invert_all
from .state import curvature_from_dict, curvature_to_dict

__all__ = ["KfacGradientMaker", "UNSET", "resolve_data_size"]

UNSET = -1  # ASDL's marker for "not set" (data_size, ema_decay)


class KfacGradientMaker(asdl.KfacGradientMaker):
    """ASDL's K-FAC with the fixes above: full state_dict, robust inverses, data_size from the batch.

    ASDL requires ``config.data_size``; when it is left unset (-1) the batch size of each step is used,
    which is what a mean loss means. ASDL preconditions ``p.grad`` in its own code, in the parameters'
    dtype, so bf16/fp16 weights and the options ``factor_dtype``, ``inverse_dtype`` (which subclasses on the
    package's step take: :class:`~fop_asdl.curvature.kron_step.CurvatureStepMaker`) are refused here.
    """

    method_label = "fop_asdl.KfacGradientMaker (ASDL's own K-FAC)"

    #: ASDL's own distributed path cannot run here; subclasses with a sharded path of their own say False.
    single_process_only = True

    def __init__(self, model: nn.Module, config: asdl.PreconditioningConfig, *args: Any,
                 factor_dtype: Optional[torch.dtype] = None, inverse_dtype: Optional[torch.dtype] = None,
                 **kwargs: Any):
        reject_ddp(model)
        if self.single_process_only:
            reject_multi_process()
        with attention_blocks(self, model):  # attention projections as blocks (fop_asdl.engine.attention)
            super().__init__(model, config, *args, **kwargs)
        self._fallback_warned: set = set()
        #: The dtypes of the sums, the curvature and the inverses (:mod:`fop_asdl.engine.precision`).
        self.precision = block_precision(self.named_modules_for_curvature, self.method_label, factor_dtype,
                                         inverse_dtype)
        if self.single_process_only:
            use = "make_gradient_maker('kfac', model, config) does (float32 curvature and inverses)."
            refuse_low_precision(self.precision, self.method_label,
                                 f"ASDL preconditions p.grad in its own code, in the parameters' dtype; {use}")
            if factor_dtype is not None or inverse_dtype is not None:
                raise TypeError(f"{self.method_label} takes no factor_dtype or inverse_dtype: ASDL preconditions "
                                f"p.grad in the parameters' dtype; {use}")

    # ASDL reads config.data_size in update_curvature; resolve it per step without touching the user's config.
    def update_curvature(self) -> None:
        user_config = self.config
        batch_size = batch_size_of(self._model_args, self._model_kwargs)
        self.config = dataclasses.replace(user_config, data_size=resolve_data_size(user_config, batch_size))
        try:
            with kept_requires_grad(self.model), quiet_asdl_hooks():
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
        """Every block's robust inverse, with one host sync for all of them (:func:`invert_all`)."""
        with full_precision(self.device.type):
            named = [(name, getattr(module, self._fisher_attr, None)) for name, module in
                     self.named_modules_for_curvature]
            invert_all([(name, matrix) for name, matrix in named if matrix is not None], self.config.damping,
                       self._fallback_warned, self.precision.inverse)

    def precondition(self, *args: Any, **kwargs: Any) -> None:
        with full_precision(self.device.type):  # the gradients are fp32; so stays F̃⁻¹ g under autocast
            super().precondition(*args, **kwargs)

    def state_dict(self) -> Dict[str, Any]:
        curvature = {}
        for name, module in self.named_modules_for_curvature:
            matrix = getattr(module, self._fisher_attr, None)
            if matrix is not None:
                curvature[name] = curvature_to_dict(matrix)
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
                setattr(module, self._fisher_attr, curvature_from_dict(tensors, self.device, self.precision.factor,
                                                                       self.precision.inverse))
        self.state["step"] = int(state_dict["step"])
        self._fallback_warned = set(state_dict.get("fallback_warned", ()))


def reject_multi_process() -> None:
    """ASDL 0.1a5's own distributed path needs CUDA/NCCL and mixes raw and preconditioned gradients; until
    the sharded path exists, refuse to run per rank without any synchronisation."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise NotImplementedError("torch.distributed is initialised with more than one rank, but this version "
                                  "of fop_asdl trains in a single process; run one process per job.")


def resolve_data_size(config: asdl.PreconditioningConfig, batch_size: int) -> int:
    """``config.data_size`` when set, otherwise the step's batch size."""
    return batch_size if config.data_size == UNSET else config.data_size
