"""One flat buffer for many tensors, and back: what every collective of the package sends.

A collective moves one contiguous buffer; :func:`pack` concatenates tensors (and block vectors, with
zeros for a part a rank has none of) in order, :func:`unpack` returns views of a buffer in the same
order. Every pack/unpack of the package goes through these two, so the layout is written once.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..engine.vectors import BlockVector, Shapes

__all__ = ["pack", "unpack", "pack_vectors", "unpack_vectors"]


def pack(tensors: Iterable[Tensor], dtype: Optional[torch.dtype] = None) -> Tensor:
    """The tensors flattened into one new buffer (in ``dtype`` if given)."""
    flat = [t.reshape(-1) if dtype is None else t.reshape(-1).to(dtype) for t in tensors]
    return torch.cat(flat)


def unpack(buffer: Tensor, shapes: Sequence[torch.Size], offset: int = 0) -> Tuple[List[Tensor], int]:
    """The tensors of ``shapes`` from ``offset`` of ``buffer``'s last dimension (views of a flat buffer;
    a buffer with leading dimensions, e.g. an all-gather's (world, size), gives (world, *shape) each), and
    the offset after them."""
    out = []
    lead = buffer.shape[:-1]
    for shape in shapes:
        size = shape.numel()
        out.append(buffer[..., offset:offset + size].reshape(*lead, *shape))
        offset += size
    return out, offset


def pack_vectors(vectors: Sequence[Optional[BlockVector]], shapes: Sequence[Shapes], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """Block vectors in one buffer; a None vector (no samples of that part here) as zeros of its shapes."""
    parts: List[Tensor] = []
    for vec, (weight, bias) in zip(vectors, shapes):
        if vec is None:
            parts.append(torch.zeros(weight.numel() + (0 if bias is None else bias.numel()), dtype=dtype,
                                     device=device))
        else:
            parts += [t for t in vec if t is not None]
    return pack(parts, dtype)


def unpack_vectors(buffer: Tensor, shapes: Sequence[Shapes], offset: int = 0
                   ) -> Tuple[List[BlockVector], int]:
    """Views of ``buffer`` as block vectors of ``shapes``, and the offset after them."""
    out = []
    for weight, bias in shapes:
        (w,), offset = unpack(buffer, [weight], offset)
        b = None
        if bias is not None:
            (b,), offset = unpack(buffer, [bias], offset)
        out.append((w, b))
    return out, offset
