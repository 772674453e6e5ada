"""SENG: against its sketch written densely with the same draws (float64; Conv2d with a truncated SVD,
Linear + bias and Linear with sampled features), equal to SMW-NG without a sketch, an unbiased sketched
Gram, and ASDL 0.1a5's SENG, which comes out ≈ g/λ."""
import copy
import math
import warnings

import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from fop_asdl.methods import seng_math

from scaffold import quiet_maker as maker
from second_order_helpers import BLOCKS, batch, block_grad, config, net, patches, per_sample_gradients, step



def output_gradients(model, x, t, block):
    """Each sample's own loss gradient at the block's output, (n, S, O), via autograd."""
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    loss = F.cross_entropy(model(x), t)
    handle.remove()
    (z,) = torch.autograd.grad(loss, seen["out"])
    z = z * x.shape[0]
    return z.flatten(2).transpose(1, 2) if z.dim() == 4 else z[:, None, :]


def block_input(model, x, block):
    seen = {}
    handle = block.register_forward_hook(lambda m, a, out: seen.__setitem__("x", a[0].detach()))
    model(x)
    handle.remove()
    return seen["x"]


def dense_seng(model, x, t, block, damping, rank, in_index, out_index):
    """(1/λ)(g − U (λn + K̂)⁻¹ K̂1/n... ) written out: each sample's truncated gradient as an O×(I+1) matrix
    (SVD of its output gradient over positions), the sampled rows and columns scaled by sqrt(D/s), K̂ their
    Gram, and the exact U of the autograd loop outside."""
    p, z = patches(block, block_input(model, x, block)), output_gradients(model, x, t, block)
    sketched = []
    for m in range(x.shape[0]):
        left, values, right = torch.linalg.svd(z[m], full_matrices=False)  # z_m (S, O)
        keep = min(rank or len(values), len(values))
        u_m = sum(values[k] * torch.outer(right[k], p[m].T @ left[:, k]) for k in range(keep))  # (O, I+1)
        if out_index is not None:
            u_m = u_m[out_index] * math.sqrt(z.shape[2] / len(out_index))
        if in_index is not None:
            u_m = u_m[:, in_index] * math.sqrt(p.shape[2] / len(in_index))
        sketched.append(u_m.reshape(-1))
    sketched = torch.stack(sketched)
    n = x.shape[0]
    gram = sketched @ sketched.T
    u = per_sample_gradients(model, x, t, block)
    c = torch.linalg.solve(damping * torch.eye(n, dtype=u.dtype) + gram / n, gram.sum(1) / n)
    return (u.mean(0) - u.T @ c / n) / damping


def test_without_a_sketch_it_is_smw_ng():
    torch.manual_seed(0)
    reference = net().double()
    grads = []
    for name, options in (("seng", {"sketching_size": 10 ** 6, "truncated_rank": None}), ("smw_ng", {})):
        model = copy.deepcopy(reference)
        step(maker(name, model, config(), **options), model, *batch(0))
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):  # the same math; the Gram of a Conv2d by another route (its rows, not conv2d_gram)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("sketching_size, rank", [(4, 2), (2, 1), (10 ** 6, 3)])
def test_equals_its_sketch_written_densely(sketching_size, rank):
    torch.manual_seed(0)
    model = net().double()
    x, t = batch(0)
    lam = 1e-2
    m = maker("seng", model, config(damping=lam), sketching_size=sketching_size, truncated_rank=rank, seed=3)
    step(m, model, x, t)
    worst = 0.0
    for index in BLOCKS:
        in_index, out_index = m._step_plan.sketch[str(index)]
        expected = dense_seng(model, x, t, model[index], lam, rank, in_index, out_index)
        error = float((block_grad(model[index]) - expected).abs().max() / expected.abs().max())
        worst = max(worst, error)
        assert error < 1e-10, (index, error)
    print(f"SENG vs dense sketch (s={sketching_size}, r={rank}): max relative error {worst:.2e}")
    sizes = [(model[i].weight[0].numel() + (model[i].bias is not None), model[i].weight.shape[0]) for i in BLOCKS]
    for (width, out), (in_index, out_index) in zip(sizes, m._step_plan.sketch.values()):
        for size, index in ((width, in_index), (out, out_index)):
            if sketching_size >= size:
                assert index is None
            else:
                assert len(index) == sketching_size == len(set(index.tolist())) and int(index.max()) < size


def test_sketched_gram_is_unbiased():
    """E over the feature draws of K̂ equals the Gram of the (truncated) per-sample gradients; ASDL's and
    SENG's D/s scaling would overshoot it by D/s (here 3 and 5)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(5, 2, 12, generator=gen, dtype=torch.float64)
    z = torch.randn(5, 2, 20, generator=gen, dtype=torch.float64)
    exact = seng_math.sketched_gram(p, z, None, None, None)
    draws = torch.Generator().manual_seed(1)
    total = torch.zeros_like(exact)
    trials = 4000
    for _ in range(trials):
        total += seng_math.sketched_gram(p, z, seng_math.draw_features(12, 4, draws, p.device),
                                         seng_math.draw_features(20, 4, draws, p.device), None)
    assert float((total / trials - exact).abs().max() / exact.abs().max()) < 0.05


def test_asdl_seng_is_about_g_over_damping():
    """ASDL 0.1a5's SENG on one Linear layer without a sketch: ≈ g/λ, far from (F + λI)⁻¹g, which this SENG
    gives."""
    torch.manual_seed(0)
    reference = nn.Sequential(nn.Linear(4, 3)).double()  # (ASDL's SENG cannot take a bare layer)
    x, t = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    lam = 0.1
    theirs_model, ours_model = copy.deepcopy(reference), copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = asdl.SengGradientMaker(theirs_model, asdl.PreconditioningConfig(data_size=6, damping=lam))
        step(theirs, theirs_model, x, t)
    step(maker("seng", ours_model, asdl.PreconditioningConfig(damping=lam)), ours_model, x, t)
    u = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
        F.cross_entropy(reference(x[j:j + 1]), t[j:j + 1]), list(reference.parameters()))]) for j in range(6)])
    g = u.mean(0)
    dense = torch.linalg.solve(u.T @ u / 6 + lam * torch.eye(u.shape[1], dtype=u.dtype), g)
    asdl_d = torch.cat([p.grad.reshape(-1) for p in theirs_model.parameters()])
    ours = torch.cat([p.grad.reshape(-1) for p in ours_model.parameters()])
    assert float((asdl_d - g / lam).norm() / (g / lam).norm()) < 0.1
    assert float((asdl_d - dense).norm() / dense.norm()) > 0.5
    torch.testing.assert_close(ours, dense, rtol=1e-10, atol=1e-14)


def test_kl_clip_is_refused_with_the_reason_and_sizes_are_checked():
    with pytest.raises(TypeError, match="not F̃⁻¹g"):
        fop_asdl.make_gradient_maker("seng", net(), config(), kl_clip=1e-3, lr=0.1)
    with pytest.raises(ValueError, match="sketching_size"):
        fop_asdl.make_gradient_maker("seng", net(), config(), sketching_size=0)
    with pytest.raises(ValueError, match="truncated_rank"):
        fop_asdl.make_gradient_maker("seng", net(), config(), truncated_rank=2.5)
