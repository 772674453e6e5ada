"""Every maker of the switch meets ASDL's ``GradientMaker`` contract, with and without micro-batches: the
output kinds and losses that ASDL's own test suite (test/grad_maker/test_grad_maker.py) exercises — plain
logits with cross-entropy and MSE, a (logits, loss) tuple with ``setup_loss_repr``, a sequence model whose
output object has ``.logits`` with the user's own flattening and ``ignore_index``, a (loss, logits) tuple —
and a dict output. The model's output comes back in its own structure, the loss is the user's, and the
gradient autograd's (for the preconditioning makers in the damped limit, F̃⁻¹ → 1/λ; Shampoo's
G / √λ)."""
import dataclasses

import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.curvature.inverses import kron_damping

METHODS = ["sgd", "kfac", "fop", "fngd", "hylo", "ekfac", "shampoo"]
LAMBDA = 1e16
IN, HID, OUT, N, SEQ = 5, 4, 3, 6, 8


class MLP(nn.Module):
    def __init__(self, loss_type="cross_entropy"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(IN, HID), nn.Linear(HID, OUT)
        self.loss_fn = F.cross_entropy if loss_type == "cross_entropy" else F.mse_loss

    def forward(self, x, t=None, as_dict=False):
        logits = self.fc2(torch.relu(self.fc1(x)))
        if as_dict:
            return {"logits": logits}
        return logits if t is None else (logits, self.loss_fn(logits, t))


@dataclasses.dataclass
class SequenceOutput:
    """A Hugging Face-style output object."""

    logits: torch.Tensor
    hidden: torch.Tensor


class SequenceModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Linear(IN, HID), nn.Linear(HID, OUT)

    def forward(self, x, t=None, return_dict=True):
        hidden = torch.tanh(self.embed(x))
        logits = self.head(hidden)
        if return_dict:
            return SequenceOutput(logits, hidden)
        loss = F.cross_entropy(logits.view(-1, OUT), t.view(-1), ignore_index=-1)
        return loss, logits


def make(name, model, micro_batch_size):
    config = asdl.PreconditioningConfig(damping=LAMBDA, curvature_upd_interval=1, preconditioner_upd_interval=1)
    options = {"fop": dict(beta=0.0, eta=None), "fngd": dict(iters_per_epoch=1, damping_mode="fixed"),
               "hylo": dict(switch_policy="kis", compression_ratio=1.0)}.get(name, {})
    return fop_asdl.make_gradient_maker(name, model, None if name == "sgd" else config,
                                        micro_batch_size=micro_batch_size, **options)


def check_gradients(gm, name, model, expected):
    for module in model.modules():
        for p in module.parameters(recurse=False):
            g = expected[p]
            scale = {"sgd": 1.0, "shampoo": LAMBDA ** 0.5}.get(name, LAMBDA)  # Shampoo: (λ^(−1/4))² G
            if name in ("kfac", "fop") and p is getattr(module, "bias", None):
                scale = kron_damping(module.fisher.kron, LAMBDA)[1]  # (B + d_B I)⁻¹ on the bias alone
            torch.testing.assert_close(p.grad * scale, g, rtol=1e-5, atol=1e-9 * float(g.abs().max()))


def autograd(model, loss):
    return dict(zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()))))


