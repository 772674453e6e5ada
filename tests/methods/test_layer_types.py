"""Issue 22 item 2: Embedding, grouped and depthwise Conv2d, Conv1d and GroupNorm preconditioned by every
method where its math applies, each against a dense float64 reference on a tiny net (tests/methods/layer_refs.py)."""
import copy

import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl

import layer_refs as ref
from dense_refs import dense_fop, dense_natural_gradient
from scaffold import spawn_ranks, state_tensors, step

#: Embedding on ids (n,) and on tokens (n, T) with padding, a token-level mean loss with ignored targets and a
#: summed one (the user's normaliser N = kept tokens, 1), grouped / depthwise Conv2d, Conv1d, GroupNorm.
KINDS = ["ids", "tokens", "token_loss", "token_sum", "grouped", "depthwise", "conv1d", "transposed", "groupnorm"]
PER_SAMPLE_KINDS = [kind for kind in KINDS if kind != "groupnorm"]


def run(name, model, x, t, loss_fn, **options):
    config = asdl.PreconditioningConfig(damping=ref.DAMPING, curvature_upd_interval=1)
    maker = fop_asdl.make_gradient_maker(name, model, config, **options)
    return step(maker, model, x, t, loss_fn=loss_fn)


def assert_close_rel(got, expected, tol):
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error < tol, f"relative error {error:.2e}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["kfac", "fop"])
def test_kronecker_methods_equal_the_dense_reference(kind, name):
    model, x, t, loss_fn, normalizer = ref.case(kind)
    block = ref.block_of(model)
    metric, damped = ref.kron_reference(kind, model, x, t, loss_fn, normalizer)
    u = ref.per_sample_gradients(model, x, t, loss_fn, normalizer, block)
    if name == "kfac":
        expected = torch.linalg.solve(damped, u.mean(0))
    else:
        expected, _ = dense_fop(u[:ref.N1].mean(0), u[ref.N1:].mean(0), ref.N1, ref.N, metric, damped)
    _, loss = run(name, model, x, t, loss_fn, fisher_type="fisher_emp")
    torch.testing.assert_close(loss, loss_fn(model(x), t))
    assert_close_rel(ref.flat_grad(block), expected, 1e-9)


class OneHotLinear(nn.Module):
    """``EmbedNet`` with its Embedding written as a Linear on one-hot rows (padding rows zero)."""

    def __init__(self, net):
        super().__init__()
        self.block = nn.Linear(ref.V, ref.D, bias=False).double()
        self.block.weight = nn.Parameter(net.block.weight.detach().T.clone())
        self.head = copy.deepcopy(net.head)

    def forward(self, onehot):
        return self.head(torch.tanh(self.block(onehot)).reshape(onehot.shape[0], -1))


class PerGroup(nn.Module):
    """A grouped convolution as one ungrouped convolution per group on its channels, weights copied."""

    def __init__(self, conv):
        super().__init__()
        g = conv.groups
        self.parts = nn.ModuleList()
        for w, b in zip(conv.weight.detach().chunk(g), conv.bias.detach().chunk(g)):
            part = nn.Conv2d(conv.in_channels // g, conv.out_channels // g, conv.kernel_size, conv.stride,
                             conv.padding).double()
            part.weight, part.bias = nn.Parameter(w.clone()), nn.Parameter(b.clone())
            self.parts.append(part)

    def forward(self, x):
        return torch.cat([part(h) for part, h in zip(self.parts, x.chunk(len(self.parts), 1))], 1)


def twins(kind):
    """(model, twin, x, twin's x, t, [(model's, twin's) parameter pairs, twin's as the model's shape]):
    the same function, the new layer against layers ASDL's own operations cover."""
    if kind == "embedding":
        model, ids, t, _, _ = ref.case("tokens")
        twin = OneHotLinear(model)
        onehot = F.one_hot(ids, ref.V).double() * (ids != 0)[..., None]
        pairs = [(model.block.weight, lambda: twin.block.weight.grad.T), (model.head.weight, lambda: twin.head.weight.grad)]
        return model, twin, ids, onehot, t, pairs
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(0, ref.C, (ref.N,), generator=gen)
    if kind == "conv1d":
        conv = nn.Conv1d(4, 5, 3, stride=2, padding=1)
        flat = nn.Conv2d(4, 5, (1, 3), stride=(1, 2), padding=(0, 1))
        flat.weight, flat.bias = nn.Parameter(conv.weight.detach().unsqueeze(2).clone()), nn.Parameter(conv.bias.detach().clone())
        model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(5 * 5, ref.C)).double()
        twin = nn.Sequential(flat, nn.Tanh(), nn.Flatten(), copy.deepcopy(model[3])).double()
        x = torch.randn(ref.N, 4, 9, generator=gen, dtype=torch.float64)
        return model, twin, x, x.unsqueeze(2), t, [(conv.weight, lambda: flat.weight.grad.squeeze(2))]
    conv = nn.Conv2d(4, 6, 3, groups=2, padding=1, stride=2) if kind == "grouped" else nn.Conv2d(4, 8, 3, groups=4, padding=1)
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.Linear(conv.out_channels * (9 if kind == "grouped" else 25), ref.C)).double()
    split = PerGroup(model[0])
    twin = nn.Sequential(split, nn.Tanh(), nn.Flatten(), copy.deepcopy(model[3]))
    x = torch.randn(ref.N, 4, 5, 5, generator=gen, dtype=torch.float64)
    return model, twin, x, x, t, [(model[0].weight, lambda: torch.cat([p.weight.grad for p in split.parts])),
                                  (model[0].bias, lambda: torch.cat([p.bias.grad for p in split.parts]))]


