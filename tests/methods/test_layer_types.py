"""Issue 22 item 2: Embedding, grouped and depthwise Conv2d, Conv1d and GroupNorm preconditioned by every
method where its math applies, each against a dense float64 reference on a tiny net (tests/methods/layer_refs.py)."""
import asdl
import pytest
import torch
import torch.nn.functional as F

import fop_asdl

import layer_refs as ref
from conftest import step

KINDS = ["ids", "tokens", "token_loss", "grouped", "depthwise", "conv1d", "groupnorm"]


def run(name, model, x, t, loss_fn, **options):
    config = asdl.PreconditioningConfig(damping=ref.DAMPING)
    maker = fop_asdl.make_gradient_maker(name, model, config, **options)
    return step(maker, model, x, t, loss_fn=loss_fn)


def assert_close_rel(got, expected, tol):
    error = float((got - expected).abs().max() / expected.abs().max())
    assert error < tol, f"relative error {error:.2e}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["kfac", "fop"])
def test_kronecker_methods_equal_the_dense_reference(kind, name):
    model, x, t, loss_fn, normalizer = ref.case(kind)
    block = ref.block_of(model)
    metric, damped = ref.kron_reference(kind, model, x, t, loss_fn, normalizer)
    u = ref.per_sample_gradients(model, x, t, loss_fn, normalizer, block)
    if name == "kfac":
        expected = torch.linalg.solve(damped, u.mean(0))
    else:
        expected = ref.dense_fop(u[:ref.N1].mean(0), u[ref.N1:].mean(0), ref.N1, ref.N, metric, damped)
    _, loss = run(name, model, x, t, loss_fn, fisher_type="fisher_emp")
    torch.testing.assert_close(loss, loss_fn(model(x), t))
    assert_close_rel(ref.flat_grad(block), expected, 1e-9)
