"""K-BFGS against the paper's update written densely (float64, Linear, Linear + bias, Conv2d), its BFGS and
damping pieces against their defining properties, and ASDL 0.1a5's defects shown on ASDL itself."""
import copy
import math
import warnings

import asdl
import pytest
import torch
import torch.nn.functional as F
from asdl.precondition.kbfgs import bfgs_inv_update_
from torch import nn

import fop_asdl
from fop_asdl.methods import kbfgs_math

from second_order_helpers import BLOCKS, LR, batch, config, net, patches, step


def measure(model, x, t):
    """Per block: A = mean ã ãᵀ, ā, h̄ (the outputs' mean), ḡ (mean of n·∂L/∂h: each sample's own loss
    gradient) and [∇W | ∇b] of the mean loss, all by autograd and hooks."""
    inputs, outputs = {}, {}

    def keep(i):
        def hook(module, args, out):
            inputs[i], outputs[i] = args[0], out
        return hook

    handles = [model[i].register_forward_hook(keep(i)) for i in BLOCKS]
    loss = F.cross_entropy(model(x), t)
    for h in handles:
        h.remove()
    params = [p for i in BLOCKS for p in (model[i].weight, model[i].bias) if p is not None]
    grads = torch.autograd.grad(loss, [outputs[i] for i in BLOCKS] + params)
    out_grads, param_grads = grads[:len(BLOCKS)], list(grads[len(BLOCKS):])
    result = {}
    for i, z in zip(BLOCKS, out_grads):
        block, n = model[i], x.shape[0]
        rows = patches(block, inputs[i])
        flat = rows.reshape(-1, rows.shape[-1])
        dims = (0,) if z.dim() == 2 else (0, 2, 3)
        grad_w = param_grads.pop(0).reshape(block.weight.shape[0], -1)
        grad = grad_w if block.bias is None else torch.cat([grad_w, param_grads.pop(0)[:, None]], 1)
        result[i] = dict(A=flat.T @ flat / flat.shape[0], a=flat.mean(0), h=outputs[i].detach().mean(dims),
                         g=(n * z).mean(dims), G=grad, S=rows.shape[1])
    return result


def bfgs(h, s, y):
    """The textbook product form of BFGS on the inverse."""
    rho = 1 / (s @ y)
    eye = torch.eye(len(s), dtype=h.dtype)
    return (eye - rho * torch.outer(s, y)) @ h @ (eye - rho * torch.outer(y, s)) + rho * torch.outer(s, s)


def double_damping(h, s, y, mu1, mu2):
    """The paper's DD with Python branches."""
    if s @ y < mu1 * (y @ h @ y):
        theta = (1 - mu1) * (y @ h @ y) / (y @ h @ y - s @ y)
        s = theta * s + (1 - theta) * h @ y
    if s @ y < mu2 * (s @ s):
        theta = (1 - mu2) * (s @ s) / (s @ s - s @ y)
        y = theta * y + (1 - theta) * s
    return s, y


