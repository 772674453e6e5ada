"""With beta=0, eta=None FOP is K-FAC: same gradients as asdl.KfacGradientMaker on the same data."""
import copy

import asdl
import pytest
import torch

import fop_asdl
from fop_asdl import FOPGradientMaker

from scaffold import config, conv_bn_ln_net, step


def assert_same_training(reference_maker, model_ref, fop_maker, model_fop, x, t, steps=5):
    """Run both makers through curvature and plain steps (interval 2) and compare every gradient."""
    opt_ref = torch.optim.SGD(model_ref.parameters(), lr=0.1, momentum=0.9)
    opt_fop = torch.optim.SGD(model_fop.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        for maker, model, opt in ((reference_maker, model_ref, opt_ref), (fop_maker, model_fop, opt_fop)):
            opt.zero_grad(set_to_none=True)
            step(maker, model, x, t)
        scale = max(p.grad.abs().max() for p in model_ref.parameters())
        for p_ref, p_fop in zip(model_ref.parameters(), model_fop.parameters()):
            torch.testing.assert_close(p_fop.grad, p_ref.grad, rtol=1e-6, atol=1e-6 * float(scale))
        opt_ref.step()
        opt_fop.step()


@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_exact"])
@pytest.mark.parametrize("ema_decay", [0.1, -1])
def test_beta_zero_equals_asdl_kfac_with_batchnorm(image_batch, fisher_type, ema_decay):
    x, t = image_batch
    torch.manual_seed(0)
    model_ref = conv_bn_ln_net().double()
    model_fop = copy.deepcopy(model_ref)
    cfg = config(ema_decay=ema_decay, data_size=len(x))
    kfac = asdl.KfacGradientMaker(model_ref, cfg, fisher_type=fisher_type)
    fop = FOPGradientMaker(model_fop, cfg, fisher_type=fisher_type, beta=0.0, eta=None)
    assert_same_training(kfac, model_ref, fop, model_fop, x, t)


@pytest.mark.parametrize("kwargs", [dict(swift=True), dict(fisher_type="fisher_mc", seed=7, n_mc_samples=2),
                                    dict(grad_scale=0.5, scale=2.0)])
def test_beta_zero_equals_package_kfac(image_batch, kwargs):
    """Options ASDL's own K-FAC crashes on (swift) or that need the same random draws (fisher_mc)."""
    kwargs = {"fisher_type": "fisher_emp", **kwargs}
    x, t = image_batch
    torch.manual_seed(0)
    model_ref = conv_bn_ln_net().double()
    model_fop = copy.deepcopy(model_ref)
    kfac = fop_asdl.make_gradient_maker("kfac", model_ref, config(), **kwargs)
    fop = fop_asdl.make_gradient_maker("fop", model_fop, config(), beta=0.0, eta=None, **kwargs)
    assert_same_training(kfac, model_ref, fop, model_fop, x, t)
