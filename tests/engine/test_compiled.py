"""A torch.compile'd model: every method on the step machinery runs it eagerly, with the eager model's gradients."""
import copy

import pytest
import torch

import fop_asdl

from scaffold import config, conv_bn_ln_net, step

OPTIONS = {"fop": {"fisher_type": "fisher_emp"}, "kfac": {"fisher_type": "fisher_emp"},
           "fngd": {"iters_per_epoch": 2}}


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_compiled_model_gets_the_eager_gradients(image_batch, name):
    x, t = image_batch
    torch.manual_seed(0)
    eager = conv_bn_ln_net().double()
    twin = copy.deepcopy(eager)
    compiled = torch.compile(twin, backend="eager")
    reference = fop_asdl.make_gradient_maker(name, eager, config(), **OPTIONS[name])
    with pytest.warns(UserWarning, match="torch.compile'd model's eager module"):
        maker = fop_asdl.make_gradient_maker(name, compiled, config(), **OPTIONS[name])
    assert [n for n, _ in maker._step_blocks] == [n for n, _ in reference._step_blocks]  # no "_orig_mod."
    for _ in range(3):  # curvature, plain, curvature
        _, loss_ref = step(reference, eager, x, t)
        _, loss = step(maker, compiled, x, t)
        assert torch.equal(loss, loss_ref)
        for p, q in zip(eager.parameters(), twin.parameters()):
            assert torch.equal(q.grad, p.grad)
