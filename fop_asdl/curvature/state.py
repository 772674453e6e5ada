"""A block's curvature (ASDL's Kron / unit-wise matrices and their inverses) as state-dict tensors and back:
ASDL 0.1a5's ``state_dict()`` keeps only the step counter, so a resumed run restarted with no curvature."""
from __future__ import annotations

from typing import Dict

import torch
from asdl.symmatrix import Kron, SymMatrix, UnitWise

__all__ = ["curvature_from_dict", "curvature_to_dict"]

_KRON_KEYS = ("A", "B", "A_inv", "B_inv")
_UNIT_KEYS = ("data", "inv")


def curvature_to_dict(matrix: SymMatrix) -> Dict[str, torch.Tensor]:
    out = {}
    if matrix.has_kron:
        out.update({f"kron.{k}": getattr(matrix.kron, k) for k in _KRON_KEYS
                    if getattr(matrix.kron, k) is not None})
    if matrix.has_unit:
        out.update({f"unit.{k}": getattr(matrix.unit, k) for k in _UNIT_KEYS
                    if getattr(matrix.unit, k) is not None})
    return {k: v.detach().clone() for k, v in out.items()}


def curvature_from_dict(tensors: Dict[str, torch.Tensor], device: torch.device, factor_dtype: torch.dtype,
                        inverse_dtype: torch.dtype) -> SymMatrix:
    """The matrix of :func:`curvature_to_dict`'s tensors, its factors in ``factor_dtype`` and its inverses in
    ``inverse_dtype`` (the loading maker's: a state saved with another precision resumes in this one's)."""
    get = {k: v.to(device, inverse_dtype if k.endswith("inv") else factor_dtype).clone()
           for k, v in tensors.items() if k.startswith(("kron.", "unit."))}
    kron = unit = None
    if any(k.startswith("kron.") for k in get):
        kron = Kron(get.get("kron.A"), get.get("kron.B"), get.get("kron.A_inv"), get.get("kron.B_inv"))
    if any(k.startswith("unit.") for k in get):
        unit = UnitWise(get.get("unit.data"), get.get("unit.inv"))
    return SymMatrix(kron=kron, unit=unit)
