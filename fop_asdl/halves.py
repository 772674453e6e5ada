"""The two sub-batch gradient sums of every curvature block from one forward and one backward pass.

While the capture is active, the parameters of each curvature block stop requiring grad during the
block's own forward call, so autograd computes only the gradient that flows to the block's input. The
block's weight and bias gradients are instead formed here, separately for the first ⌈n/2⌉ samples (B1)
and the rest (B2), from the block input and the gradient at its output: the same arithmetic autograd
would have done once, split in two. The full batch goes through the model once, so BatchNorm sees
full-batch statistics and g_avg is exactly the full-batch gradient.

With micro-batches (or on one rank of a sharded run) the capture sees one chunk at a time: ``set_chunk``
says how many of the chunk's rows belong to B1, and the sums of all chunks add up.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["BlockSum", "HalfGradientCapture", "add_sums", "first_half_size", "supports_half_gradients"]

_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def first_half_size(n: int) -> int:
    """|B1| = ⌈n/2⌉."""
    return (n + 1) // 2


def supports_half_gradients(module: nn.Module) -> bool:
    """Whether this module's per-sub-batch gradients can be formed here (and ASDL has its curvature)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, nn.Conv2d):
        return (module.groups == 1 and module.dilation == (1, 1) and module.padding_mode == "zeros"
                and not isinstance(module.padding, str))
    if isinstance(module, _NORM):
        return module.weight is not None and module.bias is not None
    return False


def _normalization_stats(module: nn.Module, x: Tensor) -> Tuple[Tensor, Tensor]:
    """(mean, 1/std), broadcastable to ``x``, with which a BatchNorm/LayerNorm call normalised ``x``."""
    if isinstance(module, nn.LayerNorm):
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
    elif module.training or module.running_mean is None:
        dims = (0,) + tuple(range(2, x.ndim))
    else:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return module.running_mean.view(shape), torch.rsqrt(module.running_var + module.eps).view(shape)
    var, mean = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)  # one pass over x
    return mean, torch.rsqrt(var + module.eps)


BlockSum = Tuple[Tensor, Optional[Tensor]]  # (weight, bias) gradients summed over some samples


def _norm_param_grads(module: nn.Module, x: Tensor, grad_out: Tensor, halves: Sequence[slice]
                      ) -> List[BlockSum]:
    """Per-half (weight, bias) gradients of a BatchNorm/LayerNorm call: (Σ δ·x̂, Σ δ) over each half,
    with x̂ normalised by the statistics of the whole call (BatchNorm) or of each sample (LayerNorm)."""
    mean, inv_std = _normalization_stats(module, x)
    if isinstance(module, nn.LayerNorm):
        lead = tuple(range(x.ndim - len(module.normalized_shape)))
    else:
        lead = (0,) + tuple(range(2, x.ndim))
    per_sample = isinstance(module, nn.LayerNorm)  # its statistics belong to each row
    out = []
    for rows in halves:
        m, s = (mean[rows], inv_std[rows]) if per_sample else (mean, inv_std)
        g = grad_out[rows]
        out.append(((g * ((x[rows] - m) * s)).sum(lead), g.sum(lead)))
    return out


