"""Tiny float64 nets with the layer types of issue 22 item 2, and dense references of what each method writes
for them, built without the package: per-sample gradients by one autograd pass per sample, a layer's
input and output gradient by plain torch hooks, convolution patches by the layer's own forward with one-hot
weights (so padding modes, dilation, groups and Conv1d go through torch's code, not the package's)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dense_refs import kron_metric, unit_metric

N, N1, V, D, T, C = 7, 4, 7, 4, 3, 3  # batch (B1 = ⌈7/2⌉), vocabulary, width, tokens, classes
DAMPING = 3e-2


class EmbedNet(nn.Module):
    """ids (n,) or (n, T) -> Embedding (padding_idx 0) -> tanh -> one Linear over the flattened tokens."""

    def __init__(self, tokens: int):
        super().__init__()
        self.block = nn.Embedding(V, D, padding_idx=0)
        self.head = nn.Linear(D * max(tokens, 1), C)

    def forward(self, ids):
        return self.head(torch.tanh(self.block(ids)).reshape(ids.shape[0], -1))


class TokenNet(nn.Module):
    """ids (n, T) -> Embedding -> Conv1d over the tokens -> per-token logits (n, T, C): a token-level loss."""

    def __init__(self):
        super().__init__()
        self.block = nn.Embedding(V, D, padding_idx=0)
        self.conv = nn.Conv1d(D, 5, 3, padding=1)
        self.head = nn.Linear(5, C)

    def forward(self, ids):
        h = torch.tanh(self.conv(self.block(ids).transpose(1, 2))).transpose(1, 2)
        return self.head(h)


def token_loss(y, t, reduction="mean"):
    """Cross-entropy over every token, padding targets (-1) ignored: the mean runs over the kept tokens."""
    return F.cross_entropy(y.flatten(0, 1), t.flatten(), ignore_index=-1, reduction=reduction)


def token_sum(y, t, reduction="sum"):
    """``token_loss`` summed: the user's normaliser is 1."""
    return token_loss(y, t, reduction)


class AllNet(nn.Module):
    """Every new layer type in one net, samples independent (no BatchNorm): Embedding, Conv1d, GroupNorm,
    grouped and depthwise Conv2d, ConvTranspose2d, Linear."""

    def __init__(self, extra: int = 0):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.seq = nn.Conv1d(D, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.grouped = nn.Conv2d(4, 6, 3, groups=2, padding=1)
        self.depthwise = nn.Conv2d(6, 6, 3, groups=6, padding="same", padding_mode="reflect")
        self.more = nn.ModuleList(nn.Conv2d(6, 6, 3, groups=3, padding=1) for _ in range(extra))
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(4, C)

    def forward(self, ids):
        h = torch.tanh(self.norm(self.seq(self.emb(ids).transpose(1, 2))))  # (n, 4, T)
        h = torch.tanh(self.grouped(h.unsqueeze(-1) * h.unsqueeze(-2)))  # (n, 6, T, T)
        h = torch.tanh(self.depthwise(h))
        for layer in self.more:
            h = torch.tanh(layer(h))
        h = torch.tanh(self.up(h))  # (n, 4, 2T, 2T)
        return self.head(h.mean((2, 3)))


def conv_net(kind: str) -> nn.Module:
    """The layer under test is ``net.block``: grouped, depthwise (reflect 'same' padding), Conv1d (stride,
    dilation), a Conv2d with GroupNorm after it, or ``block`` a GroupNorm."""
    if kind == "grouped":
        block = nn.Conv2d(4, 6, 3, groups=2, padding=2, dilation=2, stride=2)
        return nn.Sequential(block, nn.Tanh(), nn.Flatten(), nn.Linear(6 * 3 * 3, C))
    if kind == "depthwise":
        block = nn.Conv2d(4, 8, 3, groups=4, padding="same", padding_mode="reflect")
        return nn.Sequential(block, nn.Tanh(), nn.Flatten(), nn.Linear(8 * 5 * 5, C))
    if kind == "conv1d":
        block = nn.Conv1d(4, 5, 3, stride=2, padding=2, dilation=2)
        return nn.Sequential(block, nn.Tanh(), nn.Flatten(), nn.Linear(5 * 5, C))
    if kind == "transposed":
        block = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        return nn.Sequential(block, nn.Tanh(), nn.Flatten(), nn.Linear(6 * 6 * 6, C))
    if kind == "groupnorm":
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(),
                             nn.Linear(4 * 5 * 5, C))
    raise ValueError(kind)


