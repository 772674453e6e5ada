"""The ASDL interface: one training loop for FOP, K-FAC and SGD; what non-preconditioned parameters get."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl

from scaffold import config, conv_bn_ln_net, step


@pytest.mark.parametrize("name", ["fop", "kfac", "sgd"])
def test_one_loop_for_every_maker(image_batch, name):
    x, t = image_batch
    torch.manual_seed(0)
    model = conv_bn_ln_net().double()
    maker = fop_asdl.make_gradient_maker(name, model, config())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(6):
        opt.zero_grad(set_to_none=True)
        y, loss = step(maker, model, x, t)
        assert y.shape == (len(x), 3)  # the output of the whole batch
        torch.testing.assert_close(loss, F.cross_entropy(y, t))  # the full-batch mean loss
        losses.append(loss.item())
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]


def test_unknown_maker_lists_choices():
    with pytest.raises(ValueError, match=r"'fngd'.*'fop'.*'hylo'.*'kfac'.*'sgd'"):
        fop_asdl.make_gradient_maker("adam", nn.Linear(2, 2))


class WithUnsupported(nn.Module):
    """An Embedding that scales its gradient by token frequency (no FOP curvature: a sample's gradient depends on
    the batch), a container-owned Parameter, an ignored and a frozen layer."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4, scale_grad_by_freq=True)
        self.temperature = nn.Parameter(torch.tensor(1.5))
        self.fc = nn.Linear(4, 6)
        self.skipped = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 3)

    def forward(self, tokens):
        h = torch.tanh(self.fc(self.embed(tokens).mean(1)))
        return self.head(torch.tanh(self.frozen(torch.tanh(self.skipped(h))))) * self.temperature


def test_parameters_without_curvature_get_the_full_batch_gradient_on_every_step():
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 5, (9, 3), generator=gen)
    t = torch.randint(0, 3, (9,), generator=gen)
    torch.manual_seed(0)
    model = WithUnsupported().double()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        maker = fop_asdl.make_gradient_maker("fop", model, config(ignore_modules=["skipped"]),
                                             fisher_type="fisher_emp")
    messages = [str(w.message) for w in caught if "no FOP curvature" in str(w.message)]
    assert len(messages) == 1
    assert "embed (Embedding: scale_grad_by_freq" in messages[0] and "<root> (WithUnsupported:" in messages[0]
    assert "skipped" not in messages[0]  # ignored by the user: no warning
    plain = ["embed.weight", "temperature", "skipped.weight", "skipped.bias"]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(4):  # curvature on steps 0 and 2
        opt.zero_grad(set_to_none=True)
        reference.load_state_dict(model.state_dict())
        reference.zero_grad(set_to_none=True)
        step(maker, model, tokens, t)
        F.cross_entropy(reference(tokens), t).backward()
        grads, ref = dict(model.named_parameters()), dict(reference.named_parameters())
        for name in plain:
            torch.testing.assert_close(grads[name].grad, ref[name].grad, rtol=1e-12, atol=1e-14)
        assert model.frozen.weight.grad is None and model.frozen.bias.grad is None
        assert not torch.allclose(model.fc.weight.grad, reference.fc.weight.grad)  # preconditioned
        assert set(maker.last_stats) == {"fc", "head"}
        opt.step()


def test_requires_grad_flags_are_restored(image_batch):
    x, t = image_batch
    model = conv_bn_ln_net().double()
    model[0].bias.requires_grad_(False)  # partially frozen block: plain gradient, flags untouched
    with pytest.warns(UserWarning, match="partially frozen"):
        maker = fop_asdl.make_gradient_maker("fop", model, config())
    before = [p.requires_grad for p in model.parameters()]
    for _ in range(3):
        step(maker, model, x, t)
    assert [p.requires_grad for p in model.parameters()] == before
    assert model[0].bias.grad is None and model[0].weight.grad is not None


@pytest.mark.parametrize("name", ["sgd", "kfac", "fop", "fngd", "hylo"])
@pytest.mark.parametrize("micro_batch_size", [None, 4])
def test_every_maker_replaces_what_was_in_p_grad(image_batch, name, micro_batch_size):
    """One p.grad semantics on the whole switch: a stale gradient (say of ones, left without zero_grad) is
    replaced, never added to."""
    x, t = image_batch
    grads = []
    for stale in (False, True):
        torch.manual_seed(0)
        model = conv_bn_ln_net().double().eval()  # eval: BatchNorm's statistics do not depend on the chunks
        options = {"fngd": dict(iters_per_epoch=1), "hylo": dict(switch_policy="kis")}.get(name, {})
        maker = fop_asdl.make_gradient_maker(name, model, config(), micro_batch_size=micro_batch_size, **options)
        if stale:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step(maker, model, x, t)
        grads.append([p.grad.clone() for p in model.parameters()])
    for clean, after_stale in zip(*grads):
        torch.testing.assert_close(after_stale, clean, rtol=0, atol=0)
