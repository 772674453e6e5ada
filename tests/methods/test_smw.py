"""FNGD's pure per-layer math against per-sample autograd loops and dense matrices (FNGD_SPEC §2, §10)."""
import pytest
import torch
from torch import nn

from fop_asdl.methods import fngd_math as smw
from fop_asdl.methods.fngd_math import (choose_gram_strategy, conv2d_gram, conv2d_weighted_sum, fngd_coefficients,
                          gram_costs, linear_gram, linear_weighted_sum)

DTYPE = torch.float64


def make_case(name: str):
    """A real layer and an input batch (float64)."""
    torch.manual_seed(0)
    layer, shape = {
        "linear": (nn.Linear(5, 3, bias=False), (7, 5)),
        "linear_bias": (nn.Linear(5, 3), (7, 5)),
        "linear_tokens_bias": (nn.Linear(4, 3), (6, 5, 4)),
        "linear_tokens": (nn.Linear(4, 3, bias=False), (6, 5, 4)),
        "conv_stride_pad_bias": (nn.Conv2d(2, 3, 3, stride=2, padding=1), (5, 2, 7, 7)),
        "conv_dilation_rect": (nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(0, 1), dilation=2,
                                         bias=False), (5, 2, 8, 7)),
        # inputs smaller than the output gradients: the weighted sums weigh x instead of grad_out
        "linear_widening_bias": (nn.Linear(3, 6), (7, 3)),
        "linear_tokens_widening_bias": (nn.Linear(2, 5), (6, 4, 2)),
        "conv_widening_bias": (nn.Conv2d(1, 4, 3, padding=1), (5, 1, 6, 6)),
    }[name]
    return layer.to(DTYPE), torch.randn(*shape, dtype=DTYPE)


CASES = ["linear", "linear_bias", "linear_tokens_bias", "linear_tokens", "conv_stride_pad_bias",
         "conv_dilation_rect", "linear_widening_bias", "linear_tokens_widening_bias", "conv_widening_bias"]


def loss(y, target):
    """A sum of per-sample losses, each depending only on its own output row."""
    return 0.5 * ((torch.tanh(y) - target) ** 2).sum()


def capture(layer, x):
    """grad_out of the summed loss for the batch, and U (M, N) from one autograd call per sample."""
    target = torch.randn(layer(x).shape, dtype=DTYPE)
    y = layer(x)
    (grad_out,) = torch.autograd.grad(loss(y, target), y)
    rows = []
    for m in range(x.shape[0]):
        grads = torch.autograd.grad(loss(layer(x[m:m + 1]), target[m:m + 1]), list(layer.parameters()))
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return grad_out, torch.stack(rows)


def gram_of(layer, x, grad_out, **kw):
    if isinstance(layer, nn.Linear):
        return linear_gram(x, grad_out, layer.bias is not None, **kw)
    return conv2d_gram(x, grad_out, layer.weight.shape, layer.stride, layer.padding, layer.dilation,
                       bias=layer.bias is not None, **kw)


def weighted_sum_of(layer, x, grad_out, w):
    """The flat d = [vec D_W; D_b], in the order of U's columns."""
    if isinstance(layer, nn.Linear):
        d_w, d_b = linear_weighted_sum(x, grad_out, w, layer.bias is not None)
    else:
        d_w, d_b = conv2d_weighted_sum(x, grad_out, w, layer.weight.shape, layer.stride, layer.padding,
                                       layer.dilation, bias=layer.bias is not None)
    assert d_w.shape == layer.weight.shape
    assert (d_b is None) == (layer.bias is None)
    return torch.cat([d_w.reshape(-1)] + ([] if d_b is None else [d_b]))


def assert_rel(actual, expected, tol=1e-10):
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err <= tol, f"relative error {err:.3g} > {tol}"


@pytest.mark.parametrize("strategy,chunk", [("auto", None), ("per_sample", None), ("pairwise", None),
                                            ("pairwise", 40)])
@pytest.mark.parametrize("name", CASES)
def test_gram_matches_per_sample_loop(name, strategy, chunk):
    layer, x = make_case(name)
    grad_out, u = capture(layer, x)
    kw = {"strategy": strategy} if chunk is None else {"strategy": strategy, "chunk_elems": chunk}
    k = gram_of(layer, x, grad_out, **kw)
    assert k.shape == (x.shape[0], x.shape[0])
    assert_rel(k, u @ u.T)


@pytest.mark.parametrize("name", CASES)
def test_gram_strategies_agree(name):
    layer, x = make_case(name)
    grad_out, _ = capture(layer, x)
    per_sample = gram_of(layer, x, grad_out, strategy="per_sample")
    assert_rel(gram_of(layer, x, grad_out, strategy="pairwise", chunk_elems=7), per_sample)


def test_linear_gram_is_eq12():
    """Without tokens: K = (ZZᵀ)∘(XXᵀ + 11ᵀ), written out."""
    layer, x = make_case("linear_bias")
    grad_out, _ = capture(layer, x)
    assert_rel(linear_gram(x, grad_out, True), (grad_out @ grad_out.T) * (x @ x.T + 1))


