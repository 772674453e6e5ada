"""Torch's own attention layers as blocks of every maker on the shared step (FOP, K-FAC, FNGD, HyLo).

``nn.MultiheadAttention`` computes its q, k, v and output projections with ``F.linear`` on its own packed
parameters, so no module hook ever sees them, and ASDL 0.1a5 rejects its ``out_proj`` (a Linear subclass)
by class name. While a maker's step runs (and while it is constructed), :class:`AttentionRouting`
re-parametrises every attention layer: three :class:`AttentionProjection` modules (``q_proj``, ``k_proj``,
``v_proj``), whose weight and bias are windows onto the rows of the layer's own ``in_proj_weight`` /
``q_proj_weight`` ... and ``in_proj_bias``, stand in for those parameters, and the layer's forward calls
them and its ``out_proj`` as modules, so ASDL's hooks and FOP's capture see each projection as a Linear
block of its own. At the end of the step the projections' gradients are gathered into the ``.grad`` of the
user's real parameters and everything is put back: outside the step the model, its ``parameters()`` and
its ``state_dict()`` are exactly the user's, and torch's own forward runs.

Inside the step every projection sees batch-first tensors (dim 0 = sample, as FOP's per-half sums need):
a ``batch_first=False`` attention layer transposes its inputs, and the outermost sequence-first torch
transformer module (``nn.Transformer``, ``nn.TransformerEncoder``/``Decoder`` and their layers) runs
batch-first inside, so its Linear and LayerNorm layers see samples first too.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionProjection", "AttentionRouting", "attention_blocks", "routing_of"]

PROJECTIONS = ("q_proj", "k_proj", "v_proj")
#: Torch's sequence-first modules and the names of their sequence arguments (all other arguments are masks).
_SEQUENCE_ARGS: Dict[type, Tuple[str, ...]] = {
    nn.Transformer: ("src", "tgt"),
    nn.TransformerEncoder: ("src",),
    nn.TransformerDecoder: ("tgt", "memory"),
    nn.TransformerEncoderLayer: ("src",),
    nn.TransformerDecoderLayer: ("tgt", "memory"),
}




class AttentionProjection(nn.Linear):
    """q, k or v of an attention layer as a Linear block. Its parameters are windows onto rows of the
    layer's real parameters (same storage), re-opened at every step so that they follow ``.to()``,
    ``load_state_dict`` and optimizer updates of the real ones."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight.detach(), weight.requires_grad)
        self.register_parameter("bias", None if bias is None else nn.Parameter(bias.detach(), bias.requires_grad))


# A window: (projection, "weight" | "bias", real parameter's name, its rows).
_Window = Tuple[AttentionProjection, str, str, slice]


class _RoutedAttention:
    """One ``nn.MultiheadAttention`` and its three projections."""

    def __init__(self, name: str, mha: nn.MultiheadAttention):
        for attr in PROJECTIONS:
            if hasattr(mha, attr):
                raise ValueError(f"fop_asdl: attention layer '{name}' already has an attribute '{attr}', the name "
                                 f"its projection block would take; rename it, or list '{name}' in "
                                 f"PreconditioningConfig.ignore_modules.")
        e = mha.embed_dim
        thirds = [slice(0, e), slice(e, 2 * e), slice(2 * e, 3 * e)]
        if mha._qkv_same_embed_dim:
            weights = [("in_proj_weight", rows) for rows in thirds]
        else:
            weights = [(f"{p}_proj_weight", slice(None)) for p in "qkv"]
        self.mha = mha
        self.projections: Dict[str, AttentionProjection] = {}
        self.windows: List[_Window] = []
        for attr, (w_name, w_rows), b_rows in zip(PROJECTIONS, weights, thirds):
            bias = None if mha.in_proj_bias is None else mha.in_proj_bias[b_rows]
            proj = AttentionProjection(getattr(mha, w_name)[w_rows], bias)
            self.projections[attr] = proj
            self.windows.append((proj, "weight", w_name, w_rows))
            if bias is not None:
                self.windows.append((proj, "bias", "in_proj_bias", b_rows))
        self.covered = list(dict.fromkeys(w[2] for w in self.windows))
        self._saved: Optional[Dict[str, Any]] = None

    def attach(self) -> None:
        """Projections in, the covered real parameters out of ``_parameters`` (still readable as attributes)."""
        mha = self.mha
        self._saved = dict(mha._parameters)
        for name in self.covered:
            real = mha._parameters.pop(name)
            mha.__dict__[name] = real
        with torch.no_grad():
            for proj, attr, name, rows in self.windows:
                real = mha.__dict__[name]
                param = getattr(proj, attr)
                param.data = real.detach()[rows]
                param.requires_grad_(real.requires_grad)
        mha._modules.update(self.projections)
        mha.__dict__["forward"] = functools.partial(_attend, mha, self.projections)

    def detach(self) -> None:
        """Back to the user's module, parameter order included."""
        mha = self.mha
        del mha.__dict__["forward"]
        for attr in PROJECTIONS:
            mha._modules.pop(attr, None)
        for name in self.covered:
            mha.__dict__.pop(name, None)
        mha._parameters.clear()
        mha._parameters.update(self._saved)
        self._saved = None

    def gather(self) -> None:
        """The projections' gradients into the real parameters' ``.grad`` (overwritten, as the makers overwrite
        their blocks'), rows of a projection without a gradient as zeros; None where no projection has one."""
        for name in self.covered:
            real = self._saved[name] if self._saved is not None else getattr(self.mha, name)
            parts = [(getattr(p, attr), rows) for p, attr, n, rows in self.windows if n == name]
            grads = [param.grad for param, _ in parts]
            if all(g is None for g in grads):
                real.grad = None
            else:
                full = [g if g is not None else torch.zeros_like(param) for g, (param, _) in zip(grads, parts)]
                real.grad = (full[0] if len(full) == 1 else torch.cat(full)).reshape(real.shape)
            for param, _ in parts:
                param.grad = None


