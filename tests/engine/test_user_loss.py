"""The user's loss, exactly, on every maker of the switch: whatever it averages over (samples, tokens, output
elements, targets not ignored, class weights), the returned loss is the user's loss on the whole batch and
the gradient autograd's of it (for the preconditioning makers in the damped limit, where F̃⁻¹ → 1/λ, and
Shampoo's roots → λ^(−1/4)), with and without micro-batches. FOP's halves: g1, g2 are r times the halves'
summed-loss mean gradients (r = n / N, fop_asdl.engine.loss), so that their weighted mean is the user's
gradient."""
import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from scaffold import token_ce
from fop_asdl.curvature.inverses import kron_damping

METHODS = ["sgd", "kfac", "fop", "fngd", "hylo", "ekfac", "shampoo"]
LAMBDA = 1e16  # the damped limit: F̃⁻¹ g = g / λ up to |A| / √λ (K-FAC damps each factor by ~√λ)
B, T, V = 6, 4, 5


class TokenModel(nn.Module):
    """(B, T, 3) -> (B, T, V) logits through two Linear blocks."""

    def __init__(self, out_shape=(V,)):
        super().__init__()
        self.out_shape = out_shape
        self.fc1 = nn.Linear(3, 6)
        self.fc2 = nn.Linear(6, int(torch.tensor(out_shape).prod()))

    def forward(self, x):
        y = self.fc2(torch.tanh(self.fc1(x)))
        return y.reshape(*y.shape[:-1], *self.out_shape)


def data(kind):
    gen = torch.Generator().manual_seed(3)
    if kind == "mse":  # (B, 2, 3) outputs per sample, an element-wise mean
        return torch.randn(B, 3, generator=gen, dtype=torch.float64), torch.randn(B, 2, 3, generator=gen,
                                                                                   dtype=torch.float64)
    x = torch.randn(B, T, 3, generator=gen, dtype=torch.float64)
    t = torch.randint(0, V, (B, T), generator=gen)
    if kind in ("padded", "flattened"):  # a different number of padding tokens per sample, none in sample 0
        for i in range(1, B):
            t[i, T - (i % T):] = -100
    return x, t


CASES = {  # name: (model, data kind, how the loss is registered, the user's loss on output y)
    "tokens": (TokenModel, "tokens", lambda gm, y, t: gm.setup_loss_call(token_ce, y, t), token_ce),
    "padded": (TokenModel, "padded", lambda gm, y, t: gm.setup_loss_call(token_ce, y, t), token_ce),
    # ASDL's own idiom: logits and targets flattened by the user, k = T rows per sample in the loss call
    "flattened": (TokenModel, "flattened",
                  lambda gm, y, t: gm.setup_loss_call(F.cross_entropy, y.view(-1, V), t.view(-1)),
                  lambda y, t: F.cross_entropy(y.reshape(-1, V), t.reshape(-1))),
    "mse": (lambda: TokenModel((2, 3)), "mse", lambda gm, y, t: gm.setup_loss_call(F.mse_loss, y, t), F.mse_loss),
    "weighted": (TokenModel, "tokens",
                 lambda gm, y, t: gm.setup_loss_call(F.cross_entropy, y[:, 0], t[:, 0], weight=CLASS_WEIGHTS),
                 lambda y, t: F.cross_entropy(y[:, 0], t[:, 0], weight=CLASS_WEIGHTS)),
    "summed": (TokenModel, "tokens", lambda gm, y, t: gm.setup_loss_call(token_ce, y, t, reduction="sum"),
               lambda y, t: token_ce(y, t, reduction="sum")),
}
CLASS_WEIGHTS = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)


def maker(name, model, micro_batch_size=None, **options):
    config = asdl.PreconditioningConfig(damping=LAMBDA, curvature_upd_interval=1, preconditioner_upd_interval=1)
    if name == "fngd":
        options.update(iters_per_epoch=1, damping_mode="fixed")
    if name == "hylo":
        options.update(switch_policy="kis", compression_ratio=1.0)
    if name == "fop":
        options.setdefault("beta", 0.0)
        options.setdefault("eta", None)
    return fop_asdl.make_gradient_maker(name, model, None if name == "sgd" else config,
                                        micro_batch_size=micro_batch_size, **options)


def limit_scales(gm, name, model):
    """Per parameter, what p.grad is multiplied by in the damped limit to give the plain gradient: λ, but
    for a K-FAC/FOP bias ASDL applies (B + d_B I)⁻¹ alone, with d_B ≈ √λ / π of the π-split. EKFAC's
    U diag(1/(s + λ)) Uᵀ → 1/λ on weights and biases alike. Shampoo's ε is λ:
    (L + λI)^(−1/4) G (R + λI)^(−1/4) → G / √λ, and a vector's (L + λI)^(−1/2) g → g / √λ too."""
    if name == "shampoo":
        return {p: LAMBDA ** 0.5 for p in model.parameters()}
    scales = {p: 1.0 if name == "sgd" else LAMBDA for p in model.parameters()}
    for _, module in getattr(gm, "named_modules_for_curvature", []) if name in ("kfac", "fop") else []:
        if getattr(module, "bias", None) is not None and module.fisher.has_kron:
            scales[module.bias] = kron_damping(module.fisher.kron, LAMBDA)[1]
    return scales


