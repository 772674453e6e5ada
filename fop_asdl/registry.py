"""One name per gradient maker, so a training loop swaps FOP, K-FAC, FNGD, HyLo and SGD by changing a string."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import asdl
import torch
from torch import nn

from .methods import diag_ng, kbfgs, kron_psgd, seng, smw_ng
from .methods.fngd import FNGDGradientMaker
from .methods.fop import FOPGradientMaker
from .methods.hylo import HyLoGradientMaker
from .methods.kfac import ScalableKfacGradientMaker
from .methods.sgd import PlainGradientMaker

__all__ = ["GRADIENT_MAKERS", "make_gradient_maker"]


def _sgd(model: nn.Module, config: Optional[asdl.PreconditioningConfig], micro_batch_size: Optional[int] = None,
         grad_scaler: Optional[torch.amp.GradScaler] = None, **kwargs: Any) -> asdl.GradientMaker:
    if kwargs:
        raise TypeError(f"the 'sgd' gradient maker takes only micro_batch_size and grad_scaler, got {sorted(kwargs)}.")
    return PlainGradientMaker(model, micro_batch_size=micro_batch_size, grad_scaler=grad_scaler)


def _fop(model: nn.Module, config: Optional[asdl.PreconditioningConfig], **kwargs: Any) -> asdl.GradientMaker:
    return FOPGradientMaker(model, config if config is not None else asdl.PreconditioningConfig(), **kwargs)


def _kfac(model: nn.Module, config: Optional[asdl.PreconditioningConfig], **kwargs: Any) -> asdl.GradientMaker:
    """K-FAC on the shared step machinery: ASDL's curvature and inverses, its gradients, with FOP's
    guarantees (a clear ``FloatingPointError`` before ASDL samples from a NaN output, nothing changed by a
    failed step, micro-batches, GradScaler, several ranks, ``kl_clip``). ASDL's own path with only the
    compat fixes stays available as ``fop_asdl.KfacGradientMaker``."""
    return ScalableKfacGradientMaker(model, config if config is not None else asdl.PreconditioningConfig(),
                                     **kwargs)


def _fngd(model: nn.Module, config: Optional[asdl.PreconditioningConfig], **kwargs: Any) -> asdl.GradientMaker:
    if "kl_clip" in kwargs:
        raise TypeError("FNGD does not take kl_clip: after its coefficient epochs it reuses stored weights, so "
                        "its step is not F̃⁻¹g for any F̃ of the batch and has no Fisher norm to bound; lower "
                        "the learning rate, or use 'kfac', 'fop' or 'hylo', which take kl_clip.")
    return FNGDGradientMaker(model, config, **kwargs)


def _hylo(model: nn.Module, config: Optional[asdl.PreconditioningConfig], **kwargs: Any) -> asdl.GradientMaker:
    return HyLoGradientMaker(model, config, **kwargs)


GRADIENT_MAKERS: Dict[str, Callable[..., asdl.GradientMaker]] = {
    "fngd": _fngd,
    "fop": _fop,
    "hylo": _hylo,
    "kfac": _kfac,
    "sgd": _sgd,
    "smw_ng": smw_ng.build,
    "seng": seng.build,
    "diag_ng": diag_ng.build,
    "kbfgs": kbfgs.build,
    "kron_psgd": kron_psgd.build,
}


def make_gradient_maker(name: str, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None,
                        **kwargs: Any) -> asdl.GradientMaker:
    """Build the gradient maker called ``name`` ("fop", "kfac", "fngd", "hylo" or "sgd") for ``model``.

    ``config`` defaults to ``asdl.PreconditioningConfig()``; ``kwargs`` go to the maker's constructor
    (FOP: see :class:`FOPGradientMaker`; FNGD: :class:`FNGDGradientMaker`, which needs ``iters_per_epoch``;
    HyLo: :class:`HyLoGradientMaker`; K-FAC: ``asdl.KfacGradientMaker``'s, on the shared step as
    :class:`ScalableKfacGradientMaker`). All of them
    take ``micro_batch_size`` (gradient accumulation inside one step) and ``grad_scaler`` (fp16), and run sharded
    when ``torch.distributed`` is initialised with several ranks; SGD then all-reduces its gradients once per
    step.
    """
    try:
        build = GRADIENT_MAKERS[name]
    except KeyError:
        raise ValueError(f"unknown gradient maker {name!r}; choose one of {sorted(GRADIENT_MAKERS)}.") from None
    return build(model, config, **kwargs)
