"""The engine's guarantees on SMW-NG, SENG, diag-NG, K-BFGS and Kronecker PSGD (issue 23 item 2): micro-batches,
GradScaler, a failed step changes nothing, a fresh-process resume is bit-identical, gloo ranks equal one
process, clear errors."""
import copy
from pathlib import Path

import pytest
import torch

import fop_asdl
import second_order_worker as w

from scaffold import (assert_equal_nested, assert_same_parameters, checkpoint, failing_step, resumed_in_fresh_process,
                      spawn_ranks)
from second_order_helpers import METHODS, TokenNet, batch, bn_net, build, config, net, options, step, train

HERE = Path(__file__).parent


@pytest.mark.parametrize("name", METHODS)
def test_micro_batched_step_equals_the_one_pass_step(name):
    runs = []
    for micro in (None, 3):  # 8 samples: 3 + 3 + 2
        model, maker, opt = w.make(name, **({} if micro is None else {"micro_batch_size": micro}))
        seen = []
        model[0].register_forward_hook(lambda m, a, out: seen.append(len(a[0])))
        runs.append((train(model, maker, opt, range(4)), maker.state_dict()))
        assert max(seen) == (micro or 8)
    (full, full_state), (chunked, chunked_state) = runs
    for a_step, b_step in zip(chunked, full):
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
    assert full_state.keys() == chunked_state.keys()


@pytest.mark.parametrize("name", METHODS)
def test_attention_projections_are_blocks_and_micro_batches_agree(name):
    """A TransformerEncoderLayer: its q/k/v/out projections are blocks (token Linear rows); Kronecker PSGD's
    double backward runs through attention (math kernel)."""
    def tokens(i):
        gen = torch.Generator().manual_seed(200 + i)
        return torch.randn(6, 5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen)

    runs = []
    for micro in (None, 4):
        model, maker, opt = build(name, TokenNet, config(**w.CONFIG), quiet=True,
                                  **({} if micro is None else {"micro_batch_size": micro}))
        assert {"body.self_attn.q_proj", "body.self_attn.out_proj"} <= {n for n, _ in maker.blocks}
        runs.append(train(model, maker, opt, range(3), tokens))
    for a_step, b_step in zip(*runs):
        for a, b in zip(a_step, b_step):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11 * float(b.abs().max()))
            assert torch.isfinite(a).all()


@pytest.mark.parametrize("name", METHODS)
def test_grad_scaler_gives_the_unscaled_result(name):
    """A power-of-two loss scale is exact: after unscale_ the gradients equal the unscaled run's (BatchNorm's
    plain gradient included), so the scale reaches every backward pass and never the curvature."""
    results = []
    for enabled in (False, True):
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, enabled=enabled)
        model, maker, opt = build(name, bn_net, config(**w.CONFIG), quiet=True, grad_scaler=scaler)
        for i in range(4):
            opt.zero_grad(set_to_none=True)
            step(maker, model, *batch(i))
            scaler.unscale_(opt)
            grads = [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
        results.append((grads, maker.state_dict()))
    for a, b in zip(results[1][0], results[0][0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("update_step", [True, False])
@pytest.mark.parametrize("fault", ["nan_input", "inf_gradient", "loss_raises"])
@pytest.mark.parametrize("name", METHODS)
def test_failed_step_changes_nothing(name, fault, update_step):
    model, maker, opt = w.make(name)
    train(model, maker, opt, range(2 if update_step else 3))  # interval 2: step 2 updates, step 3 does not
    x, t = batch(7)
    step(maker, model, x, t)  # leave gradients in p.grad
    maker.state["step"] -= 1  # ... and the same step parity as before that call
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    state = copy.deepcopy(maker.state_dict())
    failing_step(maker, model, x, t, fault)
    assert all(g is p.grad for g, p in zip(grads, model.parameters()))  # the very same tensors
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert_equal_nested(maker.state_dict(), state)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", METHODS)
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, name):
    model, maker, opt = w.make(name)
    train(model, maker, opt, range(3))
    torch.save(checkpoint(model, maker, opt), tmp_path / "ckpt.pt")
    train(model, maker, opt, range(3, 6))
    assert_same_parameters(model, resumed_in_fresh_process(HERE / "second_order_worker.py", tmp_path, name))


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_ranks_equal_one_process(tmp_path, world):
    """Each rank trains on its 4 samples per step; every rank's p.grad equals one process's on all 4·W, and
    every rank holds the same (replicated) state. Prints the nominal bytes per step."""
    ranks = spawn_ranks(w.distributed, world, tmp_path)
    for label, name, extra in w.runs():
        model, maker, opt = w.make(name, **extra)
        expected = train(model, maker, opt, range(4), lambda i: w.global_batch(i, world))
        for rank in ranks:
            for a_step, e_step in zip(rank[label]["grads"], expected):
                for a, e in zip(a_step, e_step):
                    torch.testing.assert_close(a, e, rtol=1e-8, atol=1e-12, msg=lambda m: f"{label}: {m}")
            assert_equal_nested(rank[label]["state"], ranks[0][label]["state"])
        print(f"{label}: {ranks[0][label]['bytes']:.0f} nominal bytes per step and rank (W = {world})")


@pytest.mark.parametrize("name", METHODS)
def test_warning_names_what_is_not_preconditioned_and_bad_rows_are_refused(name):
    with pytest.warns(UserWarning, match=r"does not precondition 1 \(BatchNorm2d\)"):
        model = bn_net().double()
        maker = fop_asdl.make_gradient_maker(name, model, config(), **options(name))
    x, t = batch(0)
    with pytest.raises(ValueError, match="rows, neither the batch's"):
        step(maker, model, x, t[:-1])
    with pytest.raises(TypeError):
        fop_asdl.make_gradient_maker(name, net(), config(), **options(name), no_such_option=1)
