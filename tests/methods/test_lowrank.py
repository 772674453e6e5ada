"""HyLo's pure math (HYLO_SPEC §2.1-§2.5, §4, §9) against independent dense and autograd references."""
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import nn

from fop_asdl.methods.hylo_math import (LowRankFactors, apply_factors, conv2d_patch_sums, conv2d_rows, exact_sngd,
                              kernel, kid_factors, kid_select, kis_factors, kis_probabilities, kis_select,
                              linear_rows, precondition)
from fop_asdl.methods.hylo_schedule import SwitchPolicy, local_rows, refresh_traffic

D = torch.float64
ALPHA = 0.1


def authors_head_projection(y, k_hat):
    """REFERENCE ONLY: hylo-dso/hylo HEAD (d5c16d0) computes Y − Y K̂⁻¹ (I + Y K̂⁻¹)⁻¹ Y, because its
    buffer already holds K̂⁻¹. HYLO_SPEC §2.4 shows this is not eq. 8; the test below shows it fails."""
    k_inv = torch.linalg.inv(k_hat)
    return y - y @ k_inv @ torch.linalg.inv(torch.eye(len(y), dtype=y.dtype) + y @ k_inv) @ y


def problem(layer, x, seed=0):
    """Captured grad_out of the summed loss, per-sample gradients U by an autograd loop, mean V."""
    gen = torch.Generator().manual_seed(seed)
    layer, params = layer.double(), [p for p in (layer.weight, layer.bias) if p is not None]
    readout = torch.randn(layer(x[:1]).flatten(1).shape[1], 3, generator=gen, dtype=D)
    t = torch.randint(0, 3, (len(x),), generator=gen)
    loss = lambda out, j: F.cross_entropy(torch.tanh(out.flatten(1)) @ readout, t[j], reduction="sum")
    out = layer(x)
    grad_out, = torch.autograd.grad(loss(out, slice(None)), out)
    rows = []
    for j in range(len(x)):
        grads = torch.autograd.grad(loss(layer(x[j:j + 1]), slice(j, j + 1)), params)
        rows.append(torch.cat([grads[0].reshape(len(grads[0]), -1)] + [b[:, None] for b in grads[1:]], 1))
    u = torch.stack(rows)
    return grad_out, u, u.mean(0)


def dense_ngd(u, v, alpha=ALPHA):
    """(F + αI)⁻¹ V with F = (1/N) Σ_j vec(u_j) vec(u_j)ᵀ, solved densely."""
    flat = u.reshape(len(u), -1)
    fisher = flat.T @ flat / len(u) + alpha * torch.eye(flat.shape[1], dtype=D)
    return torch.linalg.solve(fisher, v.reshape(-1)).reshape(v.shape)


def khatri_rao(a, g):
    return g[:, :, None] * a[:, None, :]