def block_of(model: nn.Module) -> nn.Module:
    return model[1] if isinstance(model, nn.Sequential) and isinstance(model[1], nn.GroupNorm) else (
        model.block if hasattr(model, "block") else model[0])


def case(kind: str, seed: int = 0):
    """(model, x, t, loss_fn, N = the user's loss normaliser) of a layer kind, float64."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(0, C, (N,), generator=gen)
    if kind in ("ids", "tokens"):
        shape = (N,) if kind == "ids" else (N, T)
        ids = torch.randint(0, V, shape, generator=gen)
        ids.view(-1)[:2] = 0  # padding tokens
        return EmbedNet(0 if kind == "ids" else T).double(), ids, t, F.cross_entropy, N
    if kind in ("token_loss", "token_sum"):
        ids = torch.randint(0, V, (N, T), generator=gen)
        ids[0, 0] = 0
        t = torch.randint(0, C, (N, T), generator=gen)
        t[1, :2] = -1
        if kind == "token_sum":
            return TokenNet().double(), ids, t, token_sum, 1
        return TokenNet().double(), ids, t, token_loss, int((t != -1).sum())
    shape = {"conv1d": (N, 4, 9), "transposed": (N, 4, 3, 3)}.get(kind, (N, 4, 5, 5))
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    return conv_net(kind).double(), x, t, F.cross_entropy, N


def params(module):
    return [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]


def conv_layout(module, weight) -> torch.Tensor:
    """A ConvTranspose2d's weight (in, out/G, kh, kw) as the equivalent Conv2d's (out, in/G, kh, kw): per
    group transposed, kernel flipped; other weights as they are."""
    if not isinstance(module, nn.ConvTranspose2d):
        return weight
    c_in, per_group, kh, kw = module.weight.shape
    g = module.groups
    w = weight.reshape(g, c_in // g, per_group, kh, kw).transpose(1, 2)
    return w.reshape(g * per_group, c_in // g, kh, kw).flip(-2, -1)


def flat(module, grads) -> torch.Tensor:
    """[weight; bias] of a block as one vector, the weight in the layout its curvature is defined on."""
    return torch.cat([conv_layout(module, grads[0]).reshape(-1)] + [g.reshape(-1) for g in grads[1:]])


def flat_grad(module) -> torch.Tensor:
    return flat(module, [p.grad for p in params(module)])


def per_sample_gradients(model, x, t, loss_fn, normalizer, module) -> torch.Tensor:
    """U (n, P): row i the gradient of sample i's term of the user's loss, n/N times its summed loss, so
    that the rows' mean is autograd's gradient of the user's loss."""
    rows = []
    for i in range(x.shape[0]):
        term = loss_fn(model(x[i:i + 1]), t[i:i + 1], reduction="sum") * (x.shape[0] / normalizer)
        rows.append(flat(module, torch.autograd.grad(term, params(module))))
    return torch.stack(rows)


def input_and_output_grad(model, module, x, t, loss_fn, normalizer):
    """The module's input and the gradient at its output of Σ_i (sample i's term) = n/N × the summed loss."""
    seen = {}

    def hook(m, args, out):
        out.retain_grad()
        seen.update(x=args[0], y=out)

    handle = module.register_forward_hook(hook)
    (loss_fn(model(x), t, reduction="sum") * (x.shape[0] / normalizer)).backward()
    handle.remove()
    model.zero_grad(set_to_none=True)
    return seen["x"].detach(), seen["y"].grad.detach()


