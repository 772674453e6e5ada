"""The hybrid protocol: the maker's preconditioned parameters and the rest, two optimizers stepped as one,
the runner's others_optimizer field; and the ViT of the model zoo under it."""
import copy

import asdl
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fop_asdl import make_gradient_maker
from fop_asdl.cli.config import ConfigError, build_config
from fop_asdl.cli.protocol import RunSpec, build_gradient_maker, build_optimizer
from fop_asdl.optim.hybrid import HybridOptimizer, other_parameters, preconditioned_parameters
from fop_asdl.models import VisionTransformer, build_model

from scaffold import step

NORMS = [nn.LayerNorm]


def small_vit(**kwargs):
    torch.manual_seed(0)
    return VisionTransformer(dim=16, depth=1, heads=2, **kwargs)


def names(model, params):
    ids = {id(p) for p in params}
    return [n for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("method", ["fop", "kfac"])
def test_split_of_the_vit(method):
    model = small_vit()
    gm = make_gradient_maker(method, model, asdl.PreconditioningConfig(ignore_modules=NORMS))
    pre, other = preconditioned_parameters(gm), other_parameters(gm)
    assert names(model, other) == ["cls_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
                                   "blocks.0.norm2.weight", "blocks.0.norm2.bias", "norm.weight", "norm.bias"]
    assert set(names(model, pre)) == {
        "patch_embed.weight", "patch_embed.bias", "blocks.0.self_attn.in_proj_weight",
        "blocks.0.self_attn.in_proj_bias", "blocks.0.self_attn.out_proj.weight", "blocks.0.self_attn.out_proj.bias",
        "blocks.0.linear1.weight", "blocks.0.linear1.bias", "blocks.0.linear2.weight", "blocks.0.linear2.bias",
        "head.weight", "head.bias"}


def test_split_with_asdls_own_makers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    gm = asdl.KfacGradientMaker(model, asdl.PreconditioningConfig(data_size=8, ignore_modules=NORMS))
    assert names(model, other_parameters(gm)) == ["1.weight", "1.bias"]
    assert names(model, preconditioned_parameters(gm)) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    plain = asdl.GradientMaker(model)
    assert preconditioned_parameters(plain) == [] and len(other_parameters(plain)) == 6


def test_hybrid_optimizer_steps_and_schedules_each_part():
    model = small_vit()
    twin = copy.deepcopy(model)
    config = asdl.PreconditioningConfig(damping=1e-2, ignore_modules=NORMS)
    gm = make_gradient_maker("fop", model, config, fisher_type="fisher_emp")  # no sampling: both runs agree
    gm_twin = make_gradient_maker("fop", twin, config, fisher_type="fisher_emp")

    def parts(g):
        return (torch.optim.SGD(preconditioned_parameters(g), lr=0.05, momentum=0.9),
                torch.optim.AdamW(other_parameters(g), lr=1e-3, weight_decay=0.05))

    hybrid, separate = HybridOptimizer(*parts(gm)), parts(gm_twin)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(hybrid, 4)
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, 4) for o in separate]
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 1, 28, 28, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    for _ in range(2):
        hybrid.zero_grad()
        for o in separate:
            o.zero_grad()
        step(gm, model, x, t)
        step(gm_twin, twin, x, t)
        hybrid.step()
        for o in separate:
            o.step()
        for s in [schedule] + schedules:
            s.step()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, msg=name)
    assert hybrid.optimizers[1].param_groups[0]["lr"] == pytest.approx(1e-3 * (1 + 0) / 2)
    state = hybrid.state_dict()
    again = HybridOptimizer(*parts(gm))
    again.load_state_dict(state)
    assert again.optimizers[1].state_dict()["state"].keys() == hybrid.optimizers[1].state_dict()["state"].keys()


def test_hybrid_optimizer_refuses_shared_parameters():
    layer = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="preconditioned_parameters"):
        HybridOptimizer(torch.optim.SGD(layer.parameters(), lr=1), torch.optim.AdamW([layer.bias]))


def test_runner_field_builds_the_protocol():
    config = build_config(dict(model="vit", others_optimizer="adamw", others_lr=2e-3, base_batch=8))
    spec = RunSpec(config, "fop", 16, 0.01, 0)
    model = small_vit()
    gm = build_gradient_maker(spec, model, 16)
    opt = build_optimizer(spec, model, gm)
    sgd, adamw = opt.optimizers
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    assert sgd.param_groups[0]["lr"] == pytest.approx(0.02) and adamw.param_groups[0]["lr"] == pytest.approx(4e-3)
    assert not any(isinstance(m, nn.LayerNorm) for _, m in gm.named_modules_for_curvature)
    assert names(model, adamw.param_groups[0]["params"])[:2] == ["cls_token", "pos_embed"]
    assert not isinstance(build_optimizer(RunSpec(config, "adamw", 16, 0.01, 0), model, gm), HybridOptimizer)
    with pytest.raises(ConfigError, match="others_optimizer"):
        build_config(dict(others_optimizer="adam"))


@pytest.mark.parametrize("image_size,channels", [(28, 1), (32, 3)])
def test_vit_shapes_and_errors(image_size, channels):
    model = build_model("vit", in_channels=channels, image_size=image_size, num_classes=7)
    assert model(torch.randn(2, channels, image_size, image_size)).shape == (2, 7)
    assert model.pos_embed.shape[1] == (image_size // 4) ** 2 + 1
    assert 100_000 < sum(p.numel() for p in model.parameters()) < 200_000
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(image_size=image_size, patch_size=5)


def test_vit_loss_falls_under_fop_and_adamw():
    model = small_vit()
    gm = make_gradient_maker("fop", model, asdl.PreconditioningConfig(damping=1e-1, ignore_modules=NORMS))
    opt = HybridOptimizer(torch.optim.SGD(preconditioned_parameters(gm), lr=0.05, momentum=0.9),
                          torch.optim.AdamW(other_parameters(gm), lr=3e-3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=gen)
    t = (x[:, 0, :14].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :14].mean((1, 2)) > 0).long()  # 4 learnable classes
    first = F.cross_entropy(model(x), t).item()
    for _ in range(20):
        opt.zero_grad()
        step(gm, model, x, t)
        opt.step()
    assert F.cross_entropy(model(x), t).item() < 0.6 * first  # (at this lr it stalls near the class prior)
