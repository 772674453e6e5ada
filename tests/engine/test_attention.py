"""Torch's own transformer layers under FOP and K-FAC: the routed attention forward equals torch's, the model's
parameters, state_dict and outputs are the user's outside a step, and every layer type trains without error."""
import asdl
import pytest
import torch
from torch import nn

from fop_asdl import make_gradient_maker
from fop_asdl.engine.attention import AttentionRouting

from scaffold import step

E, HEADS = 8, 2


def _inputs(n=3, tgt=4, src=5, kdim=E, vdim=E, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, tgt, E, generator=gen, dtype=torch.float64),
            torch.randn(n, src, kdim, generator=gen, dtype=torch.float64),
            torch.randn(n, src, vdim, generator=gen, dtype=torch.float64))


CASES = {
    "self": dict(),
    "separate_no_bias": dict(kdim=6, vdim=7, bias=False),
    "bias_kv_zero_attn": dict(add_bias_kv=True, add_zero_attn=True),
}
CALLS = {
    "weights": dict(need_weights=True),
    "per_head_weights_masks": dict(need_weights=True, average_attn_weights=False, masks=True),
    "sdpa_masks": dict(need_weights=False, masks=True),
    "causal": dict(need_weights=False, is_causal=True),
}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("call", sorted(CALLS))
def test_routed_forward_equals_torch(batch_first, case, call):
    options = dict(CASES[case])
    kdim, vdim = options.get("kdim", E), options.get("vdim", E)
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, **options).double()
    with torch.no_grad():  # torch initialises the biases (and bias_k, bias_v) to zero, which would hide them
        for p in mha.parameters():
            p.add_(0.3 * torch.randn_like(p))
    query, key, value = _inputs(kdim=kdim, vdim=vdim)
    if case == "self":
        key = value = query
    kwargs = dict(CALLS[call])
    if kwargs.pop("masks", False):
        src = key.shape[1]
        padding = torch.zeros(3, src, dtype=torch.bool)
        padding[0, -1] = padding[2, 0] = True
        kwargs["key_padding_mask"] = padding
        kwargs["attn_mask"] = torch.rand(3 * HEADS, 4, src, dtype=torch.float64) < 0.3  # bool, per head
        kwargs["attn_mask"][..., 1] = False  # every query keeps a key
    if kwargs.get("is_causal"):
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
        key, value = key[:, :4], value[:, :4]
    args = [t if batch_first else t.transpose(0, 1) for t in (query, key, value)]
    expected = mha(*args, **kwargs)
    with AttentionRouting(mha).active(gather=False):
        got = mha(*args, **kwargs)
    torch.testing.assert_close(got[0], expected[0])
    assert (got[1] is None) == (expected[1] is None)
    if got[1] is not None:
        torch.testing.assert_close(got[1], expected[1])


def test_unbatched_input_equals_torch():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, HEADS).double()
    query = _inputs()[0][0]
    expected = mha(query, query, query)
    with AttentionRouting(mha).active(gather=False):
        got = mha(query, query, query)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


class SeqFirst(nn.Module):
    """A batch-first model around a sequence-first torch module (the inputs of FOP's makers are batch-first)."""

    def __init__(self, body: nn.Module, decoder: bool = False):
        super().__init__()
        self.embed, self.body, self.decoder = nn.Linear(3, E), body, decoder
        self.head = nn.Linear(E, 4)

    def forward(self, x):
        h = self.embed(x).transpose(0, 1)
        h = self.body(h, h) if self.decoder else self.body(h)
        return self.head(h.transpose(0, 1).mean(1))


class BatchFirst(nn.Module):
    def __init__(self, body: nn.Module, mode: str = "layer"):
        super().__init__()
        self.embed, self.body, self.mode = nn.Linear(3, E), body, mode
        self.head = nn.Linear(E, 4)

    def forward(self, x):
        h = self.embed(x)
        if self.mode == "mha":
            h = self.body(h, h, h, need_weights=False)[0]
        elif self.mode == "cross":
            h = self.body(h, h[:, :3], h[:, :3])[0]
        else:
            h = self.body(h)
        return self.head(h.mean(1))


class MyLinear(nn.Linear):
    """A user's Linear subclass: ASDL 0.1a5 rejected these by class name."""


