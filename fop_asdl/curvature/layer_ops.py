"""ASDL operations (the per-module curvature of :mod:`asdl.operations`) for the layers ASDL 0.1a5 lacks or
gets wrong; :mod:`fop_asdl.compat` puts them in ASDL's lookup (docs/asdl_fixes.md, fixes 12-13). Their
factors follow :mod:`fop_asdl.curvature.factors`: B on the rows of the weight as stored, A on its columns.

* ``Embedding``: the weight is (V, D), one row per token id. ASDL's op crashes on a batch of single ids
  (``bincount`` of a 0-d tensor), counts ``padding_idx`` tokens whose row never gets a gradient, and for
  sequences builds A = Σ_n c_n c_nᵀ from per-sample counts c_n: cross-token terms that K-FAC of the same
  layer as a Linear on one-hot rows (ASDL's own Linear op on (n, T, V) one-hots) does not have, beside a
  B summed over tokens. Here the embedding is that Linear: B = diag(token counts, padding excluded) on the
  rows, stored as the vector of its diagonal (a V×V matrix would not fit a vocabulary), and A = Σ g gᵀ over
  all tokens on the columns, both per sample of the summed loss as for every Kron block.
* ``Conv``: Conv1d (ASDL has none) as a Conv2d of unit height, ConvTranspose2d (ASDL has none) as the
  Conv2d of its flipped, transposed weight on its zero-inserted input, and Conv2d with groups, dilation,
  string padding or a non-zero padding mode (ASDL's im2col refuses dilation and ignores groups and the
  padding mode): ASDL's conv factors on ``F.unfold`` patches of the input as that Conv2d convolves it
  (:mod:`fop_asdl.engine.layers`); with groups, one (A_g, B_g) pair per group, stacked.
* ``GroupNorm`` (ASDL has none): the unit-wise 2×2 curvature per channel of (Σ δ x̂, Σ δ) per sample,
  as ASDL's BatchNorm2d op; x̂ from the input and the group statistics (not from dividing the output by
  the weight, which fails for a zero weight).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from asdl.operations import Conv2d as _AsdlConv2d, Embedding as _AsdlEmbedding, Operation
from asdl.operations.operation import (OP_COV_KRON, OP_COV_SWIFT_KRON, OP_COV_UNIT_WISE, OP_COV_UNIT_WISE_INV,
                                       OP_SAVE_INPUTS, OP_SAVE_OUTGRADS, OP_SAVE_OUTPUTS)
from torch import Tensor, nn

from ..engine.layers import as_2d, conv_input, embedding_tokens, geometry

__all__ = ["Conv", "Embedding", "GroupNorm", "op_class"]

_SAVE = [OP_SAVE_INPUTS, OP_SAVE_OUTPUTS, OP_SAVE_OUTGRADS]


@contextlib.contextmanager
def _without(op: Operation, name: str) -> Iterator[None]:
    """ASDL's own code for every operation of ``op`` but ``name``, which the subclass did itself."""
    names = op._op_names
    op._op_names = names - {name}
    try:
        yield
    finally:
        op._op_names = names


class Embedding(_AsdlEmbedding):
    """K-FAC of an Embedding as a Linear on one-hot rows (module docstring): B = token counts (diagonal), A
    = output-gradient covariance."""

    # Both hooks run in the factor dtype (fop_asdl.compat fix 2b wraps them as it wraps ASDL's): out_data and
    # out_grads arrive in it, the token ids as they are.
    def forward_post_process(self, in_data: Tensor, out_data: Tensor):
        module = self._module
        if OP_COV_KRON in self._op_names:
            ids, keep = embedding_tokens(module, in_data)
            counts = torch.zeros(module.num_embeddings, dtype=out_data.dtype, device=keep.device)
            counts.index_add_(0, ids.reshape(-1), keep.reshape(-1).to(out_data.dtype))
            self.accumulate_result(counts.mul_(self._cov_scale), OP_COV_KRON, "B")
        with _without(self, OP_COV_KRON):
            super().forward_post_process(in_data, out_data)

    def backward_pre_process(self, out_grads: Tensor, vector: Tensor = None):
        if OP_COV_KRON in self._op_names:
            g = out_grads.flatten(end_dim=-2)
            self.accumulate_result((g.T @ g).mul_(self._cov_scale), OP_COV_KRON, "A")
        with _without(self, OP_COV_KRON):
            super().backward_pre_process(out_grads, vector)


