"""Shampoo's math (Gupta, Koren and Singer 2018) as pure tensor functions: blocks, statistics, roots.

A parameter is seen as a matrix G (m, n): a Linear weight as it is, a Conv2d weight as (out, in·kh·kw), any
other tensor of two or more dimensions as (shape[0], rest). A block of G gets L = Σ G_b G_bᵀ and
R = Σ G_bᵀ G_b and the update L^(−1/4) G_b R^(−1/4). A 1-d parameter (a bias, a norm layer's weight) is a
vector g with one factor, L = Σ g gᵀ, and the update L^(−1/2) g (order 1: exponent −1/(2·1)).

``block_size`` b cuts every dimension into pieces of b (the last one shorter), so no factor is larger than
b×b. The blocks of a parameter fall into at most four groups of equal shape (full×full, full×rest,
rest×full, rest×rest); each group is one batched tensor (k, rows, cols), so statistics, roots and products
are one batched call per group, never a Python loop over blocks.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Layout", "layout_of", "split", "merge", "statistics", "inverse_root", "inverse_roots", "precondition"]


@dataclasses.dataclass(frozen=True)
class _Cut:
    """One dimension of n cut into ``count`` pieces of ``size`` and a last piece of ``rest`` (0: none)."""

    size: int
    count: int
    rest: int

    @staticmethod
    def of(n: int, block_size: Optional[int]) -> "_Cut":
        if block_size is None or block_size >= n:
            return _Cut(n, 1, 0)
        return _Cut(block_size, n // block_size, n % block_size)

    @property
    def full(self) -> int:
        return self.size * self.count


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one parameter is cut: its matrix shape (m, n) (n = 1 and ``vector`` for a 1-d parameter) and the
    cuts of both dimensions."""

    rows: _Cut
    cols: _Cut
    vector: bool

    @property
    def shape(self) -> Tuple[int, int]:
        return self.rows.full + self.rows.rest, self.cols.full + self.cols.rest


def layout_of(shape: Sequence[int], block_size: Optional[int]) -> Layout:
    """The layout of a parameter of ``shape`` (0-d and 1-d: a vector; else the (shape[0], rest) matrix)."""
    if len(shape) <= 1:
        n = int(torch.Size(shape).numel())
        return Layout(_Cut.of(n, block_size), _Cut(1, 1, 0), True)
    m = int(shape[0])
    n = int(torch.Size(shape[1:]).numel())
    return Layout(_Cut.of(m, block_size), _Cut.of(n, block_size), False)


def _regions(layout: Layout) -> List[Tuple[slice, slice, int, int, int, int]]:
    """(row slice, col slice, row pieces, col pieces, piece rows, piece cols) of each group, in a fixed order."""
    rows, cols = layout.rows, layout.cols
    out = []
    for r_slice, r_count, r_size in ((slice(0, rows.full), rows.count, rows.size),
                                     (slice(rows.full, rows.full + rows.rest), 1, rows.rest)):
        for c_slice, c_count, c_size in ((slice(0, cols.full), cols.count, cols.size),
                                         (slice(cols.full, cols.full + cols.rest), 1, cols.rest)):
            if r_size and c_size and r_count and c_count:
                out.append((r_slice, c_slice, r_count, c_count, r_size, c_size))
    return out


def split(matrix: Tensor, layout: Layout) -> List[Tensor]:
    """The blocks of a (m, n) matrix, one (k, rows, cols) tensor per group (row-major order of blocks)."""
    out = []
    for r_slice, c_slice, r_count, c_count, r_size, c_size in _regions(layout):
        region = matrix[r_slice, c_slice]
        out.append(region.reshape(r_count, r_size, c_count, c_size).transpose(1, 2)
                   .reshape(r_count * c_count, r_size, c_size))
    return out


def merge(groups: Sequence[Tensor], layout: Layout) -> Tensor:
    """The (m, n) matrix whose blocks are ``groups`` (the inverse of :func:`split`)."""
    out = groups[0].new_empty(layout.shape)
    for group, (r_slice, c_slice, r_count, c_count, r_size, c_size) in zip(groups, _regions(layout)):
        out[r_slice, c_slice] = (group.reshape(r_count, c_count, r_size, c_size).transpose(1, 2)
                                 .reshape(r_count * r_size, c_count * c_size))
    return out


def statistics(block: Tensor, vector: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """(G Gᵀ, Gᵀ G) of a group of blocks (k, rows, cols); a vector's blocks (k, rows, 1) have no right
    factor."""
    left = torch.bmm(block, block.transpose(1, 2))
    return left, None if vector else torch.bmm(block.transpose(1, 2), block)


def inverse_root(stat: Tensor, exponent: int, epsilon: float) -> Tensor:
    """(S + εI)^(−1/exponent) of a batch of symmetric PSD matrices, by an eigendecomposition in at least
    float32 (float64 stays float64), with the eigenvalues clamped at 0 before ε is added (rounding leaves
    small negative ones). A non-finite S gives NaN (the step's finiteness check catches it): the
    eigendecomposition itself only ever sees finite matrices."""
    dtype = torch.float64 if stat.dtype == torch.float64 else torch.float32
    sym = stat.to(dtype)
    sym = 0.5 * (sym + sym.transpose(-1, -2))
    finite = torch.isfinite(sym).flatten(1).all(1)[:, None, None]
    eye = torch.eye(sym.shape[-1], dtype=dtype, device=sym.device).expand_as(sym)
    try:
        values, vectors = torch.linalg.eigh(torch.where(finite, sym, eye))
    except torch.linalg.LinAlgError:  # LAPACK did not converge in float32: once more in float64
        values, vectors = torch.linalg.eigh(torch.where(finite, sym, eye).double())
        values, vectors = values.to(dtype), vectors.to(dtype)
    scale = (values.clamp_min(0) + epsilon) ** (-1.0 / exponent)
    root = (vectors * scale.unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return torch.where(finite, root, torch.full_like(root, float("nan")))


def inverse_roots(stats: Sequence[Tuple[Tensor, int]], epsilon: float) -> List[Tensor]:
    """:func:`inverse_root` of every (statistics group, exponent), with the groups of equal matrix size,
    exponent and dtype stacked into one eigendecomposition call (many small factors of one size, as the
    blocks of a network, cost one call)."""
    batches: dict = {}
    for index, (stat, exponent) in enumerate(stats):
        batches.setdefault((stat.shape[-1], exponent, stat.dtype), []).append(index)
    out: List[Optional[Tensor]] = [None] * len(stats)
    for (_, exponent, _), indices in batches.items():
        group = [stats[i][0] for i in indices]
        roots = inverse_root(torch.cat(group) if len(group) > 1 else group[0], exponent, epsilon)
        for i, part in zip(indices, roots.split([t.shape[0] for t in group])):
            out[i] = part
    return out  # type: ignore[return-value]


def precondition(block: Tensor, left_root: Tensor, right_root: Optional[Tensor]) -> Tensor:
    """L^(−1/p) G_b R^(−1/p) of a group of blocks (the roots in their own dtype, the result in G's)."""
    out = torch.bmm(left_root.to(block.dtype), block)
    if right_root is not None:
        out = torch.bmm(out, right_root.to(block.dtype))
    return out
