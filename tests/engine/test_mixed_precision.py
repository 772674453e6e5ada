"""FOP and K-FAC under torch.autocast: curvature, inverses and FOP scalars stay fp32; GradScaler works."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fop_asdl
from fop_asdl.models import SmallCNN

from scaffold import config, conv_bn_ln_net, step
from scaffold import max_relative_error as relative_error


def grads_of(name, model, x, t, autocast_dtype=None, steps=2, **kwargs):
    maker = fop_asdl.make_gradient_maker(name, model, config(damping=1.0), fisher_type="fisher_emp", **kwargs)
    for _ in range(steps):  # a curvature step, then a plain one (interval 2)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            step(maker, model, x, t)
    return [p.grad.clone() for p in model.parameters()], maker


# Stated tolerance: the bf16 step of FOP or K-FAC may differ from the fp32 step by at most 1.5x the
# relative error that bf16 autocast already puts into the plain SGD gradient of the same model and batch
# (measured here: SGD 3.8 %, K-FAC 3.9 %, FOP 4.1 % on SmallCNN). Half-precision factors or inverses
# would add their own error on top.
@pytest.mark.parametrize("name", ["fop", "kfac"])
def test_bf16_step_stays_close_to_fp32_and_keeps_curvature_in_fp32(real_batch, name):
    x, t = real_batch
    torch.manual_seed(0)
    reference = SmallCNN()
    sgd = {}
    for dtype in (None, torch.bfloat16):
        model = copy.deepcopy(reference)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            F.cross_entropy(model(x), t).backward()
        sgd[dtype] = [p.grad for p in model.parameters()]
    sgd_error = relative_error(sgd[torch.bfloat16], sgd[None])
    fp32, _ = grads_of(name, copy.deepcopy(reference), x, t)
    bf16, maker = grads_of(name, copy.deepcopy(reference), x, t, autocast_dtype=torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in bf16)
    assert relative_error(bf16, fp32) <= 1.5 * sgd_error, (relative_error(bf16, fp32), sgd_error)
    for tensors in maker.state_dict()["curvature"].values():
        assert all(v.dtype == torch.float32 for v in tensors.values())
    for stats in getattr(maker, "last_stats", {}).values():
        assert all(v.dtype == torch.float32 for v in stats.values())


@pytest.mark.parametrize("name, fisher_type", [("fop", "fisher_emp"), ("fop", "fisher_exact"),
                                               ("kfac", "fisher_emp"), ("kfac", "fisher_exact"), ("sgd", None)])
def test_grad_scaler_gives_the_unscaled_result(image_batch, name, fisher_type):
    """Without autocast a power-of-two loss scale is exact: after unscale_ the gradients equal the unscaled
    run's, which checks that the scaled loss reaches every backward pass and never the curvature (BatchNorm's
    unit-wise curvature included). FOP's ε guard in s = ⟨g_d, g_a⟩_F / (⟨g_a, g_a⟩_F + ε) is the one term
    that sees the scale; it is set tiny here. A smooth model (no ReLU/max-pool ties) keeps the two runs on
    the same path."""
    x, t = image_batch
    torch.manual_seed(0)
    reference = conv_bn_ln_net().double()
    kwargs = {"sgd": {}, "kfac": {"fisher_type": fisher_type}, "fop": {"fisher_type": fisher_type, "eps": 1e-300}}[name]
    results = []
    for scaler in (torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=False),
                   torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)):
        model = copy.deepcopy(reference)
        maker = fop_asdl.make_gradient_maker(name, model, config(), grad_scaler=scaler, **kwargs)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            step(maker, model, x, t)
            scaler.unscale_(opt)
            grads = [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
        results.append(grads)
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_fp16_with_grad_scaler_trains_without_nan_and_skips_overflow(real_batch):
    x, t = real_batch
    torch.manual_seed(0)
    model = SmallCNN()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 18)  # overflows fp16 at first: skipped steps
    maker = fop_asdl.make_gradient_maker("fop", model, config(damping=1.0), grad_scaler=scaler)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    skipped, losses = [], []
    for _ in range(12):
        opt.zero_grad(set_to_none=True)
        before = [p.detach().clone() for p in model.parameters()]
        with torch.autocast("cpu", dtype=torch.float16):
            _, loss = step(maker, model, x, t)
        scaler.step(opt)
        scaler.update()
        skipped.append(maker.last_step_skipped)
        if maker.last_step_skipped:  # nothing moved: neither the weights nor the maker's step counter
            assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        else:
            losses.append(float(loss))
    assert skipped[0] and not skipped[-1]
    assert scaler.get_scale() < 2.0 ** 18
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert maker.state["step"] == skipped.count(False) and losses[-1] < losses[0]
