"""EKFAC equals a dense reference: the eigendecomposition of the dense B ⊗ A (and of B for a bias), the
rescaling s from per-sample gradients of an autograd loop over samples, LayerNorm by K-FAC's unit-wise
inverse; and it has the engine's guarantees."""
import copy

import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.methods import ekfac_math as em

from dense_refs import unit_metric
from scaffold import conv_bn_ln_net, conv_ln_net, independent_net, small_image_batch, step, token_ce
from engine_guarantees import (failed_step_check, grad_scaler_check, micro_batch_check, ranks_check, resume_check,
                               train)

DAMPING = 3e-2
N = 24


def tiny_net() -> nn.Module:
    """Conv2d with bias (A 9×9, B 2×2), Linear with bias (18 → 4), LayerNorm, Linear without bias (4 → 3)."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(18, 4),
                         nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3, bias=False))


def batches(k):
    return small_image_batch(k, N)


def per_sample(model, x, t, r):
    """Per block: per-sample gradients (n, weight·bias) from one autograd pass per sample (times r, the user's
    per-sample term against its summed-loss term), and K-FAC's factors A, B by ASDL's definitions from each
    sample's inputs and output gradients (a Conv2d's A over unfolded patches, divided by the positions)."""
    blocks = {name: m for name, m in model.named_children() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))}
    grads = {name: [] for name in blocks}
    a_sum = {name: 0 for name, m in blocks.items() if not isinstance(m, nn.LayerNorm)}
    b_sum = dict(a_sum)
    for i in range(len(x)):
        seen = {}

        def hook(module, args, out, name=None):
            seen[name] = [args[0].detach(), None]
            out.register_hook(lambda g: seen[name].__setitem__(1, g.detach() * r))

        handles = [m.register_forward_hook(lambda mod, a, o, n=name: hook(mod, a, o, n)) for name, m in blocks.items()
                   if name in a_sum]
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), t[i:i + 1], reduction="sum").backward()
        for h in handles:
            h.remove()
        for name, m in blocks.items():
            grads[name].append(torch.cat([p.grad.flatten() * r for p in (m.weight, m.bias) if p is not None]))
            if name in a_sum:
                inp, out = seen[name]
                if isinstance(m, nn.Conv2d):
                    a = F.unfold(inp, 3, padding=1, stride=2)[0].T  # (positions, in·k·k)
                    a_sum[name] = a_sum[name] + a.T @ a / a.shape[0]
                    d = out.flatten(2)[0].T
                else:
                    a, d = inp, out
                    a_sum[name] = a_sum[name] + a.T @ a
                b_sum[name] = b_sum[name] + d.T @ d
    model.zero_grad()
    n = len(x)
    return ({name: torch.stack(g) for name, g in grads.items()},
            {name: (a_sum[name] / n, b_sum[name] / n) for name in a_sum})


def reference(model, steps, ema, refresh_every, reduction, curvature_every=1):
    """Per step, EKFAC's gradient of every block, densely: F_K = B ⊗ A (blockdiag with B for a bias), its
    eigenvectors V from torch.linalg.eigh on refresh steps, s = diag(Vᵀ F_emp V) with F_emp the mean of
    g_i g_iᵀ (EMA: (1 − d)·eigenvalues of F_K at a refresh, else the last s, plus d·diag(Vᵀ F_emp V)), and
    V diag(1/(s + λ)) Vᵀ g; LayerNorm's F̃⁻¹ g with the unit-wise F + λI inverted on refresh steps. Steps
    between curvature steps apply the stored V, s and inverses to g."""
    accumulate = ema != -1
    factors, state, out = {}, {}, []
    for k in range(steps):
        x, t = batches(k)
        r = len(x) if reduction == "sum" else 1.0
        grads, kfac = per_sample(model, x, t, r)
        curvature = k % curvature_every == 0
        refresh = k % refresh_every == 0 or (curvature and not accumulate)
        expected = {}
        for name, g in grads.items():
            if curvature:
                new, old = kfac[name] if name in kfac else unit_metric(g), factors.get(name)
                if not accumulate:
                    factors[name] = new
                elif name not in kfac:
                    factors[name] = ema * new if old is None else (1 - ema) * old + ema * new
                else:
                    factors[name] = tuple(ema * f if old is None else (1 - ema) * o + ema * f
                                          for f, o in zip(new, old or new))
            if name not in kfac and refresh:  # LayerNorm: K-FAC's unit-wise inverse, refreshed with the inverses
                state[name] = torch.linalg.inv(factors[name] + DAMPING * torch.eye(len(new), dtype=g.dtype))
            elif name in kfac and curvature:
                a, b = factors[name]
                n_w = a.shape[0] * b.shape[0]
                pieces = [(torch.kron(b, a), g[:, :n_w])] + ([(b, g[:, n_w:])] if g.shape[1] > n_w else [])
                for j, (f_k, g_part) in enumerate(pieces):
                    if refresh:
                        values, vectors = torch.linalg.eigh(f_k)
                        state[(name, j)] = (vectors, values.clamp_min(0))
                    vectors, start = state[(name, j)]
                    estimate = ((g_part @ vectors) ** 2).mean(0)
                    state[(name, j)] = (vectors, estimate if not accumulate else (1 - ema) * start + ema * estimate)
            expected[name] = preconditioned(state, name, g, name in kfac)
        out.append(expected)
    return out


def preconditioned(state, name, g, kron):
    """The stored V diag(1/(s + λ)) Vᵀ (or unit-wise inverse) applied to the mean of g."""
    if not kron:
        return state[name] @ g.mean(0)
    pairs = [state[(name, j)] for j in range(2) if (name, j) in state]
    parts = torch.split(g.mean(0), [len(v) for v, _ in pairs])
    return torch.cat([v @ ((v.T @ part) / (s + DAMPING)) for (v, s), part in zip(pairs, parts)])


@pytest.mark.parametrize("ema, reduction, curvature_every", [(-1, "mean", 1), (0.5, "mean", 1), (0.5, "sum", 1),
                                                             (0.5, "mean", 2), (-1, "mean", 2)])
def test_written_gradient_equals_the_dense_reference(ema, reduction, curvature_every):
    """Eigenbases every 2 curvature steps (without an EMA every curvature step): with curvature every step,
    step 1 rescales in step 0's basis; every 2, steps 1 and 3 apply the stored bases and s to autograd's sums.
    A loss with reduction='sum' has per-sample terms n times its summed ones."""
    torch.manual_seed(0)
    model = tiny_net().double()
    cfg = asdl.PreconditioningConfig(damping=DAMPING, ema_decay=ema, curvature_upd_interval=curvature_every,
                                     preconditioner_upd_interval=2 * curvature_every)
    maker = fop_asdl.make_gradient_maker("ekfac", model, cfg)
    loss_fn = (lambda y, t, reduction="sum": F.cross_entropy(y, t, reduction=reduction)) if reduction == "sum" \
        else F.cross_entropy
    got, steps = [], 2 * curvature_every + 1
    for k in range(steps):
        x, t = batches(k)
        step(maker, model, x, t, loss_fn=loss_fn)
        got.append({name: torch.cat([p.grad.flatten() for p in (m.weight, m.bias) if p is not None])
                    for name, m in model.named_children() if any(True for _ in m.parameters())})
    want = reference(model, steps, ema, 2 * curvature_every, reduction, curvature_every)
    for k, (g_step, w_step) in enumerate(zip(got, want)):
        assert g_step.keys() == w_step.keys()
        for name in w_step:
            torch.testing.assert_close(g_step[name], w_step[name], rtol=1e-7, atol=1e-10,
                                       msg=lambda m: f"step {k}, block {name}: {m}")
            if k == steps - 1:
                assert maker.last_stats[name]["kl_base"] > 0


def token_batch(k, n=6, positions=4, vocab=5):
    """Batch ``k``: (n, T, 3) inputs and (n, T) targets with a different number of padding tokens per sample."""
    gen = torch.Generator().manual_seed(300 + k)
    x = torch.randn(n, positions, 3, generator=gen, dtype=torch.float64)
    t = torch.randint(0, vocab, (n, positions), generator=gen)
    for i in range(1, n):
        t[i, positions - (i % positions):] = -100
    return x, t


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rescaling_takes_the_users_per_sample_terms(reduction, micro_batch_size):
    """ŝ follows the user's loss normaliser (fop_asdl.engine.loss): with a token-level mean over the tokens not
    ignored (N of them) or a sum (N = 1), sample i's term of the user's loss is r = n / N times its summed-loss
    term, so ŝ = mean_i (U_Bᵀ r G_i U_A)² (and (U_Bᵀ r b_i)² for the bias), G_i, b_i the gradients of sample i's
    summed loss from an autograd pass of its own, in the bases the maker stored. Step 0 refreshes the bases
    (its rows are kept until they are known), step 1 projects its rows chunk by chunk in them (EMA weight 1:
    s is the step's ŝ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    cfg = asdl.PreconditioningConfig(damping=1e-2, ema_decay=1.0, curvature_upd_interval=1,
                                     preconditioner_upd_interval=2)
    maker = fop_asdl.make_gradient_maker("ekfac", model, cfg, micro_batch_size=micro_batch_size)
    bases = None
    for k in range(2):
        x, t = token_batch(k)
        maker.setup_loss_call(token_ce, maker.setup_model_call(model, x), t, reduction=reduction)
        maker.forward_and_backward()
        n = len(x)
        r = n / (1.0 if reduction == "sum" else float((t != -100).sum()))
        assert abs(r - 1) > 0.5  # the padding (or the sum) makes the user's per-sample terms differ from the sums'
        state = maker.state_dict()["ekfac"]
        if k == 1:  # no refresh: step 0's bases
            assert all(torch.equal(state[name][key], bases[name][key]) for name in bases for key in ("U_A", "U_B"))
        bases = state
        for name in ("0", "2"):
            layer = model[int(name)]
            weight, bias = [], []
            for i in range(n):
                g_w, g_b = torch.autograd.grad(token_ce(model(x[i:i + 1]), t[i:i + 1], reduction="sum"),
                                               (layer.weight, layer.bias))
                weight.append(r * g_w)
                bias.append(r * g_b)
            u_a, u_b = state[name]["U_A"], state[name]["U_B"]
            s_w = torch.stack([(u_b.T @ g @ u_a) ** 2 for g in weight]).mean(0)
            s_b = torch.stack([(g @ u_b) ** 2 for g in bias]).mean(0)
            torch.testing.assert_close(state[name]["s_w"], s_w, rtol=1e-9, atol=1e-14)
            torch.testing.assert_close(state[name]["s_b"], s_b, rtol=1e-9, atol=1e-14)


