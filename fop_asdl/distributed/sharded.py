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
from ..engine.sub_batches import first_half_size
from ..engine.vectors import BlockVector, Shapes, add, numel, shapes_of
from .assignment import assign_owners, block_cost
from .comm import Communicator
from .packing import pack, pack_vectors, unpack, unpack_vectors
from .sync import HalfSums, LocalSync

__all__ = ["ShardedSync", "resolve_sub_batches"]


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
        self._dtype = dtype  # every buffer is in one dtype (make_sync's), so all ranks agree on sizes
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
        small = pack([head, *scalars] + [p.grad for p in grads])
        # one all-reduce: counts, loss, the loss's normalizer, gradients outside blocks (DDP's share)
        self.comm.all_reduce(small)
        reduced, _ = unpack(small, [p.grad.shape for p in grads], offset=3 + len(terms))
        for p, grad in zip(grads, reduced):
            p.grad.copy_(grad)
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
            pieces = [piece for name in names
                      for piece in (sums[name] if self.two_gradients else (add(*sums[name]),))]
            buffer = pack_vectors(pieces, [shapes[name] for name in names for _ in range(halves)], dtype, device)
            del pieces
            self.comm.reduce(buffer, dst=owner)
            if owner == self.rank:
                received, _ = unpack_vectors(buffer, [shapes[name] for name in names for _ in range(halves)])
                for i, name in enumerate(names):
                    pair = received[i * halves:(i + 1) * halves]
                    owned[name] = (pair[0], pair[1] if halves == 2 else None)
        return owned

    def _reduce_by_parity(self, sums: Dict[str, HalfSums], names: List[str], shapes: Dict[str, Shapes],
                          owner: int) -> Optional[Dict[str, HalfSums]]:
        """The owner's (S1, S2) of ``names`` when B1 = even ranks and B2 = odd ranks: each parity group sums
        its ranks' shares into one member (the owner in its own group, the owner's neighbour in the other),
        and the neighbour hands its group's sum to the owner."""
        parity = self.rank % 2
        own = pack_vectors([add(*sums[name]) for name in names], [shapes[name] for name in names], self._dtype,
                           self.comm.device)
        neighbour = owner + 1 if owner % 2 == 0 else owner - 1
        even_dst, odd_dst = (owner, neighbour) if owner % 2 == 0 else (neighbour, owner)
        self.comm.reduce_within_parity(own, even_dst, odd_dst)
        other = self.comm.hand_over(own, src=neighbour, dst=owner)
        if self.rank != owner:
            return None
        even, odd = (own, other) if parity == 0 else (other, own)
        layout = [shapes[name] for name in names]
        firsts, _ = unpack_vectors(even, layout)
        seconds, _ = unpack_vectors(odd, layout)
        return {name: (s1, s2) for name, s1, s2 in zip(names, firsts, seconds)}

    # --- curvature ------------------------------------------------------------------------------
    def reduce_curvature(self, curvature: Dict[str, SymMatrix]) -> Dict[str, SymMatrix]:
        owned = {}
        for owner in range(self.world_size):
            names = [name for name in self._owned_by(owner) if name in curvature]
            if not names:
                continue
            tensors = [t for name in names for t in matrix_tensors(curvature[name])]
            buffer = pack(tensors)
            self.comm.reduce(buffer, dst=owner)
            if owner == self.rank:
                for t, total in zip(tensors, unpack(buffer, [t.shape for t in tensors])[0]):
                    t.copy_(total)
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
            # every rank's rows in its slot of a (world_size, ...) stack per tensor, zeros elsewhere
            slots = [torch.zeros(self.world_size, *t.shape, dtype=t.dtype, device=self.comm.device)
                     for t in tensors]
            for slot, t in zip(slots, tensors):
                slot[self.rank] = t
            buffer = pack(slots)
            del slots
            self.comm.reduce(buffer, dst=owner)
            if owner != self.rank:
                continue
            stacks = iter(unpack(buffer, [torch.Size((self.world_size * m, *t.shape[1:])) for t in tensors])[0])
            for name in names:
                gathered[name] = [next(stacks) for _ in rows[name]]
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
    def share(self, results: Dict[str, Tuple[BlockVector, Optional[Tensor]]], shapes: Dict[str, Shapes],
              n_stats: int = 0) -> Dict[str, Tuple[BlockVector, Optional[Tensor]]]:
        """Each owner broadcasts its blocks' results (and the method's ``n_stats`` per-block stats) in one
        buffer.

        A block whose owner has no curvature for it yet has NaN stats on the other ranks (a host sync per
        step would be needed to leave it out, as one process does).
        """
        dtype, device = self._dtype, self.comm.device
        shared: Dict[str, Tuple[BlockVector, Optional[Tensor]]] = {}
        for owner in range(self.world_size):
            names = self._owned_by(owner)
            if not names:
                continue
            layout = [shapes[name] for name in names]
            if owner == self.rank:
                vectors = [results.get(name, (None, None))[0] for name in names]
                parts = [pack_vectors(vectors, layout, dtype, device)]
                if n_stats:
                    parts += [results[name][1].to(dtype) if results.get(name, (None, None))[1] is not None else
                              torch.full((n_stats,), float("nan"), dtype=dtype, device=device) for name in names]
                buffer = pack(parts)
                self.comm.broadcast(buffer, src=owner)
                shared.update({name: results[name] for name in names if name in results})
                continue
            size = sum(numel(shape) for shape in layout) + n_stats * len(names)
            buffer = torch.empty(size, dtype=dtype, device=device)
            self.comm.broadcast(buffer, src=owner)
            vectors, offset = unpack_vectors(buffer, layout)
            stats, _ = unpack(buffer, [torch.Size((n_stats,))] * len(names), offset)
            for name, vector, block_stats in zip(names, vectors, stats):
                shared[name] = (vector, block_stats if n_stats else None)
        return shared

    def gathered_curvature(self, local: Dict[str, Dict[str, Tensor]]) -> Dict[str, Dict[str, Tensor]]:
        gathered: Dict[str, Dict[str, Tensor]] = {}
        for owner in range(self.world_size):
            mine = {name: {k: v.cpu() for k, v in local[name].items()}
                    for name in self._owned_by(owner) if name in local} if owner == self.rank else None
            gathered.update(self.comm.broadcast_object(mine, src=owner))
        return {name: gathered[name] for name in self._blocks if name in gathered}


def _shapes_of(halves: HalfSums) -> Shapes:
    return shapes_of(halves[0] if halves[0] is not None else halves[1])
