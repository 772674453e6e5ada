"""Each attention projection is a curvature block of its own, and Linear layers on (batch, tokens, features)
inputs sum the token dimension into their factors: K-FAC factors, K-FAC's and FOP's gradients against dense
references built from a hand-written attention forward and per-sample / per-half autograd passes; FNGD's and
HyLo's against the same attention written with one nn.Linear per projection."""
import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop_asdl import FOPGradientMaker, make_gradient_maker
from fop_asdl.engine.capture import BlockCapture, Chunk
from fop_asdl.engine.sub_batches import half_sums

from dense_refs import dense_fop, kron_metric, per_sample_gradients
from scaffold import step

E, HEADS, TOKENS = 4, 2, 3
DAMPING = 3e-2
N, N1 = 9, 5  # odd batch: B1 has ⌈9/2⌉ = 5 samples


def dense_metric(b_mat, a_mat, bias, damped=False):
    """F = B ⊗ A on vec_row(W) (and B alone on the bias); damped: π-split (B + d_B I) ⊗ (A + d_A I)."""
    return kron_metric([(b_mat, a_mat)], bias, DAMPING if damped else None)


class AttnNet(nn.Module):
    """Self-attention over the packed weight, or cross-attention over separate q/k/v weights (kdim 3, vdim 5)."""

    def __init__(self, packed: bool, bias: bool, batch_first: bool):
        super().__init__()
        kdim, vdim = (None, None) if packed else (3, 5)
        self.attn = nn.MultiheadAttention(E, HEADS, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first)
        self.head = nn.Linear(E, 3)
        self.packed, self.batch_first = packed, batch_first

    def inputs(self, x):
        return (x, x, x) if self.packed else (x, x[..., :3], torch.cat([x, x[..., :1]], -1))

    def forward(self, x):
        seqs = [s if self.batch_first else s.transpose(0, 1) for s in self.inputs(x)]
        h = self.attn(*seqs, need_weights=False)[0]
        return self.head(torch.tanh(h if self.batch_first else h.transpose(0, 1)).mean(1))


def projection_params(model):
    """{block: [(real parameter, rows)]} for q, k, v (weight, then bias) and out_proj."""
    m, e = model.attn, E
    thirds = [slice(0, e), slice(e, 2 * e), slice(2 * e, 3 * e)]
    out = {}
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        weight = (m.in_proj_weight, thirds[i]) if model.packed else (getattr(m, f"{name}_weight"), slice(None))
        out[name] = [weight] + ([(m.in_proj_bias, thirds[i])] if m.in_proj_bias is not None else [])
    out["out_proj"] = [(m.out_proj.weight, slice(None))] + ([(m.out_proj.bias, slice(None))]
                                                             if m.out_proj.bias is not None else [])
    return out


