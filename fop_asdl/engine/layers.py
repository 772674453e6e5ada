"""The layer types beyond Linear and the norms, as every method's math sees them: convolutions and
``Embedding``. Each convolution is seen as a plain ``Conv2d`` with zero padding on an input prepared here, so
the curvature, Gram and row formulas are written once:

* ``Conv1d``: a Conv2d of unit height;
* a non-zero padding mode or string padding (possibly asymmetric): the input padded beforehand, as torch's
  own forward pads it for the padding mode;
* ``ConvTranspose2d``: exactly the Conv2d of its flipped, transposed weight W' (out, in/groups, kh, kw),
  stride 1, on its input with stride − 1 zeros inserted between entries and padded by dilation·(k − 1) −
  padding (+ output_padding after). Its blocks hold their gradients in W' layout (:func:`to_conv_layout`);
  ``write_block`` turns them back.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CONVS", "Geometry", "as_2d", "conv_input", "conv_weight_shape", "conv_weight_sum", "embedding_problem",
           "embedding_tokens", "from_conv_layout", "geometry", "matrix_shapes", "to_conv_layout"]

#: Convolutions whose weight gradient is Σ_s g_s p_sᵀ over output positions s (patches p of the input).
CONVS = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d)
Pair = Tuple[int, int]


class Geometry(NamedTuple):
    """A convolution as a 2-D one on :func:`conv_input`: kernel, stride, padding, dilation (pairs), groups."""

    kernel: Pair
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int


def _explicit_padding(module: nn.Module) -> bool:
    """Whether the input is padded before the convolution: a transposed convolution, a non-zero padding mode
    or string padding."""
    return isinstance(module, nn.ConvTranspose2d) or module.padding_mode != "zeros" or isinstance(module.padding, str)


def geometry(module: nn.Module) -> Geometry:
    """The 2-D geometry of a Conv1d/Conv2d/ConvTranspose2d on :func:`conv_input`'s input."""
    if isinstance(module, nn.ConvTranspose2d):
        return Geometry(tuple(module.kernel_size), (1, 1), (0, 0), tuple(module.dilation), module.groups)
    padding = (0, 0) if _explicit_padding(module) else tuple(module.padding)
    if isinstance(module, nn.Conv1d):
        return Geometry((1, module.kernel_size[0]), (1, module.stride[0]), (0, padding[0]),
                        (1, module.dilation[0]), module.groups)
    return Geometry(tuple(module.kernel_size), tuple(module.stride), tuple(padding), tuple(module.dilation),
                    module.groups)


def conv_input(module: nn.Module, x: Tensor) -> Tensor:
    """A convolution's input as the Conv2d of :func:`geometry` convolves it (padded, zeros inserted)."""
    if isinstance(module, nn.ConvTranspose2d):
        (sh, sw), (kh, kw), (dh, dw) = module.stride, module.kernel_size, module.dilation
        spread = x.new_zeros(x.shape[0], x.shape[1], (x.shape[2] - 1) * sh + 1, (x.shape[3] - 1) * sw + 1)
        spread[:, :, ::sh, ::sw] = x
        (ph, pw), (oh, ow) = module.padding, module.output_padding
        top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw  # negative: F.pad crops
        return F.pad(spread, (left, left + ow, top, top + oh))
    if _explicit_padding(module):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    return x


def as_2d(module: nn.Module, t: Tensor) -> Tensor:
    """A Conv1d's (n, C, L) tensor as (n, C, 1, L); others unchanged."""
    return t.unsqueeze(2) if isinstance(module, nn.Conv1d) else t


def conv_weight_shape(module: nn.Module) -> torch.Size:
    """The 4-D weight shape of the Conv2d a convolution is seen as (out, in/groups, kh, kw)."""
    shape = module.weight.shape
    if isinstance(module, nn.Conv1d):
        return torch.Size((shape[0], shape[1], 1, shape[2]))
    if isinstance(module, nn.ConvTranspose2d):
        return torch.Size((module.out_channels, module.in_channels // module.groups, shape[2], shape[3]))
    return shape


def matrix_shapes(module: nn.Module) -> Tuple[torch.Size, Optional[torch.Size]]:
    """(weight, bias) shapes of a block's vectors as the Kronecker math sees them: a convolution's weight as the
    (out, in/groups·kh·kw) matrix of the Conv2d it is seen as (a ConvTranspose2d's W'); no bias for an
    Embedding."""
    weight = module.weight.shape
    if isinstance(module, CONVS):
        shape = conv_weight_shape(module)
        weight = torch.Size((shape[0], shape[1:].numel()))
    bias = getattr(module, "bias", None)
    return weight, None if bias is None else bias.shape


def to_conv_layout(module: nn.Module, weight: Tensor) -> Tensor:
    """A ConvTranspose2d's weight (or gradient) W (in, out/G, kh, kw) as W' (out, in/G, kh, kw): per group
    transposed, kernel flipped. Other layers' unchanged."""
    if not isinstance(module, nn.ConvTranspose2d):
        return weight
    groups, (c_in, per_group, kh, kw) = module.groups, module.weight.shape
    w = weight.reshape(groups, c_in // groups, per_group, kh, kw).transpose(1, 2)
    return w.reshape(module.out_channels, c_in // groups, kh, kw).flip(-2, -1)


def from_conv_layout(module: nn.Module, weight: Tensor) -> Tensor:
    """The inverse of :func:`to_conv_layout`, from any shape of W' (a block vector) to the weight's shape."""
    if not isinstance(module, nn.ConvTranspose2d):
        return weight.reshape(module.weight.shape)
    groups, (c_in, per_group, kh, kw) = module.groups, module.weight.shape
    w = weight.reshape(groups, per_group, c_in // groups, kh, kw).flip(-2, -1).transpose(1, 2)
    return w.reshape(module.weight.shape)


def conv_weight_sum(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tensor:
    """The weight gradient of one call summed over its samples (a ConvTranspose2d's in W' layout), from its
    input ``x`` as the layer received it and its output gradient: the GEMM autograd runs."""
    transposed = isinstance(module, nn.ConvTranspose2d)
    padding = module.padding
    if not transposed and _explicit_padding(module):
        x, padding = conv_input(module, x), (0,) * (x.dim() - 2)
    weight = grad_out.new_empty(1).expand(module.weight.shape)
    output_padding = module.output_padding if transposed else (0,) * (x.dim() - 2)
    grad = torch.ops.aten.convolution_backward(grad_out, x, weight, None, module.stride, padding, module.dilation,
                                               transposed, output_padding, module.groups, (False, True, False))[1]
    return to_conv_layout(module, grad)


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