def _additive_mask(mask: Optional[Tensor], dtype: torch.dtype, what: str) -> Optional[Tensor]:
    """A bool mask (True = masked) as 0/-inf, a float mask as given: how torch's attention reads them."""
    if mask is None or torch.is_floating_point(mask):
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"{what}: only bool and floating-point masks are supported, got {mask.dtype}.")
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


def _attend(mha: nn.MultiheadAttention, proj: Dict[str, AttentionProjection], query: Tensor, key: Tensor,
            value: Tensor, key_padding_mask: Optional[Tensor] = None, need_weights: bool = True,
            attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
            is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
    """``nn.MultiheadAttention.forward``'s arithmetic, batch-first, with the projections called as modules."""
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    elif not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    n, tgt_len, src_len, heads, head_dim = query.shape[0], query.shape[1], key.shape[1], mha.num_heads, mha.head_dim
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint (torch's MultiheadAttention rule); "
                           "nn.Transformer.generate_square_subsequent_mask makes one.")
    causal = is_causal and key_padding_mask is None and not need_weights  # torch then ignores attn_mask
    kpm = _additive_mask(key_padding_mask, query.dtype, "key_padding_mask")
    mask = None if causal else _additive_mask(attn_mask, query.dtype, "attn_mask")
    if mask is not None:
        expected = {2: (tgt_len, src_len), 3: (n * heads, tgt_len, src_len)}.get(mask.dim())
        if expected is None or tuple(mask.shape) != expected:
            raise RuntimeError(f"attn_mask has shape {tuple(mask.shape)}; expected {(tgt_len, src_len)} or "
                               f"{(n * heads, tgt_len, src_len)}.")
        mask = mask.view(1, 1, tgt_len, src_len) if mask.dim() == 2 else mask.view(n, heads, tgt_len, src_len)
    q, k, v = proj["q_proj"](query), proj["k_proj"](key), proj["v_proj"](value)
    pad = mha.add_zero_attn + (mha.bias_k is not None)  # extra key/value positions, never masked
    if mha.bias_k is not None:
        k = torch.cat([k, mha.bias_k.expand(n, 1, -1)], 1)
        v = torch.cat([v, mha.bias_v.expand(n, 1, -1)], 1)
    q, k, v = (t.view(n, t.shape[1], heads, head_dim).transpose(1, 2) for t in (q, k, v))
    if mha.add_zero_attn:
        k = torch.cat([k, k.new_zeros(n, heads, 1, head_dim)], 2)
        v = torch.cat([v, v.new_zeros(n, heads, 1, head_dim)], 2)
    if pad:
        mask = None if mask is None else F.pad(mask, (0, pad))
        kpm = None if kpm is None else F.pad(kpm, (0, pad))
    if kpm is not None:
        kpm = kpm.view(n, 1, 1, -1)
        mask = kpm if mask is None else mask + kpm
    dropout = mha.dropout if mha.training else 0.0
    weights = None
    if need_weights:
        scores = (q * math.sqrt(1.0 / head_dim)) @ k.transpose(-2, -1)
        weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
        out = (F.dropout(weights, dropout) if dropout > 0 else weights) @ v
        weights = weights.mean(1) if average_attn_weights else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout, is_causal=causal)
    out = mha.out_proj(out.transpose(1, 2).reshape(n, tgt_len, mha.embed_dim))
    if not batched:
        return out.squeeze(0), None if weights is None else weights.squeeze(0)
    return (out if mha.batch_first else out.transpose(0, 1)), weights


