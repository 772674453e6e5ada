"""Shampoo equals L^(−1/4) G R^(−1/4) written densely, block by block, with float64 eigendecompositions; and
it has the engine's guarantees."""
import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.methods import shampoo_math as sm

from scaffold import conv_bn_ln_net, conv_ln_net, independent_net, small_image_batch, step
from engine_guarantees import (failed_step_check, grad_scaler_check, micro_batch_check, ranks_check, resume_check,
                               train)

EPS = 1e-3


def tiny_net() -> nn.Module:
    """Conv2d (2, 9) weight, a bias of 2; Linear (5, 18) + bias 5; LayerNorm 5 + 5; Linear (3, 5) without bias:
    with 3-blocks every parameter has full blocks and a rest, rows and columns."""
    return nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(18, 5),
                         nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3, bias=False))


def dense_root(stat, exponent):
    values, vectors = torch.linalg.eigh(stat.double())
    return vectors @ torch.diag((values.clamp_min(0) + EPS) ** (-1.0 / exponent)) @ vectors.T


def reference(model, batches, steps, block, ema, roots_every, grafting=None):
    """Per step, the Shampoo update of every parameter, written with loops over blocks: G from autograd on
    each batch, L and R summed (ema -1) or averaged (ASDL's EMA) every step, roots every ``roots_every``
    steps, L^(−1/4) G_b R^(−1/4) (L^(−1/2) g_b for vectors), optionally grafted per parameter."""
    stats, roots, adagrad, out = {}, {}, {}, []
    for k in range(steps):
        x, t = batches(k)
        model.zero_grad()
        F.cross_entropy(model(x), t).backward()
        expected = []
        for i, p in enumerate(model.parameters()):
            g = p.grad.double()
            mat = g.reshape(-1, 1) if p.dim() == 1 else g.reshape(p.shape[0], -1)
            m, n = mat.shape
            b = block or max(m, n)
            cuts = [(r, c) for r in range(0, m, b) for c in range(0, n, b)]
            for r, c in cuts:
                blk = mat[r:r + b, c:c + b]
                new = (blk @ blk.T, None if p.dim() == 1 else blk.T @ blk)
                old = stats.get((i, r, c))
                if old is None:
                    stats[(i, r, c)] = tuple(None if s is None else (s if ema == -1 else ema * s) for s in new)
                else:
                    stats[(i, r, c)] = tuple(None if s is None else (o + s if ema == -1 else (1 - ema) * o + ema * s)
                                             for o, s in zip(old, new))
                if k % roots_every == 0:
                    left, right = stats[(i, r, c)]
                    roots[(i, r, c)] = (dense_root(left, 2 if right is None else 4),
                                        None if right is None else dense_root(right, 4))
            update = torch.zeros_like(mat)
            for r, c in cuts:
                left, right = roots[(i, r, c)]
                blk = left @ mat[r:r + b, c:c + b]
                update[r:r + b, c:c + b] = blk if right is None else blk @ right
            graft = mat
            if grafting == "adagrad":
                adagrad[i] = adagrad.get(i, 0) + mat ** 2
                graft = mat / (adagrad[i].sqrt() + 1e-8)
            if grafting is not None:
                update = update * graft.norm() / update.norm()
            expected.append(update.reshape(p.shape))
        out.append(expected)
    return out


def run_maker(model, batches, steps, cfg, **options):
    maker = fop_asdl.make_gradient_maker("shampoo", model, cfg, **options)
    got = []
    for k in range(steps):
        x, t = batches(k)
        step(maker, model, x, t)
        got.append([p.grad.clone() for p in model.parameters()])
    return got, maker


@pytest.mark.parametrize("block_size, ema, grafting", [(None, -1, None), (None, 0.3, None), (3, -1, None),
                                                       (3, 0.3, None), (3, -1, "sgd"), (3, -1, "adagrad")])
def test_update_equals_the_dense_blockwise_reference(block_size, ema, grafting):
    """Statistics every step, roots every 2 steps (step 1 preconditions with step 0's roots)."""
    torch.manual_seed(0)
    model = tiny_net().double()
    cfg = asdl.PreconditioningConfig(damping=EPS, ema_decay=ema, curvature_upd_interval=1,
                                     preconditioner_upd_interval=2)
    got, _ = run_maker(model, small_image_batch, 3, cfg, block_size=block_size if block_size else -1,
                       grafting=grafting)
    want = reference(model, small_image_batch, 3, block_size, ema, 2, grafting)
    for k, (g_step, w_step) in enumerate(zip(got, want)):
        for a, e in zip(g_step, w_step):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12, msg=lambda m: f"step {k}: {m}")
    if block_size is None and grafting is None:  # the reference is not SGD in disguise
        plain = [p.grad for p in model.parameters()]
        assert all((a - e).norm() > 0.1 * e.norm() for a, e in zip(got[-1], plain) if a.dim() == 2)


def test_float32_roots_match_the_float64_reference():
    """A float32 model: roots by float32 eigendecompositions, within 1e-4 of the float64 reference."""
    torch.manual_seed(0)
    model = tiny_net()

    def batches(k):
        x, t = small_image_batch(k)
        return x.float(), t

    cfg = asdl.PreconditioningConfig(damping=EPS, ema_decay=-1, preconditioner_upd_interval=1)
    got, maker = run_maker(model, batches, 2, cfg, block_size=3)
    want = reference(model, batches, 2, 3, -1, 1)
    assert all(r.dtype == torch.float32 for pairs in maker._roots.values() for pair in pairs for r in pair
               if r is not None)
    for a, e in zip(got[-1], want[-1]):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), e, rtol=1e-4, atol=1e-4 * float(e.abs().max()))


