"""Dense references the tests of several folders share, built without the package: per-sample gradients by one
autograd pass per sample, the damped natural gradient by a dense solve, K-FAC's Kronecker and a norm layer's
unit-wise F as dense matrices, FOP_SPEC steps 1-8 written densely, and ASDL's SMW maker as an oracle."""
from __future__ import annotations

import copy
import warnings
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from asdl.precondition.smw import SmwEmpNaturalGradientConfig, SmwEmpNaturalGradientMaker
from torch import nn

from scaffold import step


def block_params(block: nn.Module) -> List[torch.Tensor]:
    return [p for p in (block.weight, block.bias) if p is not None]


def block_grad(block: nn.Module) -> torch.Tensor:
    """The block's p.grad, [W | b] flattened."""
    return torch.cat([p.grad.reshape(-1) for p in block_params(block)])


def per_sample_gradients(model, x, t, block, loss_fn=F.cross_entropy) -> torch.Tensor:
    """U (M, N_l): the block's gradient of each sample's loss (summed: no 1/M), one autograd pass per sample,
    [W | b] flattened like p.grad."""
    return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        loss_fn(model(x[j:j + 1]), t[j:j + 1], reduction="sum"), block_params(block))]) for j in range(x.shape[0])])


def dense_natural_gradient(u: torch.Tensor, damping, g: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(F + λI)⁻¹ g with F = UᵀU/M and g U's mean row (or the ``g`` given), by a dense solve."""
    fisher = u.T @ u / u.shape[0]
    return torch.linalg.solve(fisher + damping * torch.eye(u.shape[1], dtype=u.dtype), u.mean(0) if g is None else g)


def kron_metric(pairs, bias: bool, damping=None) -> torch.Tensor:
    """F = ⊕_g B_g ⊗ A_g on vec(W) (row-major, groups' rows in order), then ⊕_g B_g on the bias; with
    ``damping``, each group π-damped: (B_g + λ^½/π I) ⊗ (A_g + λ^½ π I)."""
    weight, bias_part = [], []
    for b, a in pairs:
        if damping is not None:
            pi = torch.sqrt((a.trace() / len(a)) / (b.trace() / len(b)))
            a = a + damping ** 0.5 * pi * torch.eye(len(a), dtype=a.dtype)
            b = b + damping ** 0.5 / pi * torch.eye(len(b), dtype=b.dtype)
        weight.append(torch.kron(b, a))
        bias_part.append(b)
    return torch.block_diag(*weight, *(bias_part if bias else []))


def unit_metric(u: torch.Tensor, damping=None) -> torch.Tensor:
    """A norm layer's unit-wise F on [w; b] from its per-sample gradients U (n, 2f): one 2×2 per unit, each
    entry the mean over samples; with ``damping``, + λI."""
    f = u.shape[1] // 2
    per_unit = torch.stack([u[:, :f], u[:, f:]], 2)  # (n, f, 2)
    units = torch.einsum("nfi,nfj->fij", per_unit, per_unit) / u.shape[0]
    dense = torch.zeros(2 * f, 2 * f, dtype=u.dtype)
    idx = torch.arange(f)
    for r in range(2):
        for c in range(2):
            dense[idx + r * f, idx + c * f] = units[:, r, c]
    return dense if damping is None else dense + damping * torch.eye(2 * f, dtype=u.dtype)


def dense_fop(g1, g2, n1: int, n: int, metric, damped, beta="adaptive", eps=1e-12):
    """FOP_SPEC steps 1-8 with dense matrices (β adaptive or fixed, η adaptive, their default clamps), g1 the
    mean gradient of the first n1 of n samples: (the direction, its scalars)."""
    g_avg = (n1 * g1 + (n - n1) * g2) / n
    g_diff = g1 - g2
    s = (g_diff @ metric @ g_avg) / (g_avg @ metric @ g_avg + eps)
    g_perp = g_diff - s * g_avg
    inv = torch.linalg.inv(damped)
    u, v = inv @ g_avg, inv @ g_perp
    big_a, big_d, big_e = g_avg @ u, g_avg @ v, g_perp @ v
    beta = (big_d / big_e).clamp(-0.5, 0.5) if beta == "adaptive" else torch.tensor(beta, dtype=g_avg.dtype)
    g_comb = g_avg + beta * g_perp
    eta = (2 * g_avg @ inv @ g_comb / (g_comb @ inv @ g_comb)).clamp(0.0, 2.0)
    return eta * (u + beta * v), dict(s=s, beta=beta, eta=eta, A=big_a, D=big_d, E=big_e)


def check_against_asdl_smw(make: Callable[[nn.Module], object]) -> None:
    """One Linear layer (5 → 3, 7 samples, float64): the maker ``make(model)`` writes the gradient of ASDL's
    SmwEmpNaturalGradientMaker (damping 1e-2)."""
    torch.manual_seed(0)
    reference = nn.Linear(5, 3).double()
    x, t = torch.randn(7, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    oracle_model, model = copy.deepcopy(reference), copy.deepcopy(reference)
    oracle = SmwEmpNaturalGradientMaker(oracle_model, SmwEmpNaturalGradientConfig(data_size=7, damping=1e-2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ASDL's own backward-hook deprecation
        step(oracle, oracle_model, x, t)
    step(make(model), model, x, t)
    for p, q in zip(model.parameters(), oracle_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
