"""The gradient FOPGradientMaker writes equals a dense-matrix implementation of FOP_SPEC steps 1-8.

The reference is built independently: the Kronecker and unit-wise factors from the definitions (per-sample
activations and output gradients of a hand-written forward pass), dense F and F̃ = (B + d_B I) ⊗ (A + d_A I)
with π-split damping, a dense inverse, and g1, g2 from separate autograd passes over the two halves.
"""
import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop_asdl import FOPGradientMaker

from dense_refs import dense_fop, kron_metric, unit_metric
from scaffold import step

DAMPING = 3e-2
N, N1 = 9, 5  # odd batch: B1 has ⌈9/2⌉ = 5 samples


class TinyNet(nn.Module):
    def __init__(self, layer_norm: bool):
        super().__init__()
        self.fc1 = nn.Linear(5, 4)
        self.ln = nn.LayerNorm(4) if layer_norm else nn.Identity()
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def reference_curvature(model: TinyNet, x, t):
    """Factors from the definitions: A = E[a aᵀ], B = E[δ δᵀ] (δ of the summed loss), per-unit E[g gᵀ]."""
    h1 = x @ model.fc1.weight.T + model.fc1.bias
    h1.retain_grad()
    if isinstance(model.ln, nn.LayerNorm):
        x_hat = (h1 - h1.mean(1, keepdim=True)) / torch.sqrt(h1.var(1, unbiased=False, keepdim=True) + model.ln.eps)
        z = x_hat * model.ln.weight + model.ln.bias
        z.retain_grad()
    else:
        z = h1
    a2 = torch.tanh(z)
    y = a2 @ model.fc2.weight.T + model.fc2.bias
    y.retain_grad()
    F.cross_entropy(y, t, reduction="sum").backward()
    n = x.shape[0]
    blocks = {
        "fc1": (h1.grad.T @ h1.grad / n, x.T @ x / n),
        "fc2": (y.grad.T @ y.grad / n, a2.detach().T @ a2.detach() / n),
    }
    metric = {name: kron_metric([(b, a)], bias=True) for name, (b, a) in blocks.items()}
    damped = {name: kron_metric([(b, a)], bias=True, damping=DAMPING) for name, (b, a) in blocks.items()}
    if isinstance(model.ln, nn.LayerNorm):
        per_sample = torch.cat([z.grad * x_hat.detach(), z.grad], dim=1)  # (n, 2f): [w; b] of each sample
        metric["ln"], damped["ln"] = unit_metric(per_sample), unit_metric(per_sample, DAMPING)
    model.zero_grad()
    return blocks, metric, damped


def flat_block_grads(model, name):
    module = getattr(model, name)
    return torch.cat([module.weight.grad.flatten(), module.bias.grad.flatten()])


def half_gradients(model, x, t):
    grads = []
    for part in (slice(0, N1), slice(N1, None)):
        model.zero_grad()
        F.cross_entropy(model(x[part]), t[part]).backward()
        grads.append({name: flat_block_grads(model, name) for name in ("fc1", "ln", "fc2")
                      if isinstance(getattr(model, name), (nn.Linear, nn.LayerNorm))})
    model.zero_grad()
    return grads


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("metric_name", ["undamped", "damped"])
@pytest.mark.parametrize("beta_mode", ["adaptive", 0.3])
def test_written_gradient_equals_dense_fop(layer_norm, metric_name, beta_mode):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    t = torch.randint(0, 3, (N,), generator=gen)
    torch.manual_seed(0)
    model = TinyNet(layer_norm).double()
    blocks, metric, damped = reference_curvature(model, x, t)
    g1, g2 = half_gradients(model, x, t)

    maker = FOPGradientMaker(model, asdl.PreconditioningConfig(damping=DAMPING), fisher_type="fisher_emp",
                             beta=beta_mode, projection_metric=metric_name)
    _, loss = step(maker, model, x, t)

    torch.testing.assert_close(loss, F.cross_entropy(model(x), t))
    for name, (b_ref, a_ref) in blocks.items():  # the maker's stored factors are the defined ones
        kron = getattr(model, name).fisher.kron
        torch.testing.assert_close(kron.A, a_ref)
        torch.testing.assert_close(kron.B, b_ref)
    for name in g1:
        projection = metric[name] if metric_name == "undamped" else damped[name]
        expected, stats = dense_fop(g1[name], g2[name], N1, N, projection, damped[name], beta_mode)
        torch.testing.assert_close(flat_block_grads(model, name), expected, rtol=1e-7, atol=1e-10)
        for key, value in stats.items():
            torch.testing.assert_close(maker.last_stats[name][key], value.to(torch.float64), rtol=1e-7, atol=1e-10)
    assert set(maker.last_stats) == set(g1)
