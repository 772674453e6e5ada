"""The sharded step (paper Algorithm 1): every rank is the owner of some curvature blocks.

Per step: the counts, the loss and the gradients of parameters outside curvature blocks are all-reduced
in one buffer; each block's gradient sums over B1 and B2 (FOP) or their total (K-FAC) are reduced to the
block's owner only; on curvature steps so is the block's curvature (only the owner keeps and inverts it);
the owners compute their blocks' results, and each owner broadcasts its results, so every rank ends the
step with identical ``p.grad`` and ``last_stats``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from asdl.symmatrix import SymMatrix
from torch import Tensor, nn

from ..curvature.products import matrix_tensors
from ..engine.sub_batches import add_sums, first_half_size
from .sync import HalfSums, LocalSync, Vector
from .assignment import assign_owners, block_cost
from .comm import Communicator

__all__ = ["ShardedSync", "resolve_sub_batches"]

Shapes = Tuple[torch.Size, Optional[torch.Size]]


def resolve_sub_batches(sub_batches: str, world_size: int) -> str:
    """"auto" → "ranks" for an even world size, else "halves"; "ranks" needs an even world size."""
    if sub_batches == "auto":
        return "ranks" if world_size % 2 == 0 else "halves"
    if sub_batches == "ranks" and world_size % 2:
        raise ValueError(f"sub_batches='ranks' forms B1 from the even ranks and B2 from the odd ones, so it needs "
                         f"an even world size; got {world_size}. Use sub_batches='halves' (or 'auto').")
    return sub_batches


class ShardedSync(LocalSync):
    """The step's collectives for ``world_size`` > 1 ranks; blocks owned as :func:`assign_owners` says."""

    def __init__(self, named_modules: Sequence[Tuple[str, nn.Module]], sub_batches: str, two_gradients: bool,
                 dtype: torch.dtype, costs: Optional[Dict[str, float]] = None):
        self.comm = Communicator()
        self.world_size, self.rank = self.comm.world_size, self.comm.rank
        self.sub_batches = resolve_sub_batches(sub_batches, self.world_size)
        self.two_gradients = two_gradients
        self.splits_locally = two_gradients and self.sub_batches == "halves"
        self.assignment: Dict[str, int] = assign_owners(
            [(name, costs[name] if costs is not None else block_cost(m)) for name, m in named_modules],
                                                        self.world_size)
        self._blocks = [name for name, _ in named_modules]
        self._dtype = dtype  # every buffer is in the parameters' dtype, so all ranks agree on sizes
        # "ranks": each rank holds a share of g1 (even ranks) or of g2 (odd ranks), never both, so the two
        # sums are formed inside the parity groups and only the other group's sum travels to the owner.
        self._by_parity = two_gradients and self.sub_batches == "ranks"
        if self._by_parity:
            self.comm.make_parity_groups()

    def local_split(self, batch_size: int, two_gradients: bool) -> int:
        if not two_gradients:
            return batch_size
        if self.sub_batches == "halves":
            return first_half_size(batch_size)
        return batch_size if self.rank % 2 == 0 else 0

    def owns(self, name: str) -> bool:
        return self.assignment[name] == self.rank

    def _owned_by(self, rank: int) -> List[str]:
        return [name for name in self._blocks if self.assignment[name] == rank]

    # --- gradients ------------------------------------------------------------------------------
    def reduce_counts_and_others(self, counts: Tuple[int, int], loss_sum: Tensor, others: Sequence[nn.Parameter],
                                 terms: Sequence[Tensor] = ()):
        device, dtype = self.comm.device, self._dtype
        grads = [p for p in others if p.grad is not None]
        head = torch.tensor([counts[0], counts[1]], dtype=dtype, device=device)
        scalars = [torch.as_tensor(t, dtype=dtype, device=device).reshape(1) for t in (loss_sum, *terms)]
        small = torch.cat([head, *scalars] + [p.grad.reshape(-1) for p in grads])
        # one all-reduce: counts, loss, the loss's normalizer, gradients outside blocks (DDP's share)
        self.comm.all_reduce(small)
        offset = 3 + len(terms)
        for p in grads:
            p.grad.copy_(small[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()
        return (small[0], small[1]), small[2], tuple(small[3:3 + len(terms)])

    def reduce_block_sums(self, sums: Dict[str, HalfSums]) -> Dict[str, HalfSums]:
        if not sums:
            return {}
        device, dtype = self.comm.device, self._dtype
        halves = 2 if self.two_gradients else 1
        shapes = {name: _shapes_of(s) for name, s in sums.items()}
        owned: Dict[str, HalfSums] = {}
        for owner in range(self.world_size):
            names = [name for name in self._owned_by(owner) if name in sums]
            if not names:
                continue
            if self._by_parity:
                received = self._reduce_by_parity(sums, names, shapes, owner)
                if received is not None:
                    owned.update(received)
                continue
            parts: List[Tensor] = []
            for name in names:
                pieces = sums[name] if self.two_gradients else (add_sums(*sums[name]),)
                parts += [_flat_or_zeros(piece, shapes[name], dtype, device) for piece in pieces]
            buffer = torch.cat(parts)
            del parts
            self.comm.reduce(buffer, dst=owner)
            if owner == self.rank:
                offset = 0
                for name in names:
                    pieces = []
                    for _ in range(halves):
                        piece, offset = _unflatten(buffer, offset, shapes[name])
                        pieces.append(piece)
                    owned[name] = (pieces[0], pieces[1] if halves == 2 else None)
        return owned

    def _reduce_by_parity(self, sums: Dict[str, HalfSums], names: List[str], shapes: Dict[str, Shapes],
                          owner: int) -> Optional[Dict[str, HalfSums]]:
        """The owner's (S1, S2) of ``names`` when B1 = even ranks and B2 = odd ranks: each parity group sums
        its ranks' shares into one member (the owner in its own group, the owner's neighbour in the other),
        and the neighbour hands its group's sum to the owner."""
        parity = self.rank % 2
        own = torch.cat([_flat_or_zeros(add_sums(*sums[name]), shapes[name], self._dtype, self.comm.device)
                         for name in names])
        neighbour = owner + 1 if owner % 2 == 0 else owner - 1
        even_dst, odd_dst = (owner, neighbour) if owner % 2 == 0 else (neighbour, owner)
        self.comm.reduce_within_parity(own, even_dst, odd_dst)
        other = self.comm.hand_over(own, src=neighbour, dst=owner)
        if self.rank != owner:
            return None
        even, odd = (own, other) if parity == 0 else (other, own)
        out: Dict[str, HalfSums] = {}
        offset_even = offset_odd = 0
        for name in names:
            s1, offset_even = _unflatten(even, offset_even, shapes[name])
            s2, offset_odd = _unflatten(odd, offset_odd, shapes[name])
            out[name] = (s1, s2)
        return out

    # --- curvature ------------------------------------------------------------------------------
    def reduce_curvature(self, curvature: Dict[str, SymMatrix]) -> Dict[str, SymMatrix]:
        owned = {}
        for owner in range(self.world_size):
            names = [name for name in self._owned_by(owner) if name in curvature]
            if not names:
                continue
            tensors = [t for name in names for t in matrix_tensors(curvature[name])]
            buffer = torch.cat([t.reshape(-1) for t in tensors])
            self.comm.reduce(buffer, dst=owner)
            if owner == self.rank:
                offset = 0
                for t in tensors:
                    t.copy_(buffer[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
                owned.update({name: curvature[name] for name in names})
        return owned

    def sum_over_ranks(self, buffer: Tensor) -> Tensor:
        self.comm.all_reduce(buffer)
        return buffer

    def rows_at_owners(self, rows: Dict[str, Sequence[Tensor]]) -> Dict[str, List[Tensor]]:
        """A reduce per owner of zero-padded buffers (each rank fills its own rows; adding zeros is exact).
        It moves W times the data a gather would, and needs the same leading size on every rank, which one
        small all-reduce of (m, m²) checks (Σm² = W·m̄² only if all m are equal)."""
        m = next(t.shape[0] for tensors in rows.values() for t in tensors)
        sizes = torch.tensor([m, m * m], dtype=torch.float64, device=self.comm.device)
        self.comm.all_reduce(sizes)
        if sizes.tolist() != [m * self.world_size, m * m * self.world_size]:
            raise ValueError(f"coefficient_scope='global' needs the same batch size on every rank; rank {self.rank} "
                             f"has {m} samples. Give every rank the same number (drop_last=True).")
        gathered: Dict[str, List[Tensor]] = {}
        for owner in range(self.world_size):
            names = [name for name in self._owned_by(owner) if name in rows]
            if not names:
                continue
            tensors = [t for name in names for t in rows[name]]
            buffer = torch.zeros(self.world_size * sum(t.numel() for t in tensors), dtype=tensors[0].dtype,
                                 device=self.comm.device)
            offset = 0
            for t in tensors:
                buffer[offset + self.rank * t.numel():offset + (self.rank + 1) * t.numel()] = t.reshape(-1)
                offset += self.world_size * t.numel()
            self.comm.reduce(buffer, dst=owner)
            if owner != self.rank:
                continue
            offset = 0
            for name in names:
                gathered[name] = []
                for t in rows[name]:
                    size = self.world_size * t.numel()
                    gathered[name].append(buffer[offset:offset + size].view(self.world_size * m, *t.shape[1:]))
                    offset += size
        return gathered

    def all_gather(self, buffer: Tensor) -> Tensor:
        """One all-gather, after a 2-element all-reduce that checks every rank sends the same size (a
        mismatch would otherwise hang or garble the collective)."""
        sizes = torch.tensor([buffer.numel(), -buffer.numel()], dtype=torch.int64, device=self.comm.device)
        self.comm.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
        if sizes.tolist() != [buffer.numel(), -buffer.numel()]:
            raise ValueError(f"fop_asdl: the ranks' per-sample rows differ in size (rank {self.rank} sends "
                             f"{buffer.numel()} values); every rank needs the same batch size (drop_last=True).")
        return self.comm.all_gather(buffer)

    def any_bad(self, flags: Tensor) -> Tensor:
        flags = flags.clone()
        self.comm.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return flags

    # --- results --------------------------------------------------------------------------------
    def share(self, results: Dict[str, Tuple[Vector, Optional[Tensor]]], shapes: Dict[str, Shapes],
              n_stats: int = 0) -> Dict[str, Tuple[Vector, Optional[Tensor]]]:
        """Each owner broadcasts its blocks' results (and the method's ``n_stats`` per-block stats) in one
        buffer.

        A block whose owner has no curvature for it yet has NaN stats on the other ranks (a host sync per
        step would be needed to leave it out, as one process does).
        """
        dtype, device = self._dtype, self.comm.device
        shared: Dict[str, Tuple[Vector, Optional[Tensor]]] = {}
        for owner in range(self.world_size):
            names = self._owned_by(owner)
            if not names:
                continue
            if owner == self.rank:
                parts: List[Tensor] = []
                for name in names:
                    vector, stats = results.get(name, (None, None))
                    parts.append(_flat_or_zeros(vector, shapes[name], dtype, device))
                    if n_stats:
                        parts.append(stats.to(dtype) if stats is not None else
                                     torch.full((n_stats,), float("nan"), dtype=dtype, device=device))
                buffer = torch.cat(parts)
                self.comm.broadcast(buffer, src=owner)
                shared.update({name: results[name] for name in names if name in results})
                continue
            size = sum(_numel(shapes[name]) + n_stats for name in names)
            buffer = torch.empty(size, dtype=dtype, device=device)
            self.comm.broadcast(buffer, src=owner)
            offset = 0
            for name in names:
                vector, offset = _unflatten(buffer, offset, shapes[name])
                stats = buffer[offset:offset + n_stats] if n_stats else None
                offset += n_stats
                shared[name] = (vector, stats)
        return shared

    def gathered_curvature(self, local: Dict[str, Dict[str, Tensor]]) -> Dict[str, Dict[str, Tensor]]:
        gathered: Dict[str, Dict[str, Tensor]] = {}
        for owner in range(self.world_size):
            mine = {name: {k: v.cpu() for k, v in local[name].items()}
                    for name in self._owned_by(owner) if name in local} if owner == self.rank else None
            gathered.update(self.comm.broadcast_object(mine, src=owner))
        return {name: gathered[name] for name in self._blocks if name in gathered}


def _shapes_of(halves: HalfSums) -> Shapes:
    piece = halves[0] if halves[0] is not None else halves[1]
    return piece[0].shape, None if piece[1] is None else piece[1].shape


def _numel(shapes: Shapes) -> int:
    return shapes[0].numel() + (0 if shapes[1] is None else shapes[1].numel())


def _flat_or_zeros(piece: Optional[Vector], shapes: Shapes, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A (weight, bias) pair as one flat tensor; zeros for a sub-batch this rank has no samples of."""
    if piece is None:
        return torch.zeros(_numel(shapes), dtype=dtype, device=device)
    flat = [piece[0].reshape(-1)] + ([] if piece[1] is None else [piece[1].reshape(-1)])
    return torch.cat(flat).to(dtype)


def _unflatten(buffer: Tensor, offset: int, shapes: Shapes) -> Tuple[Vector, int]:
    weight_shape, bias_shape = shapes
    weight = buffer[offset:offset + weight_shape.numel()].view(weight_shape)
    offset += weight_shape.numel()
    bias = None
    if bias_shape is not None:
        bias = buffer[offset:offset + bias_shape.numel()].view(bias_shape)
        offset += bias_shape.numel()
    return (weight, bias), offset