def test_auto_picks_cheaper_strategy_by_documented_flops():
    # ResNet stem: many positions, few channels -> forming per-sample gradients is cheaper.
    early = dict(batch=128, positions=32 * 32, in_features=3 * 9, out_features=16)
    # Late wide layer: 4x4 positions, 512 channels -> spatial Grams are cheaper.
    late = dict(batch=128, positions=4 * 4, in_features=512 * 9, out_features=512)
    for shape, expected in ((early, "per_sample"), (late, "pairwise")):
        m, s, i, o = shape.values()
        spec_a = 2 * m * s * o * i + 2 * m ** 2 * o * i   # spec §2.2 table, strategy (a)
        spec_b = 2 * m ** 2 * s ** 2 * (i + o)              # strategy (b)
        assert gram_costs(**shape) == (spec_a, spec_b)
        assert choose_gram_strategy(**shape) == expected
        assert (spec_a < spec_b) == (expected == "per_sample")


def test_auto_dispatches_to_chosen_strategy(monkeypatch):
    called = []
    for key in ("per_sample", "pairwise"):
        monkeypatch.setitem(smw._GRAM, key, lambda p, z, c, groups=1, key=key: called.append(key) or p.new_zeros(
            p.shape[0], p.shape[0]))
    x = torch.randn(2, 1, 16, 16, dtype=DTYPE)        # 1 channel, 256 positions: per_sample wins
    conv2d_gram(x, torch.randn(2, 2, 16, 16, dtype=DTYPE), (2, 1, 1, 1), bias=False)
    x = torch.randn(2, 64, 1, 1, dtype=DTYPE)         # 64 -> 64 channels, 1 position: pairwise wins
    conv2d_gram(x, torch.randn(2, 64, 1, 1, dtype=DTYPE), (64, 64, 1, 1), bias=False)
    assert called == ["per_sample", "pairwise"]


@pytest.mark.parametrize("damping_mode,damping", [("fixed", 0.1), ("frobenius", 1e-3)])
@pytest.mark.parametrize("name", CASES)
def test_direction_is_dense_damped_ngd(name, damping_mode, damping):
    layer, x = make_case(name)
    grad_out, u = capture(layer, x)
    m, n = u.shape
    coef = fngd_coefficients(gram_of(layer, x, grad_out), damping, damping_mode=damping_mode)
    g, fisher = u.mean(0), u.T @ u / m
    dense = torch.linalg.solve(coef.damping * torch.eye(n, dtype=DTYPE) + fisher, g)
    assert coef.c.abs().max() > 1e-2, "the damping should leave the direction far from g/λ"
    assert_rel(u.T @ coef.w, dense)
    assert_rel(weighted_sum_of(layer, x, grad_out, coef.w), dense)


@pytest.mark.parametrize("name", CASES)
def test_weighted_sum_matches_per_sample_loop(name):
    layer, x = make_case(name)
    grad_out, u = capture(layer, x)
    w = torch.randn(x.shape[0], dtype=DTYPE)
    assert_rel(weighted_sum_of(layer, x, grad_out, w), u.T @ w)


def test_conv_weighted_sum_with_positions_the_stride_skips():
    """8x8 input, kernel 3, stride 2, no padding: the last row and column feed no output."""
    torch.manual_seed(1)
    layer = nn.Conv2d(2, 3, 3, stride=2).to(DTYPE)
    x = torch.randn(4, 2, 8, 8, dtype=DTYPE)
    grad_out, u = capture(layer, x)
    w = torch.randn(4, dtype=DTYPE)
    assert_rel(weighted_sum_of(layer, x, grad_out, w), u.T @ w)


@pytest.mark.parametrize("scale_mode", ["ngd", "sgd_like"])
def test_huge_damping_gives_scaled_gradient(scale_mode):
    layer, x = make_case("conv_stride_pad_bias")
    grad_out, u = capture(layer, x)
    lam = 1e9
    coef = fngd_coefficients(gram_of(layer, x, grad_out), lam, damping_mode="fixed", scale_mode=scale_mode)
    assert coef.c.abs().max() < 1e-6
    d = weighted_sum_of(layer, x, grad_out, coef.w)
    assert_rel(d * lam if scale_mode == "ngd" else d, u.mean(0), tol=1e-6)


def random_grams(batch: int, m: int):
    gen = torch.Generator().manual_seed(3)
    scales = torch.tensor([1.0, 10.0, 0.1], dtype=DTYPE)[:batch, None, None]   # unequal norms
    u = torch.randn(batch, m, 9, generator=gen, dtype=DTYPE) * scales
    return u @ u.transpose(1, 2)


