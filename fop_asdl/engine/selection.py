"""Which layers a method preconditions: the user's ``ignore_modules``, the layer types each method's math
covers, shared parameters; one warning names every trainable layer left to the plain gradient."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import asdl
from torch import nn

from .sub_batches import supports_half_gradients

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


def ignoring_unsupported(model: nn.Module, config: asdl.PreconditioningConfig, label: str
                          ) -> asdl.PreconditioningConfig:
    """A copy of ``config`` that also ignores layers without ASDL curvature, with one warning naming them.

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
        if not is_leaf or not supports_half_gradients(module) or partially_frozen:
            unsupported.append(f"{name or '<root>'} ({module.__class__.__name__}"
                               f"{', partially frozen' if partially_frozen else ''})")
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


def supports_per_sample(module: nn.Module) -> bool:
    """Whether the per-sample math of FNGD (:mod:`fop_asdl.methods.fngd_math`) and HyLo (:mod:`fop_asdl.methods.hylo_math`) covers
    this layer: Linear, and Conv2d without groups, string padding or a non-zero padding mode."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def linear_conv_blocks(model: nn.Module, ignore_modules: Optional[Sequence[Any]], label: str
                       ) -> List[Tuple[str, nn.Module]]:
    """Trainable Linear and Conv2d layers a per-sample method (FNGD, HyLo) preconditions: those
    :func:`supports_per_sample` covers and not partially frozen; one warning names the others."""
    blocks, unsupported = [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or user_ignores(name, module, ignore_modules):
            continue
        own = list(module.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        if supports_per_sample(module) and all(p.requires_grad for p in own):
            blocks.append((name, module))
        else:
            unsupported.append(f"{name} ({module.__class__.__name__})")
    if unsupported:
        warnings.warn(f"fop_asdl: {label} cannot precondition " + ", ".join(unsupported) + " (grouped, string "
                      "padding or partially frozen); their parameters receive the plain mean gradient.", UserWarning)
    return blocks
