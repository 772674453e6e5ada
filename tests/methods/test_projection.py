"""The pure FOP scalars against dense matrices (FOP_SPEC steps 2-7, Lemma 1, eqs. 16-17)."""
import pytest
import torch

from fop_asdl.engine.sub_batches import average_and_difference
from fop_asdl.methods.fop_math import FOPOptions, fop_coefficients

DTYPE = torch.float64


def random_spd(dim: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.randn(dim, dim, generator=gen, dtype=DTYPE)
    return q @ q.T / dim + 0.05 * torch.eye(dim, dtype=DTYPE)


def scalars(g_avg, g_diff, metric, inv, options):
    """The five inner products the maker feeds in, from dense matrices."""
    return fop_coefficients(
        (g_avg @ metric @ g_avg).reshape(1), (g_diff @ metric @ g_avg).reshape(1),
        (g_avg @ inv @ g_avg).reshape(1), (g_avg @ inv @ g_diff).reshape(1),
        (g_diff @ inv @ g_diff).reshape(1), options)


@pytest.fixture(params=range(5))
def problem(request):
    gen = torch.Generator().manual_seed(request.param)
    dim = 7
    fisher = random_spd(dim, gen)
    damped_inv = torch.linalg.inv(fisher + 0.1 * torch.eye(dim, dtype=DTYPE))
    return (torch.randn(dim, generator=gen, dtype=DTYPE), torch.randn(dim, generator=gen, dtype=DTYPE),
            fisher, damped_inv)


@pytest.mark.parametrize("counts", ["numbers", "tensors"])
def test_average_and_difference_keeps_full_batch_mean_for_odd_batches(counts):
    """Counts as Python numbers or as 0-d tensors (a loss normaliser read off the device), on a (4, 3) sum."""
    gen = torch.Generator().manual_seed(0)
    per_sample = torch.randn(9, 4, 3, generator=gen, dtype=DTYPE)
    n1, n2 = (5, 4) if counts == "numbers" else (torch.tensor(5.0), torch.tensor(4.0))
    g_avg, g_diff = average_and_difference(per_sample[:5].sum(0), per_sample[5:].sum(0), n1, n2, scale=3.0)
    torch.testing.assert_close(g_avg, 3 * per_sample.mean(0))
    torch.testing.assert_close(g_diff, 3 * (per_sample[:5].mean(0) - per_sample[5:].mean(0)))
    assert g_avg.dtype == g_diff.dtype == DTYPE


def test_lemma1_perpendicular_component_is_fisher_orthogonal(problem):
    g_avg, g_diff, fisher, inv = problem
    coef = scalars(g_avg, g_diff, fisher, inv, FOPOptions())
    g_perp = g_diff - coef.s * g_avg
    assert abs(float(g_perp @ fisher @ g_avg)) < 1e-9 * float(g_diff @ fisher @ g_diff)
    # and D, E are the inner products of step 4 with that g_perp
    torch.testing.assert_close(coef.D, (g_avg @ inv @ g_perp).reshape(1))
    torch.testing.assert_close(coef.E, (g_perp @ inv @ g_perp).reshape(1))
    torch.testing.assert_close(coef.A, (g_avg @ inv @ g_avg).reshape(1))


def total_loss_model(steps: torch.Tensor, g_avg, inv):
    """Second-order model of L1 + L2 (gradient 2 g_avg, Hessian ≈ F̃) at Δ = −F̃⁻¹ step, for rows of steps."""
    delta = -steps @ inv
    return 2 * delta @ g_avg + 0.5 * ((delta @ torch.linalg.inv(inv)) * delta).sum(1)


def test_beta_and_eta_minimise_their_quadratic_models(problem):
    g_avg, g_diff, fisher, inv = problem
    options = FOPOptions(beta_range=(-5.0, 5.0), eta_range=(0.0, 10.0))
    coef = scalars(g_avg, g_diff, fisher, inv, options)
    g_perp = g_diff - coef.s * g_avg
    betas = torch.linspace(-5, 5, 20001, dtype=DTYPE)
    losses = total_loss_model(g_avg + betas[:, None] * g_perp, g_avg, inv)
    assert abs(float(coef.beta) - float(betas[losses.argmin()])) < 1e-3
    g_comb = g_avg + coef.beta * g_perp
    etas = torch.linspace(0, 10, 20001, dtype=DTYPE)
    losses = total_loss_model(etas[:, None] * g_comb, g_avg, inv)
    assert abs(float(coef.eta) - float(etas[losses.argmin()])) < 1e-3


def test_clamps_and_switches(problem):
    g_avg, g_diff, fisher, inv = problem
    wide = scalars(g_avg, g_diff, fisher, inv, FOPOptions(beta_range=(-1e9, 1e9), eta_range=(-1e9, 1e9)))
    narrow = scalars(g_avg, g_diff, fisher, inv, FOPOptions(beta_range=(-0.01, 0.02), eta_range=(0.5, 0.6)))
    torch.testing.assert_close(narrow.beta, wide.beta.clamp(-0.01, 0.02))
    fixed = scalars(g_avg, g_diff, fisher, inv, FOPOptions(beta=0.25, eta=None))
    assert float(fixed.beta) == 0.25 and float(fixed.eta) == 1.0
    # β = 0 with η = 1 is exactly the K-FAC direction u = F̃⁻¹ g_avg
    kfac = scalars(g_avg, g_diff, fisher, inv, FOPOptions(beta=0.0, eta=None))
    assert float(kfac.weight_avg) == 1.0 and float(kfac.weight_diff) == 0.0


def test_kl_terms_add_up_to_the_step_norm(problem):
    g_avg, g_diff, fisher, inv = problem
    coef = scalars(g_avg, g_diff, fisher, inv, FOPOptions())
    g_comb = g_avg + coef.beta * (g_diff - coef.s * g_avg)
    delta = -coef.eta * inv @ g_comb
    norm = delta @ torch.linalg.inv(inv) @ delta
    torch.testing.assert_close(sum(coef.kl_terms()), norm.reshape(1))


def test_degenerate_inputs_fall_back_without_nan():
    zero = torch.zeros(1, dtype=DTYPE)
    coef = fop_coefficients(zero, zero, zero, zero, zero, FOPOptions())
    assert float(coef.s) == 0 and float(coef.beta) == 0 and float(coef.eta) == 1
    assert all(torch.isfinite(t).all() for t in (coef.D, coef.E, *coef.kl_terms()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta="auto"), "beta"), (dict(beta=float("nan")), "beta"), (dict(eta="yes"), "eta"),
    (dict(beta_range=(1.0, -1.0)), "beta_range"), (dict(projection_metric="fisher"), "projection_metric"),
    (dict(eps=0.0), "eps"),
])
def test_bad_options_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FOPOptions(**kwargs)