@pytest.mark.parametrize("kind, name", [("embedding", "kfac"), ("grouped", "kfac"), ("depthwise", "kfac"),
                                        ("conv1d", "kfac"), ("embedding", "fop"), ("conv1d", "fop")])
def test_equals_the_twin_that_asdls_own_operations_cover(kind, name):
    """An Embedding is K-FAC'd as the Linear on one-hot rows, a grouped convolution as one convolution per
    group, a Conv1d as a Conv2d of unit height: the twins run ASDL's own Linear and Conv2d operations. (FOP's
    s, β, η belong to a block: a grouped layer has one set, its per-group twin one per group.)"""
    model, twin, x, x_twin, t, pairs = twins(kind)
    run(name, model, x, t, F.cross_entropy, fisher_type="fisher_emp")
    run(name, twin, x_twin, t, F.cross_entropy, fisher_type="fisher_emp")
    for param, twin_grad in pairs:
        assert_close_rel(param.grad, twin_grad(), 1e-10)


@pytest.mark.parametrize("kind", ["ids", "tokens", "grouped", "depthwise", "conv1d", "groupnorm"])
def test_asdls_own_kfac_with_the_fixes_equals_the_switchs(kind):
    """fop_asdl.KfacGradientMaker (ASDL's K-FAC: its own Kron.mvp and update_inv, patched for diagonal and
    per-group factors) writes what make_gradient_maker('kfac') writes."""
    grads = []
    for build in (lambda m, c: fop_asdl.KfacGradientMaker(m, c, fisher_type="fisher_emp"),
                  lambda m, c: fop_asdl.make_gradient_maker("kfac", m, c, fisher_type="fisher_emp")):
        model, x, t, loss_fn, _ = ref.case(kind)
        step(build(model, asdl.PreconditioningConfig(damping=ref.DAMPING)), model, x, t, loss_fn=loss_fn)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert_close_rel(a, b, 1e-10)


@pytest.mark.parametrize("conv_gram", ["per_sample", "pairwise"])
@pytest.mark.parametrize("kind", PER_SAMPLE_KINDS)
def test_fngd_equals_the_dense_damped_natural_gradient(kind, conv_gram):
    """FNGD's exact damped empirical-Fisher step per block, its per-sample gradients from autograd."""
    model, x, t, loss_fn, normalizer = ref.case(kind)
    block = ref.block_of(model)
    expected = dense_natural_gradient(ref.per_sample_gradients(model, x, t, loss_fn, normalizer, block), ref.DAMPING)
    run("fngd", model, x, t, loss_fn, iters_per_epoch=1, damping_mode="fixed", conv_gram=conv_gram)
    assert_close_rel(ref.flat_grad(block), expected, 1e-9)


@pytest.mark.parametrize("name", ["fngd", "hylo"])
def test_groupnorm_gets_the_plain_gradient_from_the_per_sample_methods(name):
    model, x, t, loss_fn, _ = ref.case("groupnorm")
    block = ref.block_of(model)
    expected = torch.autograd.grad(loss_fn(model(x), t), ref.params(block))
    options = dict(iters_per_epoch=1) if name == "fngd" else dict(switch_policy="kis")
    run(name, model, x, t, loss_fn, **options)
    for p, g in zip(ref.params(block), expected):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("options", [dict(), dict(curvature="ekfac")])
def test_ekfac_leaves_the_new_layer_types_to_the_plain_gradient(options):
    """EKFAC (and FOP over it) keeps ASDL's own layer types: the others are named, with the reason, in its one
    warning and reported plain by coverage(); the Linear head stays its block."""
    name = "fop" if options else "ekfac"
    model = ref.AllNet().double()
    with pytest.warns(UserWarning, match="keeps Linear, Conv2d") as caught:
        maker = fop_asdl.make_gradient_maker(name, model, asdl.PreconditioningConfig(damping=ref.DAMPING), **options)
    message = " ".join(str(w.message) for w in caught)
    for layer in ("emb", "seq", "norm", "grouped", "depthwise", "up"):
        assert f"{layer} (" in message, layer
    report = {p.name: p.treatment for p in maker.coverage().parameters}
    assert report.pop("head.weight") == report.pop("head.bias") == "preconditioned"
    assert set(report.values()) == {"plain gradient"}, report