def _is_sequence_first(module: nn.Module) -> bool:
    if isinstance(module, nn.Transformer):
        return not module.batch_first
    layer = module.layers[0] if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)) else module
    return not layer.self_attn.batch_first


def _batch_first_call(forward: Callable[..., Tensor], names: Tuple[str, ...], *args: Any, **kwargs: Any) -> Tensor:
    """``forward`` of a sequence-first module, run batch-first: its sequence arguments (L, N, E) go in as
    (N, L, E) and its output comes back as (L, N, E); unbatched (L, E) inputs pass unchanged."""
    args = list(args)
    batched = False
    for i, name in enumerate(names):
        where, key = (args, i) if i < len(args) else (kwargs, name)
        if (i < len(args) or name in kwargs) and where[key].dim() == 3:
            where[key], batched = where[key].transpose(0, 1), True
    out = forward(*args, **kwargs)
    return out.transpose(0, 1) if batched else out


class AttentionRouting:
    """The attention layers and sequence-first transformer modules of a model, and the step-time
    re-parametrisation of :mod:`fop_asdl.engine.attention`."""

    def __init__(self, model: nn.Module):
        self.attentions = [_RoutedAttention(name, m) for name, m in model.named_modules()
                           if isinstance(m, nn.MultiheadAttention)]
        self.sequence_first: List[nn.Module] = []
        inner: set = set()
        for module in model.modules():
            if module in inner or type(module) not in _SEQUENCE_ARGS or not _is_sequence_first(module):
                continue
            self.sequence_first.append(module)
            inner.update(module.modules())
        self.is_active = False

    def __bool__(self) -> bool:
        return bool(self.attentions)

    def real_parameters(self, module: nn.Module) -> List[nn.Parameter]:
        """The user's parameters behind a projection block ([] for any other module)."""
        for routed in self.attentions:
            if module in routed.projections.values():
                names = [n for p, _, n, _ in routed.windows if p is module]
                source = routed._saved if routed._saved is not None else routed.mha._parameters
                return [source[n] for n in dict.fromkeys(names)]
        return []

    @contextlib.contextmanager
    def active(self, gather: bool = True) -> Iterator[None]:
        """Re-parametrised inside the block; with ``gather``, a block left without an exception gathers the
        projections' gradients into the real parameters. Nested use is a no-op."""
        if self.is_active:
            yield
            return
        self.is_active = True
        flags: List[Tuple[nn.Module, str, bool]] = []
        try:
            for module in self.sequence_first:
                for sub in module.modules():
                    if isinstance(sub, (nn.MultiheadAttention, nn.Transformer)):
                        flags.append((sub, "batch_first", sub.batch_first))
                        sub.batch_first = True
                module.__dict__["forward"] = functools.partial(_batch_first_call, module.forward,
                                                               _SEQUENCE_ARGS[type(module)])
            for routed in self.attentions:
                routed.attach()
            yield
            if gather:
                for routed in self.attentions:
                    routed.gather()
        finally:
            for routed in self.attentions:
                if routed._saved is not None:
                    routed.detach()
            for module in self.sequence_first:
                module.__dict__.pop("forward", None)
            for sub, attr, value in flags:
                setattr(sub, attr, value)
            self.is_active = False


def routing_of(maker: Any) -> Optional[AttentionRouting]:
    """The routing a maker built in :func:`attention_blocks` (None for makers without one)."""
    return getattr(maker, "_fop_attention", None)


@contextlib.contextmanager
def attention_blocks(maker: Any, model: nn.Module) -> Iterator[None]:
    """Around a maker's constructor: the model is re-parametrised while ASDL collects its curvature blocks,
    and afterwards every ``maker.forward_and_backward()`` runs re-parametrised and gathers the projections'
    gradients into the user's parameters. Nested constructors (FOP on K-FAC's) route once."""
    if routing_of(maker) is not None:
        yield
        return
    routing = AttentionRouting(model)
    maker._fop_attention = routing
    if not routing:
        yield
        return
    with routing.active(gather=False):
        yield
    step = maker.forward_and_backward

    @functools.wraps(step)
    def forward_and_backward(*args: Any, **kwargs: Any) -> Any:
        with routing.active():
            return step(*args, **kwargs)

    maker.forward_and_backward = forward_and_backward