def dense_kbfgs(model, batches, steps, damping, ema, mu1=0.2):
    """Train with SGD (no momentum) on the paper's K-BFGS written densely: every step's [Δ] per block."""
    state, history = {}, []
    for i in steps:
        x, t = batches(i)
        now = measure(model, x, t)
        deltas = {}
        for b, m in now.items():
            pixels = m["S"] if isinstance(model[b], nn.Conv2d) else 1
            lam_a, lam_g = math.sqrt(damping * pixels), math.sqrt(damping / pixels)
            if b not in state:
                a = m["A"]
                h_a = torch.linalg.inv(a + lam_a * torch.eye(len(a), dtype=a.dtype))
                h_g = torch.eye(m["G"].shape[0], dtype=a.dtype)
            else:
                a_old, h_a, h_g = state[b]
                a = m["A"] if ema == -1 else (1 - ema) * a_old + ema * m["A"]
            kron = torch.kron(h_g.contiguous(), h_a.contiguous())
            delta = (kron @ m["G"].reshape(-1)).reshape(m["G"].shape)  # (H_g ⊗ H_a) vec G
            deltas[b] = delta
            state[b] = (a, h_a, h_g, lam_a, lam_g)
        ahead = copy.deepcopy(model)
        with torch.no_grad():
            for b, delta in deltas.items():
                block = ahead[b]
                block.weight -= LR * delta[:, :block.weight[0].numel()].reshape(block.weight.shape)
                if block.bias is not None:
                    block.bias -= LR * delta[:, -1]
        later = measure(ahead, x, t)
        for b, (a, h_a, h_g, lam_a, lam_g) in state.items():
            s, y = double_damping(h_g, later[b]["h"] - now[b]["h"], later[b]["g"] - now[b]["g"], mu1, lam_g)
            s_a = h_a @ now[b]["a"]
            state[b] = (a, bfgs(h_a, s_a, a @ s_a + lam_a * s_a), bfgs(h_g, s, y))
        with torch.no_grad():  # the optimizer's step: the same as the lookahead's
            for b, delta in deltas.items():
                model[b].weight.copy_(ahead[b].weight)
                if model[b].bias is not None:
                    model[b].bias.copy_(ahead[b].bias)
        history.append({b: d.detach() for b, d in deltas.items()})
    return history, state


def maker_deltas(model, maker, steps, batches):
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    history = []
    for i in steps:
        x, t = batches(i)
        opt.zero_grad(set_to_none=True)
        step(maker, model, x, t)
        history.append({b: torch.cat([model[b].weight.grad.reshape(model[b].weight.shape[0], -1)]
                                     + ([model[b].bias.grad[:, None]] if model[b].bias is not None else []), 1)
                        for b in BLOCKS})
        opt.step()
    return history


@pytest.mark.parametrize("ema", [-1, 0.3])
def test_equals_the_paper_update_written_densely(ema):
    torch.manual_seed(0)
    reference = net().double()
    model = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maker = fop_asdl.make_gradient_maker("kbfgs", model, config(damping=0.05, ema_decay=ema), lr=LR)
    got = maker_deltas(model, maker, range(5), batch)
    expected, state = dense_kbfgs(reference, batch, range(5), 0.05, ema)
    worst = 0.0
    for k, (a, e) in enumerate(zip(got, expected)):
        for b in BLOCKS:
            error = float((a[b] - e[b]).abs().max() / e[b].abs().max())
            worst = max(worst, error)
            assert error < 1e-9, (k, b, error)
    for b in BLOCKS:  # and the factors after five updates
        a, h_a, h_g = maker.factors[str(b)]
        for mine, theirs in ((a, state[b][0]), (h_a, state[b][1]), (h_g, state[b][2])):
            torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-12)
    print(f"K-BFGS vs dense ({ema=}): max relative error {worst:.2e}")


def test_bfgs_update_satisfies_the_secant_equation_and_asdl_leaves_h_unchanged():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    h = q @ q.T + torch.eye(5, dtype=torch.float64)
    s, y = torch.randn(5, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)
    s, y = kbfgs_math.double_damping(h, s, y, 0.2, 0.1)
    new = kbfgs_math.bfgs_inverse_update(h, s, y)
    torch.testing.assert_close(new @ y, s)  # H⁺ y = s
    torch.testing.assert_close(new, bfgs(h, s, y))
    assert torch.linalg.eigvalsh(new).min() > 0
    asdl_h = h.clone()
    bfgs_inv_update_(asdl_h, s.clone(), y.clone())  # ASDL 0.1a5: updates a symmetrised copy
    assert torch.equal(asdl_h, h)


