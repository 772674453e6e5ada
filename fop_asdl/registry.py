"""One name per gradient maker, so a training loop swaps FOP, K-FAC and SGD by changing a string."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import asdl
from torch import nn

from .compat import KfacGradientMaker, reject_ddp
from .maker import FOPGradientMaker

__all__ = ["GRADIENT_MAKERS", "make_gradient_maker"]


def _sgd(model: nn.Module, config: Optional[asdl.PreconditioningConfig], **kwargs: Any) -> asdl.GradientMaker:
    if kwargs:
        raise TypeError(f"the 'sgd' gradient maker takes no options, got {sorted(kwargs)}.")
    reject_ddp(model)
    return asdl.GradientMaker(model)


def _preconditioned(cls: type) -> Callable[..., asdl.GradientMaker]:
    def build(model: nn.Module, config: Optional[asdl.PreconditioningConfig], **kwargs: Any):
        return cls(model, config if config is not None else asdl.PreconditioningConfig(), **kwargs)
    return build


GRADIENT_MAKERS: Dict[str, Callable[..., asdl.GradientMaker]] = {
    "fop": _preconditioned(FOPGradientMaker),
    "kfac": _preconditioned(KfacGradientMaker),
    "sgd": _sgd,
}


def make_gradient_maker(name: str, model: nn.Module, config: Optional[asdl.PreconditioningConfig] = None,
                        **kwargs: Any) -> asdl.GradientMaker:
    """Build the gradient maker called ``name`` ("fop", "kfac" or "sgd") for ``model``.

    ``config`` defaults to ``asdl.PreconditioningConfig()``; ``kwargs`` go to the maker's constructor
    (FOP: see :class:`FOPGradientMaker`; K-FAC: ``asdl.KfacGradientMaker``'s; SGD takes none).
    """
    try:
        build = GRADIENT_MAKERS[name]
    except KeyError:
        raise ValueError(f"unknown gradient maker {name!r}; choose one of {sorted(GRADIENT_MAKERS)}.") from None
    return build(model, config, **kwargs)