def test_frobenius_damping_is_alpha_times_norm_of_unnormalised_gram_per_matrix():
    grams = random_grams(3, 6)
    coef = fngd_coefficients(grams, 0.3)
    expected = torch.stack([0.3 * torch.sqrt((k ** 2).sum()) for k in grams])   # no 1/M (eq. 14)
    torch.testing.assert_close(coef.damping, expected, rtol=1e-14, atol=0)
    for k, lam, c, w in zip(grams, coef.damping, coef.c, coef.w):
        single = fngd_coefficients(k, float(lam), damping_mode="fixed")
        torch.testing.assert_close(single.c, c, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(single.w, w, rtol=1e-12, atol=1e-14)
        sgd_like = fngd_coefficients(k, float(lam), damping_mode="fixed", scale_mode="sgd_like")
        torch.testing.assert_close(sgd_like.w, w * lam, rtol=1e-12, atol=1e-14)


def test_coefficients_follow_eq9_written_out():
    k = random_grams(1, 5)[0]
    lam, m = 0.7, 5
    c = torch.linalg.solve(lam * torch.eye(m, dtype=DTYPE) + k / m, k @ torch.ones(m, dtype=DTYPE) / m)
    coef = fngd_coefficients(k, lam, damping_mode="fixed")
    torch.testing.assert_close(coef.c, c, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(coef.w, (1 - c) / (lam * m), rtol=1e-12, atol=1e-14)


def test_tensor_damping_per_matrix_and_floor_for_zero_gram():
    grams = torch.cat([random_grams(1, 4), torch.zeros(1, 4, 4, dtype=DTYPE)])
    coef = fngd_coefficients(grams, torch.tensor([0.5, 0.5], dtype=DTYPE), min_damping=1e-3)
    assert coef.damping[1] == 1e-3 and torch.isfinite(coef.w).all()
    torch.testing.assert_close(coef.w[1], torch.full((4,), 1 / (1e-3 * 4), dtype=DTYPE))
    assert coef.damping[0] == 0.5 * torch.linalg.matrix_norm(grams[0])


def test_no_value_dependent_host_sync():
    """Meta tensors have no values, so any .item() or branch on a value would raise."""
    meta = torch.device("meta")
    x, z = torch.empty(4, 2, 7, 7, device=meta), torch.empty(4, 3, 4, 4, device=meta)
    for strategy in ("per_sample", "pairwise"):
        k = conv2d_gram(x, z, (3, 2, 3, 3), 2, 1, bias=True, strategy=strategy)
        k = k + linear_gram(torch.empty(4, 5, 6, device=meta), torch.empty(4, 5, 2, device=meta), True,
                            strategy=strategy)
    for mode in ("frobenius", "fixed"):
        coef = fngd_coefficients(k, 0.1, damping_mode=mode, min_damping=1e-8)
        assert coef.w.shape == (4,) and coef.damping.shape == ()
    d_w, d_b = conv2d_weighted_sum(x, z, coef.w, (3, 2, 3, 3), 2, 1, bias=True)
    assert d_w.shape == (3, 2, 3, 3) and d_b.shape == (3,)


def _x(*shape):
    return torch.zeros(*shape, dtype=DTYPE)


@pytest.mark.parametrize("call,match", [
    (lambda: linear_gram(_x(4, 3), _x(5, 2), True), r"batch sizes differ.*same batch"),
    (lambda: linear_weighted_sum(_x(4, 3), _x(5, 2), _x(4), True), r"batch sizes differ"),
    (lambda: linear_gram(_x(4, 2, 3), _x(4, 3, 2), False), r"\(M, T, O\).*Fold extra"),
    (lambda: linear_weighted_sum(_x(4, 3), _x(4, 2), _x(3), False), r"w must have shape \(4,\)"),
    (lambda: conv2d_gram(_x(4, 2, 5, 5), _x(3, 3, 3, 3), (3, 2, 3, 3), bias=True), r"batch sizes differ"),
    (lambda: conv2d_gram(_x(4, 2, 5, 5), _x(4, 4, 5, 5), (4, 1, 3, 3), 1, 1, bias=False, groups=3),
     r"2 channels but weight_shape\[1\] = 1 with groups=3"),
    (lambda: conv2d_gram(_x(4, 2, 5, 5), _x(4, 4, 5, 5), (4, 1, 3, 3), 1, 1, bias=False),
     r"weight_shape\[1\] = 1 with groups=1.*and its groups"),
    (lambda: conv2d_weighted_sum(_x(4, 2, 5, 5), _x(4, 3, 5, 5), _x(4), (3, 2, 3, 3), bias=True),
     r"outputs \(M, 3, 3, 3\).*stride, padding and dilation"),
    (lambda: conv2d_gram(_x(4, 2, 5, 5), _x(4, 3, 5, 5), (3, 2, 3, 3), 1, "same", bias=True),
     r"padding must be an int.*'same'"),
    (lambda: linear_gram(_x(4, 3), _x(4, 2), True, strategy="unfold"), r"strategy must be one of"),
    (lambda: fngd_coefficients(_x(4, 3), 0.1), r"gram must be \(\.\.\., M, M\)"),
    (lambda: fngd_coefficients(_x(4, 4), 0.0), r"damping must be > 0"),
    (lambda: fngd_coefficients(_x(4, 4), 0.1, damping_mode="trace"), r"damping_mode must be one of"),
    (lambda: fngd_coefficients(_x(4, 4), 0.1, scale_mode="adam"), r"scale_mode must be one of"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