def test_it_differs_from_kfac_and_keeps_kfacs_batchnorm():
    """The rescaling is not K-FAC's (so the dense test checks something), while BatchNorm's gradient, K-FAC's
    unit-wise F̃⁻¹g, is K-FAC's exactly (one step: the same parameters)."""
    runs = {}
    for name in ("ekfac", "kfac"):
        runs[name] = train(name, conv_bn_ln_net, cfg(), range(1), fisher_type="fisher_emp")[0]
    for i, (a, b) in enumerate(zip(runs["ekfac"][-1][0], runs["kfac"][-1][0])):
        if i in (2, 3):  # the BatchNorm2d's weight and bias
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)
        elif i == 0:  # the Conv2d's weight
            assert (a - b).norm() > 0.05 * b.norm()


@pytest.mark.parametrize("bias_correction", [False, True])
def test_factors_are_kfacs(bias_correction):
    """The factors EKFAC forms itself on refresh steps (to decompose them before the commit) are K-FAC's, bit
    for bit, with and without ema_bias_correction (the parameters stay put: learning rate 0)."""
    states = []
    for name in ("ekfac", "kfac"):
        maker = train(name, conv_bn_ln_net, cfg(), range(5), opt_lr=0.0, fisher_type="fisher_emp",
                      ema_bias_correction=bias_correction)[1]
        states.append(maker.state_dict()["curvature"])
    for block, tensors in states[1].items():
        for key in ("kron.A", "kron.B", "unit.data"):
            if key in tensors:
                assert torch.equal(states[0][block][key], tensors[key]), (block, key)
        if "ema_updates" in tensors:
            assert int(states[0][block]["ema_updates"]) == int(tensors["ema_updates"]) == 5