def hylo_layout(module):
    """[W | b] as HyLo's rows see it (an Embedding's weight as stored, a ConvTranspose2d's as its Conv2d's)."""
    if isinstance(module, nn.Embedding):
        return module.weight.grad.reshape(-1)
    weight = ref.conv_layout(module, module.weight.grad)
    return torch.cat([weight.reshape(weight.shape[0], -1), module.bias.grad[:, None]], 1).reshape(-1)


@pytest.mark.parametrize("method", ["kis", "kid"])
@pytest.mark.parametrize("kind", PER_SAMPLE_KINDS + ["tokens/flatten"])
def test_hylo_at_ratio_one_equals_the_dense_damped_natural_gradient_on_its_rows(kind, method):
    """HyLo keeping every row is the SMW natural gradient (UᵀU/N + αI)⁻¹ V on its rows: an Embedding's rows
    of the Linear on one-hot rows (tokens averaged per sample, or each a row; no one-hot stored by HyLo), a
    convolution's rows reduced per group."""
    kind, _, reduction = kind.partition("/")
    model, x, t, loss_fn, normalizer = ref.case(kind)
    u, v = ref.hylo_rows(model, x, t, loss_fn, normalizer, reduction or "mean")
    expected = dense_natural_gradient(u, ref.DAMPING, v)
    run("hylo", model, x, t, loss_fn, switch_policy=method, compression_ratio=1.0, token_reduction=reduction or "mean")
    assert_close_rel(hylo_layout(ref.block_of(model)), expected, 1e-9)


@pytest.mark.parametrize("options", [dict(token_reduction="mean"), dict(token_reduction="flatten"),
                                     dict(token_reduction="sum", compression_ratio=0.5, switch_policy="kid")])
def test_hylo_on_an_embedding_equals_hylo_on_the_linear_on_one_hot_rows(options):
    """The Embedding's sparse multi-hot rows give HyLo's step on the Linear twin with its dense rows."""
    options = {"switch_policy": "kis", "compression_ratio": 1.0, **options}
    model, twin, x, x_twin, t, pairs = twins("embedding")
    run("hylo", model, x, t, F.cross_entropy, **options)
    run("hylo", twin, x_twin, t, F.cross_entropy, **options)
    for param, twin_grad in pairs:
        assert_close_rel(param.grad, twin_grad(), 1e-10)


OPTIONS = {"kfac": dict(fisher_type="fisher_emp"), "fop": dict(fisher_type="fisher_emp"),
           "fngd": dict(iters_per_epoch=2), "hylo": dict(switch_policy="kis", compression_ratio=0.5)}


def train(name, micro_batch_size, steps=4, extra=0, each_step=None):
    """Steps of SGD with momentum on AllNet (curvature every 2nd step with EMA; FNGD's coefficients reused
    from step 2 on; HyLo refreshing every 2nd step): every step's gradients (or ``each_step``'s result)."""
    torch.manual_seed(0)
    model = ref.AllNet(extra).double()
    config = asdl.PreconditioningConfig(damping=ref.DAMPING, ema_decay=0.5, curvature_upd_interval=2,
                                        preconditioner_upd_interval=2)
    maker = fop_asdl.make_gradient_maker(name, model, config, micro_batch_size=micro_batch_size, **OPTIONS[name])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    history = []
    for _ in range(steps):
        ids, t = torch.randint(0, ref.V, (ref.N, ref.T), generator=gen), torch.randint(0, ref.C, (ref.N,), generator=gen)
        opt.zero_grad(set_to_none=True)
        if each_step is None:
            step(maker, model, ids, t)
            history.append([p.grad.clone() for p in model.parameters()])
        else:
            history.append(each_step(lambda: step(maker, model, ids, t)))
        opt.step()
    return history


@pytest.mark.parametrize("name", ["kfac", "fop", "fngd", "hylo"])
def test_host_syncs_do_not_grow_with_the_new_blocks(name):
    """Plain steps: at most the fused finiteness check; curvature, coefficient and refresh steps: as many
    syncs with 3 more grouped convolutions as without (no read per block of any new kind)."""
    from fop_asdl.diagnostics.syncs import count_syncs

    few, many = (train(name, None, extra=extra, each_step=lambda run: count_syncs(run)[1]) for extra in (0, 3))
    plain = few[2:] if name == "fngd" else few[1::2]
    assert all(counter.count <= 1 for counter in plain), [c.report() for c in plain]
    for small, large in zip(few, many):
        assert large.count == small.count <= 2, (small.report(), large.report())


