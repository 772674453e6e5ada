"""FOP over EKFAC (issue 23 item 4) equals FOP_SPEC steps 1-8 written densely with EKFAC's dense curvature, and
with beta=0, eta=None it is "ekfac"."""
import asdl
import pytest
import torch

import fop_asdl

from dense_refs import dense_fop, unit_metric
from scaffold import conv_bn_ln_net, independent_net, small_image_batch, step
from engine_guarantees import assert_histories_close, failed_step_check, micro_batch_check, ranks_check, train
from test_ekfac import DAMPING, batches, per_sample, tiny_net


def dense_ekfac(g, kfac):
    """(F, F̃) of a block, dense: V diag(s) Vᵀ with V the eigenvectors of B ⊗ A (of B for a bias) and
    s = diag(Vᵀ F_emp V); LayerNorm's unit-wise F (kfac None). F̃ = F + λI in both cases."""
    if kfac is None:
        f = unit_metric(g)
    else:
        a, b = kfac
        n_w = a.shape[0] * b.shape[0]
        parts = [(torch.kron(b, a), g[:, :n_w])] + ([(b, g[:, n_w:])] if g.shape[1] > n_w else [])
        pieces = []
        for f_k, g_part in parts:
            vectors = torch.linalg.eigh(f_k)[1]
            pieces.append(vectors @ torch.diag(((g_part @ vectors) ** 2).mean(0)) @ vectors.T)
        f = torch.block_diag(*pieces)
    return f, f + DAMPING * torch.eye(len(f), dtype=f.dtype)


@pytest.mark.parametrize("projection_metric", ["undamped", "damped"])
def test_written_gradient_equals_dense_fop_with_ekfac_curvature(projection_metric):
    torch.manual_seed(0)
    model = tiny_net().double()
    x, t = batches(0)
    n, n1 = len(x), (len(x) + 1) // 2
    grads, kfac = per_sample(model, x, t, 1.0)
    maker = fop_asdl.make_gradient_maker("fop", model, asdl.PreconditioningConfig(damping=DAMPING), curvature="ekfac",
                                         projection_metric=projection_metric)
    step(maker, model, x, t)
    for name, g in grads.items():
        metric, damped = dense_ekfac(g, kfac.get(name))
        expected, _ = dense_fop(g[:n1].mean(0), g[n1:].mean(0), n1, n,
                                metric if projection_metric == "undamped" else damped, damped)
        module = getattr(model, name)
        written = torch.cat([p.grad.flatten() for p in (module.weight, module.bias) if p is not None])
        torch.testing.assert_close(written, expected, rtol=1e-7, atol=1e-10, msg=lambda m: f"block {name}: {m}")
        assert 0 < float(maker.last_stats[name]["eta"])


@pytest.mark.parametrize("curvature_every", [1, 2])
def test_beta_zero_and_no_eta_is_ekfac(curvature_every):
    """Also between curvature steps, where EKFAC takes autograd's sums and FOP captures its two halves."""
    cfg = asdl.PreconditioningConfig(damping=1e-2, ema_decay=0.2, curvature_upd_interval=curvature_every,
                                     preconditioner_upd_interval=2 * curvature_every)
    # 40 samples, more than any factor's size, so that the eigenbases are unique (see test_ekfac's micro-batches)
    steps = range(4 * curvature_every)
    ekfac = train("ekfac", independent_net, cfg, steps, lambda i: small_image_batch(i, 40))[0]
    fop = train("fop", independent_net, cfg, steps, lambda i: small_image_batch(i, 40), curvature="ekfac",
                beta=0.0, eta=None)[0]
    assert_histories_close(fop, ekfac, rtol=1e-9, atol=1e-13)


def test_micro_batches_and_rollback():
    """B1/B2 inside micro-batches equal the one-pass step; a failed step changes nothing."""
    cfg = asdl.PreconditioningConfig(damping=1e-2, ema_decay=0.2, curvature_upd_interval=1,
                                     preconditioner_upd_interval=2)
    micro_batch_check("fop", independent_net, cfg, 16, samples=40, curvature="ekfac")
    _, maker, model = train("fop", conv_bn_ln_net, cfg, range(2), dtype=torch.float32, curvature="ekfac")
    x, t = batches(9)
    failed_step_check(maker, model, x[:10].float(), t[:10], "inf_gradient")


def test_two_ranks_equal_one_process(tmp_path):
    """sub_batches="ranks" on 2 ranks: B1 is rank 0's samples, the first half of the global batch, as one
    process splits it."""
    options = {"config": dict(damping=1e-2, ema_decay=0.2, curvature_upd_interval=1, preconditioner_upd_interval=2),
               "maker": {"curvature": "ekfac", "sub_batches": "ranks"}}
    ranks_check(tmp_path, "fop", options, 2)


def test_unknown_curvature_and_other_fisher_types_are_refused():
    with pytest.raises(ValueError, match="'kfac' or 'ekfac'"):
        fop_asdl.make_gradient_maker("fop", independent_net(), curvature="shampoo")
    with pytest.raises(ValueError, match="fisher_emp"):
        fop_asdl.make_gradient_maker("fop", independent_net(), curvature="ekfac", fisher_type="fisher_mc")