@pytest.mark.parametrize("positions", [2, 5])
def test_rescaling_with_positions_equals_per_sample_products(positions):
    """Σ_i (U_Bᵀ G_i U_A)² with G_i = Σ_p d_ip a_ipᵀ, in sample chunks, against the per-sample matrices; with 2
    positions the rows are projected first (2·(4² + 3²) ≤ 3·4·(3 + 4)), with 5 each G_i is formed first."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(7, positions, 4, generator=gen, dtype=torch.float64)
    d = torch.randn(7, positions, 3, generator=gen, dtype=torch.float64)
    u_a = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))[0]
    u_b = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    s_w, s_b = em.rescaling(a, d, u_a, u_b, bias=True, chunk_elems=24)  # 2 samples per chunk
    per_sample = torch.einsum("npo,npi->noi", d, a)
    torch.testing.assert_close(s_w, ((u_b.T @ per_sample @ u_a) ** 2).sum(0))
    torch.testing.assert_close(s_b, ((d.sum(1) @ u_b) ** 2).sum(0))


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook")  # ASDL's own maker, run bare here
def test_asdl_ekfac_leaves_the_gradient_unchanged():
    """The defect this maker fixes: ASDL 0.1a5's EkfacGradientMaker writes the plain gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, t = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    fresh = copy.deepcopy(model)  # ASDL leaves its KFE matrices on the modules
    theirs = asdl.EkfacGradientMaker(model, asdl.PreconditioningConfig(damping=1e-2, data_size=16),
                                     fisher_type="fisher_emp")
    step(theirs, model, x, t)
    written = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), t).backward()
    assert all(torch.allclose(a, p.grad) for a, p in zip(written, model.parameters()))
    step(fop_asdl.make_gradient_maker("ekfac", fresh, asdl.PreconditioningConfig(damping=1e-2)), fresh, x, t)
    assert not torch.allclose(fresh[0].weight.grad, written[0])


