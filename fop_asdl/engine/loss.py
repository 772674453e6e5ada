"""The user's loss exactly: what a step divides its summed-loss results by.

Every pass backpropagates the user's loss *summed* (``reduction='sum'``), so that micro-batches and ranks
simply add up. The user's loss on the whole batch is that sum S divided by its normalizer N: the number of
samples for a per-sample mean, of tokens for a token-level mean over (B·T) outputs, of output elements for
an element-wise mean, of the targets that are not ``ignore_index``, the summed class ``weight`` of the
targets, 1 for ``reduction='sum'``. N is read off each chunk as N_c = S_c / M_c, where M_c is the user's
own loss on the chunk's output (evaluated once more without autograd), so any loss with a ``reduction``
argument is divided exactly as the user divides it: the returned loss is S / N and the gradient is
autograd's of the user's loss. The normalizers of the chunks (and ranks) add up, as they do for every
mean-like reduction.

A chunk whose loss is exactly 0 under the user's reduction tells nothing about its N_c; it counts with the
average normalizer per sample of the other chunks (exact for element-wise losses). A chunk whose every
target is ignored (M_c is NaN, S_c = 0) has N_c = 0.

The per-sample methods (FOP's halves, FNGD, HyLo) define the term of sample i as n times its share of the
user's loss, r = n / N times its summed-loss term, so that the terms' mean is the user's loss and their
gradients' mean is autograd's gradient; :class:`BatchCounts` carries n, N and r.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = ["BatchCounts", "LossNormalizer", "loss_scale", "user_reduction"]

Number = Union[int, float, Tensor]


def user_reduction(loss_fn: Callable, kwargs: Dict[str, Any]) -> str:
    """The reduction the user's loss call applies: an explicit ``reduction=`` argument, an ``nn.Module``
    loss's ``reduction`` attribute, or the default of the function's ``reduction`` parameter."""
    if "reduction" in kwargs:
        return kwargs["reduction"]
    if isinstance(loss_fn, nn.Module):
        return getattr(loss_fn, "reduction", "mean")
    try:
        parameter = inspect.signature(loss_fn).parameters.get("reduction")
    except (TypeError, ValueError):  # a builtin without a signature
        parameter = None
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return "mean"
    return parameter.default


def loss_scale(grad_scaler: Optional[torch.amp.GradScaler], device: torch.device) -> Number:
    """The scale s the backpropagated loss carries: a GradScaler's current scale as a device tensor (no host
    sync), 1.0 without one. ``p.grad`` keeps it (``scaler.step`` unscales); curvature must not."""
    return 1.0 if grad_scaler is None else grad_scaler.scale(torch.ones((), device=device))


@dataclasses.dataclass(frozen=True)
class BatchCounts:
    """The global counts of one step: samples of B1 and B2 and the user's loss normalizer N."""

    n1: Number
    n2: Number
    normalizer: Number

    @property
    def n(self) -> Number:
        """All samples of the step."""
        return self.n1 + self.n2

    @property
    def per_sample(self) -> Number:
        """r = n / N: a sample's term of the user's loss is r times its summed-loss term (1 for a
        per-sample mean)."""
        return self.n / self.normalizer

    def backprop_scale(self, scale: Number) -> Number:
        """σ = s / r: what the backpropagated per-sample gradients carry against the user's per-sample terms
        (``scale`` s from :func:`loss_scale`); curvature built from them is divided by σ (σ² for squares)."""
        return scale / self.per_sample

    def weights(self) -> Tuple[Number, Number]:
        """(n1 / r, n2 / r): what B1's and B2's summed-loss sums are divided by, so that their weighted
        average is the user's gradient and each half's is r times its sum's sample mean."""
        r = self.per_sample
        return self.n1 / r, self.n2 / r


class LossNormalizer:
    """The normalizer of one step's chunks: :meth:`add` after every chunk's backward pass, then the sums
    :meth:`terms` reduced over ranks, then :meth:`resolve`.

    ``loss_fn`` None stands for a loss repr (``setup_loss_repr``: the model computes its own loss): it has no
    reduction to change, so each chunk's loss is taken as a mean over its samples (exact for per-sample or
    fixed-length means; with micro-batches or ranks, chunks are weighted by their samples).
    """

    def __init__(self, loss_fn: Optional[Callable], kwargs: Dict[str, Any]):
        self.reduction = "samples" if loss_fn is None else user_reduction(loss_fn, kwargs)
        if self.reduction == "none":
            raise ValueError("The loss call has reduction='none', so it returns a loss per element; a gradient "
                             "maker needs the scalar loss the user trains on (reduction='mean' or 'sum').")
        self._known: Any = 0    # Σ N_c over the chunks whose N_c could be read
        self._unknown: Any = 0  # samples of the chunks whose loss was exactly 0

    @property
    def is_sum(self) -> bool:
        """The user sums: N = 1, nothing to read off the chunks."""
        return self.reduction == "sum"

    @property
    def needs_user_loss(self) -> bool:
        """Whether :meth:`add` needs the user's loss on the chunk (not for a sum, nor for a loss repr)."""
        return self.reduction not in ("sum", "samples")

    def add(self, loss_sum: Tensor, user_loss: Optional[Tensor], samples: int) -> None:
        """One chunk: its summed loss S_c and the user's loss M_c on the same output (when
        :attr:`needs_user_loss`)."""
        if not self.needs_user_loss:
            self._known = self._known + samples
            return
        user_loss = user_loss.detach().to(loss_sum.dtype)
        finite_nonzero = torch.isfinite(user_loss) & (user_loss != 0)
        all_ignored = torch.isnan(user_loss) & (loss_sum == 0)
        normalizer = torch.where(finite_nonzero, loss_sum / torch.where(finite_nonzero, user_loss, 1), 0)
        unknown = torch.where(finite_nonzero | all_ignored, 0, samples).to(loss_sum.dtype)
        self._known = self._known + normalizer
        self._unknown = self._unknown + unknown

    def terms(self) -> Tuple[Any, ...]:
        """What the ranks sum: (Σ N_c known, samples of unknown chunks); nothing when the user sums."""
        if self.is_sum:
            return ()
        if not self.needs_user_loss:
            return (self._known,)
        return self._known, self._unknown

    def resolve(self, n: Number, terms: Tuple[Any, ...]) -> Number:
        """The global N from the reduced :meth:`terms` and the global sample count ``n``."""
        if self.is_sum:
            return 1
        if not self.needs_user_loss:
            return terms[0]
        known, unknown = terms
        known_samples = n - unknown
        # Chunks with zero loss count with the others' normalizer per sample; with none known, per sample.
        per_sample = torch.where(known_samples > 0, known / torch.clamp(known_samples, min=1), 1)
        return known + unknown * per_sample