def reference(model, user_loss, x, t):
    """The user's loss on the whole batch and autograd's gradient of it."""
    model.zero_grad()
    loss = user_loss(model(x), t)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), grads


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", METHODS)
def test_loss_and_gradient_are_the_users(name, case, micro_batch_size):
    build, kind, register, user_loss = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    x, t = data(kind)
    expected_loss, expected = reference(model, user_loss, x, t)
    gm = maker(name, model, micro_batch_size)
    dummy_y = gm.setup_model_call(model, x)
    register(gm, dummy_y, t)
    y, loss = gm.forward_and_backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(y, model(x).detach(), rtol=1e-12, atol=1e-12)
    scales = limit_scales(gm, name, model)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad * scales[p], g, rtol=1e-5, atol=1e-9 * float(g.abs().max()))


def test_a_mean_loss_is_not_scaled_by_its_tokens():
    """The report's case: token-level CE over T tokens gave T times the user's loss and gradient."""
    torch.manual_seed(0)
    model = TokenModel().double()
    x, t = data("tokens")
    expected_loss, expected = reference(model, token_ce, x, t)
    gm = fop_asdl.make_gradient_maker("sgd", model, micro_batch_size=2)
    gm.setup_loss_call(token_ce, gm.setup_model_call(model, x), t)
    _, loss = gm.forward_and_backward()
    assert abs(float(loss / expected_loss) - 1) < 1e-12  # not T = 4
    assert abs(float(model.fc1.weight.grad.norm() / expected[0].norm()) - 1) < 1e-12


@pytest.mark.parametrize("case", ["padded", "flattened", "mse"])
def test_fop_halves_are_r_times_the_halves_summed_loss_means(case):
    """η((1 − βs) F̃⁻¹g_avg + β F̃⁻¹g_diff) → ((1 − βs) g_avg + β (g1 − g2)) / λ with a fixed β, where
    g_h = r · ∇(summed loss over half h) / n_h and r = n / N (N: the user's loss's normalizer)."""
    build, kind, register, user_loss = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    x, t = data(kind)
    gm = maker("fop", model, beta=0.5)
    register(gm, gm.setup_model_call(model, x), t)
    gm.forward_and_backward()
    params = list(model.parameters())
    y = model(x)
    n1 = (B + 1) // 2
    total = user_loss(y, t)
    summed = {"padded": lambda yy, tt: token_ce(yy, tt, reduction="sum"),
              "flattened": lambda yy, tt: token_ce(yy, tt, reduction="sum"),
              "mse": lambda yy, tt: F.mse_loss(yy, tt, reduction="sum")}[case]
    normalizer = (summed(y, t) / total).detach()  # N, from the definitions: tokens not ignored / elements
    r = B / normalizer
    g1 = [r * g / n1 for g in torch.autograd.grad(summed(y[:n1], t[:n1]), params, retain_graph=True)]
    g2 = [r * g / (B - n1) for g in torch.autograd.grad(summed(y[n1:], t[n1:]), params)]
    assert abs(float(r) - 1) > 0.05 or case == "mse"  # the padding makes N differ from B·T
    scales = limit_scales(gm, "fop", model)
    for name, module in gm.named_modules_for_curvature:
        s = gm.last_stats[name]["s"]
        for p in module.parameters():
            i = next(k for k, q in enumerate(params) if q is p)
            g_avg = (n1 * g1[i] + (B - n1) * g2[i]) / B
            expected = (1 - 0.5 * s) * g_avg + 0.5 * (g1[i] - g2[i])
            torch.testing.assert_close(p.grad * scales[p], expected, rtol=1e-5,
                                       atol=1e-9 * float(expected.abs().max()))


def test_a_chunk_with_zero_loss_counts_with_the_others_normalizer():
    """An element-wise loss that is exactly 0 on one micro-batch still divides by every element."""
    torch.manual_seed(0)
    model = TokenModel((2, 3)).double()
    x, t = data("mse")
    with torch.no_grad():
        t[:2] = model(x[:2])  # the first chunk fits exactly: its loss is 0
    expected_loss, expected = reference(model, F.mse_loss, x, t)
    gm = fop_asdl.make_gradient_maker("sgd", model, micro_batch_size=2)
    gm.setup_loss_call(F.mse_loss, gm.setup_model_call(model, x), t)
    _, loss = gm.forward_and_backward()
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=0)
    for p, g in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)


def test_reduction_none_is_refused_with_the_reason():
    model = TokenModel().double()
    x, t = data("tokens")
    gm = maker("kfac", model)
    gm.setup_loss_call(token_ce, gm.setup_model_call(model, x), t, reduction="none")
    with pytest.raises(ValueError, match="reduction='none'"):
        gm.forward_and_backward()
