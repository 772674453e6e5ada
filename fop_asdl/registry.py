"""One name per gradient maker, so a training loop swaps FOP, K-FAC, EKFAC, Shampoo, FNGD, HyLo, SGD and ASDL's other
preconditioners by changing a string."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import asdl
from torch import nn

from .methods.diag_ng import DiagNgGradientMaker
from .methods.ekfac import EkfacGradientMaker
from .methods.fngd import FNGDGradientMaker
from .methods.fop_ekfac import fop_maker
from .methods.hylo import HyLoGradientMaker
from .methods.kbfgs import KronBfgsGradientMaker
from .methods.kfac import ScalableKfacGradientMaker
from .methods.kron_psgd import KronPsgdGradientMaker
from .methods.seng import SengGradientMaker
from .methods.sgd import PlainGradientMaker
from .methods.shampoo import ShampooGradientMaker
from .methods.smw_ng import SmwNgGradientMaker

__all__ = ["GRADIENT_MAKERS", "make_gradient_maker"]


#: name -> maker class (FOP's: a factory picking its curvature); each takes (model, config=None, **its options).
#: Adding a method is one line here.
GRADIENT_MAKERS: Dict[str, Callable[..., asdl.GradientMaker]] = {
    "fngd": FNGDGradientMaker,
    "fop": fop_maker,  # FOPGradientMaker, or FOPEkfacGradientMaker with curvature="ekfac"
    "hylo": HyLoGradientMaker,
    "kfac": ScalableKfacGradientMaker,
    "sgd": PlainGradientMaker,
    "diag_ng": DiagNgGradientMaker,
    "kbfgs": KronBfgsGradientMaker,
    "kron_psgd": KronPsgdGradientMaker,
    "seng": SengGradientMaker,
    "smw_ng": SmwNgGradientMaker,
    "ekfac": EkfacGradientMaker,
    "shampoo": ShampooGradientMaker,
}


def make_gradient_maker(name: str, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None,
                        **kwargs: Any) -> asdl.GradientMaker:
    """Build the gradient maker called ``name`` (a key of :data:`GRADIENT_MAKERS`: "fop", "kfac", "ekfac",
    "shampoo", "fngd", "hylo", "sgd", ...) for ``model``.

    ``config`` defaults to ``asdl.PreconditioningConfig()``; ``kwargs`` go to the maker's constructor
    (FOP: see :class:`FOPGradientMaker`, and ``curvature="ekfac"`` for :class:`FOPEkfacGradientMaker`; EKFAC:
    :class:`EkfacGradientMaker`; Shampoo: :class:`ShampooGradientMaker`; FNGD: :class:`FNGDGradientMaker`,
    which needs ``iters_per_epoch``; HyLo: :class:`HyLoGradientMaker`; K-FAC: ``asdl.KfacGradientMaker``'s, on
    the shared step as :class:`ScalableKfacGradientMaker`). All of them take ``micro_batch_size`` (gradient
    accumulation inside one step) and ``grad_scaler`` (fp16), and run sharded when ``torch.distributed`` is
    initialised with several ranks; SGD then all-reduces its gradients once per step. bf16/fp16 weights work
    with every method but "kbfgs" (float32 internals, ``p.grad`` in the weights' dtype); "kfac", "fop", "fngd"
    and "hylo" take ``factor_dtype`` and ``inverse_dtype``.
    """
    try:
        build = GRADIENT_MAKERS[name]
    except KeyError:
        raise ValueError(f"unknown gradient maker {name!r}; choose one of {sorted(GRADIENT_MAKERS)}.") from None
    return build(model, config, **kwargs)
