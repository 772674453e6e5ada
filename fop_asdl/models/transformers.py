"""Transformers on images: a small ViT, whose attention projections are blocks through
:mod:`fop_asdl.engine.attention` and whose class token and position embedding are not (the paper's protocol
updates them with AdamW, :mod:`fop_asdl.optim.hybrid`); and a GPT-style causal decoder with the standard
tied embedding and LM head, which reads an image as a sequence of pixel tokens and classifies it by
predicting a class token after them.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VisionTransformer", "PixelGPT"]


class VisionTransformer(nn.Module):
    """A small ViT for 28x28 and 32x32 images: 4x4 patches embedded by a strided conv (49 or 64 tokens), a
    class token and learned position embedding, ``depth`` pre-norm blocks of torch's own
    ``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention`` + GELU MLP), a final LayerNorm and a Linear head
    on the class token. The defaults (dim 64, depth 4, 4 heads, MLP 128; ~0.14M parameters) train on a CPU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 patch_size: Optional[int] = None, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: int = 2):
        super().__init__()
        patch_size = patch_size or 4
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}; pick a "
                             f"patch_size that divides it (4 suits 28 and 32).")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}; choose dim = heads * head size.")
        tokens = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(
            nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (n, tokens, dim)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        return self.head(self.norm(self.blocks(x)[:, 0]))


class PixelGPT(nn.Module):
    """A GPT-style causal decoder for images, in the layout of GPT-2 and its descendants: token and position
    embeddings (``nn.Embedding``), ``depth`` pre-norm blocks of torch's ``nn.TransformerEncoderLayer`` with
    a causal mask, a final LayerNorm and an LM head whose weight *is* the token embedding's.

    The image becomes a sequence of pixel tokens: the mean of each ``patch`` × ``patch`` cell (over the
    channels too) of the normalised image, quantised into ``levels`` fixed bins over [-2, 2]. The vocabulary
    is those levels followed by one token per class; the model classifies by predicting, at the last
    position, which class token comes next, so its output is the LM head's logits of the class tokens. The
    defaults (dim 64, depth 2, 4 heads; 49 tokens at 28x28) train on a CPU."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, patch: int = 4,
                 levels: int = 16, dim: int = 64, depth: int = 2, heads: int = 4, mlp_ratio: int = 2):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}.")
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}; choose dim = heads * head size.")
        self.patch, self.levels, self.num_classes = patch, levels, num_classes
        self.tokens = (image_size // patch) ** 2
        self.token_embed = nn.Embedding(levels + num_classes, dim)
        self.position_embed = nn.Embedding(self.tokens, dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim * mlp_ratio, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, levels + num_classes, bias=False)
        self.head.weight = self.token_embed.weight  # tied, as in GPT-2
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(self.tokens),
                             persistent=False)

    def pixel_tokens(self, x: Tensor) -> Tensor:
        """(n, tokens) token ids of a batch of normalised images (n, C, H, W)."""
        cells = F.avg_pool2d(x.mean(1, keepdim=True), self.patch).flatten(1)
        return ((cells + 2.0) / 4.0 * self.levels).floor().clamp(0, self.levels - 1).long()

    def hidden(self, tokens: Tensor) -> Tensor:
        """(n, tokens, dim) hidden states after the final LayerNorm; position t sees tokens up to t only."""
        # one row of positions per sample: dim 0 is the sample inside every layer, so the position embedding is
        # a block of the gradient makers (a (tokens,) call would be one use summed over the batch)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        h = self.token_embed(tokens) + self.position_embed(positions)
        for block in self.blocks:
            h = block(h, src_mask=self.causal_mask, is_causal=True)
        return self.norm(h)

    def forward(self, x: Tensor) -> Tensor:
        logits = self.head(self.hidden(self.pixel_tokens(x))[:, -1])  # the next token after the image
        return logits[:, self.levels:]
