"""HyLo's refresh (HYLO_SPEC §2-§4): every block's rows selected locally (KIS or KID), one all-gather of all
blocks' kept rows, each owner's r×r matrix M, the owners' broadcast; the factors every rank then holds."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..distributed.packing import pack, unpack
from ..engine.layers import CONVS, conv_weight_shape
from ..engine.loss import loss_scale
from . import hylo_math
from .hylo_schedule import local_rows

__all__ = ["owner_costs", "refresh_factors", "total_rows"]

_NOMINAL_LOCAL_BATCH = 128  # the paper's per-GPU batch (ResNet-32), for the owners' cost balance only


def refresh_factors(maker: Any, method: str, chunks: Dict[str, List[Tuple[Tensor, Tensor]]], per_sample: Any
                    ) -> Dict[str, hylo_math.LowRankFactors]:
    """Every block's new factors: select locally, one all-gather, owners build M, owners broadcast M.
    ``maker`` is the :class:`~fop_asdl.methods.hylo.HyLoGradientMaker` whose options, generator and sync it
    uses; ``chunks`` each block's (A, G) rows per chunk; ``per_sample`` r of
    :class:`~fop_asdl.engine.loss.BatchCounts`. The rows stay in the maker's factor dtype, KID's Y_i and M
    are solved and kept in its inverse dtype."""
    world, names = maker._sync.world_size, list(chunks)
    factor, inverse = maker.precision.factor, maker.precision.inverse
    # G carries the backpropagated loss's scale σ against the user's per-sample terms (the GradScaler's
    # s, and 1 / r for a loss normalised by more than its samples); K would carry σ² against a fixed α.
    inv_scale = per_sample / loss_scale(maker.grad_scaler, maker.device)
    local: Dict[str, hylo_math.LocalFactors] = {}
    vocab = {name: _vocab(maker._modules[name]) for name in names}
    for name in names:
        a, g = (torch.cat(part) for part in zip(*chunks[name]))
        if not (isinstance(inv_scale, float) and inv_scale == 1.0):
            g = g * (inv_scale.to(g.dtype) if isinstance(inv_scale, Tensor) else inv_scale)
        rank, total = local_rows(maker.compression_ratio, a.shape[0]), world * a.shape[0]
        if method == "kis":
            local[name] = hylo_math.kis_select(a, g, rank, maker.generator, probability=maker.kis_probability,
                                               reweight=maker.kis_reweight, vocab=vocab[name])
        else:
            kept = hylo_math.kid_select(a.to(inverse), g.to(inverse), rank, maker.damping,
                                        kernel_scaling=maker.kernel_scaling, total_rows=total,
                                        skeleton=maker.kid_skeleton, vocab=vocab[name])
            local[name] = hylo_math.LocalFactors(kept.a.to(factor), kept.g.to(factor), kept.y, kept.index)
    tensors = {name: [t for t in (local[name].a, local[name].g, local[name].y) if t is not None] for name in names}
    packed = pack(t for name in names for t in tensors[name])
    gathered = maker._sync.all_gather(packed)  # (world, size): every rank's rows of every block
    shares = iter(unpack(gathered, [t.shape for name in names for t in tensors[name]])[0])  # (world, ...)
    rows = {name: [next(shares) for _ in tensors[name]] for name in names}
    matrices: Dict[str, Tuple[BlockVector, None]] = {}
    for name in names:
        if not maker._sync.owns(name):
            continue
        a, g = rows[name][0].flatten(0, 1).to(inverse), rows[name][1].flatten(0, 1).to(inverse)
        if method == "kis":
            f = hylo_math.kis_factors(a, g, maker.damping, kernel_scaling=maker.kernel_scaling,
                                      total_rows=total_rows(maker, chunks[name]), reweighted=maker.kis_reweight,
                                      vocab=vocab[name])
        else:
            f = hylo_math.kid_factors(a, g, [y.to(inverse) for y in rows[name][2]],
                                      kernel_scaling=maker.kernel_scaling, total_rows=total_rows(maker, chunks[name]),
                                      vocab=vocab[name])
        matrices[name] = ((f.matrix, None), None)
    shapes = {name: (torch.Size([rows[name][0].shape[0] * rows[name][0].shape[1]] * 2), None)
              for name in names}
    shared = maker._sync.share(matrices, shapes) if names else {}
    factors = {}
    for name in names:
        a, g = rows[name][0].flatten(0, 1).to(factor), rows[name][1].flatten(0, 1).to(factor)
        scale = hylo_math.prefactor(method, a.shape[0], kernel_scaling=maker.kernel_scaling,
                             total_rows=total_rows(maker, chunks[name]), reweighted=maker.kis_reweight)
        factors[name] = hylo_math.LowRankFactors(a, g, shared[name][0][0].to(inverse), scale, vocab[name])
    return factors

def total_rows(maker: Any, chunks: List[Tuple[Tensor, Tensor]]) -> int:
    """N, the global rows of a block: the all-gather checked every rank has as many as this one."""
    return maker._sync.world_size * sum(a.shape[0] for a, _ in chunks)


def owner_costs(blocks: Sequence[Tuple[str, nn.Module]], compression_ratio: float) -> Dict[str, float]:
    """The owner's refresh work per block, ≈ 4r³ + 2r²(d_a + d_g), at a nominal local batch (r is the same
    for every layer, so only the widths differ): what the owners are balanced by."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    r = world * local_rows(compression_ratio, _NOMINAL_LOCAL_BATCH)
    return {name: 4.0 * r ** 3 + 2.0 * r ** 2 * sum(_widths(m)) for name, m in blocks}


def _widths(module: nn.Module) -> Tuple[int, int]:
    """(d_a, d_g) of a block's rows; d_a counts the bias column (an Embedding: its vocabulary, its width; a
    convolution: of the Conv2d it is seen as, whose weight a ConvTranspose2d's is transposed)."""
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    shape = conv_weight_shape(module) if isinstance(module, CONVS) else module.weight.shape
    return shape[1:].numel() + (module.bias is not None), shape[0]


def _vocab(module: nn.Module) -> int:
    """The width of a block's one-hot rows (held as ids): an Embedding's vocabulary; 0 for dense rows."""
    return module.num_embeddings if isinstance(module, nn.Embedding) else 0