def test_bfgs_update_of_a_tiny_pair_is_finite_and_exactly_scale_free():
    """Behind a training-mode BatchNorm ḡ = 0, so K-BFGS's pair is ~1e-10 in float32 (CIFAR ResNet-18): ρ² of
    the textbook formula overflowed to Inf there. H⁺ does not change when s and y scale together."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    h = q @ q.T / 6 + torch.eye(6, dtype=torch.float64)
    s, y = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    s, y = kbfgs_math.double_damping(h, s, y, 0.2, 0.1)
    exact = bfgs(h, s, y)  # the dense reference on the well-scaled pair, float64
    for power in (-40, -20, 0, 20):  # scaling by a power of two is exact: the same update bit for bit
        assert torch.equal(kbfgs_math.bfgs_inverse_update(h, s * 2.0 ** power, y * 2.0 ** power),
                           kbfgs_math.bfgs_inverse_update(h, s, y))
    tiny = kbfgs_math.bfgs_inverse_update(h.float(), (s * 1e-10).float(), (y * 1e-10).float())
    assert torch.isfinite(tiny).all()
    torch.testing.assert_close(tiny.double(), exact, rtol=1e-4, atol=1e-5)


def test_double_damping_leaves_a_good_pair_alone_and_fixes_a_bad_one():
    h = torch.eye(3, dtype=torch.float64)
    s, y = torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([2.0, 0, 0], dtype=torch.float64)
    s2, y2 = kbfgs_math.double_damping(h, s, y, 0.2, 0.1)
    assert torch.equal(s2, s) and torch.equal(y2, y)
    bad = torch.tensor([-1.0, 0.5, 0], dtype=torch.float64)  # negative curvature along s
    s3, y3 = kbfgs_math.double_damping(h, s, bad, 0.2, 0.1)
    assert s3 @ y3 >= 0.1 * (s3 @ s3) - 1e-12 and s3 @ bad >= 0.2 * (bad @ h @ bad) - 1e-12
    zero = torch.zeros(3, dtype=torch.float64)  # parameters that did not move: H stays as it is
    assert torch.equal(kbfgs_math.bfgs_inverse_update(h, *kbfgs_math.double_damping(h, zero, zero, 0.2, 0.1)), h)


def test_ema_minus_one_keeps_the_batch_a_and_inverses_move():
    torch.manual_seed(0)
    model = net().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maker = fop_asdl.make_gradient_maker("kbfgs", model, config(ema_decay=-1), lr=LR)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    first = None
    for i in range(3):
        x, t = batch(i)
        expected = measure(model, x, t)
        opt.zero_grad()
        step(maker, model, x, t)
        opt.step()
        for b in BLOCKS:
            torch.testing.assert_close(maker.factors[str(b)][0], expected[b]["A"])  # not 2·A_old − A_new
        if first is None:
            first = {b: [f.clone() for f in maker.factors[str(b)]] for b in BLOCKS}
    for b in BLOCKS:  # H_a and H_g changed after step 0 (ASDL's never do)
        assert not torch.allclose(maker.factors[str(b)][1], first[b][1])
        assert not torch.allclose(maker.factors[str(b)][2], first[b][2])


def test_asdl_kbfgs_defects_as_measured():
    """What issue 23 reports, on ASDL 0.1a5 itself (float32: in float64 it fails on a float32 identity):
    A_inv never changes after step 0, B_inv stays the identity, ema_decay=-1 makes A = 2·A_0 − A_1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    maker = asdl.KronBfgsGradientMaker(model, asdl.PreconditioningConfig(data_size=8, damping=1e-2))
    xs, ts = [torch.randn(8, 4) for _ in range(3)], [torch.randint(0, 3, (8,)) for _ in range(3)]
    inverses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for x, t in zip(xs, ts):
            step(maker, model, x, t)
            kron = model[0].bfgs.kron
            inverses.append((kron.A_inv.clone(), None if kron.B_inv is None else kron.B_inv.clone()))
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
    assert torch.equal(inverses[0][0], inverses[2][0])
    assert torch.equal(inverses[2][1], torch.eye(3))
    a0, a1, a2 = (x.T @ x / 8 for x in xs)  # (its A leaves out the bias's homogeneous coordinate)
    torch.testing.assert_close(model[0].bfgs.kron.A, 2 * (2 * a0 - a1) - a2)


def test_lr_is_required_and_kl_clip_is_refused_with_the_reason():
    with pytest.raises(TypeError, match="needs the learning rate"):
        fop_asdl.make_gradient_maker("kbfgs", net(), config())
    with pytest.raises(TypeError, match="not a Fisher"):
        fop_asdl.make_gradient_maker("kbfgs", net(), config(), lr=0.1, kl_clip=1e-3, )