class Conv(_AsdlConv2d):
    """Kronecker factors of any Conv1d/Conv2d on ``F.unfold`` patches; one factor pair per group."""

    supported_operations = {OP_COV_KRON, OP_COV_SWIFT_KRON, *_SAVE}

    @staticmethod
    def preprocess_in_data(module: nn.Module, in_data: Tensor, out_data: Tensor) -> Tensor:
        g = geometry(module)  # n x (c_in)(kh)(kw) x (h_out)(w_out), channels in weight order
        return F.unfold(as_2d(module, conv_input(module, in_data)), g.kernel, dilation=g.dilation,
                        padding=g.padding, stride=g.stride)

    @staticmethod
    def preprocess_out_grads(module: nn.Module, out_grads: Tensor) -> Tensor:
        return out_grads.flatten(start_dim=2)  # n x c_out x (h_out)(w_out)

    @staticmethod
    def _by_group(module: nn.Module, t: Tensor) -> Tensor:
        """(n, G·c, S) -> (G, c, n·S)."""
        n, channels, positions = t.shape
        return t.reshape(n, module.groups, channels // module.groups, positions).permute(1, 2, 0, 3).flatten(2)

    @staticmethod
    def cov_kron_A(module: nn.Module, in_data: Tensor) -> Tensor:
        if module.groups == 1:
            return _AsdlConv2d.cov_kron_A(module, in_data)
        m = Conv._by_group(module, in_data)
        return torch.matmul(m, m.transpose(1, 2)).div(in_data.shape[-1])

    @staticmethod
    def cov_kron_B(module: nn.Module, out_grads: Tensor) -> Tensor:
        if module.groups == 1:
            return _AsdlConv2d.cov_kron_B(module, out_grads)
        m = Conv._by_group(module, out_grads)
        return torch.matmul(m, m.transpose(1, 2))

    @staticmethod
    def _no_swift(module: nn.Module) -> None:
        if module.groups != 1:
            raise NotImplementedError("SKFAC (swift=True) has no factors per group; use swift=False or list the "
                                      "grouped convolution in PreconditioningConfig.ignore_modules.")

    @classmethod
    def cov_swift_kron_A(cls, module: nn.Module, in_data: Tensor) -> Tensor:
        cls._no_swift(module)
        return super().cov_swift_kron_A(module, in_data)

    @classmethod
    def cov_swift_kron_B(cls, module: nn.Module, out_grads: Tensor) -> Tensor:
        cls._no_swift(module)
        return super().cov_swift_kron_B(module, out_grads)


class GroupNorm(Operation):
    """Unit-wise curvature of a GroupNorm: per channel the 2×2 sum over samples of (Σ δ x̂, Σ δ)(…)ᵀ."""

    supported_operations = {OP_COV_UNIT_WISE, OP_COV_UNIT_WISE_INV, *_SAVE}

    @staticmethod
    def preprocess_in_data(module: nn.GroupNorm, in_data: Tensor, out_data: Tensor) -> Tensor:
        groups = in_data.reshape(in_data.shape[0], module.num_groups, -1)
        var, mean = torch.var_mean(groups, dim=2, unbiased=False, keepdim=True)
        return ((groups - mean) * torch.rsqrt(var + module.eps)).view_as(in_data)

    @staticmethod
    def extend_in_data(in_data: Tensor) -> Tensor:
        return in_data  # ASDL appends a column of ones for a bias of other layer types

    @staticmethod
    def cov_unit_wise(module: nn.GroupNorm, in_data: Tensor, out_grads: Tensor) -> Tensor:
        dims = tuple(range(2, in_data.ndim))
        grads_w = (in_data * out_grads).sum(dims) if dims else in_data * out_grads  # n x c
        grads_b = out_grads.sum(dims) if dims else out_grads
        per_sample = torch.stack([grads_w, grads_b], dim=2)  # n x c x 2
        return torch.einsum("nci,ncj->cij", per_sample, per_sample)  # c x 2 x 2


def op_class(module: nn.Module):
    """This module's operation class for the layers above, None for the others (ASDL's own lookup)."""
    if isinstance(module, nn.Embedding):
        return Embedding
    if isinstance(module, nn.GroupNorm):
        return GroupNorm
    if isinstance(module, (nn.Conv1d, nn.ConvTranspose2d)) or (isinstance(module, nn.Conv2d) and (
            module.groups != 1 or module.dilation != (1, 1) or module.padding_mode != "zeros"
            or isinstance(module.padding, str))):
        return Conv
    return None
