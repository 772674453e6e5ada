"""The step's new curvature into the stored one: ASDL's scaling by ``data_size`` and its EMA (with an
optional bias correction), per block, only once the step is known to be finite."""
from __future__ import annotations

from typing import Any, Dict, Union

from asdl.symmatrix import SymMatrix
from torch import Tensor, nn

from .products import matrix_tensors

__all__ = ["commit_curvature", "scale_curvature"]


def scale_curvature(curvature: Dict[str, SymMatrix], data_size: Union[int, Tensor]) -> None:
    """Sums over samples → ASDL's scaling: every stored factor divided by ``data_size``, as ASDL's
    ``scale / data_size`` does for each factor."""
    for matrix in curvature.values():
        for tensor in matrix_tensors(matrix):
            tensor.div_(data_size)


def commit_curvature(modules: Dict[str, nn.Module], attr: str, new: Dict[str, SymMatrix], decay: float,
                     accumulate: bool, bias_correction: bool, updates: Dict[str, int]) -> None:
    """ASDL's EMA per factor, m ← (1 − d) m + d F (``new`` holds d F already, as ASDL's scale does), or
    replacement without one. With ``bias_correction`` m_k = ((1 − d) b_{k−1} m_{k−1} + d F_k) / b_k,
    b_k = 1 − (1 − d)^k, the count k of each block kept in ``updates``."""
    for name, matrix in new.items():
        module: Any = modules[name]
        stored = getattr(module, attr, None)
        keep = 1.0 - decay
        if accumulate and bias_correction:
            k = updates.get(name, 0) + 1 if stored is not None else 1
            updates[name] = k
            corrected, previous = 1.0 - (1.0 - decay) ** k, 1.0 - (1.0 - decay) ** (k - 1)
            keep = (1.0 - decay) * previous / corrected
            matrix.mul_(1.0 / corrected)
        if accumulate and stored is not None:
            stored.mul_(keep)
            stored += matrix
        else:
            setattr(module, attr, matrix)
