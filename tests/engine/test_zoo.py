"""Architectures as users bring them, on every maker of the switch: a few steps each, every gradient finite,
and the step doing what ``gm.coverage()`` reports. In the damped limit (F̃ → λ·I, λ = 1e12) a block a
method preconditions receives autograd's gradient / λ, and a parameter it leaves to the plain gradient
receives autograd's gradient: both checked against ``torch.autograd.grad`` of the user's loss, per
parameter, in float64. The per-layer dense references of each method live in its own tests."""
import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.models import PixelGPT

LAMBDA = 1e16
#: Options that make each method's step F̃⁻¹ g with F̃ → λ·I as λ grows (no adaptive scaling of the step).
DAMPED = {"fop": dict(beta=0.0, eta=None), "fngd": dict(iters_per_epoch=2, damping_mode="fixed"),
          "hylo": dict(switch_policy="kis", compression_ratio=1.0), "ekfac": {},
          "fop_ekfac": dict(curvature="ekfac", beta=0.0, eta=None)}  # FOP over EKFAC: the "fop" maker
#: The other makers: a valid configuration, checked for finiteness and for their plain parameters (Shampoo's
#: damped limit is G / √λ, tests/engine/test_user_loss.py).
OTHERS = {"kbfgs": dict(lr=0.1), "seng": {}, "smw_ng": {}, "diag_ng": {}, "kron_psgd": {}, "shampoo": {}}


class LSTMClassifier(nn.Module):
    """An LSTM (no method preconditions it: the report says so) under a Linear head."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 projection, BatchNorm after each."""

    def __init__(self, c, expand=2):
        super().__init__()
        h = c * expand
        self.body = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                                  nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h),
                                  nn.ReLU6(), nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.body(x)


def mobilenet():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU6(),
                         InvertedResidual(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))


def conv1d_classifier():
    return nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 4, 3, dilation=2), nn.Tanh(),
                         nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(4, 4))


def decoder():
    """A ConvTranspose2d decoder whose pixels are the outputs (per-pixel classes, a 4-d cross-entropy)."""
    return nn.Sequential(nn.Linear(3, 8), nn.Unflatten(1, (2, 2, 2)), nn.Tanh(),
                         nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1), nn.Tanh(),
                         nn.Conv2d(3, 4, 1))


def groupnorm_cnn():
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 4))


class FrozenAndUnused(nn.Module):
    """A frozen Linear, a Linear the forward never calls, and a trained one."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(3, 5).requires_grad_(False)
        self.unused = nn.Linear(5, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.frozen(x)))


class DictOutput(nn.Module):
    """A Hugging Face-style output: the loss reads ``output["logits"]``."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(3, 5), nn.Linear(5, 4)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return {"logits": self.head(h), "hidden": h}


def gpt():
    return PixelGPT(image_size=8, patch=2, levels=4, dim=8, depth=1, heads=2, num_classes=4)


#: name -> (model, inputs of a batch of n, targets of a batch of n, the loss's logits from the output)
ZOO = {
    "gpt_tied": (gpt, lambda g, n: torch.randn(n, 1, 8, 8, generator=g), lambda g, n: torch.randint(0, 4, (n,), generator=g)),
    "lstm": (LSTMClassifier, lambda g, n: torch.randn(n, 6, 3, generator=g), lambda g, n: torch.randint(0, 4, (n,), generator=g)),
    "mobilenet": (mobilenet, lambda g, n: torch.randn(n, 3, 8, 8, generator=g), lambda g, n: torch.randint(0, 4, (n,), generator=g)),
    "conv1d": (conv1d_classifier, lambda g, n: torch.randn(n, 3, 9, generator=g), lambda g, n: torch.randint(0, 4, (n,), generator=g)),
    "deconv": (decoder, lambda g, n: torch.randn(n, 3, generator=g), lambda g, n: torch.randint(0, 4, (n, 4, 4), generator=g)),
    "groupnorm": (groupnorm_cnn, lambda g, n: torch.randn(n, 3, 6, 6, generator=g), lambda g, n: torch.randint(0, 4, (n,), generator=g)),
    "frozen_unused": (FrozenAndUnused, lambda g, n: torch.randn(n, 3, generator=g), lambda g, n: torch.randint(0, 4, (n,), generator=g)),
    "dict_output": (DictOutput, lambda g, n: torch.randn(n, 3, generator=g), lambda g, n: torch.randint(0, 4, (n,), generator=g)),
}


