"""kl_clip: the step's squared F̃-norm is bounded by κ/lr², ν follows the learning rate, and the one-name
swap from K-FAC to FOP at K-FAC's learning rate trains with it where it fails without."""
import copy
import math
import statistics
from typing import List, NamedTuple

import asdl
import pytest
import torch
from torch import nn

import fop_asdl
from fop_asdl.data.arrays import load_fashion_mnist_subset
from fop_asdl.models import Mixer

from scaffold import config, step

LR = 0.1


def pair(name, kl_clip, lr, image_batch):
    """An unclipped and a clipped maker with the same curvature (one identical warm-up step each)."""
    x, t = image_batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False)).double()
    models = [model, copy.deepcopy(model)]
    makers = [fop_asdl.make_gradient_maker(name, models[0], config(), fisher_type="fisher_emp"),
              fop_asdl.make_gradient_maker(name, models[1], config(), fisher_type="fisher_emp",
                                           kl_clip=kl_clip, lr=lr)]
    for m, gm in zip(models, makers):
        step(gm, m, x, t)
    return models, makers


def fisher_norm(model, maker) -> torch.Tensor:
    """Σ_l vec(Δ_l)ᵀ F̃_l vec(Δ_l) with the dense F̃_l = inv(B⁻¹) ⊗ inv(A⁻¹) of the inverses the maker applied."""
    total = torch.zeros((), dtype=torch.float64)
    for _, module in maker.named_modules_for_curvature:
        kron = module.fisher.kron
        dense = torch.kron(torch.linalg.inv(kron.B_inv), torch.linalg.inv(kron.A_inv))
        delta = module.weight.grad.reshape(-1)
        total = total + delta @ dense @ delta
    return total


@pytest.mark.parametrize("name", ["fop", "kfac"])
@pytest.mark.parametrize("kl_clip", [1e-4, 1e3])
def test_nu_scales_the_step_to_the_trust_region(image_batch, name, kl_clip):
    (plain_model, clipped_model), (plain, clipped) = pair(name, kl_clip, LR, image_batch)
    x, t = image_batch
    for _ in range(2):  # a plain step, then a curvature step
        for m, gm in ((plain_model, plain), (clipped_model, clipped)):
            step(gm, m, x, t)
        norm = fisher_norm(plain_model, plain)
        nu = torch.clamp(torch.sqrt(kl_clip / (LR ** 2 * norm)), max=1.0)
        torch.testing.assert_close(clipped.last_nu, nu, rtol=1e-10, atol=0)
        assert (float(nu) < 1) == (kl_clip < 1)  # the small bound clips, the large one leaves the step alone
        for p, q in zip(plain_model.parameters(), clipped_model.parameters()):
            torch.testing.assert_close(q.grad, nu * p.grad, rtol=1e-10, atol=0)
        assert float(LR ** 2 * fisher_norm(clipped_model, clipped)) <= kl_clip * (1 + 1e-9)


def test_nu_follows_the_learning_rate_of_a_scheduler(image_batch):
    x, t = image_batch
    optimizers = []  # the maker reads the lr of the optimizer built after it
    (_, model), (_, maker) = pair("fop", 1e-4, lambda: optimizers[0].param_groups[0]["lr"] if optimizers else LR,
                                  image_batch)
    (_, model_half), (_, maker_half) = pair("fop", 1e-4, LR / 2, image_batch)
    optimizers.append(torch.optim.SGD(model.parameters(), lr=LR))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizers[0], step_size=1, gamma=0.5)
    optimizers[0].zero_grad(set_to_none=True)
    optimizers[0].step()  # no gradients: the weights stay; the scheduler then halves the lr
    scheduler.step()
    step(maker, model, x, t)
    step(maker_half, model_half, x, t)
    assert float(maker.last_nu) < 1
    torch.testing.assert_close(maker.last_nu, maker_half.last_nu, rtol=0, atol=0)


@pytest.mark.parametrize("options, message", [(dict(kl_clip=1e-3), "needs the learning rate"),
                                              (dict(kl_clip=-1.0, lr=0.1), "positive float"),
                                              (dict(kl_clip=1e-3, lr=0.0), "lr must be")])
def test_bad_kl_clip_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        fop_asdl.make_gradient_maker("fop", nn.Linear(3, 2), config(), **options)


class MixerRun(NamedTuple):
    accuracy: float
    losses: List[float]  # the mean training loss of every step
    nus: List[float]     # ν of every step (1.0 without kl_clip)
    norms: List[float]   # lr² Σ_l ‖Δ_l‖²_F̃ of every step's preconditioned gradient before ν scales it


