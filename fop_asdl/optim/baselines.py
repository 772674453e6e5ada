"""The optimizers the field compares against, from pinned libraries (the ``baselines`` extra), with the
defaults of each method's paper or reference code. Nothing here re-implements a method: each function
builds the library's optimizer; why each implementation was chosen is in docs/baselines.md.

The libraries are optional: :func:`require` imports one or raises :class:`MissingLibraryError` naming the
extra that installs it, and :func:`missing_libraries` says which are absent without importing them.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Iterable, List, Sequence

import torch
from torch import nn

__all__ = [
    "PINNED",
    "INSTALL",
    "MissingLibraryError",
    "missing_libraries",
    "install_hint",
    "require",
    "hidden_matrices",
    "lars",
    "lamb",
    "soap",
    "grafted_shampoo",
    "muon",
    "adamw_schedulefree",
]

#: Import name -> the pinned requirement of pyproject.toml's ``baselines`` extra (a test keeps them equal).
PINNED = {"pytorch_optimizer": "pytorch-optimizer==4.1.0", "schedulefree": "schedulefree==1.4.1"}
INSTALL = 'pip install ".[baselines]"'

Params = Iterable[nn.Parameter]


class MissingLibraryError(ImportError):
    """A baseline's library is not installed."""


def missing_libraries(names: Sequence[str]) -> List[str]:
    """The import names in ``names`` that cannot be imported (checked without importing them: importing
    pytorch_optimizer takes seconds)."""
    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # ValueError: a module whose __spec__ is unset
            return True
    return [name for name in names if absent(name)]


def install_hint(names: Sequence[str]) -> str:
    """How to install the libraries ``names``: the extra, or the pinned packages alone."""
    pins = " ".join(PINNED.get(n, n) for n in names)
    return f"{INSTALL} (or pip install {pins})"


def require(name: str, who: str) -> ModuleType:
    """``import name``, or :class:`MissingLibraryError` saying that ``who`` needs it and how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise MissingLibraryError(f"{who} needs the library {name}, which is not installed: "
                                  f"{install_hint([name])}.") from error


def hidden_matrices(model: nn.Module) -> List[nn.Parameter]:
    """The parameters Muon orthogonalises, by the rule of its author's post: the weights of the hidden
    Linear and Conv layers (a filter as its (out, in·k·k) matrix), not those of the first and last such
    layer (input embedding, classifier), nor any bias, norm gain, token or embedding; model order."""
    layers = [m for m in model.modules()
              if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and m.weight.requires_grad]
    return [m.weight for m in layers[1:-1]]


def lars(params: Params, lr: float, *, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """LARS (You, Gitman, Ginsburg 2017): heavy-ball momentum on g + β·w scaled per layer by
    η‖w‖/(‖g‖ + β‖w‖), η = 0.001 (the paper's trust coefficient); biases: plain SGD, no decay."""
    po = require("pytorch_optimizer", "lars")
    return po.LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=1e-3)


def lamb(params: Params, lr: float, *, weight_decay: float) -> torch.optim.Optimizer:
    """LAMB (You et al. 2020): Adam's m/√v plus λw, rescaled per layer to ‖w‖ (clipped at 10); β 0.9,
    0.999, ε 1e-6 as in the paper; weight decay inside the trust ratio, as in the paper."""
    po = require("pytorch_optimizer", "lamb")
    return po.Lamb(params, lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=weight_decay,
                   weight_decouple=False)


def soap(params: Params, lr: float, *, weight_decay: float,
         precondition_frequency: int) -> torch.optim.Optimizer:
    """SOAP (Vyas et al. 2024): Adam in the eigenbasis of Shampoo's factors, the basis refreshed every
    ``precondition_frequency`` steps; β (0.95, 0.95), ε 1e-8, decoupled weight decay: the reference's."""
    po = require("pytorch_optimizer", "soap")
    return po.SOAP(params, lr=lr, betas=(0.95, 0.95), weight_decay=weight_decay,
                   precondition_frequency=precondition_frequency)


def grafted_shampoo(params: Params, lr: float, *, momentum: float, weight_decay: float,
                    precondition_frequency: int) -> torch.optim.Optimizer:
    """Shampoo with RMSProp (Adam-like) grafting (Anil et al. 2020; the AlgoPerf winner grafts to Adam):
    the Shampoo direction with the per-layer norm of RMSProp's step, momentum ``momentum`` on the grafted
    step (Nesterov), β₂ 0.999, roots every ``precondition_frequency`` steps from that step on, blocks of
    512, ε 1e-6 relative to the largest eigenvalue, decoupled weight decay."""
    require("pytorch_optimizer", "shampoo_grafted")
    from .grafted_shampoo import GraftedShampoo  # imports pytorch_optimizer

    return GraftedShampoo(params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay,
                          decoupled_weight_decay=True, moving_average_for_momentum=True,
                          preconditioning_compute_steps=precondition_frequency,
                          start_preconditioning_step=precondition_frequency)


def muon(params: Params, lr: float, *, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    """Muon (Jordan et al. 2024) on ``params`` (see :func:`hidden_matrices`): Nesterov momentum, then the
    update orthogonalised by 5 Newton-Schulz steps, scaled by √max(1, out/in); decoupled weight decay."""
    po = require("pytorch_optimizer", "muon")
    return po.Muon([{"params": list(params), "use_muon": True}], lr=lr, momentum=momentum,
                   weight_decay=weight_decay, nesterov=True)


def adamw_schedulefree(params: Params, lr: float, *, weight_decay: float) -> torch.optim.Optimizer:
    """Schedule-Free AdamW (Defazio et al. 2024), by its authors: β (0.9, 0.999), ε 1e-8, no warm-up of its
    own (the runner's warm-up scales its lr), weight decay at y. Needs ``optimizer.train()`` before
    training and ``optimizer.eval()`` before evaluating or saving."""
    sf = require("schedulefree", "adamw_schedulefree")
    return sf.AdamWScheduleFree(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
