"""ema_bias_correction: the curvature after k updates is the EMA divided by 1 − (1 − d)^k, per factor, and
a resumed run keeps k."""
import copy

import pytest
import torch

import fop_asdl

from scaffold import config, conv_bn_ln_net, step

DECAY = 0.1
KEYS = ("kron.A", "kron.B", "unit.data")


def batches(image_batch):
    x, t = image_batch
    return [(x, t), (x.flip(0), t.flip(0)), (x * 0.5, t)]


def curvature(maker):
    return {block: {k: v for k, v in tensors.items() if k in KEYS}
            for block, tensors in maker.state_dict()["curvature"].items()}


@pytest.mark.parametrize("name", ["fop", "kfac"])
def test_corrected_ema_is_the_weighted_mean_of_the_curvatures(image_batch, name):
    torch.manual_seed(0)
    model = conv_bn_ln_net().double()
    reference_model = copy.deepcopy(model)
    every_step = dict(curvature_upd_interval=1, preconditioner_upd_interval=1)
    maker = fop_asdl.make_gradient_maker(name, model, config(ema_decay=DECAY, **every_step),
                                         fisher_type="fisher_emp", ema_bias_correction=True)
    fresh = fop_asdl.make_gradient_maker(name, reference_model, config(ema_decay=-1, **every_step),
                                         fisher_type="fisher_emp")  # this step's curvature alone
    history = []
    for k, (x, t) in enumerate(batches(image_batch), start=1):  # no optimizer: the weights stay
        step(maker, model, x, t)
        step(fresh, reference_model, x, t)
        history.append(curvature(fresh))
        got = curvature(maker)
        for block, tensors in got.items():
            for key, value in tensors.items():
                weights = [DECAY * (1 - DECAY) ** (k - 1 - i) for i in range(k)]
                expected = sum(w * h[block][key] for w, h in zip(weights, history)) / sum(weights)
                torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    assert k == 3 and got  # the first update is the curvature itself: no 0.1 F to start from


def test_resume_keeps_the_update_count(image_batch):
    torch.manual_seed(0)
    model = conv_bn_ln_net().double()
    cfg = config(ema_decay=DECAY, curvature_upd_interval=1, preconditioner_upd_interval=1)
    maker = fop_asdl.make_gradient_maker("fop", model, cfg, fisher_type="fisher_emp", ema_bias_correction=True)
    data = batches(image_batch)
    for x, t in data[:2]:
        step(maker, model, x, t)
    resumed = fop_asdl.make_gradient_maker("fop", model, cfg, fisher_type="fisher_emp", ema_bias_correction=True)
    resumed.load_state_dict(copy.deepcopy(maker.state_dict()))
    for m in (maker, resumed):
        step(m, model, *data[2])
    assert all(int(t["ema_updates"]) == 3 for t in resumed.state_dict()["curvature"].values())
    for block, tensors in curvature(maker).items():
        for key, value in tensors.items():
            assert torch.equal(curvature(resumed)[block][key], value)
