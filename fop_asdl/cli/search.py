"""Equal-budget hyperparameter search: each method's declared space turned into its trial points.

The fairness rule of the MLCommons AlgoPerf benchmark: every method gets the same number of trials over a
declared search space, so a method with more hyperparameters (K-FAC's and FOP's damping) pays for them out
of the same budget instead of getting a larger grid. A space is a grid (every combination of the listed
values) or N quasi-random Halton points, log-uniform in [low, high] per hyperparameter. Halton values are
rounded to 3 significant digits, so the results table, the run folder and a repeated ``train`` name the
exact value that ran.
"""

from __future__ import annotations

import itertools
import math
from typing import Dict, List, Mapping, Optional, Sequence

from .experiment import ExperimentSettings
from .methods import METHODS

__all__ = ["SEARCH_MODES", "Point", "halton", "search_points", "method_points", "edges", "point_text"]

SEARCH_MODES = ("grid", "halton")
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)  # one Halton base per dimension
SIGNIFICANT_DIGITS = 3

Point = Dict[str, float]


def halton(index: int, base: int) -> float:
    """Element ``index`` (>= 1) of the van der Corput sequence in ``base``: its digits mirrored around the
    radix point (base 2: 1/2, 1/4, 3/4, 1/8, ...); one prime base per dimension gives the Halton sequence."""
    value, scale = 0.0, 1.0
    while index > 0:
        scale /= base
        value += scale * (index % base)
        index //= base
    return value


def search_points(mode: str, space: Mapping[str, Sequence[float]], n: Optional[int]) -> List[Point]:
    """The trials of one space, its names in the given order: the grid's combinations (first name slowest),
    or Halton points 1..n (point 0 would sit at every range's low end)."""
    names = list(space)
    if mode == "grid":
        return [dict(zip(names, values)) for values in itertools.product(*(space[k] for k in names))]
    if len(names) > len(PRIMES):
        raise ValueError(f"a Halton space has at most {len(PRIMES)} dimensions, got {len(names)}.")
    points = []
    for i in range(1, (n or 0) + 1):
        point = {}
        for name, base in zip(names, PRIMES):
            low, high = (math.log(v) for v in space[name])
            point[name] = float(f"{math.exp(low + halton(i, base) * (high - low)):.{SIGNIFICANT_DIGITS}g}")
        points.append(point)
    return points


def method_points(config: ExperimentSettings, method: str) -> List[Point]:
    """``method``'s trials under ``config``; dimensions in the order of its hyperparameters (lr first), so
    that methods searching lr over the same range try the same lrs whatever the order written in the YAML."""
    space = config.search_space[method]
    ordered = {name: space[name] for name in METHODS[method].hyperparameter_names if name in space}
    return search_points(config.search, ordered, config.search_points)


def edges(point: Mapping[str, float], points: Sequence[Mapping[str, float]]) -> List[str]:
    """``"<name> low"`` / ``"<name> high"`` for each hyperparameter whose value in ``point`` is the lowest or
    highest tried (of two or more): a best trial there suggests the range was too narrow on that side."""
    flags = []
    for name, value in point.items():
        tried = {p[name] for p in points}
        if len(tried) > 1 and value in (min(tried), max(tried)):
            flags.append(f"{name} {'low' if value == min(tried) else 'high'}")
    return flags


def point_text(point: Mapping[str, float]) -> str:
    """``lr 0.05, damping 0.01``."""
    return ", ".join(f"{name} {value:g}" for name, value in point.items())
