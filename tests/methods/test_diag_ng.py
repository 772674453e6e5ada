"""diag-NG: every block against (diag F + λ)⁻¹ g with diag F from an autograd per-sample loop (float64;
Conv2d, Linear + bias, Linear, token Linear), its EMA and interval, kl_clip, and ASDL 0.1a5's Conv2d diagonal
that drops the positions' cross terms."""
from functools import partial

import pytest
import torch
from asdl.operations.conv import Conv2d as AsdlConv2d
from torch import nn

import fop_asdl
from fop_asdl.methods.diag_ng_math import squared_gradient_sums

from scaffold import quiet_maker
from second_order_helpers import BLOCKS, batch, block_grad, config, net, patches, per_sample_gradients, step

maker = partial(quiet_maker, "diag_ng")


def dense_diagonal(model, x, t, block):
    u = per_sample_gradients(model, x, t, block)
    return u.mean(0), (u * u).mean(0)


def test_every_block_equals_the_dense_diagonal_natural_gradient():
    torch.manual_seed(0)
    model = net().double()
    x, t = batch(0)
    step(maker(model, config(damping=1e-3)), model, x, t)
    worst = 0.0
    for index in BLOCKS:
        g, diagonal = dense_diagonal(model, x, t, model[index])
        expected = g / (diagonal + 1e-3)
        worst = max(worst, float((block_grad(model[index]) - expected).abs().max() / expected.abs().max()))
    assert worst < 1e-12
    print(f"diag-NG vs dense: max relative error {worst:.2e}")


class TokenNet(nn.Module):
    """A Linear on (n, T, I) tokens, the mean over tokens, a Linear head: per-sample gradients with cross
    terms between tokens."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)).mean(1))


def test_token_linear_sums_a_sample_over_its_tokens_before_squaring():
    torch.manual_seed(0)
    model = TokenNet().double()
    x, t = torch.randn(6, 7, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    step(maker(model, config(damping=1e-3)), model, x, t)
    g, diagonal = dense_diagonal(model, x, t, model.body)
    torch.testing.assert_close(block_grad(model.body), g / (diagonal + 1e-3), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_ema_from_zero_every_other_step(bias_correction):
    """ema_decay d, interval 2: F ← (1 − d)F + d F_new on steps 0, 2, 4 (from zero, as ASDL), divided by
    1 − (1 − d)^k with bias correction; the steps between divide by the stored F."""
    torch.manual_seed(0)
    model = net().double()
    d, lam = 0.3, 1e-2
    m = maker(model, config(damping=lam, ema_decay=d, curvature_upd_interval=2), ema_bias_correction=bias_correction)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema, k = {}, 0
    for i in range(5):
        x, t = batch(i)
        measured = {b: dense_diagonal(model, x, t, model[b]) for b in BLOCKS}
        if i % 2 == 0:
            k += 1
            ema = {b: (1 - d) * ema.get(b, 0) + d * measured[b][1] for b in BLOCKS}
        opt.zero_grad()
        step(m, model, x, t)
        for b in BLOCKS:
            diagonal = ema[b] / (1 - (1 - d) ** k) if bias_correction else ema[b]
            torch.testing.assert_close(block_grad(model[b]), measured[b][0] / (diagonal + lam), rtol=1e-10,
                                       atol=1e-15)
        opt.step()


def test_kl_clip_bounds_the_dense_diagonal_norm():
    torch.manual_seed(0)
    model = net().double()
    x, t = batch(0)
    lr, kappa, lam = 0.5, 1e-4, 1e-2
    m = maker(model, config(damping=lam), kl_clip=kappa, lr=lr)
    step(m, model, x, t)
    norm, expected = 0.0, {}
    for b in BLOCKS:
        g, diagonal = dense_diagonal(model, x, t, model[b])
        expected[b] = g / (diagonal + lam)
        norm += float(g @ expected[b])
    nu = min(1.0, (kappa / (lr * lr * norm)) ** 0.5)
    assert nu < 0.5
    for b in BLOCKS:
        torch.testing.assert_close(block_grad(model[b]), nu * expected[b], rtol=1e-10, atol=1e-15)


def test_asdl_conv_diagonal_drops_the_positions_cross_terms():
    """ASDL 0.1a5's Conv2d.cov_diag_weight sums z²·p² over samples and positions whenever that takes less
    memory than per-sample gradients (few output pixels, many channels): that is Σ_m Σ_s (z_ms p_ms)², not
    Σ_m (Σ_s z_ms p_ms)². The squares here are the per-sample gradients'."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, stride=2).double()  # 5×5 input: 2×2 output pixels
    x = torch.randn(4, 8, 5, 5, dtype=torch.float64)
    z = torch.randn(4, 8, 2, 2, dtype=torch.float64)
    p = patches(conv, x)[..., :-1]  # (n, S, I) without the bias column
    exact = (torch.einsum("nso,nsi->noi", z.flatten(2).transpose(1, 2), p) ** 2).sum(0)
    ours, _ = squared_gradient_sums(x, z, True, (conv.kernel_size, conv.stride, conv.padding, conv.dilation))
    torch.testing.assert_close(ours, exact, rtol=1e-12, atol=1e-12)
    theirs = AsdlConv2d.cov_diag_weight(conv, p.transpose(1, 2), z.flatten(2)).reshape(8, -1)
    assert float((theirs - exact).abs().max() / exact.abs().max()) > 0.3


def test_fisher_type_and_bad_config_are_refused():
    with pytest.raises(TypeError, match="empirical Fisher"):
        fop_asdl.make_gradient_maker("diag_ng", net(), config(), fisher_type="fisher_mc")
    with pytest.raises(ValueError, match="ema_decay"):
        fop_asdl.make_gradient_maker("diag_ng", net(), config(ema_decay=1.5))
    with pytest.raises(ValueError, match="damping"):
        fop_asdl.make_gradient_maker("diag_ng", net(), config(damping=-1.0))
