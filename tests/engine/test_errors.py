"""Bad input gets a clear error and changes nothing: gradients, curvature, inverses and step stay as they were."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fop_asdl

from scaffold import config, conv_bn_ln_net, failing_step, step


def snapshot(model, maker):
    curvature = {name: {k: v.clone() for k, v in tensors.items()}
                 for name, tensors in maker.state_dict()["curvature"].items()}
    grads = [p.grad for p in model.parameters()]
    return grads, curvature, maker.state["step"], copy.deepcopy(model.state_dict())


def assert_unchanged(model, maker, before):
    grads, curvature, step_count, params = before
    assert all(g is h for g, h in zip(grads, [p.grad for p in model.parameters()]))  # the very same tensors
    after = maker.state_dict()["curvature"]
    assert after.keys() == curvature.keys()
    for name in curvature:  # factors and inverses (rebuilt after a failed curvature step) bit for bit
        for key, value in curvature[name].items():
            assert torch.equal(after[name][key], value), (name, key)
    assert maker.state["step"] == step_count
    for key, value in params.items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm buffers move in any forward
            assert torch.equal(model.state_dict()[key], value)


@pytest.fixture(params=[("fop", 0.1), ("kfac", 0.1), ("fop", -1), ("kfac", -1)], ids=lambda p: f"{p[0]}-ema{p[1]}")
def trained(image_batch, request):
    """A float32 model (where ASDL's in-place damping moved the factors' last bits) after two steps; with
    ema -1 every curvature step replaces the curvature and its inverses."""
    name, ema_decay = request.param
    x, t = image_batch
    x = x.float()
    torch.manual_seed(0)
    model = conv_bn_ln_net()
    maker = fop_asdl.make_gradient_maker(name, model, config(ema_decay=ema_decay), fisher_type="fisher_emp")
    for _ in range(2):
        step(maker, model, x, t)  # curvature, then a plain step; grads are left in p.grad
    return model, maker, x, t


@pytest.mark.parametrize("curvature_step", [True, False])
@pytest.mark.parametrize("fault", ["nan_input", "inf_gradient", "loss_raises"])
def test_failed_step_raises_and_rolls_back(trained, curvature_step, fault):
    model, maker, x, t = trained
    if not curvature_step:
        step(maker, model, x, t)  # step 2 updates curvature, step 3 does not
    before = snapshot(model, maker)
    failing_step(maker, model, x, t, fault)
    assert_unchanged(model, maker, before)
    assert all(p.requires_grad for p in model.parameters())


def test_batch_of_one_is_refused_by_fop_only(trained):
    model, maker, x, t = trained
    before = snapshot(model, maker)
    if isinstance(maker, fop_asdl.FOPGradientMaker) and maker.two_gradients:
        with pytest.raises(ValueError, match="at least 2 samples"):
            step(maker, model, x[:1], t[:1])
        assert_unchanged(model, maker, before)
    else:  # K-FAC needs no halves
        step(maker, model, x[:1], t[:1])
        assert maker.state["step"] == before[2] + 1


def test_rows_that_do_not_match_the_batch_are_refused(trained):
    model, maker, x, t = trained
    with pytest.raises(ValueError, match="rows, neither the batch's"):
        step(maker, model, x, t[:-1])


def test_missing_setup_calls():
    model = conv_bn_ln_net()
    maker = fop_asdl.make_gradient_maker("fop", model, config())
    with pytest.raises(RuntimeError, match="setup_model_call"):
        maker.forward_and_backward()
    maker.setup_model_call(model, torch.randn(4, 1, 6, 6))
    with pytest.raises(RuntimeError, match="setup_loss_call"):
        maker.forward_and_backward()


def test_loss_without_reduction_is_refused(trained):
    model, maker, x, t = trained

    def loss(y, target):
        return F.cross_entropy(y, target)

    with pytest.raises(TypeError, match="reduction"):
        step(maker, model, x, t, loss_fn=loss)


def test_layer_with_a_non_batch_leading_dimension_is_named():
    class Regroup(nn.Module):  # pairs up samples: the next Linear sees n/2 rows, not the batch
        def forward(self, x):
            return x.reshape(x.shape[0] // 2, -1)

    model = nn.Sequential(nn.Linear(4, 4), Regroup(), nn.Linear(8, 2), nn.Flatten(0, -1))
    maker = fop_asdl.make_gradient_maker("fop", model, config())
    with pytest.raises(ValueError, match="leading dimension 3"):
        step(maker, model, torch.randn(6, 4), torch.randn(6), loss_fn=F.mse_loss)
    assert all(p.requires_grad for p in model.parameters())


def test_ddp_wrapped_model_is_refused_with_the_way_out(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(nn.Linear(3, 2))
        for name in ("fop", "kfac", "sgd"):
            with pytest.raises(TypeError, match=r"Pass the bare model \(model.module\)"):
                fop_asdl.make_gradient_maker(name, ddp, config())
    finally:
        dist.destroy_process_group()


def test_asdl_kfac_refuses_several_ranks_rather_than_run_unsynchronised(monkeypatch):
    """ASDL's own K-FAC path cannot run sharded here; make_gradient_maker("kfac") uses ours instead."""
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    with pytest.raises(NotImplementedError, match="single process"):
        fop_asdl.KfacGradientMaker(conv_bn_ln_net(), config())


