"""Shared parameters on every maker: a parameter used by several modules (a tied embedding and LM head, one
weight in two layers) receives the sum of the contributions of all its uses, each use treated by its own
block: preconditioned where that block has curvature, the plain gradient where it has none. Checked in the
damped limit (F̃⁻¹ → 1/λ), where each use's contribution is known from autograd alone.

Shampoo preconditions parameters, not the modules using them: a tied weight is one Shampoo parameter whose
gradient (the sum of its uses) is preconditioned as a whole, (L + λI)^(−1/4) G (R + λI)^(−1/4) → G / √λ. Its
tests check that sum, all uses kept (:func:`tied_expectation`)."""
import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fop_asdl
from scaffold import token_ce
from fop_asdl.curvature.inverses import kron_damping

METHODS = ["sgd", "kfac", "fop", "fngd", "hylo", "ekfac", "shampoo"]
#: The methods whose blocks include an Embedding (docs/layers.md).
EMBEDDING_BLOCKS = ("kfac", "fop", "fngd", "hylo")
LAMBDA = 1e16
V, H, B, T = 7, 5, 6, 3


class TiedLM(nn.Module):
    """A GPT-style tie: the LM head's weight is the token embedding's (``head.weight = emb.weight``)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.mix = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens, weight_for=None):
        """``weight_for`` = (embedding's, head's) weight: the test's way to see each use's part alone."""
        if weight_for is None:
            return self.head(torch.tanh(self.mix(self.emb(tokens))))
        h = torch.tanh(self.mix(F.embedding(tokens, weight_for[0])))
        return F.linear(h, weight_for[1])


class TwinLinear(nn.Module):
    """One square weight in two Linear layers: both uses are preconditioned blocks."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(H, H)
        self.second = nn.Linear(H, H)
        self.second.weight = self.first.weight
        self.out = nn.Linear(H, V)

    def forward(self, x):
        return self.out(torch.tanh(self.second(torch.tanh(self.first(x)))))


class FunctionalTie(nn.Module):
    """The tie written functionally: only the head is a module, its weight also embeds the tokens through
    ``F.embedding`` (no module holds it twice, so only a step can see the other use)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(H, H)
        self.head = nn.Linear(H, V, bias=False)

    def forward(self, tokens, weight_for=None):
        emb_weight, head_weight = weight_for or (self.head.weight, None)
        h = torch.tanh(self.mix(F.embedding(tokens, emb_weight)))
        return self.head(h) if head_weight is None else F.linear(h, head_weight)


def make(name, model, micro_batch_size=None, ignore=()):
    config = asdl.PreconditioningConfig(damping=LAMBDA, curvature_upd_interval=1, preconditioner_upd_interval=1,
                                        ignore_modules=list(ignore))
    options = {"fop": dict(beta=0.0, eta=None), "fngd": dict(iters_per_epoch=1, damping_mode="fixed"),
               "hylo": dict(switch_policy="kis", compression_ratio=1.0)}.get(name, {})
    return fop_asdl.make_gradient_maker(name, model, None if name == "sgd" else config,
                                        micro_batch_size=micro_batch_size, **options)


def tied_expectation(name, via_head, via_emb, emb="block"):
    """(c, e): the tied weight's c·p.grad in the damped limit is e. The head's use preconditioned (a block's
    F̃⁻¹ → 1/λ); the embedding's too where ``emb`` is "block" and the method has Embedding blocks, plain where it
    is "ignored" (by the user) or "functional" (no module). Shampoo preconditions the parameter, both uses
    together, by 1/√λ, unless a module holding it is ignored."""
    if name == "shampoo":
        return (1.0 if emb == "ignored" else LAMBDA ** 0.5), via_head + via_emb
    scale = 1.0 if name == "sgd" else LAMBDA
    return 1.0, via_head / scale + via_emb / (scale if emb == "block" and name in EMBEDDING_BLOCKS else 1.0)


def run(gm, model, x, t, loss_fn):
    gm.setup_loss_call(loss_fn, gm.setup_model_call(model, x), t)
    return gm.forward_and_backward()


def scale_of(gm, name, param, module):
    """λ, or for a K-FAC/FOP bias d_B of the π-split (ASDL applies (B + d_B I)⁻¹ to it alone); EKFAC's bias as
    its weight (U_B diag(1/(s_b + λ)) U_Bᵀ → 1/λ); Shampoo's √λ (its roots → λ^(−1/4) on both sides)."""
    if name == "sgd":
        return 1.0
    if name == "shampoo":
        return LAMBDA ** 0.5
    if name in ("kfac", "fop") and param is getattr(module, "bias", None):
        return kron_damping(module.fisher.kron, LAMBDA)[1]
    return LAMBDA


