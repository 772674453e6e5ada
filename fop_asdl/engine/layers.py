"""The layer types beyond Linear and the norms, as every method's math sees them: convolutions (``Conv1d`` as a
``Conv2d`` of unit height; any groups, dilation, string padding or padding mode), ``ConvTranspose2d`` and
``Embedding``. One place says which of them a method can take and why not, and turns a call's tensors into
the plain 2-D, zero-padded form the curvature, Gram and row formulas are written for.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CONVS", "Geometry", "as_2d", "conv_input", "conv_weight_sum", "embedding_problem", "embedding_tokens",
           "geometry", "grouped", "unsupported_reason"]

#: Convolutions whose weight gradient is Σ_s g_s p_sᵀ over output positions s (patches p of the input).
CONVS = (nn.Conv1d, nn.Conv2d)
Pair = Tuple[int, int]


class Geometry(NamedTuple):
    """A convolution as a 2-D one on an input padded beforehand: kernel, stride, padding, dilation (pairs)."""

    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int


def _explicit_padding(module: nn.Module) -> bool:
    """Whether the input must be padded before the convolution: a non-zero padding mode, or string padding
    (which may be asymmetric), as torch's own forward does for the padding mode."""
    return module.padding_mode != "zeros" or isinstance(module.padding, str)


def geometry(module: nn.Module) -> Geometry:
    """The 2-D geometry of a Conv1d/Conv2d/ConvTranspose2d on :func:`conv_input`'s input."""
    one_d = isinstance(module, nn.Conv1d)
    padding = (0, 0) if _explicit_padding(module) else tuple(module.padding)
    if one_d:
        return Geometry((1, module.kernel_size[0]), (1, module.stride[0]), (0, padding[0]),
                        (1, module.dilation[0]), module.groups)
    return Geometry(tuple(module.kernel_size), tuple(module.stride), tuple(padding), tuple(module.dilation),
                    module.groups)


def conv_input(module: nn.Module, x: Tensor) -> Tensor:
    """A convolution's input as the layer convolves it: padded here when :func:`geometry` says padding 0."""
    if isinstance(module, CONVS) and _explicit_padding(module):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    return x


def as_2d(module: nn.Module, t: Tensor) -> Tensor:
    """A Conv1d's (n, C, L) tensor as (n, C, 1, L); others unchanged."""
    return t.unsqueeze(2) if isinstance(module, nn.Conv1d) else t


def conv_weight_sum(module: nn.Module, x: Tensor, grad_out: Tensor, rows: slice = slice(None)) -> Tensor:
    """The weight gradient of one call summed over ``rows`` of its samples, from its input ``x`` (as the layer
    received it) and output gradient: the GEMM autograd would run, for every convolution type."""
    x, grad_out = x[rows], grad_out[rows]
    transposed = isinstance(module, nn.ConvTranspose2d)
    x = conv_input(module, x)
    padding = (0,) * (x.dim() - 2) if not transposed and _explicit_padding(module) else module.padding
    weight = grad_out.new_empty(1).expand(module.weight.shape)
    output_padding = module.output_padding if transposed else (0,) * (x.dim() - 2)
    return torch.ops.aten.convolution_backward(grad_out, x, weight, None, module.stride, padding, module.dilation,
                                               transposed, output_padding, module.groups, (False, True, False))[1]


def grouped(tensor: Tensor, groups: int, dim: int) -> Tensor:
    """``tensor`` with dim ``dim`` split into (groups, size / groups)."""
    shape = tensor.shape
    return tensor.reshape(shape[:dim] + (groups, shape[dim] // groups) + shape[dim + 1:])


def embedding_problem(module: nn.Embedding) -> Optional[str]:
    """Why an Embedding cannot be a block, or None."""
    if module.sparse:
        return "sparse gradients"
    if module.scale_grad_by_freq:
        return "scale_grad_by_freq: a sample's gradient depends on the whole batch's token counts"
    return None


def embedding_tokens(module: nn.Embedding, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(token ids (n, T), weight (n, T): 0 at ``padding_idx``, whose row autograd never updates, else 1)."""
    ids = x.reshape(x.shape[0], -1)
    if module.padding_idx is None:
        return ids, torch.ones(ids.shape, dtype=module.weight.dtype, device=ids.device)
    return ids, (ids != module.padding_idx).to(module.weight.dtype)


def unsupported_reason(module: nn.Module, per_sample: bool) -> Optional[str]:
    """Why a layer type this module knows cannot be a block of a Kronecker (``per_sample`` False) or per-sample
    method, or None when it can. Linear and the norms are not this module's business."""
    if isinstance(module, nn.Embedding):
        return embedding_problem(module)
    if isinstance(module, nn.ConvTranspose2d):
        if module.groups != 1:
            return "grouped transposed convolution"
        return None
    return None
