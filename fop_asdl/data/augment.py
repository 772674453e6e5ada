"""CIFAR augmentation (random crop with zero padding + horizontal flip) as batched tensor ops.

It runs on whatever device holds the batch, so a training set kept on the GPU never goes back to the
host. The random parameters are drawn separately from their application: a caller can draw them for a
whole global batch and apply the slice that belongs to one rank, so the result does not depend on how the
batch is split across processes.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["CropFlip", "sample_crop_flip", "crop_flip"]


class CropFlip(NamedTuple):
    """Per-image crop offsets into the padded image (0..2·padding) and flip flags."""

    top: Tensor
    left: Tensor
    flip: Tensor

    def narrow(self, start: int, length: int) -> "CropFlip":
        """The parameters of images ``start .. start+length-1`` (one rank's part of a global batch)."""
        return CropFlip(*(t[start:start + length] for t in self))


def sample_crop_flip(n: int, padding: int, generator: torch.Generator) -> CropFlip:
    """Draw crop offsets and flips for ``n`` images from ``generator`` (on the generator's device)."""
    device = generator.device
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    return CropFlip(top, left, flip)


def crop_flip(x: Tensor, params: CropFlip, padding: int, fill: Sequence[float]) -> Tensor:
    """Pad ``x`` (N,C,H,W) by ``padding`` with the per-channel ``fill`` (the normalised value of pixel 0,
    i.e. zero padding of the raw image), crop back to H×W at ``params``' offsets, then flip where asked."""
    n, c, h, w = x.shape
    # Filled in on the device: as_tensor of a Python list is a host-to-device copy, a stream sync on CUDA.
    fill_t = (torch.as_tensor(fill, dtype=x.dtype, device=x.device) if isinstance(fill, Tensor) else
              torch.stack([torch.full((), float(v), dtype=x.dtype, device=x.device) for v in fill])).view(1, c, 1, 1)
    padded = fill_t.expand(n, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding:padding + h, padding:padding + w] = x
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(params.flip[:, None], w - 1 - cols, cols) + params.left[:, None]  # (N, W)
    rows = torch.arange(h, device=x.device) + params.top[:, None]  # (N, H)
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put the channel dim last