def reference_factors(model, x, t):
    """(B, A) of every projection from a hand-written attention forward: rows = (sample, token) pairs, A from
    the projection's input, B from the gradient of the summed loss at its output, both divided by N."""
    m, params = model.attn, projection_params(model)
    ins = dict(zip(("q_proj", "k_proj", "v_proj"), model.inputs(x)))
    outs = {}
    for name, x_in in ins.items():
        (w, rows), *b = params[name]
        outs[name] = x_in @ w[rows].T + (b[0][0][b[0][1]] if b else 0)
        outs[name].retain_grad()
    split = [outs[k].view(N, -1, HEADS, E // HEADS).transpose(1, 2) for k in ("q_proj", "k_proj", "v_proj")]
    att = torch.softmax(split[0] @ split[1].transpose(-1, -2) / (E // HEADS) ** 0.5, -1)
    ins["out_proj"] = (att @ split[2]).transpose(1, 2).reshape(N, TOKENS, E)
    outs["out_proj"] = m.out_proj(ins["out_proj"])
    outs["out_proj"].retain_grad()
    F.cross_entropy(model.head(torch.tanh(outs["out_proj"]).mean(1)), t, reduction="sum").backward()
    model.zero_grad()
    flat = lambda v: v.detach().reshape(-1, v.shape[-1])  # noqa: E731
    return {k: (flat(outs[k].grad).T @ flat(outs[k].grad) / N, flat(ins[k]).T @ flat(ins[k]) / N) for k in outs}


def block_gradients(model, x, t, rows):
    """Mean gradient of each projection block (weight rows, then bias rows, flattened) over the samples ``rows``."""
    model.zero_grad()
    F.cross_entropy(model(x[rows]), t[rows]).backward()
    grads = {k: torch.cat([p.grad[r].flatten() for p, r in v]) for k, v in projection_params(model).items()}
    model.zero_grad()
    return grads


def written(model):
    return {k: torch.cat([p.grad[r].flatten() for p, r in v]) for k, v in projection_params(model).items()}


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, TOKENS, E, generator=gen, dtype=torch.float64), torch.randint(0, 3, (N,), generator=gen)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("packed,bias", [(True, True), (False, False)])
@pytest.mark.parametrize("method", ["fop", "fop_micro", "kfac", "kfac_micro"])
def test_projection_blocks_equal_dense_reference(method, packed, bias, batch_first):
    x, t = _batch()
    torch.manual_seed(0)
    model = AttnNet(packed, bias, batch_first).double()
    with torch.no_grad():  # torch initialises the projection biases to zero, which would hide their rows
        for p in model.attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    factors = reference_factors(model, x, t)
    g1, g2 = block_gradients(model, x, t, slice(0, N1)), block_gradients(model, x, t, slice(N1, None))
    g_avg = {k: (N1 * g1[k] + (N - N1) * g2[k]) / N for k in g1}
    kwargs = dict(micro_batch_size=4) if method.endswith("micro") else {}
    if method.startswith("fop"):
        kwargs.update(beta=0.3)
    gm = make_gradient_maker(method.split("_")[0], model, asdl.PreconditioningConfig(damping=DAMPING),
                             fisher_type="fisher_emp", **kwargs)
    _, loss = step(gm, model, x, t)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), t))
    blocks = {name.split("/")[-1]: m for name, m in gm.named_modules_for_curvature if "attn" in name}
    assert sorted(blocks) == ["k_proj", "out_proj", "q_proj", "v_proj"]
    got = written(model)
    for name, (b_ref, a_ref) in factors.items():
        kron = blocks[name].fisher.kron
        torch.testing.assert_close(kron.A, a_ref)
        torch.testing.assert_close(kron.B, b_ref)
        damped = dense_metric(b_ref, a_ref, bias, damped=True)
        if method.startswith("fop"):
            expected, _ = dense_fop(g1[name], g2[name], N1, N, dense_metric(b_ref, a_ref, bias), damped, 0.3)
        else:
            expected = torch.linalg.solve(damped, g_avg[name])
        torch.testing.assert_close(got[name], expected, rtol=1e-7, atol=1e-10)


class TokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(E, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x))).mean(1)


def per_layer_sample_gradients(model, x, t):
    """{layer: (n, out·in + out)} gradients of each sample's own loss, one autograd pass per sample."""
    return {name: per_sample_gradients(model, x, t, getattr(model, name)) for name in ("fc1", "fc2")}


def test_token_dimension_half_sums_equal_per_sample_autograd():
    x, t = _batch()
    torch.manual_seed(0)
    model = TokenNet().double()
    per_sample = per_layer_sample_gradients(model, x, t)
    capture = BlockCapture([model.fc1, model.fc2], lambda m, x, g, chunk, previous: half_sums(m, x, g, chunk.split))
    with capture:
        capture.set_chunk(Chunk(0, N, N1))
        F.cross_entropy(model(x), t, reduction="sum").backward()
    sums = capture.take_records()
    for name, module in (("fc1", model.fc1), ("fc2", model.fc2)):
        for half, rows in zip(sums[module], (slice(0, N1), slice(N1, None))):
            torch.testing.assert_close(torch.cat([half[0].flatten(), half[1]]), per_sample[name][rows].sum(0))


