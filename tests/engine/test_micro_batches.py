"""Micro-batching is exact: a step run as several forward/backward passes equals the one-pass step."""
import copy

import pytest
import torch
import torch.nn.functional as F

import fop_asdl
from fop_asdl.engine.chunks import chunk_bounds, concat_outputs

from scaffold import build, config, conv_ln_net, step


def test_chunk_bounds_cover_the_batch_once():
    assert chunk_bounds(11, 4) == [(0, 4), (4, 8), (8, 11)]
    assert chunk_bounds(11, None) == [(0, 11)]
    assert chunk_bounds(3, 8) == [(0, 3)]


def test_outputs_of_the_chunks_are_joined():
    a, b = torch.randn(3, 2), torch.randn(2, 2)
    torch.testing.assert_close(concat_outputs([a, b]), torch.cat([a, b]))
    joined = concat_outputs([(a, {"k": a}), (b, {"k": b})])
    torch.testing.assert_close(joined[1]["k"], torch.cat([a, b]))


def train(name, micro_batch_size, x, t, fisher_type, steps=5, **kwargs):
    """Curvature and plain steps (interval 2, EMA on) with SGD momentum; every step's grads and loss."""
    extra = {} if micro_batch_size is None else {"micro_batch_size": micro_batch_size}
    model, maker, opt = build(name, conv_ln_net, config(), opt_lr=0.1, fisher_type=fisher_type, **extra, **kwargs)
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    history = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        y, loss = step(maker, model, x, t)
        history.append(([p.grad.clone() for p in model.parameters()], loss.detach().clone(), y.detach().clone()))
        opt.step()
    assert max(seen) == (micro_batch_size or len(x))  # the passes really ran on micro-batches
    assert sum(seen) == steps * len(x)
    return history, maker


@pytest.mark.parametrize("name", ["fop", "kfac"])
@pytest.mark.parametrize("fisher_type", ["fisher_emp", "fisher_exact"])
@pytest.mark.parametrize("micro_batch_size", [4, 5])  # 11 samples: 4+4+3 (B1/B2 boundary inside a chunk), 5+5+1
def test_micro_batched_step_equals_the_full_batch_step(image_batch, name, fisher_type, micro_batch_size):
    x, t = image_batch
    full, full_maker = train(name, None, x, t, fisher_type)
    chunked, chunked_maker = train(name, micro_batch_size, x, t, fisher_type)
    for (g_full, loss_full, y_full), (g_chunk, loss_chunk, y_chunk) in zip(full, chunked):
        torch.testing.assert_close(loss_chunk, loss_full, rtol=1e-10, atol=0)
        torch.testing.assert_close(y_chunk, y_full, rtol=1e-10, atol=0)
        for a, b in zip(g_chunk, g_full):
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)
    if name == "fop":
        for block, stats in full_maker.last_stats.items():
            for key, value in stats.items():
                torch.testing.assert_close(chunked_maker.last_stats[block][key], value, rtol=1e-7, atol=1e-12)


def test_micro_batched_sgd_equals_the_full_batch_gradient(image_batch):
    x, t = image_batch
    torch.manual_seed(0)
    model = conv_ln_net().double()
    reference = copy.deepcopy(model)
    F.cross_entropy(reference(x), t).backward()
    maker = fop_asdl.make_gradient_maker("sgd", model, micro_batch_size=3)
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    y, loss = step(maker, model, x, t)
    assert seen == [3, 3, 3, 2]
    torch.testing.assert_close(loss, F.cross_entropy(reference(x), t))
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-14)


def test_micro_batched_sgd_refuses_what_it_cannot_split_and_changes_nothing(image_batch):
    """Its summed-loss passes need a loss with a reduction and arguments that split with the batch; one
    pass is autograd of the user's own loss and takes any loss."""
    x, t = image_batch
    model = conv_ln_net().double()
    stale = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, g in zip(model.parameters(), stale):
        p.grad = g

    def no_reduction(y, target):
        return F.cross_entropy(y, target)

    maker = fop_asdl.make_gradient_maker("sgd", model, micro_batch_size=3)
    with pytest.raises(TypeError, match="has no 'reduction' argument"):
        step(maker, model, x, t, loss_fn=no_reduction)
    with pytest.raises(ValueError, match="rows, neither the batch's"):
        step(maker, model, x, t[:-1])
    assert all(p.grad is g for p, g in zip(model.parameters(), stale))
    step(fop_asdl.make_gradient_maker("sgd", model), model, x, t, loss_fn=no_reduction)
    assert all(not torch.equal(p.grad, g) for p, g in zip(model.parameters(), stale))


def test_swift_cannot_be_micro_batched():
    with pytest.raises(ValueError, match="swift=True"):
        fop_asdl.make_gradient_maker("fop", conv_ln_net(), config(), swift=True, micro_batch_size=4)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_micro_batch_size_is_refused(bad):
    for name in ("fop", "kfac", "sgd"):
        with pytest.raises(ValueError, match="micro_batch_size"):
            fop_asdl.make_gradient_maker(name, conv_ln_net(), config(), micro_batch_size=bad)