def logits(y, arch):
    """The logits in the model's output, or on the dummy output of setup_model_call (ASDL's way)."""
    return y["logits"] if arch == "dict_output" else y


def make(name, model, damping):
    config = asdl.PreconditioningConfig(damping=damping, curvature_upd_interval=2, preconditioner_upd_interval=2)
    maker = "fop" if name == "fop_ekfac" else name
    return fop_asdl.make_gradient_maker(maker, model, config, **{**DAMPED, **OTHERS}.get(name, {}))


def check_steps(name, arch, damped_limit, steps=3, n=8):
    torch.manual_seed(0)
    build, inputs, targets = ZOO[arch]
    model = build().double()
    gm = make(name, model, LAMBDA if damped_limit else 1e-2)
    report = {p.name: p for p in gm.coverage().parameters}
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):  # a curvature step, a plain one, a curvature one
        x, t = inputs(gen, n).double(), targets(gen, n)
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        reference = torch.autograd.grad(F.cross_entropy(logits(model(x), arch), t), [p for _, p in named],
                                        allow_unused=True)
        for _, p in named:
            p.grad = None
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, logits(dummy_y, arch), t)
        y, loss = gm.forward_and_backward()
        assert type(y) is type(model(x)) and torch.isfinite(loss)
        for (k, p), g in zip(named, reference):
            if g is None:  # took no part in the loss: autograd leaves None, so does every maker
                assert p.grad is None, k
                continue
            assert torch.isfinite(p.grad).all(), k
            treatment = report[k].treatment
            if treatment == "plain gradient":
                torch.testing.assert_close(p.grad, g, msg=f"{k}: reported plain")
            elif treatment == "preconditioned" and damped_limit:
                check_damped_limit(name, k, p.grad, g)
    return report


def check_damped_limit(name, key, grad, g):
    """``grad`` = g / λ. A Kronecker block's bias (K-FAC, FOP) is damped by B's share of λ alone (ASDL's
    π-split), so there ``grad`` = g / d_B for one d_B > 0 per block: parallel to g (per q, k, v window
    of an attention layer's packed bias). Windows whose gradient is zero but for rounding are skipped."""
    kron_bias = name in ("kfac", "fop") and grad.ndim == 1
    windows = 3 if key.endswith("in_proj_bias") else 1
    for part, ref in zip(grad.chunk(windows), g.chunk(windows)):
        if ref.abs().max() < max(1e-12, 1e-10 * g.abs().max()):
            continue  # no gradient but rounding (a bias before BatchNorm; the key bias: softmax ignores it)
        scale = (part * ref).sum() / (ref * ref).sum()
        torch.testing.assert_close(part, scale * ref, rtol=1e-5, atol=1e-8 * float(part.abs().max()),
                                   msg=lambda m: f"{key}: not parallel to autograd's gradient\n{m}")
        if kron_bias:
            assert scale > 0, key
        else:
            torch.testing.assert_close(scale * LAMBDA, torch.ones_like(scale), rtol=1e-6, atol=0,
                                       msg=lambda m: f"{key}: not autograd's gradient / λ\n{m}")


@pytest.mark.filterwarnings("ignore:fop_asdl")
@pytest.mark.parametrize("arch", sorted(ZOO))
@pytest.mark.parametrize("name", ["sgd", *DAMPED, "kfac"])
def test_every_architecture_gets_what_the_report_says_in_the_damped_limit(name, arch):
    report = check_steps(name, arch, damped_limit=True)
    if name != "sgd" and arch not in ("lstm",):
        assert any(p.treatment == "preconditioned" for p in report.values()), arch
    if arch == "lstm":
        assert all(p.treatment == "plain gradient" for k, p in report.items() if k.startswith("lstm."))
    if arch == "frozen_unused":
        assert report["frozen.weight"].treatment == "frozen"


@pytest.mark.filterwarnings("ignore:fop_asdl")
@pytest.mark.parametrize("arch", sorted(ZOO))
@pytest.mark.parametrize("name", sorted(OTHERS))
def test_the_other_makers_step_every_architecture(name, arch):
    check_steps(name, arch, damped_limit=False)