def _param_grads(module: nn.Module, x: Tensor, grad_out: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
    """(weight grad, bias grad) of a Linear or Conv2d call, summed over the samples of ``x``."""
    if isinstance(module, nn.Linear):
        g2d = grad_out.reshape(-1, grad_out.shape[-1])
        weight = g2d.T @ x.reshape(-1, x.shape[-1])
        bias = g2d.sum(0) if module.bias is not None else None
        return weight, bias
    if isinstance(module, nn.Conv2d):
        weight = torch.nn.grad.conv2d_weight(x, module.weight.shape, grad_out, module.stride,
                                             module.padding, module.dilation, module.groups)
        bias = grad_out.sum((0, 2, 3)) if module.bias is not None else None
        return weight, bias
    raise TypeError(f"no per-half gradients for {type(module).__name__}")


class _JoinGraph(torch.autograd.Function):
    """Identity on ``output`` that puts it into the autograd graph through ``anchor``; backward passes the
    gradient through and gives the anchor none."""

    @staticmethod
    def forward(ctx, output: Tensor, anchor: Tensor) -> Tensor:
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class HalfGradientCapture:
    """Context manager that records per-sub-batch gradient sums of the given blocks.

    ``sums[module]`` is ``[sum over B1, sum over B2]`` after the backward passes, each a (weight, bias)
    pair, or None where no sample of that sub-batch has been seen (a rank of the "ranks" split holds one
    sub-batch only). ``active`` lets the caller ignore backward passes that are not the loss gradient
    (ASDL's Monte-Carlo Fisher passes).
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.chunk_size = 0
        self.split = 0
        self.active = True
        self.sums: Dict[nn.Module, List[Optional[BlockSum]]] = {}
        self._handles: list = []
        self._frozen: List[nn.Parameter] = []

    def set_chunk(self, size: int, split: int) -> None:
        """The next forward call sees ``size`` samples, of which the first ``split`` belong to B1."""
        if not 0 <= split <= size:
            raise ValueError(f"split {split} outside a chunk of {size} samples")
        self.chunk_size, self.split = size, split

    def __enter__(self) -> "HalfGradientCapture":
        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._before_forward))
            self._handles.append(module.register_forward_hook(self._after_forward))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._thaw()

    def take_sums(self) -> Dict[nn.Module, List[Optional[BlockSum]]]:
        """The sums, handed over: the graph's hooks keep this capture alive as long as the model output
        lives, and must not keep the sums alive with it."""
        sums, self.sums = self.sums, {}
        return sums

    def _thaw(self) -> None:
        for param in self._frozen:
            param.requires_grad_(True)
        self._frozen.clear()

    def _before_forward(self, module: nn.Module, args: tuple):
        x = args[0]
        if x.shape[0] != self.chunk_size:
            raise ValueError(f"fop_asdl: block {module.__class__.__name__} received a tensor with leading "
                             f"dimension {x.shape[0]}, but the batch has {self.chunk_size} samples. FOP "
                             f"needs dim 0 to be the sample index inside every preconditioned layer; list "
                             f"this module in PreconditioningConfig.ignore_modules.")
        for param in (module.weight, module.bias):
            if param is not None and param.requires_grad:
                param.requires_grad_(False)
                self._frozen.append(param)
        return None

    def _after_forward(self, module: nn.Module, args: tuple, output: Tensor) -> Optional[Tensor]:
        self._thaw()
        if not torch.is_grad_enabled():
            return None
        if not output.requires_grad:
            # Neither the input (a first layer) nor the frozen parameters require grad, so the output left
            # the graph and the gradient at it (which ASDL's Fisher needs too) would never be formed. Join it
            # to the graph through a free identity rather than making the input require grad, which would
            # have autograd compute an input gradient that nothing uses.
            output = _JoinGraph.apply(output, output.new_zeros((), requires_grad=True))
        x = args[0].detach()  # shares the version counter: in-place changes stay visible
        # The hook holds the input in a box that it empties once it has used it: autograd frees each saved
        # input as soon as its node has run, and the capture must not keep every block's input alive
        # until the whole graph is freed at the end of the step.
        box, split = [x], self.split
        output.register_hook(
            lambda grad, m=module, v=x._version, k=split: self._on_output_grad(m, box, v, k, grad))
        return output

    def _on_output_grad(self, module: nn.Module, box: List[Tensor], version: int, split: int,
                        grad_out: Tensor) -> None:
        if not self.active or not box:  # a Fisher pass (not the loss gradient), or the input was used
            return
        x = box.pop()
        if x._version != version:  # autograd no longer saves x for this layer, so it cannot check this
            raise RuntimeError(f"fop_asdl: the input of a {module.__class__.__name__} block was modified in "
                               f"place after the layer used it; FOP needs it intact for the layer's gradient. "
                               f"Make that operation out of place (e.g. relu without inplace=True).")
        size = x.shape[0]
        halves = [rows for rows in (slice(0, split), slice(split, size)) if rows.stop > rows.start]
        dtype = module.weight.dtype  # under autocast x and grad_out are bf16/fp16; the sums are not
        x, grad_out = x.to(dtype), grad_out.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if isinstance(module, _NORM):
                sums = iter(_norm_param_grads(module, x, grad_out, halves))
            else:
                sums = iter([_param_grads(module, x[rows], grad_out[rows]) for rows in halves])
        new = [next(sums) if 0 < split else None, next(sums) if split < size else None]
        previous = self.sums.get(module)
        # Chunks of a micro-batched step, and modules called more than once (shared weights), add up.
        self.sums[module] = new if previous is None else [add_sums(a, b) for a, b in zip(previous, new)]


def add_sums(a: Optional[BlockSum], b: Optional[BlockSum]) -> Optional[BlockSum]:
    """a + b for (weight, bias) sums, where None stands for no samples (zero)."""
    if a is None or b is None:
        return b if a is None else a
    return a[0] + b[0], None if a[1] is None else a[1] + b[1]