def _basis(module, i):
    """One-hot weights: entry i of the first output channel of every group, that entry counted in the
    (out, in/G, kh, kw) layout; for a ConvTranspose2d the weight entry (g·in/G + c, 0, kh−1−a, kw−1−b) that the
    Conv2d entry (c, a, b) of its flipped, transposed weight stands for."""
    weight, groups = module.weight, module.groups
    if isinstance(module, nn.ConvTranspose2d):
        c_in, _, kh, kw = weight.shape
        c, rest = divmod(i, kh * kw)
        basis = torch.zeros_like(weight)
        for g in range(groups):
            basis[g * (c_in // groups) + c, 0, kh - 1 - rest // kw, kw - 1 - rest % kw] = 1
        return basis
    out, width = weight.shape[0], weight[0].numel()
    basis = torch.zeros(out, width, dtype=weight.dtype)
    basis[::out // groups, i] = 1
    return basis.reshape(weight.shape)


def patches(module, x) -> torch.Tensor:
    """(n, S, G, a): the input patch each output position of group g multiplies, read off the layer's own
    forward with one-hot weights on the first output channel of each group."""
    groups = module.groups
    out = module.out_channels
    width = module.weight[0].numel() if not isinstance(module, nn.ConvTranspose2d) else \
        module.in_channels // groups * module.weight[0, 0].numel()
    columns = []
    for i in range(width):
        values = {"weight": _basis(module, i)}
        if module.bias is not None:
            values["bias"] = torch.zeros_like(module.bias)
        y = torch.func.functional_call(module, values, (x,))
        columns.append(y[:, ::out // groups].flatten(2))  # (n, G, S)
    return torch.stack(columns, -1).transpose(1, 2)


def conv_factors(module, x, gy):
    """[(B_g, A_g)] per group, ASDL's conv K-FAC: A = Σ p pᵀ / S, B = Σ g gᵀ, both per sample (/n)."""
    p = patches(module, x)
    n, positions, groups = p.shape[:3]
    g = gy.flatten(2).transpose(1, 2).reshape(n, positions, groups, -1)
    a = torch.einsum("nsgi,nsgj->gij", p, p) / positions / n
    b = torch.einsum("nsgi,nsgj->gij", g, g) / n
    return list(zip(b, a))


def embedding_factors(module, ids, gy):
    """[(B, A)]: K-FAC of the Linear on one-hot rows (padding rows zero) that the Embedding is; its input
    factor (B, on the weight's V rows) is checked to be diagonal."""
    n = ids.shape[0]
    onehot = F.one_hot(ids.reshape(n, -1), V).double() * (ids.reshape(n, -1) != 0)[..., None]
    b = torch.einsum("ntv,ntw->vw", onehot, onehot) / n
    assert torch.equal(b, torch.diag(b.diagonal()))
    g = gy.reshape(-1, gy.shape[-1])
    return [(b, g.T @ g / n)]


def kron_reference(kind, model, x, t, loss_fn, normalizer):
    """(F, F̃) of the block under test, K-FAC's empirical Fisher as the methods define it."""
    module = block_of(model)
    if isinstance(module, nn.GroupNorm):
        u = per_sample_gradients(model, x, t, loss_fn, normalizer, module)
        return unit_metric(u), unit_metric(u, DAMPING)
    inputs, gy = input_and_output_grad(model, module, x, t, loss_fn, normalizer)
    if isinstance(module, nn.Embedding):
        pairs = embedding_factors(module, inputs, gy)
    else:
        pairs = conv_factors(module, inputs, gy)
    bias = getattr(module, "bias", None) is not None
    return kron_metric(pairs, bias), kron_metric(pairs, bias, DAMPING)


def hylo_rows(model, x, t, loss_fn, normalizer, token_reduction="mean"):
    """(U, V): HyLo's rows of the block under test and its mean gradient, in one layout. An Embedding: those
    of the Linear on one-hot rows (padding: zero), one per token (``"flatten"``) or per sample, the one-hots
    and output gradients averaged over tokens (``"mean"``); a convolution: per sample and group the patch and
    output-gradient means over positions (the bias a 1 per position), u = ⊕_g ĝ âᵀ in the (out, in + bias)
    layout of [W | b]."""
    module = block_of(model)
    inputs, gy = input_and_output_grad(model, module, x, t, loss_fn, normalizer)
    grads = torch.autograd.grad(loss_fn(model(x), t), params(module))
    grads = (conv_layout(module, grads[0]),) + grads[1:]
    if isinstance(module, nn.Embedding):
        ids = inputs.reshape(inputs.shape[0], -1)
        onehot = F.one_hot(ids, V).double() * (ids != 0)[..., None]  # (n, T, V)
        g = gy.reshape(*ids.shape, -1)
        if token_reduction == "flatten":
            a, g = onehot.reshape(-1, V), g.reshape(-1, g.shape[-1])
        else:
            a, g = onehot.mean(1), g.mean(1)
        return (a[:, :, None] * g[:, None, :]).reshape(len(a), -1), grads[0].reshape(-1)
    p = patches(module, inputs)
    n, _, groups, _ = p.shape
    a = torch.cat([p.mean(1), torch.ones(n, groups, 1, dtype=p.dtype)], 2)
    g = gy.flatten(2).mean(2).reshape(n, groups, -1)
    u = torch.einsum("ngo,ngi->ngoi", g, a).reshape(n, -1)
    return u, torch.cat([grads[0].reshape(grads[0].shape[0], -1), grads[1][:, None]], 1).reshape(-1)