def data(loss_type="cross_entropy", sequence=False, ignored=True):
    gen = torch.Generator().manual_seed(0)
    if sequence:
        x = torch.randn(N, SEQ, IN, generator=gen, dtype=torch.float64)
        t = torch.randint(0, OUT, (N, SEQ), generator=gen)
        if ignored:
            t[1:, -2:] = -1
            t[3, :5] = -1
        return x, t
    x = torch.randn(N, IN, generator=gen, dtype=torch.float64)
    if loss_type == "cross_entropy":
        return x, torch.randint(0, OUT, (N,), generator=gen)
    return x, torch.randn(N, OUT, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("loss_type", ["cross_entropy", "mse"])
@pytest.mark.parametrize("name", METHODS)
def test_logits(name, loss_type, micro_batch_size):
    torch.manual_seed(0)
    model = MLP(loss_type).double()
    x, t = data(loss_type)
    y_true = model(x)
    loss_true = model.loss_fn(y_true, t)
    expected = autograd(model, loss_true)
    gm = make(name, model, micro_batch_size)
    dummy_y = gm.setup_model_call(model, x)
    gm.setup_loss_call(model.loss_fn, dummy_y, t)
    y, loss = gm.forward_and_backward()
    torch.testing.assert_close(y, y_true.detach())
    torch.testing.assert_close(loss, loss_true.detach())
    check_gradients(gm, name, model, expected)


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("loss_type", ["cross_entropy", "mse"])
@pytest.mark.parametrize("name", METHODS)
def test_tuple_with_the_models_own_loss(name, loss_type, micro_batch_size):
    """(logits, loss) with ``setup_loss_repr(dummy_y[1])``: the model's per-sample mean, chunk by chunk."""
    torch.manual_seed(0)
    model = MLP(loss_type).double()
    x, t = data(loss_type)
    logits_true, loss_true = model(x, t)
    expected = autograd(model, loss_true)
    gm = make(name, model, micro_batch_size)
    dummy_y = gm.setup_model_call(model, x, t)
    gm.setup_loss_repr(dummy_y[1])
    (logits, _), loss = gm.forward_and_backward()
    torch.testing.assert_close(logits, logits_true.detach())
    torch.testing.assert_close(loss, loss_true.detach())
    check_gradients(gm, name, model, expected)


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("name", METHODS)
def test_sequence_output_object(name, micro_batch_size):
    """``dummy_y.logits.view(-1, V)`` and ``t.view(-1)`` with ``ignore_index``: the user's token mean."""
    torch.manual_seed(0)
    model = SequenceModel().double()
    x, t = data(sequence=True)
    out = model(x)
    loss_true = F.cross_entropy(out.logits.view(-1, OUT), t.view(-1), ignore_index=-1)
    expected = autograd(model, loss_true)
    gm = make(name, model, micro_batch_size)
    dummy_y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, dummy_y.logits.view(-1, dummy_y.logits.size(-1)), t.view(-1),
                       ignore_index=-1)
    y, loss = gm.forward_and_backward()
    assert isinstance(y, SequenceOutput)
    torch.testing.assert_close(y.logits, out.logits.detach())
    torch.testing.assert_close(loss, loss_true.detach())
    check_gradients(gm, name, model, expected)


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("name", METHODS)
def test_sequence_tuple_with_the_models_own_loss(name, micro_batch_size):
    """(loss, logits) with ``setup_loss_repr(dummy_y[0])``; the Fisher's logits named with
    ``setup_logits_repr(dummy_y[1])``, as ASDL asks. Chunks of a repr loss weigh by their samples, so the
    micro-batched case has no padding (with padding, setup_loss_call is exact)."""
    torch.manual_seed(0)
    model = SequenceModel().double()
    x, t = data(sequence=True, ignored=micro_batch_size is None)
    loss_true, logits_true = model(x, t, return_dict=False)
    expected = autograd(model, loss_true)
    gm = make(name, model, micro_batch_size)
    dummy_y = gm.setup_model_call(model, x, t, return_dict=False)
    gm.setup_loss_repr(dummy_y[0])
    gm.setup_logits_repr(dummy_y[1])
    (_, logits), loss = gm.forward_and_backward()
    torch.testing.assert_close(logits, logits_true.detach())
    torch.testing.assert_close(loss, loss_true.detach())
    check_gradients(gm, name, model, expected)


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("name", METHODS)
def test_dict_output(name, micro_batch_size):
    torch.manual_seed(0)
    model = MLP().double()
    x, t = data()
    out = model(x, as_dict=True)
    loss_true = F.cross_entropy(out["logits"], t)
    expected = autograd(model, loss_true)
    gm = make(name, model, micro_batch_size)
    dummy_y = gm.setup_model_call(model, x, as_dict=True)
    gm.setup_loss_call(F.cross_entropy, dummy_y["logits"], t)
    y, loss = gm.forward_and_backward()
    assert set(y) == {"logits"}
    torch.testing.assert_close(y["logits"], out["logits"].detach())
    torch.testing.assert_close(loss, loss_true.detach())
    check_gradients(gm, name, model, expected)


@pytest.mark.parametrize("name", ["kfac", "fop"])
def test_fisher_without_logits_says_how_to_name_them(name):
    """A loss repr on a dict output leaves ASDL's Fisher without logits: a clear error, nothing changed."""
    torch.manual_seed(0)
    model = MLP().double()
    x, t = data()
    gm = make(name, model, None)
    dummy_y = gm.setup_model_call(model, x, as_dict=True)
    gm.setup_loss_repr(dummy_y["logits"].sum())
    with pytest.raises(TypeError, match="setup_logits_repr"):
        gm.forward_and_backward()
    assert all(p.grad is None for p in model.parameters())
