"""Small pieces the makers of issue 23 share (SMW-NG, SENG, diagonal NG, K-BFGS, Kronecker PSGD): which
parameters get the plain gradient, the options a method refuses, sums over ranks."""
from __future__ import annotations

import warnings
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["refuse", "summed_over_ranks", "warn_plain_parameters"]


def warn_plain_parameters(model: nn.Module, blocks: Sequence[Tuple[str, nn.Module]], label: str) -> None:
    """One warning naming every module whose trainable parameters no block preconditions (BatchNorm,
    LayerNorm, embeddings, ignored or unsupported layers): they receive the plain mean gradient."""
    covered = {id(p) for _, m in blocks for p in m.parameters()}
    plain = [f"{name or '<root>'} ({module.__class__.__name__})" for name, module in model.named_modules()
             if any(p.requires_grad and id(p) not in covered for p in module.parameters(recurse=False))]
    if plain:
        warnings.warn(f"fop_asdl: {label} does not precondition " + ", ".join(plain)
                      + "; their parameters receive the plain mean gradient.", UserWarning)


def refuse(label: str, options: Dict[str, Any], reasons: Dict[str, str]) -> None:
    """A TypeError for options ``label`` does not take: with the reason for another method's option it
    knows, else naming them."""
    for name, reason in reasons.items():
        if name in options:
            raise TypeError(f"{label} does not take {name}: {reason}")
    if options:
        raise TypeError(f"{label} takes no option {', '.join(sorted(options))}; see its docstring.")


def summed_over_ranks(sync: Any, tensors: Iterable[Tensor]) -> List[Tensor]:
    """Each tensor summed over processes, all of them in one flat all-reduce (nothing moves in one
    process). The caller's tensors are left as they are."""
    tensors = list(tensors)
    if sync.world_size == 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    sync.sum_over_ranks(flat)
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