@pytest.mark.parametrize("beta", ["adaptive", 0.3])
def test_token_dimension_fop_step_equals_dense(beta):
    x, t = _batch()
    torch.manual_seed(0)
    model = TokenNet().double()
    per_sample = per_layer_sample_gradients(model, x, t)
    h1 = model.fc1(x)
    h1.retain_grad()
    a2 = torch.tanh(h1)
    y = model.fc2(a2)
    y.retain_grad()
    F.cross_entropy(y.mean(1), t, reduction="sum").backward()
    model.zero_grad()
    flat = lambda v: v.detach().reshape(-1, v.shape[-1])  # noqa: E731  (sample, token) rows
    factors = {"fc1": (flat(h1.grad).T @ flat(h1.grad) / N, flat(x).T @ flat(x) / N),
               "fc2": (flat(y.grad).T @ flat(y.grad) / N, flat(a2).T @ flat(a2) / N)}
    gm = FOPGradientMaker(model, asdl.PreconditioningConfig(damping=DAMPING), fisher_type="fisher_emp", beta=beta)
    step(gm, model, x, t)
    for name, (b_ref, a_ref) in factors.items():
        layer = getattr(model, name)
        torch.testing.assert_close(layer.fisher.kron.A, a_ref)
        torch.testing.assert_close(layer.fisher.kron.B, b_ref)
        g1, g2 = per_sample[name][:N1].mean(0), per_sample[name][N1:].mean(0)
        expected, _ = dense_fop(g1, g2, N1, N, dense_metric(b_ref, a_ref, True),
                                dense_metric(b_ref, a_ref, True, True), beta)
        torch.testing.assert_close(torch.cat([layer.weight.grad.flatten(), layer.bias.grad]), expected,
                                   rtol=1e-7, atol=1e-10)


class ExplicitAttnNet(nn.Module):
    """AttnNet(packed=True, bias=True) written with an nn.Linear per projection: the blocks the routing makes."""

    def __init__(self, routed: AttnNet):
        super().__init__()
        self.q, self.k, self.v, self.out = (nn.Linear(E, E).double() for _ in range(4))
        self.head = nn.Linear(E, 3).double()
        with torch.no_grad():
            m = routed.attn
            for i, layer in enumerate((self.q, self.k, self.v)):
                layer.weight.copy_(m.in_proj_weight[i * E:(i + 1) * E])
                layer.bias.copy_(m.in_proj_bias[i * E:(i + 1) * E])
            for mine, theirs in ((self.out, m.out_proj), (self.head, routed.head)):
                mine.weight.copy_(theirs.weight)
                mine.bias.copy_(theirs.bias)

    def forward(self, x):
        n = x.shape[0]
        q, k, v = (layer(x).view(n, -1, HEADS, E // HEADS).transpose(1, 2) for layer in (self.q, self.k, self.v))
        att = torch.softmax(q @ k.transpose(-1, -2) / (E // HEADS) ** 0.5, -1)
        h = self.out((att @ v).transpose(1, 2).reshape(n, -1, E))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("method", ["fngd", "hylo"])
def test_per_sample_methods_see_each_projection_as_its_linear_layer(method, batch_first):
    """FNGD and HyLo (ρ = 1, exact) on nn.MultiheadAttention write into its packed parameters exactly what
    they write into the four nn.Linear layers of the same attention written by hand."""
    x, t = _batch()
    torch.manual_seed(0)
    model = AttnNet(True, True, batch_first).double()
    with torch.no_grad():
        for p in model.attn.parameters():
            p.add_(0.3 * torch.randn_like(p))
    explicit = ExplicitAttnNet(model)
    torch.testing.assert_close(model(x), explicit(x))
    for net in (model, explicit):
        if method == "fngd":
            gm = make_gradient_maker("fngd", net, None, iters_per_epoch=2)
        else:
            gm = make_gradient_maker("hylo", net, asdl.PreconditioningConfig(damping=0.1, curvature_upd_interval=1),
                                     compression_ratio=1.0, switch_policy="kis")
        assert len(gm.blocks) == 5  # q, k, v, out and the head
        step(gm, net, x, t)
    m = model.attn
    pairs = [(m.in_proj_weight, torch.cat([explicit.q.weight.grad, explicit.k.weight.grad, explicit.v.weight.grad])),
             (m.in_proj_bias, torch.cat([explicit.q.bias.grad, explicit.k.bias.grad, explicit.v.bias.grad])),
             (m.out_proj.weight, explicit.out.weight.grad), (m.out_proj.bias, explicit.out.bias.grad),
             (model.head.weight, explicit.head.weight.grad)]
    for param, expected in pairs:
        torch.testing.assert_close(param.grad, expected, rtol=1e-9, atol=1e-12)