def low_rank_rows(seed, m=32, d_a=9, d_g=5, noise=0.05):
    """Kernel of numerical rank about 12 (3 × 4) plus noise, as in HYLO_SPEC §2.4's check."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=D)
    a, g = rand(m, 3) @ rand(3, d_a), rand(m, 4) @ rand(4, d_g)
    return a + noise * rand(m, d_a), g + noise * rand(m, d_g), rand(d_g, d_a)


def kid_run(a, g, r_loc, parts, scaling="consistent", projection=None):
    locs = [kid_select(ai, gi, r_loc, ALPHA, kernel_scaling=scaling, total_rows=len(a))
            for ai, gi in zip(a.chunk(parts), g.chunk(parts))]
    a_s, g_s, ys = torch.cat([l.a for l in locs]), torch.cat([l.g for l in locs]), [l.y for l in locs]
    f = kid_factors(a_s, g_s, ys, kernel_scaling=scaling, total_rows=len(a))
    if projection is not None:
        f = LowRankFactors(a_s, g_s, projection(torch.block_diag(*ys), kernel(a_s, g_s, f.scale)), f.scale)
    return f


def all_methods(a, g, v, parts=2):
    """Every route to the preconditioned V at compression ratio 1: SNGD, KIS, KID (1 and P blocks)."""
    loc = kis_select(a, g, len(a), torch.Generator().manual_seed(0))
    out = {"sngd": exact_sngd(a, g, v, ALPHA),
           "kis": apply_factors(v, kis_factors(loc.a, loc.g, ALPHA), ALPHA)}
    for scaling in ("consistent", "reference"):
        for p in (1, parts):
            out[f"kid-{scaling}-P{p}"] = apply_factors(v, kid_run(a, g, len(a) // p, p, scaling), ALPHA)
    return out


@pytest.mark.parametrize("bias", [True, False])
def test_linear_ratio_one_equals_dense_ngd_from_autograd(bias):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 4, generator=gen, dtype=D)
    layer = nn.Linear(4, 3, bias=bias)
    grad_out, u, v = problem(layer, x)
    a, g = linear_rows(x, grad_out, bias=bias)
    torch.testing.assert_close(khatri_rao(a, g), u, rtol=1e-12, atol=1e-12)
    expected = dense_ngd(u, v)
    for name, got in all_methods(a, g, v).items():
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)
    loc = kis_select(a, g, 10, torch.Generator().manual_seed(3))
    w, b = precondition(v[:, :4], v[:, 4] if bias else None, kis_factors(loc.a, loc.g, ALPHA), ALPHA)
    torch.testing.assert_close(torch.cat([w, b[:, None]], 1) if bias else w, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_conv_ratio_one_equals_dense_formula_on_reduced_rows(bias):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 2, 7, 6, generator=gen, dtype=D)
    layer = nn.Conv2d(2, 3, 3, stride=2, padding=1, bias=bias)
    grad_out, u, v = problem(layer, x)
    a, g = conv2d_rows(x, grad_out, 3, 2, 1, bias=bias)
    patches = F.unfold(x, 3, padding=1, stride=2).mean(-1)  # independent: im2col then the spatial mean
    a_ref = torch.cat([patches, torch.ones(8, 1, dtype=D)], 1) if bias else patches
    torch.testing.assert_close(a, a_ref)
    torch.testing.assert_close(g, grad_out.flatten(2).mean(-1))
    expected = dense_ngd(khatri_rao(a_ref, grad_out.flatten(2).mean(-1)), v)
    for name, got in all_methods(a, g, v).items():
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)
    w, b = precondition(v[:, :18].reshape(3, 2, 3, 3), v[:, 18] if bias else None,
                        kis_factors(a, g, ALPHA), ALPHA)
    torch.testing.assert_close(w, expected[:, :18].reshape(3, 2, 3, 3), rtol=1e-10, atol=1e-10)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("geometry", [dict(kernel_size=3, stride=2, padding=1, dilation=1),
                                      dict(kernel_size=(2, 3), stride=(1, 2), padding=(0, 2),
                                           dilation=(2, 1)),
                                      dict(kernel_size=3, stride=1, padding="same", dilation=2),
                                      dict(kernel_size=(2, 4), stride=1, padding="same", dilation=1),
                                      dict(kernel_size=2, stride=1, padding="valid", dilation=1)])
def test_patch_sums_equal_unfold_sum(geometry):
    x = torch.randn(3, 2, 9, 8, generator=torch.Generator().manual_seed(0), dtype=D)
    conv = nn.Conv2d(2, 1, bias=False, **geometry).double()
    sums, positions = conv2d_patch_sums(x, **geometry)
    assert positions == conv(x)[0, 0].numel()
    # Σ_s X_j[s, :] is the weight gradient of one output channel under an all-ones output gradient
    ref = torch.stack([torch.autograd.grad(conv(x[j:j + 1]).sum(), conv.weight)[0].reshape(-1)
                       for j in range(3)])
    torch.testing.assert_close(sums, ref)
    if not isinstance(geometry["padding"], str):
        geo = geometry
        unfold = F.unfold(x, geo["kernel_size"], geo["dilation"], geo["padding"], geo["stride"])
        torch.testing.assert_close(sums, unfold.sum(-1))


def test_scaled_mean_is_exact_for_position_constant_gradients_and_scales_relate():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 2, 6, 6, generator=gen, dtype=D)
    conv = nn.Conv2d(2, 3, 3, bias=True).double()
    grad_out = torch.randn(5, 3, 1, 1, generator=gen, dtype=D).expand(5, 3, 4, 4)
    exact = []
    for j in range(5):  # true per-sample gradient Σ_s g_s x_sᵀ (and Σ_s g_s for the bias) by autograd
        gw, gb = torch.autograd.grad((conv(x[j:j + 1]) * grad_out[j:j + 1]).sum(), [conv.weight, conv.bias])
        exact.append(torch.cat([gw.reshape(3, -1), gb[:, None]], 1))
    rows = {r: khatri_rao(*conv2d_rows(x, grad_out, 3, bias=True, conv_reduction=r))
            for r in ("mean", "sum", "scaled_mean")}
    torch.testing.assert_close(rows["scaled_mean"], torch.stack(exact))
    torch.testing.assert_close(rows["sum"], 16 ** 2 * rows["mean"])
    torch.testing.assert_close(rows["scaled_mean"], 16 * rows["mean"])


@pytest.mark.parametrize("bias", [True, False])
def test_linear_tokens_flatten_or_reduce_like_a_one_by_one_conv(bias):
    gen = torch.Generator().manual_seed(5)
    x, grad_out = torch.randn(4, 6, 3, generator=gen, dtype=D), torch.randn(4, 6, 2, generator=gen, dtype=D)
    a, g = linear_rows(x, grad_out, bias=bias)
    assert a.shape == (24, 3 + bias) and g.shape == (24, 2)
    torch.testing.assert_close(g.T @ a[:, :3], torch.einsum("mto,mti->oi", grad_out, x))  # Uᵀ1 = summed grad
    as_image = lambda t: t.transpose(1, 2)[..., None]  # (m, d, T, 1): T positions of a 1×1 conv
    for reduction in ("mean", "sum", "scaled_mean"):
        got = linear_rows(x, grad_out, bias=bias, token_reduction=reduction)
        ref = conv2d_rows(as_image(x), as_image(grad_out), 1, bias=bias, conv_reduction=reduction)
        for t_got, t_ref in zip(got, ref):
            torch.testing.assert_close(t_got, t_ref)


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("scaling", ["consistent", "reference"])
def test_kid_error_falls_with_rank_exact_at_m_and_head_projection_fails(parts, scaling):
    a, g, v = low_rank_rows(0)
    exact = exact_sngd(a, g, v, ALPHA)
    m_loc = len(a) // parts
    err = lambda f: ((apply_factors(v, f, ALPHA) - exact).norm() / exact.norm()).item()
    errors = [err(kid_run(a, g, r, parts, scaling)) for r in (1, m_loc // 4, m_loc // 2, m_loc)]
    assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-10 and errors[-2] < 0.2
    head = [err(kid_run(a, g, r, parts, scaling, authors_head_projection)) for r in (m_loc // 2, m_loc)]
    assert min(head) > 1.0, head  # ≈ 10² off even at r_loc = m, where eq. 8 is exact


def test_kid_matrix_equals_printed_eq8_and_spec_difference_form():
    gen = torch.Generator().manual_seed(6)
    a, g = torch.randn(12, 5, generator=gen, dtype=D), torch.randn(12, 4, generator=gen, dtype=D)
    eq8 = lambda y, k: y - y @ torch.linalg.inv(torch.linalg.inv(k) + y) @ y
    spec_form = lambda y, k: y - y @ k @ torch.linalg.inv(torch.eye(len(y), dtype=D) + y @ k) @ y
    ours = kid_run(a, g, 3, 2).matrix
    torch.testing.assert_close(ours, kid_run(a, g, 3, 2, projection=eq8).matrix, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ours, kid_run(a, g, 3, 2, projection=spec_form).matrix)


def test_kid_is_exact_on_a_rank_r_kernel_only_with_consistent_scaling():
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(1, 6, generator=gen, dtype=D).expand(16, 6)  # U = G * a: rank 3, exact ID at r_loc = 3
    g = torch.randn(16, 3, generator=gen, dtype=D) @ torch.randn(3, 5, generator=gen, dtype=D)
    v = torch.randn(5, 6, generator=gen, dtype=D)
    exact = exact_sngd(a, g, v, ALPHA)
    torch.testing.assert_close(apply_factors(v, kid_run(a, g, 3, 1), ALPHA), exact, rtol=1e-9, atol=1e-9)
    off = apply_factors(v, kid_run(a, g, 3, 1, "reference"), ALPHA) - exact
    assert off.norm() > 1e-3 * exact.norm()  # c_P = 1/r is the Fisher of 3 samples, not of 16


def test_kid_y_matches_an_independent_id_skeletons_and_gram_scale():
    a, g, _ = low_rank_rows(1, m=16)
    scores = a.square().sum(1) * g.square().sum(1)
    loc = kid_select(a, g, 5, ALPHA, total_rows=16)
    order = torch.argsort(scores, descending=True)
    assert loc.index.tolist() == order[:5].tolist()
    q = kernel(a[order], g[order], 1 / 16)  # independent ID: least-squares coefficients, residual E
    w = torch.cat([torch.eye(5, dtype=D), torch.linalg.lstsq(q[:, :5], q[:, 5:]).solution], 1)
    resid = q - q[:, :5] @ w
    assert resid[:, :5].abs().max() < 1e-12 and resid.norm() > 1e-3 * ALPHA
    torch.testing.assert_close(loc.y, w @ torch.linalg.solve(resid + ALPHA * torch.eye(16, dtype=D), w.T))
    _, _, piv = scipy.linalg.qr(kernel(a, g, 1 / 16).numpy(), pivoting=True)
    pivoted = kid_select(a, g, 5, ALPHA, total_rows=16, skeleton="pivoted_qr")
    assert pivoted.index.tolist() == piv[:5].tolist()
    # local Gram scale c_Q = 1/N: E/N + αI = (E + NαI)/N, so Y_consistent(α) = N · Y_reference(Nα)
    y_reference = kid_select(a, g, 5, 16 * ALPHA, kernel_scaling="reference").y
    torch.testing.assert_close(loc.y, 16 * y_reference)
    dup = torch.cat([a[:4], a[:4]]), torch.cat([g[:4], g[:4]])  # rank-deficient skeleton stays finite
    assert torch.isfinite(kid_select(*dup, 6, ALPHA, total_rows=8).y).all()


def test_kis_sampling_reproducible_without_replacement_and_proportional():
    a, g, _ = low_rank_rows(2, m=20)
    draw = lambda seed, **kw: kis_select(a, g, 6, torch.Generator().manual_seed(seed), **kw).index
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    assert all(len(set(draw(s).tolist())) == 6 for s in range(10))
    norms_sq = a.square().sum(1) * g.square().sum(1)
    torch.testing.assert_close(kis_probabilities(a, g), norms_sq / norms_sq.sum())
    torch.testing.assert_close(kis_probabilities(a, g, "norm"), norms_sq.sqrt() / norms_sq.sqrt().sum())
    gen = torch.Generator().manual_seed(7)
    drawn = torch.cat([kis_select(a[:4], g[:4], 1, gen).index for _ in range(4000)])
    counts = torch.bincount(drawn, minlength=4)
    torch.testing.assert_close(counts.to(D) / 4000, kis_probabilities(a[:4], g[:4]), atol=0.03, rtol=0)
    zero = kis_select(torch.zeros(5, 3, dtype=D), g[:5], 3, torch.Generator().manual_seed(0))
    assert len(set(zero.index.tolist())) == 3


def test_kis_reweighting_rescales_rows_and_uses_one_over_n():
    a, g, v = low_rank_rows(3, m=10)
    loc = kis_select(a, g, 4, torch.Generator().manual_seed(0), reweight=True)
    p = kis_probabilities(a, g)[loc.index]
    torch.testing.assert_close(loc.a, a[loc.index] / (4 * p).sqrt()[:, None])
    f = kis_factors(loc.a, loc.g, ALPHA, reweighted=True, total_rows=10)
    u = khatri_rao(loc.a, loc.g)
    expected = dense_ngd(u * 0.4 ** 0.5, v)  # F ≈ (1/N) Σ ũũᵀ over the rescaled rows
    torch.testing.assert_close(apply_factors(v, f, ALPHA), expected, rtol=1e-10, atol=1e-10)
    assert kis_factors(loc.a, loc.g, ALPHA, kernel_scaling="reference", reweighted=True).scale == 1 / 4


def repo_adaptive_is_kid(step, iters, a0, a1, a2):
    """REFERENCE: the authors' per-step --adaptive rule (HYLO_SPEC §2.5)."""
    return step < a0 * iters or a1 * iters < step <= a2 * iters