# --- the engine's guarantees ------------------------------------------------------------------------------------
BASE = dict(damping=1e-2, ema_decay=0.2, curvature_upd_interval=1, preconditioner_upd_interval=2)


def cfg(**kwargs):
    return asdl.PreconditioningConfig(**{**BASE, **kwargs})


@pytest.mark.parametrize("micro_batch_size", [13, 16])
def test_micro_batched_step_equals_the_one_pass_step(micro_batch_size):
    """40 samples, more than any factor's size: with fewer, a factor's null space has no unique eigenbasis,
    and the rescaling a later batch gets there depends on the basis rounding picked (EKFAC, not this code)."""
    micro_batch_check("ekfac", independent_net, cfg(), micro_batch_size, samples=40)


def test_grad_scaler_gives_the_unscaled_result():
    grad_scaler_check("ekfac", conv_bn_ln_net, cfg())


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    resume_check(tmp_path, "ekfac", {"config": BASE})


@pytest.mark.parametrize("ema", [0.2, -1])
@pytest.mark.parametrize("kind", ["refresh", "rescaling", "plain"])
@pytest.mark.parametrize("fault", ["nan_input", "inf_gradient", "loss_raises"])
def test_failed_step_raises_and_changes_nothing(ema, kind, fault):
    """In float32 (where ASDL's in-place damping would move the factors' last bits) on a refresh step (2), a
    rescaling-only step (3) and, with curvature every 2 steps, a step without curvature (3)."""
    config = cfg(ema_decay=ema, curvature_upd_interval=2, preconditioner_upd_interval=4) if kind == "plain" \
        else cfg(ema_decay=ema)
    _, maker, model = train("ekfac", conv_bn_ln_net, config, range(2 if kind == "refresh" else 3),
                            dtype=torch.float32)
    x, t = small_image_batch(9, 10)
    failed_step_check(maker, model, x.float(), t, fault)


