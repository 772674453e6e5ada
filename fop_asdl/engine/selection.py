"""Which layers a method preconditions: the user's ``ignore_modules``, the layer types each method's math
covers, shared parameters; one warning names every trainable layer left to the plain gradient."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import asdl
from torch import nn

from .layers import CONVS, embedding_problem
from .sub_batches import supports_half_gradients

#: Norm layers: their parameters get the plain gradient from the per-sample methods by design.
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)

__all__ = ["ignoring_unsupported", "linear_conv_blocks", "shared_blocks", "supports_per_sample", "user_ignores"]


def user_ignores(name: str, module: nn.Module, ignore_modules: Optional[Sequence[Any]]) -> bool:
    """Whether ``PreconditioningConfig.ignore_modules`` names this module (by type, name part or identity)."""
    for rule in ignore_modules or ():
        if isinstance(rule, type) and isinstance(module, rule):
            return True
        if isinstance(rule, str) and rule in name:
            return True
        if rule is module:
            return True
    return False


def _plain_reason(module: nn.Module, all_layer_types: bool = True) -> str:
    """Why a trainable layer gets the plain gradient from a method: the text its warning gives after the type."""
    if next(module.children(), None) is not None:
        return "parameters of its own beside its submodules"
    if not all(p.requires_grad for p in module.parameters(recurse=False)):
        return "partially frozen"
    if not all_layer_types and supports_half_gradients(module):
        return "this method keeps Linear, Conv2d (groups 1, no dilation, zero padding), BatchNorm and LayerNorm"
    if isinstance(module, nn.Embedding) and embedding_problem(module):
        return embedding_problem(module)
    if isinstance(module, _NORMS):
        return "weight or bias missing: the unit-wise 2×2 curvature needs both"
    if isinstance(module, nn.RNNBase):
        return "a recurrent layer's weights act at every time step through its state: no per-layer factors"
    return "no curvature for this layer type"


def ignoring_unsupported(model: nn.Module, config: asdl.PreconditioningConfig, label: str,
                         all_layer_types: bool = True) -> asdl.PreconditioningConfig:
    """A copy of ``config`` that also ignores layers without ASDL curvature (:func:`supports_half_gradients`
    with ``all_layer_types``), with one warning naming them and why.

    Their parameters (and any parameter owned directly by a container module) receive the plain gradient.
    """
    ignore = list(config.ignore_modules or [])
    unsupported = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False)]
        if not any(p.requires_grad for p in own) or user_ignores(name, module, config.ignore_modules):
            continue
        is_leaf = next(module.children(), None) is None
        partially_frozen = not all(p.requires_grad for p in own)
        if not is_leaf or not supports_half_gradients(module, all_layer_types) or partially_frozen:
            unsupported.append(f"{name or '<root>'} ({module.__class__.__name__}: "
                               f"{_plain_reason(module, all_layer_types)})")
            if is_leaf:
                ignore.append(module)
    if unsupported:
        warnings.warn(f"fop_asdl: no {label} curvature for " + ", ".join(unsupported)
                      + "; their parameters receive the plain full-batch gradient g_avg.", UserWarning)
    return dataclasses.replace(config, ignore_modules=ignore)


def shared_blocks(model: nn.Module, blocks: Sequence[Tuple[str, nn.Module]]) -> List[Tuple[str, nn.Module]]:
    """The blocks with a parameter that another module of ``model`` holds too (a tied embedding and LM
    head): autograd's gradient of such a parameter mixes the uses, so a method must capture the block to
    tell its own part apart."""
    holders: Dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            holders[id(param)] = holders.get(id(param), 0) + 1
    return [(name, m) for name, m in blocks if any(holders.get(id(p), 0) > 1 for p in m.parameters(recurse=False))]


def with_other_uses(blocks: Sequence[Tuple[str, nn.Module]], shared: Sequence[Tuple[str, nn.Module]]
                    ) -> List[Tuple[str, nn.Module]]:
    """``shared`` and the blocks with a plain gradient part after a step that captured every block: their
    parameters have uses outside the block (a tied weight, one used functionally), so they stay captured."""
    return [(name, m) for name, m in blocks if (name, m) in shared or any(p.grad is not None for p in m.parameters())]


def supports_per_sample(module: nn.Module, all_layer_types: bool = True) -> bool:
    """Whether per-sample math covers this layer: with ``all_layer_types`` (FNGD's
    :mod:`~fop_asdl.methods.fngd_math`, HyLo's :mod:`~fop_asdl.methods.hylo_rows`) Linear, every convolution
    of :mod:`fop_asdl.engine.layers` and Embedding (not sparse, no ``scale_grad_by_freq``); without, Linear and
    Conv2d without groups, string padding or a non-zero padding mode (the other per-sample methods' math)."""
    if isinstance(module, nn.Linear):
        return True
    if all_layer_types:
        if isinstance(module, nn.Embedding):
            return embedding_problem(module) is None
        return isinstance(module, CONVS)
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def linear_conv_blocks(model: nn.Module, ignore_modules: Optional[Sequence[Any]], label: str,
                       all_layer_types: bool = False) -> List[Tuple[str, nn.Module]]:
    """Trainable layers a per-sample method preconditions: those :func:`supports_per_sample` covers and not
    partially frozen. With ``all_layer_types`` (FNGD, HyLo) norm layers (BatchNorm, LayerNorm, GroupNorm) get
    the plain gradient by design and one warning names every other trainable layer left to it, and why;
    without, one warning names the Linear and Conv2d layers left to it."""
    if not all_layer_types:
        return _linear_conv2d_blocks(model, ignore_modules, label)
    blocks, unsupported = [], []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad for p in own) or user_ignores(name, module, ignore_modules):
            continue
        if supports_per_sample(module) and all(p.requires_grad for p in own):
            blocks.append((name, module))
        elif not (isinstance(module, _NORMS) and all(p.requires_grad for p in own)):
            unsupported.append(f"{name or '<root>'} ({module.__class__.__name__}: "
                               f"{_plain_reason(module)})")
    if unsupported:
        warnings.warn(f"fop_asdl: {label} cannot precondition " + ", ".join(unsupported)
                      + "; their parameters receive the plain mean gradient.", UserWarning)
    return blocks


def _linear_conv2d_blocks(model: nn.Module, ignore_modules: Optional[Sequence[Any]], label: str
                          ) -> List[Tuple[str, nn.Module]]:
    blocks, unsupported = [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or user_ignores(name, module, ignore_modules):
            continue
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        if supports_per_sample(module, all_layer_types=False) and all(p.requires_grad for p in own):
            blocks.append((name, module))
        else:
            unsupported.append(f"{name} ({module.__class__.__name__})")
    if unsupported:
        warnings.warn(f"fop_asdl: {label} cannot precondition " + ", ".join(unsupported) + " (grouped, string "
                      "padding or partially frozen); their parameters receive the plain mean gradient.", UserWarning)
    return blocks