def test_kfac_plain_steps_from_autograds_sums_equal_the_captured_ones(monkeypatch):
    """K-FAC's plain steps take autograd's gradient sums as the records: in the captured records' layout for
    every new layer type (a ConvTranspose2d's W', an Embedding without bias), so the steps are unchanged."""
    from fop_asdl.curvature.kron_step import CurvatureStepMaker

    from_autograd = train("kfac", None)
    monkeypatch.setattr(CurvatureStepMaker, "autograd_records", False)  # every block captured on every step
    monkeypatch.setattr(CurvatureStepMaker, "_captured_blocks", lambda maker, plan: maker._step_blocks)
    for got, want in zip(from_autograd, train("kfac", None)):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def low_precision_steps(name, model, data):
    """Three steps (curvature, plain, curvature) of ``name`` on ``model``: every step's p.grad, and the maker."""
    config = asdl.PreconditioningConfig(damping=1e-2, curvature_upd_interval=2, preconditioner_upd_interval=2)
    options = {**OPTIONS, "hylo": dict(switch_policy="kis", compression_ratio=1.0)}.get(name, {})
    maker = fop_asdl.make_gradient_maker(name, model, None if name == "sgd" else config, **options)
    out = []
    for ids, t in data:
        model.zero_grad(set_to_none=True)
        step(maker, model, ids, t)
        out.append([p.grad.clone() for p in model.parameters()])
    return out, maker


def relative_error(low, full):
    """‖low − full‖ / ‖full‖ of float32 results ``full`` rounded to bf16."""
    a, b = (torch.cat([t.double().flatten() for t in ts]) for ts in (low, [t.bfloat16() for t in full]))
    return float((a - b).norm() / b.norm())


@pytest.mark.filterwarnings("ignore:fop_asdl")
@pytest.mark.parametrize("name", ["kfac", "fop", "fngd", "hylo"])
def test_bf16_weights_give_the_float32_result_rounded(name):
    """bf16 weights on every new layer type: factors (an Embedding's diagonal, per-group stacks), Grams and rows in
    float32, so every step is the float32 run's up to what bf16 activations do to a gradient: within 2x the
    largest relative error of SGD's gradient of any parameter (here 1-4 %; SGD's whole gradient, the bound of
    tests/engine/test_low_precision.py, is dominated by its head's bias, which bf16 rounds least, and preconditioning
    weighs the parameters otherwise). Half-precision curvature would fail or add its own, amplified error."""
    torch.manual_seed(0)
    weights = ref.AllNet().bfloat16()
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, ref.V, (ref.N, ref.T), generator=gen), torch.randint(0, ref.C, (ref.N,), generator=gen))
            for _ in range(3)]
    (low, maker), (full, _), (sgd_low, _), (sgd_full, _) = (
        low_precision_steps(method, copy.deepcopy(weights).to(dtype), data)
        for method in (name, "sgd") for dtype in (torch.bfloat16, torch.float32))
    for step_low, step_full, s_low, s_full in zip(low, full, sgd_low, sgd_full):
        assert all(g.dtype == torch.bfloat16 for g in step_low)
        bf16_effect = max(relative_error([a], [b]) for a, b in zip(s_low, s_full))
        assert relative_error(step_low, step_full) <= 2 * bf16_effect, (relative_error(step_low, step_full), bf16_effect)
    floats = [t for t in state_tensors(maker.state_dict()) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.float32 for t in floats)


@pytest.mark.parametrize("name", ["kfac", "fop", "fngd", "hylo"])
def test_micro_batched_steps_equal_one_pass(name):
    """7 samples as 3 + 3 + 1: curvature, per-half sums, Grams and rows of every new layer type add up."""
    for full, chunked in zip(train(name, None), train(name, 3)):
        for a, b in zip(full, chunked):
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


def test_two_gloo_ranks_equal_one_process():
    """Every maker, AllNet on 2 ranks of 4 samples each: stacked and diagonal factors reduced at their owners,
    token ids sent to FNGD's owners, HyLo's grouped and id rows all-gathered: the one-process steps."""
    import tempfile
    from pathlib import Path

    import layer_worker

    with tempfile.TemporaryDirectory() as tmp:
        results = spawn_ranks(layer_worker.ranks, 2, Path(tmp))
    for name in layer_worker.MAKERS:
        for step_index, expected in enumerate(layer_worker.single(name, 2)):
            for rank in results:
                for got, want in zip(rank[name][step_index], expected):
                    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10 * float(want.abs().max()))