@pytest.mark.parametrize("shape, block", [((7, 5), 3), ((6, 9), 3), ((4,), 3), ((2, 3, 2, 2), 5), ((5, 5), None)])
def test_split_and_merge_are_inverse_and_blocks_are_at_most_block_size(shape, block):
    layout = sm.layout_of(shape, block)
    matrix = torch.randn(layout.shape)
    groups = sm.split(matrix, layout)
    assert torch.equal(sm.merge(groups, layout), matrix)
    assert sum(g.numel() for g in groups) == matrix.numel()
    assert all(g.shape[1] <= (block or 99) and g.shape[2] <= (block or 99) for g in groups)


def test_asdl_shampoo_ignores_block_size_and_this_one_honours_it():
    """The defect: ASDL 0.1a5 never hands block_size to its per-layer preconditioners (whole 64×64 and 48×48
    factors); here the largest factor is block_size."""
    model = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 3))
    theirs = asdl.ShampooGradientMaker(model, asdl.PreconditioningConfig(), block_size=16)
    assert max(s.shape[0] for pre in theirs.preconditioners for s in pre.statistics) == 64
    ours = fop_asdl.make_gradient_maker("shampoo", model, asdl.PreconditioningConfig(), block_size=16)
    step(ours, model, torch.randn(8, 48), torch.randint(0, 3, (8,)))
    assert max(s.shape[-1] for pairs in ours._stats.values() for pair in pairs for s in pair if s is not None) == 16


# --- the engine's guarantees ------------------------------------------------------------------------------------
def cfg(**kwargs):
    base = dict(damping=1e-3, ema_decay=0.2, curvature_upd_interval=1, preconditioner_upd_interval=2)
    base.update(kwargs)
    return asdl.PreconditioningConfig(**base)


@pytest.mark.parametrize("micro_batch_size", [4, 5])
def test_micro_batched_step_equals_the_one_pass_step(micro_batch_size):
    micro_batch_check("shampoo", conv_ln_net, cfg(), micro_batch_size, block_size=4, grafting="adagrad")


@pytest.mark.parametrize("grafting", [None, "adagrad"])
def test_grad_scaler_gives_the_unscaled_result(grafting):
    grad_scaler_check("shampoo", conv_bn_ln_net, cfg(), block_size=4, grafting=grafting)


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    resume_check(tmp_path, "shampoo", {"config": dict(damping=1e-3, ema_decay=0.2, preconditioner_upd_interval=2),
                                       "maker": {"block_size": 4, "grafting": "adagrad"}})


@pytest.mark.parametrize("roots_step", [True, False])
@pytest.mark.parametrize("fault", ["nan_input", "inf_gradient", "loss_raises"])
def test_failed_step_raises_and_changes_nothing(roots_step, fault):
    _, maker, model = train("shampoo", conv_bn_ln_net, cfg(), range(2 if roots_step else 3), block_size=4,
                            grafting="adagrad")
    x, t = small_image_batch(9, 10)
    failed_step_check(maker, model, x, t, fault)


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_equal_one_process_with_replicated_state(tmp_path, world_size):
    options = {"config": dict(damping=1e-3, ema_decay=0.2, preconditioner_upd_interval=2),
               "maker": {"block_size": 4, "grafting": "sgd"}}
    ranks = ranks_check(tmp_path, "shampoo", options, world_size)
    for result in ranks[1:]:  # replicated: every rank holds the same state, bit for bit
        for key, value in result["state"]["statistics"].items():
            for a, b in zip(value, ranks[0]["state"]["statistics"][key]):
                assert all(torch.equal(x, y) for x, y in zip(a, b) if x is not None)


def test_options_it_does_not_take_are_refused_with_the_reason():
    with pytest.raises(TypeError, match="no norm to bound"):
        fop_asdl.make_gradient_maker("shampoo", independent_net(), cfg(), kl_clip=1e-3, lr=0.1)
    with pytest.raises(TypeError, match="does not take \\['beta'\\]"):
        fop_asdl.make_gradient_maker("shampoo", independent_net(), cfg(), beta=0.1)
    for bad in (dict(block_size=0), dict(block_size=2.5), dict(grafting="adam"), dict(grafting_eps=0.0)):
        with pytest.raises(ValueError):
            fop_asdl.make_gradient_maker("shampoo", independent_net(), cfg(), **bad)
    with pytest.raises(ValueError, match="damping"):
        fop_asdl.make_gradient_maker("shampoo", independent_net(), cfg(damping=0.0))


def test_ignored_modules_are_named_and_get_the_plain_gradient():
    torch.manual_seed(0)
    model = independent_net().double()
    with pytest.warns(UserWarning, match=r"does not precondition 5\.weight"):
        maker = fop_asdl.make_gradient_maker("shampoo", model, cfg(ignore_modules=["5"]))
    x, t = small_image_batch(0)
    step(maker, model, x, t)
    written = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    F.cross_entropy(model(x), t).backward()
    torch.testing.assert_close(written[-1], model[5].weight.grad)  # Linear 5 has no bias
    assert not torch.allclose(written[0], model[0].weight.grad)


def test_state_of_another_block_size_is_refused():
    _, maker, _ = train("shampoo", independent_net, cfg(), range(1), block_size=4)
    other = fop_asdl.make_gradient_maker("shampoo", independent_net().double(), cfg(), block_size=8)
    with pytest.raises(ValueError, match="block_size=4"):
        other.load_state_dict(maker.state_dict())
