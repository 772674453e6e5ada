"""The runner's methods, and the hyperparameters each one reads: the ones its search space may vary.

Adding a method is one entry in :data:`METHODS` (and in :data:`PRECONDITIONED` if its maker takes an
``asdl.PreconditioningConfig``); its searchable hyperparameters follow from those two.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

__all__ = ["METHODS", "PRECONDITIONED", "HYPERPARAMETERS", "RANGES", "in_range"]

#: Optimisation methods: the gradient maker and the torch optimizer each one uses.
METHODS: Dict[str, str] = {
    "sgd": "SGD momentum",
    "adamw": "AdamW",
    "kfac": "K-FAC + SGD momentum",
    "fop": "FOP + SGD momentum",
    "fngd": "FNGD + SGD momentum",
    "hylo": "HyLo + SGD momentum",
}
#: Methods whose maker preconditions with curvature (damping, EMA decay, update interval).
PRECONDITIONED: Tuple[str, ...] = ("kfac", "fop", "hylo")



def _reads(method: str) -> Tuple[str, ...]:
    """AdamW uses torch's AdamW (its own betas); every other method torch's SGD with momentum."""
    optimizer = ("lr", "weight_decay") if method == "adamw" else ("lr", "weight_decay", "momentum")
    curvature = {"kfac": ("damping", "ema_decay"), "fop": ("damping", "ema_decay"), "hylo": ("damping",),
                 "fngd": ("fngd_alpha",)}
    return optimizer + curvature.get(method, ())


#: Per method, in a fixed order (a Halton point's dimensions follow it), the hyperparameters it reads:
#: ``lr`` is the base learning rate, every other name the config field of that name.
HYPERPARAMETERS: Dict[str, Tuple[str, ...]] = {m: _reads(m) for m in METHODS}

#: Valid values of each searchable hyperparameter: (test, the range in words).
RANGES: Dict[str, Tuple[Callable[[float], bool], str]] = {
    "lr": (lambda v: 0 < v < math.inf, "> 0"),
    "damping": (lambda v: 0 < v < math.inf, "> 0"),
    "fngd_alpha": (lambda v: 0 < v < math.inf, "> 0"),
    "ema_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "weight_decay": (lambda v: 0 <= v < math.inf, ">= 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def in_range(name: str, value: float) -> bool:
    return RANGES[name][0](value)