def mixer_run(name, kl_clip, epochs=3, lr=0.05) -> MixerRun:
    """The swap trial of scripts/swap_trial.py on the packaged subset: K-FAC's settings for every run."""
    data = load_fashion_mnist_subset()
    torch.manual_seed(0)
    model = Mixer()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    cfg = asdl.PreconditioningConfig(damping=0.1, ema_decay=0.1, curvature_upd_interval=5,
                                     preconditioner_upd_interval=5)
    extra = {} if kl_clip is None else {"kl_clip": kl_clip, "lr": lambda: opt.param_groups[0]["lr"]}
    maker = fop_asdl.make_gradient_maker(name, model, cfg, **extra)
    gen, losses, nus, norms = torch.Generator().manual_seed(0), [], [], []
    for _ in range(epochs):
        for idx in torch.randperm(len(data.y_train), generator=gen).split(BATCH):
            opt.zero_grad(set_to_none=True)
            _, loss = step(maker, model, data.x_train[idx], data.y_train[idx])
            losses.append(float(loss))
            nus.append(1.0 if kl_clip is None else float(maker.last_nu))
            # the KL terms FOP (and K-FAC) report are the blocks' ‖Δ_l‖²_F̃, those ν is computed from
            kl = [v for stats in maker.last_stats.values() for k, v in stats.items() if k.startswith("kl_")]
            norms.append(lr * lr * float(sum(kl)))
            opt.step()
    with torch.no_grad():
        accuracy = float((model(data.x_test).argmax(1) == data.y_test).float().mean())
    return MixerRun(accuracy, losses, nus, norms)


BATCH = 250
KAPPA = 0.02
CHANCE_LOSS = math.log(10)  # the cross-entropy of a uniform guess over the 10 classes


@pytest.mark.filterwarnings("ignore:fop_asdl. curvature of block")
def test_fop_at_kfac_learning_rate_trains_with_kl_clip_and_not_without():
    """The trust region's guarantees on every step, and divergence against training, each with a wide
    margin; not where a short run happens to end (a diverged run ended at 21.6 % against a former bound of
    20 %; K-FAC's highest loss at 2.71 against a former 2.76 with another seed), which rounding moves.

    Measured on 5 variants (as is; seeds 1 and 2 for the weights and the batch order; one torch thread; the
    initial weights perturbed by 1e-3, relative), against the bounds below: FOP's first step 3.6-6.9 κ
    (> 2 κ); unclipped FOP's largest lr²‖Δ‖²_F̃ 1.5e4-8.2e7 (> 20), its last-epoch losses 6.3e3-1.5e5
    (> 23); clipped FOP and K-FAC: highest loss 2.29-2.71 (< 4.6), last-epoch mean loss 0.76-0.90 (< 1.38),
    accuracy 66-73 % (> 40 %)."""
    kfac = mixer_run("kfac", None)
    unclipped = mixer_run("fop", None)
    clipped = mixer_run("fop", KAPPA)
    epoch = len(load_fashion_mnist_subset().y_train) // BATCH
    # Both FOP runs take the same first step: FOP's η* ≈ 2 makes it too large for the trust region, so the
    # clipped run scales it into the region (ν < 1/√2) and the unclipped one takes it in full.
    assert unclipped.norms[0] == pytest.approx(clipped.norms[0], rel=1e-5)
    assert unclipped.norms[0] > 2 * KAPPA and clipped.nus[0] < 0.75
    # Every clipped step: ν = min(1, sqrt(κ / lr²‖Δ‖²_F̃)), so the step taken has lr²‖νΔ‖²_F̃ ≤ κ, and ν < 1
    # exactly where the step is too large.
    for nu, norm in zip(clipped.nus, clipped.norms):
        assert nu == pytest.approx(min(1.0, math.sqrt(KAPPA / norm)), rel=1e-5)
        assert nu * nu * norm <= KAPPA * (1 + 1e-5)
        if norm > KAPPA * (1 + 1e-4):
            assert nu < 1
        elif norm < KAPPA * (1 - 1e-4):
            assert nu == 1
    # Without the bound FOP diverges: its steps grow far out of the trust region and its loss blows up to
    # ten times chance's on every step of the last epoch. (Where a diverged run's accuracy ends is noise.)
    assert max(unclipped.norms) > 1e3 * KAPPA
    assert min(unclipped.losses[-epoch:]) > 10 * CHANCE_LOSS
    # With it FOP trains, as K-FAC does at this learning rate: the loss never blows up (twice chance's at
    # most) and its last epoch is well below chance's, and the model predicts far above chance.
    for run in (kfac, clipped):
        assert max(run.losses) < 2 * CHANCE_LOSS
        assert statistics.fmean(run.losses[-epoch:]) < 0.6 * CHANCE_LOSS
        assert run.accuracy > 0.4