MODELS = {
    "mha": lambda: BatchFirst(nn.MultiheadAttention(E, HEADS, batch_first=True), "mha"),
    "mha_cross_separate": lambda: BatchFirst(nn.MultiheadAttention(E, HEADS, kdim=E, vdim=E, batch_first=True,
                                                                   bias=False), "cross"),
    "encoder_layer": lambda: BatchFirst(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True)),
    "encoder_layer_seq_first": lambda: SeqFirst(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0,
                                                                           norm_first=True)),
    "decoder_layer_seq_first": lambda: SeqFirst(nn.TransformerDecoderLayer(E, HEADS, 16, dropout=0.0), decoder=True),
    "encoder_seq_first": lambda: SeqFirst(nn.TransformerEncoder(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0),
                                                                2, norm=nn.LayerNorm(E), enable_nested_tensor=False)),
    "transformer_seq_first": lambda: SeqFirst(nn.Transformer(E, HEADS, 1, 1, 16, dropout=0.0), decoder=True),
    "linear_subclass": lambda: nn.Sequential(MyLinear(3, E), nn.Tanh(), nn.Flatten(), MyLinear(5 * E, 4)),
}


@pytest.mark.parametrize("micro_batch_size", [None, 3])
@pytest.mark.parametrize("method", ["fop", "kfac", "fngd", "hylo"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_layer_type_trains(name, method, micro_batch_size):
    torch.manual_seed(0)
    model = MODELS[name]()
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(7, 5, 3, generator=gen), torch.randint(0, 4, (7,), generator=gen)
    params, keys = list(model.named_parameters()), list(model.state_dict())
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.train()
    kwargs = {} if micro_batch_size is None else dict(micro_batch_size=micro_batch_size)
    config = asdl.PreconditioningConfig(damping=1e-2, ema_decay=0.1)
    if method in ("fngd", "hylo"):  # every step forms FNGD's coefficients / refreshes HyLo's factors
        kwargs["iters_per_epoch"] = 2
        config.curvature_upd_interval = 1
    gm = make_gradient_maker(method, model, None if method == "fngd" else config, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    blocks = [n for n, _ in (gm.blocks if method in ("fngd", "hylo") else gm.named_modules_for_curvature)]
    if "mha" in name or "former" in name or "coder" in name:
        assert any(n.endswith("q_proj") for n in blocks) and any(n.endswith("out_proj") for n in blocks)
    for _ in range(2):
        opt.zero_grad()
        out, loss = step(gm, model, x, t)
        assert torch.isfinite(loss)
        assert out.shape == (7, 4)
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        opt.step()
    assert list(model.named_parameters()) == params and list(model.state_dict()) == keys
    assert not any(isinstance(m, nn.Linear) and type(m).__name__ == "AttentionProjection" for m in model.modules())
    model.eval()
    with torch.no_grad():  # torch's own forward again, on the weights the steps moved
        assert not torch.allclose(model(x), before)


def test_state_dict_round_trip_and_optimizer_built_first():
    torch.manual_seed(0)
    model = BatchFirst(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # before the maker, as ASDL's examples do
    gm = make_gradient_maker("fop", model, asdl.PreconditioningConfig(damping=1e-2))
    x, t = torch.randn(6, 5, 3), torch.randint(0, 4, (6,))
    w0 = model.body.self_attn.in_proj_weight.detach().clone()
    step(gm, model, x, t)
    opt.step()
    assert not torch.equal(model.body.self_attn.in_proj_weight, w0)  # the user's packed weight moved
    state = model.state_dict()
    fresh = BatchFirst(nn.TransformerEncoderLayer(E, HEADS, 16, dropout=0.0, batch_first=True))
    fresh.load_state_dict(state)
    model.load_state_dict(fresh.state_dict())
    opt.zero_grad()
    step(gm, model, x, t)  # the projections re-open their windows onto the loaded weights
    model.eval()
    fresh.eval()
    torch.testing.assert_close(model(x), fresh(x))


def test_projection_name_clash_is_refused():
    mha = nn.MultiheadAttention(E, HEADS, batch_first=True)
    mha.q_proj = nn.Identity()
    with pytest.raises(ValueError, match="q_proj"):
        make_gradient_maker("fop", BatchFirst(mha, "mha"), asdl.PreconditioningConfig())
