"""FOP over EKFAC: FOP's projection, β* and η* (:mod:`fop_asdl.methods.fop`) with EKFAC's curvature
(:mod:`fop_asdl.methods.ekfac`) as the metric and the preconditioner: what
``make_gradient_maker("fop", ..., curvature="ekfac")`` returns (:func:`fop_maker`, the registry's "fop" entry,
picks FOP's curvature).

A Kron block's F is U diag(s) Uᵀ and F̃ = U diag(s + λ) Uᵀ (U = U_B ⊗ U_A, s EKFAC's per-sample
rescaling); unit-wise blocks keep K-FAC's. With ``beta=0, eta=None`` the step is EKFAC's F̃⁻¹ g_avg.
"""
from __future__ import annotations

from typing import Any, Optional, Union

import asdl
from asdl.matrices import FISHER_EMP
from torch import nn

from ..engine.vectors import BlockVector
from .ekfac import EkfacMixin
from .fop import FOPGradientMaker

__all__ = ["FOPEkfacGradientMaker", "fop_maker"]

CURVATURES = ("kfac", "ekfac")


def fop_maker(model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None, curvature: str = "kfac",
              **options: Any) -> Union[FOPGradientMaker, "FOPEkfacGradientMaker"]:
    """FOP on K-FAC's curvature (:class:`FOPGradientMaker`), or with ``curvature="ekfac"`` on EKFAC's
    (:class:`FOPEkfacGradientMaker`); ``options`` go to the maker."""
    if curvature not in CURVATURES:
        raise ValueError(f"FOP's curvature must be 'kfac' or 'ekfac', got {curvature!r}.")
    maker = FOPEkfacGradientMaker if curvature == "ekfac" else FOPGradientMaker
    return maker(model, config, **options)


class FOPEkfacGradientMaker(EkfacMixin, FOPGradientMaker):
    """FOP (all of :class:`FOPGradientMaker`'s options) on EKFAC's curvature; ``fisher_type`` must be
    ``"fisher_emp"``, as EKFAC's (its rescaling comes from the loss's own per-sample gradients). On several
    ranks the factors and s are sharded per block, the eigenbases replicated, as for EKFAC."""

    method_label = "FOP-EKFAC"

    def __init__(self, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None,
                 fisher_type: str = FISHER_EMP, **kwargs: Any):
        if fisher_type != FISHER_EMP:
            raise ValueError(f"FOP over EKFAC estimates EKFAC's rescaling from the per-sample gradients of the loss "
                             f"the step backpropagates: fisher_type must be 'fisher_emp', got {fisher_type!r}.")
        if kwargs.get("swift"):
            raise TypeError("FOP over EKFAC does not take swift=True: swift factors are not square, so they have "
                            "no eigenbasis.")
        super().__init__(model, config if config is not None else asdl.PreconditioningConfig(),
                         fisher_type=fisher_type, **kwargs)
        self._init_ekfac()

    def _metric(self, name: str, module: nn.Module, matrix, vec: BlockVector, damped: bool) -> BlockVector:
        if name in self._kron:
            return self._kfe_metric(name, vec, damped)
        return super()._metric(name, module, matrix, vec, damped)

    def _invert_all(self) -> None:
        super()._invert_all()  # EKFAC's: the unit-wise blocks only
        self._damping_cache.clear()