def test_state_dict_holds_bases_and_rescaling_of_every_kron_block():
    """After a refresh step the stored factors are exactly those U_A, U_B diagonalise."""
    _, maker, _ = train("ekfac", conv_bn_ln_net, cfg(), range(1))
    state = maker.state_dict()
    assert set(state["ekfac"]) == {"0", "4", "7"} and set(state["ekfac"]["4"]) == {"U_A", "U_B", "s_w", "s_b"}
    assert set(state["curvature"]["1"]) == {"unit.data", "unit.inv"}  # BatchNorm as K-FAC keeps it
    for factor, basis in (("kron.A", "U_A"), ("kron.B", "U_B")):
        u = state["ekfac"]["4"][basis]
        rotated = u.T @ state["curvature"]["4"][factor] @ u
        torch.testing.assert_close(rotated, torch.diag(torch.diagonal(rotated)), rtol=0, atol=1e-12)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_equal_one_process(tmp_path, world_size):
    """Factors and s sharded per block, bases replicated; the gathered state equals one process's."""
    options = {"config": BASE, "maker": {"kl_clip": 1e-3, "lr": 0.1}}
    ranks = ranks_check(tmp_path, "ekfac", options, world_size)
    import rank_worker as w
    _, maker = w.run("ekfac", options, world_size, rank=None)
    reference = maker.state_dict()["ekfac"]
    for result in ranks:
        assert result["state"]["ekfac"].keys() == reference.keys()
        for block, tensors in reference.items():
            for key, value in tensors.items():
                if key.startswith("s_"):
                    torch.testing.assert_close(result["state"]["ekfac"][block][key], value, rtol=1e-6, atol=1e-12)


def test_kl_clip_bounds_the_step_in_its_own_curvature():
    """ν scales the step so that lr²‖Δ‖²_F̃ = κ, with ‖Δ‖²_F̃ = Σ (Uᵀg)² / (s + λ) from last_stats."""
    lr, kappa = 0.1, 1e-4
    clipped = train("ekfac", conv_ln_net, cfg(), range(1), kl_clip=kappa, lr=lr)
    free = train("ekfac", conv_ln_net, cfg(), range(1))
    nu = clipped[1].last_nu
    assert nu < 1
    kl = sum(s["kl_base"] for s in free[1].last_stats.values())
    torch.testing.assert_close(nu, torch.sqrt(kappa / (lr ** 2 * kl)).to(nu.dtype), rtol=1e-6, atol=0)
    for a, b in zip(clipped[0][-1][0], free[0][-1][0]):  # every parameter is in a block: all scaled
        torch.testing.assert_close(a, nu * b, rtol=1e-7, atol=1e-14)


def test_options_it_does_not_take_are_refused():
    with pytest.raises(TypeError, match="FOP's options"):
        fop_asdl.make_gradient_maker("ekfac", independent_net(), cfg(), beta=0.1)
    with pytest.raises(TypeError, match="swift"):
        fop_asdl.make_gradient_maker("ekfac", independent_net(), cfg(), swift=True)
    with pytest.raises(ValueError, match="fisher_emp"):
        fop_asdl.make_gradient_maker("ekfac", independent_net(), cfg(), fisher_type="fisher_mc")
    with pytest.raises(TypeError, match="block_size"):
        fop_asdl.make_gradient_maker("ekfac", independent_net(), cfg(), block_size=4)


def test_layers_without_curvature_are_named_and_get_the_plain_gradient():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 3)).double()
    with pytest.warns(UserWarning, match=r"no EKFAC curvature for 0 \(Embedding: this method keeps Linear"):
        maker = fop_asdl.make_gradient_maker("ekfac", model, cfg())
    x, t = torch.randint(0, 5, (6, 2)), torch.randint(0, 3, (6,))
    step(maker, model, x, t)
    written = model[0].weight.grad.clone()
    model.zero_grad()
    F.cross_entropy(model(x), t).backward()
    torch.testing.assert_close(written, model[0].weight.grad)


def test_a_block_called_twice_in_one_pass_is_named():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(torch.tanh(self.fc(x)))

    model = Twice()
    maker = fop_asdl.make_gradient_maker("ekfac", model, cfg())
    with pytest.raises(ValueError, match="ran more than once"):
        step(maker, model, torch.randn(6, 4), torch.randint(0, 4, (6,)))
