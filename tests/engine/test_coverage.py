"""``gm.coverage()``: what each maker of the switch does with every parameter, checked against what its
step does — a parameter reported as taking the plain gradient receives exactly autograd's gradient, one
reported as preconditioned receives something else."""
import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl

OPTIONS = {"fngd": dict(iters_per_epoch=2), "hylo": dict(switch_policy="kis"), "kbfgs": dict(lr=0.1)}
METHODS = sorted(fop_asdl.GRADIENT_MAKERS)


class Zoo(nn.Module):
    """A conv and two Linears (blocks for every preconditioning method), an Embedding, a LayerNorm, a
    parameter the root holds directly, a frozen Linear and one the user ignores."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.emb = nn.Embedding(5, 3)
        self.norm = nn.LayerNorm(3)
        self.hidden = nn.Linear(3, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.skipped = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        h = self.conv(x[:, :, :4].unsqueeze(1)).mean((2, 3)) + self.emb(x[:, 0, 0].long().clamp(0, 4))
        h = torch.tanh(self.hidden(self.norm(h)))
        return self.out(torch.tanh(self.skipped(self.frozen(h)))) * self.scale


def config():
    return asdl.PreconditioningConfig(damping=1e-2, curvature_upd_interval=1, preconditioner_upd_interval=1,
                                      ignore_modules=["skipped"])


@pytest.mark.filterwarnings("ignore:fop_asdl")
@pytest.mark.parametrize("name", METHODS)
def test_the_report_says_what_the_step_does(name):
    torch.manual_seed(0)
    model = Zoo().double()
    gm = fop_asdl.make_gradient_maker(name, model, config(), **OPTIONS.get(name, {}))
    x, t = torch.rand(8, 4, 6, dtype=torch.double) * 4, torch.randint(0, 3, (8,))
    autograd = torch.autograd.grad(F.cross_entropy(model(x), t), [p for p in model.parameters() if p.requires_grad])
    dummy_y = gm.setup_model_call(model, x)
    gm.setup_loss_call(F.cross_entropy, dummy_y, t)
    gm.forward_and_backward()
    report = {p.name: p for p in gm.coverage().parameters}
    assert sorted(report) == sorted(n for n, _ in model.named_parameters())
    assert {report[f"frozen.{k}"].treatment for k in ("weight", "bias")} == {"frozen"}
    expected_skip = "plain gradient" if name == "sgd" else "ignored by the user"
    assert {report[f"skipped.{k}"].treatment for k in ("weight", "bias")} == {expected_skip}
    if name == "shampoo":  # it preconditions parameters, not layers: the root's own one too
        assert report["scale"].treatment == "preconditioned" and "a vector" in report["scale"].uses[0].detail
    else:
        assert report["scale"].treatment == "plain gradient" and "holds it directly" in report["scale"].uses[0].detail
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for (n, p), g in zip(trainable, autograd):
        if report[n].treatment == "preconditioned":
            assert not torch.allclose(p.grad, g), n
        else:
            torch.testing.assert_close(p.grad, g, msg=f"{n}: reported {report[n].treatment}")
    preconditioned = {n for n, c in report.items() if c.treatment == "preconditioned"}
    if name == "sgd":
        assert not preconditioned
    else:
        assert {"conv.weight", "hidden.weight", "out.weight"} <= preconditioned


@pytest.mark.filterwarnings("ignore:fop_asdl")
def test_the_summary_adds_up_and_names_the_reasons():
    torch.manual_seed(0)
    model = Zoo()
    gm = fop_asdl.make_gradient_maker("kfac", model, config())
    coverage = gm.coverage()
    counts = coverage.counts()
    assert sum(n for n, _ in counts.values()) == len(list(model.parameters()))
    assert sum(e for _, e in counts.values()) == sum(p.numel() for p in model.parameters())
    line = coverage.summary()
    assert line.startswith("K-FAC on ") and "\n" not in line
    assert "ignored by the user 2 parameters" in line and "frozen 2 parameters" in line
    assert coverage.as_dict()["summary"] == line


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.emb(tokens)))


def test_a_tied_weight_lists_each_use_and_its_other_name():
    gm = fop_asdl.make_gradient_maker("hylo", Tied(), config(), switch_policy="kis")
    (tied,) = gm.coverage().parameters
    assert tied.name == "emb.weight" and tied.shared_with == ("head.weight",)
    assert [u.module for u in tied.uses] == ["emb", "head"]
    assert tied.uses[1].treatment == "preconditioned"
    assert tied.treatment in ("preconditioned", "partly preconditioned")


def test_attention_projections_count_as_the_layer_parameters_they_stand_in_for():
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    report = {p.name: p for p in fop_asdl.make_gradient_maker("kfac", model).coverage().parameters}
    use = report["self_attn.in_proj_weight"].uses[0]
    assert use.treatment == "preconditioned" and "self_attn.q_proj" in use.detail