@pytest.mark.filterwarnings("ignore:fop_asdl")
@pytest.mark.parametrize("emb", ["block", "ignored"])
@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("name", METHODS)
def test_tied_embedding_and_head_get_both_parts(name, micro_batch_size, emb):
    """The head is a block, and the embedding one too (p.grad = both parts / λ) or, ignored by the user, not
    (p.grad = (head's part) / λ + (embedding's part))."""
    torch.manual_seed(0)
    model = TiedLM().double()
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen)
    w = model.emb.weight
    via_head = torch.autograd.grad(token_ce(model(x, (w.detach(), w)), t), w)[0]
    via_emb = torch.autograd.grad(token_ce(model(x, (w, w.detach())), t), w)[0]
    gm = make(name, model, micro_batch_size, ignore=["emb"] if emb == "ignored" else ())
    run(gm, model, x, t, token_ce)
    scale, expected = tied_expectation(name, via_head, via_emb, emb)
    torch.testing.assert_close(w.grad * scale, expected, rtol=1e-6, atol=1e-12)
    assert via_emb.norm() > 0.1 * via_head.norm()  # both parts matter: dropping one would fail


@pytest.mark.parametrize("micro_batch_size", [None, 4])
@pytest.mark.parametrize("name", METHODS)
def test_a_weight_in_two_blocks_gets_the_full_gradient_in_the_damped_limit(name, micro_batch_size):
    """Every use preconditioned: the damped limit is autograd's gradient, so no use was dropped."""
    torch.manual_seed(0)
    model = TwinLinear().double()
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(B, H, generator=gen, dtype=torch.float64), torch.randint(0, V, (B,), generator=gen)
    expected = torch.autograd.grad(F.cross_entropy(model(x), t), list(model.parameters()))
    gm = make(name, model, micro_batch_size)
    run(gm, model, x, t, F.cross_entropy)
    owners = {id(p): m for m in model.modules() for p in m.parameters(recurse=False)}
    for p, g in zip(model.parameters(), expected):
        scale = scale_of(gm, name, p, owners[id(p)])
        torch.testing.assert_close(p.grad * scale, g, rtol=1e-6, atol=1e-9 * float(g.abs().max()))


@pytest.mark.filterwarnings("ignore:fop_asdl")
@pytest.mark.parametrize("net, emb", [(TiedLM, "block"), (TiedLM, "ignored"), (FunctionalTie, "functional")])
@pytest.mark.parametrize("name", ["kfac", "fop", "fngd", "hylo", "ekfac", "shampoo"])
def test_hylo_and_the_others_keep_both_parts_between_curvature_steps(name, net, emb):
    """Between curvature updates (K-FAC and HyLo capture only the blocks known to be shared there: by the
    model's structure, or by a plain part seen on a curvature step) the tie stays exact, with the tied
    embedding a block or ignored by the user (a functional tie's embedding is no module, so never a block)."""
    torch.manual_seed(0)
    model = net().double()
    config = asdl.PreconditioningConfig(damping=LAMBDA, curvature_upd_interval=3, preconditioner_upd_interval=3,
                                        ignore_modules=["emb"] if emb == "ignored" else [])
    options = {"fop": dict(beta=0.0, eta=None), "fngd": dict(iters_per_epoch=1, damping_mode="fixed"),
               "hylo": dict(switch_policy="kis", compression_ratio=1.0)}.get(name, {})
    gm = fop_asdl.make_gradient_maker(name, model, config, **options)
    gen = torch.Generator().manual_seed(1)
    w = model.head.weight
    for _ in range(2):  # a curvature (refresh) step, then a plain one (EKFAC: stored bases, Shampoo: stored roots)
        x, t = torch.randint(0, V, (B, T), generator=gen), torch.randint(0, V, (B, T), generator=gen)
        via_head = torch.autograd.grad(token_ce(model(x, (w.detach(), w)), t), w)[0]
        via_emb = torch.autograd.grad(token_ce(model(x, (w, w.detach())), t), w)[0]
        run(gm, model, x, t, token_ce)
        scale, expected = tied_expectation(name, via_head, via_emb, emb)
        torch.testing.assert_close(w.grad * scale, expected, rtol=1e-6, atol=1e-12)
