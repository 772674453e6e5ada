"""A block's vector: one (weight, bias) pair, the one type every method, sum and collective passes around.

``weight`` is a tensor in any shape of the block's weight (Conv2d as the (out, in·kh·kw) matrix ASDL's
curvature acts on), ``bias`` a tensor or None for a block without bias. A stack of k vectors carries a
leading dimension k on both (:func:`stacked`, the FOP products of :mod:`fop_asdl.curvature.products`).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .layers import from_conv_layout

__all__ = ["BlockVector", "Shapes", "add", "cast", "flat_block", "numel", "scaled", "shapes_of",
           "stacked", "write_block"]

BlockVector = Tuple[Tensor, Optional[Tensor]]
#: (weight shape, bias shape or None) of a block vector.
Shapes = Tuple[torch.Size, Optional[torch.Size]]


def add(a: Optional[BlockVector], b: Optional[BlockVector]) -> Optional[BlockVector]:
    """a + b, where None stands for no samples (zero)."""
    if a is None or b is None:
        return b if a is None else a
    return a[0] + b[0], None if a[1] is None else a[1] + b[1]


def scaled(vec: BlockVector, factor: Union[float, Tensor]) -> BlockVector:
    """``factor`` · vec (ASDL's grad_scale, kl_clip's ν, the loss's r), the very same tensors when a float
    factor is 1 (a tensor is never compared: that would be a host sync)."""
    if not isinstance(factor, Tensor) and factor == 1:
        return vec
    return vec[0] * factor, None if vec[1] is None else vec[1] * factor


def cast(vec: BlockVector, dtype: torch.dtype) -> BlockVector:
    """vec in ``dtype`` (the very same tensors when it is in it already)."""
    return vec[0].to(dtype), None if vec[1] is None else vec[1].to(dtype)


def stacked(vec: BlockVector) -> BlockVector:
    """A block vector as a stack of one along a new dim 0 (the k of a stack), as views: no copy (FOP's
    stack of two is formed by :func:`fop_asdl.engine.sub_batches.average_and_difference_pair`)."""
    weight, bias = vec
    return weight.unsqueeze(0), None if bias is None else bias.unsqueeze(0)


def flat_block(vec: Optional[BlockVector], shapes: Shapes) -> Optional[BlockVector]:
    """A block's vector reshaped to ``shapes`` (a Conv2d weight as the matrix its curvature acts on)."""
    return None if vec is None else (vec[0].reshape(shapes[0]), vec[1])


def shapes_of(vec: BlockVector) -> Shapes:
    return vec[0].shape, None if vec[1] is None else vec[1].shape


def numel(shapes: Shapes) -> int:
    return shapes[0].numel() + (0 if shapes[1] is None else shapes[1].numel())


def write_block(module: nn.Module, vec: BlockVector) -> None:
    """Add a block vector, in any shape of the same size (a ConvTranspose2d's weight in the layout of
    :func:`~fop_asdl.engine.layers.to_conv_layout`), to the module's grads: the step starts from None, so a
    parameter gets the sum of its uses (a shared weight's other blocks, and its plain gradient from uses
    outside blocks). The vector is cast to the parameter's dtype (bf16 weights: computed in float32)."""
    for param, value in ((module.weight, vec[0]), (getattr(module, "bias", None), vec[1])):
        if value is None:
            continue
        value = from_conv_layout(module, value) if param is module.weight else value.reshape(param.shape)
        value = value.to(param.dtype)
        param.grad = value.contiguous() if param.grad is None else param.grad + value