def test_switch_policies_reproduce_reported_windows():
    gradient = SwitchPolicy("gradient")
    flat = [1.0] * 100
    kid = [e for e in range(100) if gradient.method(e, [d for d in (35, 75) if d <= e], flat[:e]) == "kid"]
    assert kid == list(range(10)) + list(range(35, 40)) + list(range(75, 80))  # 20% (ResNet-32, Fig. 11)
    policy, iters = SwitchPolicy.from_adaptive(10, 35, 40), 7
    mismatched = [s for s in range(50 * iters)
                  if (policy.method(s // iters) == "kid") != repo_adaptive_is_kid(s, iters, 10, 35, 40)]
    assert mismatched == [35 * iters, 40 * iters]
    assert {SwitchPolicy("kid").method(e) for e in range(50)} == {"kid"}
    assert {SwitchPolicy("kis").method(e, [3], [1.0, 9.0]) for e in range(50)} == {"kis"}


def test_gradient_rule_threshold():
    rule = SwitchPolicy("gradient", threshold=0.5, kid_warmup_epochs=0, kid_epochs_after_lr_decay=0)
    assert rule.method(0) == "kid" and rule.method(1, (), [1.0]) == "kid"  # eq. 10 undefined yet
    assert rule.method(5, (), [1.0, 2.0, 1.4]) == "kis"  # |1.4 − 2| / 2 = 0.3
    assert rule.method(5, (), [1.0, 2.0, 0.9]) == "kid"  # 0.55
    assert rule.method(5, (), [2.0, 3.0]) == "kid"  # exactly η counts
    assert rule.method(5, (), [0.0, 1.0]) == "kid" and rule.method(5, (5,), [1.0, 1.0]) == "kid"
    assert SwitchPolicy().threshold == 0.5


def test_refresh_traffic_formula_and_packed_payload():
    conv = refresh_traffic([(4608, 512)], 8, 64, "kid")  # the ResNet-50 example of HYLO_SPEC §4
    assert conv.gather_sent == 4 * (8 * 5120 + 64) and conv.gather_received == 64 * conv.gather_sent
    assert conv.broadcast == 4 * 512 ** 2
    widths, gen = [(6, 3), (10, 4)], torch.Generator().manual_seed(0)
    rows = [low_rank_rows(s, m=12, d_a=d_a, d_g=d_g)[:2] for s, (d_a, d_g) in enumerate(widths)]
    r_loc = local_rows(0.25, 12)
    for method in ("kid", "kis"):
        locs = [kid_select(a, g, r_loc, ALPHA, total_rows=24) if method == "kid"
                else kis_select(a, g, r_loc, gen) for a, g in rows]
        packed = torch.cat([t.reshape(-1) for l in locs for t in (l.a, l.g, l.y) if t is not None])
        traffic = refresh_traffic(widths, r_loc, 2, method, element_size=8)
        assert traffic.gather_sent == packed.numel() * packed.element_size()
        assert traffic.broadcast == 2 * 8 * (2 * r_loc) ** 2
    assert local_rows(0.29, 100) == 29 and local_rows(0.01, 50) == 1


IMG = torch.ones(2, 1, 5, 5)


@pytest.mark.parametrize("call, match", [
    (lambda a, g: kis_select(a, g, 0, torch.Generator()), "rank must be an int >= 1"),
    (lambda a, g: kid_select(a, g, 9, ALPHA, total_rows=8), "rank 9 exceeds the 8 rows"),
    (lambda a, g: kis_select(a, g[:5], 2, torch.Generator()), "a has 8 rows but g has 5"),
    (lambda a, g: kid_factors(a, g, [torch.eye(3)]), r"the Y blocks make a \(3, 3\) matrix"),
    (lambda a, g: kid_select(a, g, 2, ALPHA), "pass total_rows=N"),
    (lambda a, g: kid_select(a, g, 2, ALPHA, kernel_scaling="repo"), "kernel_scaling must be one of"),
    (lambda a, g: kid_select(a, g, 2, ALPHA, total_rows=8, skeleton="svd"), "kid_skeleton must be one of"),
    (lambda a, g: kid_select(a, g, 2, 0.0, total_rows=8), "damping must be > 0"),
    (lambda a, g: kis_probabilities(a, g, "l1"), "kis_probability must be one of"),
    (lambda a, g: conv2d_rows(IMG, IMG[..., :3, :3], 3, bias=True, conv_reduction="max"),
     "conv_reduction must"),
    (lambda a, g: conv2d_rows(IMG, IMG[..., :4, :4], 3, bias=True), "pass the layer's kernel_size"),
    (lambda a, g: linear_rows(torch.ones(2, 3), torch.ones(3, 2), bias=True), "must agree"),
    (lambda a, g: precondition(torch.ones(5, 4), None, kis_factors(a, g, ALPHA), ALPHA), "bias flag"),
    (lambda a, g: SwitchPolicy("random"), "switch_policy must be one of"),
    (lambda a, g: SwitchPolicy("epochs"), "needs kid_windows"),
    (lambda a, g: local_rows(0.0, 10), "compression_ratio must be in"),
    (lambda a, g: refresh_traffic([(3, 2)], 1, 1, "sngd"), "method must be 'kid' or 'kis'"),
])
def test_bad_input_raises_naming_the_fix(call, match):
    gen = torch.Generator().manual_seed(0)
    a, g = torch.randn(8, 4, generator=gen, dtype=D), torch.randn(8, 3, generator=gen, dtype=D)
    with pytest.raises(ValueError, match=match):
        call(a, g)