def test_error_inside_the_fisher_pass_leaves_requires_grad_as_it_was(image_batch):
    """ASDL switches requires_grad off around its Fisher backward passes without try/finally."""
    x, t = image_batch
    for name in ("fop", "kfac"):
        model = conv_bn_ln_net().double()
        maker = fop_asdl.make_gradient_maker(name, model, config(), fisher_type="fisher_exact")

        def failing_loop(closure):
            def nll():
                raise RuntimeError("boom")
            closure(nll)  # raises inside ASDL's skip_param_grad, which then never switches grads back on

        maker.fisher_maker._fisher_loop = failing_loop
        with pytest.raises(RuntimeError, match="boom"):
            step(maker, model, x, t)
        assert all(p.requires_grad for p in model.parameters()), name


def test_block_input_modified_in_place_is_named():
    class ScalesItsHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc1(x) + 1.0  # nothing but fc2 needs h for the backward pass
            y = self.fc2(h)
            h.mul_(2.0)  # plain autograd refuses this too: it saves h for fc2's weight gradient
            return y

    model = ScalesItsHidden()
    maker = fop_asdl.make_gradient_maker("fop", model, config())
    with pytest.raises(RuntimeError, match="modified in place"):
        step(maker, model, torch.randn(6, 4), torch.randint(0, 2, (6,)))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["fop", "kfac"])
def test_rollback_is_exact_when_the_inverses_lag_the_curvature(image_batch, name):
    """curvature_upd_interval 1 < preconditioner_upd_interval 3: the inverses of step 3 were built from the
    factors of step 0, not from the newer ones; a failed step 3 must not replace them by inverses of those."""
    x, t = image_batch
    x = x.float()
    torch.manual_seed(0)
    model = conv_bn_ln_net()
    maker = fop_asdl.make_gradient_maker(name, model, config(curvature_upd_interval=1, preconditioner_upd_interval=3),
                                         fisher_type="fisher_emp")
    for _ in range(3):
        step(maker, model, x, t)
    before = snapshot(model, maker)
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(FloatingPointError, match="Nothing was updated"):
        step(maker, model, bad, t)  # step 3 updates curvature and inverses
    assert_unchanged(model, maker, before)


def test_layer_called_on_a_scalar_is_named():
    class Total(nn.Module):  # the whole batch summed to one number: no sample dimension left
        def forward(self, x):
            return x.sum()

    def loss(y, target, reduction="mean"):
        return (y.sum() - target.sum()) ** 2

    model = nn.Sequential(nn.Linear(4, 1), Total(), nn.Linear(1, 2))
    maker = fop_asdl.make_gradient_maker("kfac", model, config())
    with pytest.raises(ValueError, match=r"Linear received a tensor without dimensions \(a scalar\), but the "
                                         r"batch has 6 samples"):
        step(maker, model, torch.randn(6, 4), torch.randn(6), loss_fn=loss)
    assert all(p.grad is None for p in model.parameters())

