"""SMW-NG: every block against the dense damped empirical natural gradient of an autograd per-sample loop
(float64; Conv2d, Linear + bias, Linear), against FNGD's exact mode (the math it shares) and ASDL's SMW
maker, kl_clip against the dense F̃, and its options."""
import copy
from functools import partial

import asdl
import pytest
import torch
import torch.nn.functional as F

import fop_asdl

from dense_refs import check_against_asdl_smw, dense_natural_gradient
from scaffold import quiet_maker
from second_order_helpers import BLOCKS, batch, block_grad, bn_net, config, net, per_sample_gradients, step

maker = partial(quiet_maker, "smw_ng")


@pytest.mark.parametrize("damping", [1e-3, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_block_equals_the_dense_empirical_natural_gradient(damping, reduction):
    torch.manual_seed(0)
    model = net().double()
    x, t = batch(0)

    def loss_fn(y, target, reduction=reduction):
        return F.cross_entropy(y, target, reduction=reduction)

    step(maker(model, config(damping=damping)), model, x, t, loss_fn)
    worst = 0.0
    for index in BLOCKS:
        u = per_sample_gradients(model, x, t, model[index])
        if reduction == "sum":  # the user's loss is Σ ℓ_m: a sample's term is n·ℓ_m (mean of terms = loss)
            u = u * x.shape[0]
        expected = dense_natural_gradient(u, damping)
        error = float((block_grad(model[index]) - expected).abs().max() / expected.abs().max())
        worst = max(worst, error)
        assert error < 1e-10, (index, error)
    print(f"SMW-NG vs dense ({damping=}, {reduction=}): max relative error {worst:.2e}")


def test_is_fngd_exact_mode_on_every_step():
    torch.manual_seed(0)
    reference = net().double()
    grads = []
    for name, options in (("smw_ng", {}), ("fngd", {"iters_per_epoch": 1, "damping_mode": "fixed",
                                                      "coefficient_epochs": 10})):
        model = copy.deepcopy(reference)
        m = quiet_maker(name, model, config(damping=1e-2), **options)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        run = []
        for i in range(3):
            opt.zero_grad()
            step(m, model, *batch(i))
            run.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        grads.append(run)
    for a, b in zip(*grads):
        for g, h in zip(a, b):
            assert torch.equal(g, h)


def test_equals_asdl_smw_maker_on_one_linear_layer():
    check_against_asdl_smw(lambda model: maker(model, asdl.PreconditioningConfig(damping=1e-2)))


def test_kl_clip_bounds_the_dense_fisher_norm():
    torch.manual_seed(0)
    model = net().double()
    x, t = batch(0)
    lr, kappa, damping = 0.5, 1e-4, 1e-2
    m = maker(model, config(damping=damping), kl_clip=kappa, lr=lr)
    step(m, model, x, t)
    expected, norm = {}, 0.0
    for index in BLOCKS:
        u = per_sample_gradients(model, x, t, model[index])
        expected[index] = dense_natural_gradient(u, damping)
        norm += float(u.mean(0) @ expected[index])  # gᵀF̃⁻¹g = ‖Δ‖²_F̃
    nu = min(1.0, (kappa / (lr * lr * norm)) ** 0.5)
    assert nu < 0.5
    torch.testing.assert_close(m.last_nu, torch.tensor(nu, dtype=torch.float64), rtol=1e-10, atol=0)
    for index in BLOCKS:
        torch.testing.assert_close(block_grad(model[index]), nu * expected[index], rtol=1e-9, atol=1e-14)


def test_state_is_the_step_and_plain_parameters_are_named():
    torch.manual_seed(0)
    model = bn_net().double()
    with pytest.warns(UserWarning, match=r"SMW-NG does not precondition 1 \(BatchNorm2d\)"):
        m = fop_asdl.make_gradient_maker("smw_ng", model, config())
    step(m, model, *batch(0))
    assert m.state_dict() == {"step": 1}
    plain = copy.deepcopy(model)
    F.cross_entropy(plain(batch(0)[0]), batch(0)[1]).backward()
    torch.testing.assert_close(model[1].weight.grad, plain[1].weight.grad)  # BatchNorm: the mean gradient


def test_fngd_options_are_refused_with_the_reason():
    for option in ("iters_per_epoch", "alpha", "coefficient_scope"):
        with pytest.raises(TypeError, match="belongs to 'fngd'"):
            fop_asdl.make_gradient_maker("smw_ng", net(), config(), **{option: 1})
    with pytest.raises(TypeError):
        fop_asdl.make_gradient_maker("smw_ng", net(), config(), fisher_type="fisher_emp")
    with pytest.raises(ValueError, match="damping"):
        fop_asdl.make_gradient_maker("smw_ng", net(), config(damping=0.0))
