"""Models: output shapes, sizes, and that every parameter sits in a layer ASDL's K-FAC preconditions."""
import pytest
import torch
from torch import nn

from fop_asdl.models import (MLP, MODELS, PixelGPT, SmallCNN, VisionTransformer, build_model, resnet18_cifar,
                             resnet32_cifar)

PRECONDITIONED = (nn.Linear, nn.Conv2d, nn.BatchNorm2d, nn.LayerNorm)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, kwargs, input_shape, n_classes", [
    ("small_cnn", {}, (2, 1, 28, 28), 10),
    ("small_cnn", {"in_channels": 3, "image_size": 32, "num_classes": 100}, (2, 3, 32, 32), 100),
    ("mlp", {}, (2, 1, 28, 28), 10),
    ("mlp", {"in_features": 3 * 32 * 32, "hidden": (64, 32), "num_classes": 5}, (2, 3, 32, 32), 5),
    ("resnet18", {}, (2, 3, 32, 32), 10),
    ("resnet32", {}, (2, 3, 32, 32), 10),
    ("resnet32", {"num_classes": 100}, (2, 3, 32, 32), 100),
    ("mixer", {}, (2, 1, 28, 28), 10),
    ("mixer", {"in_channels": 3, "image_size": 32, "patch": 8, "num_classes": 100}, (2, 3, 32, 32), 100),
    ("gpt", {}, (2, 1, 28, 28), 10),
    ("gpt", {"in_channels": 3, "image_size": 32, "num_classes": 100}, (2, 3, 32, 32), 100),
])
def test_output_shape(name: str, kwargs: dict, input_shape: tuple, n_classes: int) -> None:
    model = build_model(name, **kwargs)
    assert model(torch.randn(input_shape)).shape == (input_shape[0], n_classes)


def test_parameter_counts() -> None:
    assert 100_000 < n_params(SmallCNN()) < 400_000
    assert n_params(MLP()) == 784 * 256 + 256 + 256 * 10 + 10
    assert 11_000_000 < n_params(resnet18_cifar()) < 11_300_000  # the usual 11.17M
    assert n_params(resnet32_cifar()) == 464_154  # the usual 0.46M of the CIFAR ResNet-32 (option A shortcuts)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_only_preconditioned_layers_hold_parameters(name: str) -> None:
    # The ViT's attention layers hold their packed projections (blocks through fop_asdl.engine.attention), and its
    # root the class token and position embedding (AdamW's in the paper's protocol).
    # The GPT's token and position embeddings are nn.Embedding (its LM head shares the token embedding's weight).
    allowed = PRECONDITIONED + {"vit": (nn.MultiheadAttention, VisionTransformer),
                                "gpt": (nn.MultiheadAttention, nn.Embedding)}.get(name, ())
    for module in build_model(name).modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, allowed), type(module)
            assert getattr(module, "groups", 1) == 1


def test_resnet18_structure() -> None:
    model = resnet18_cifar()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert len(model.blocks) == 8
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules()) == 3


def test_backward_reaches_every_parameter() -> None:
    model = resnet18_cifar()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_build_model_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="small_cnn"):
        build_model("vgg16")


def test_resnet32_structure() -> None:
    model = resnet32_cifar()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(model.blocks) == 15 and len(convs) == 31  # 3 stages x 5 blocks x 2 convs + the stem
    assert all(m.kernel_size == (3, 3) for m in convs)  # parameter-free shortcuts: no 1x1 convs
    assert [model.blocks[i].conv1.out_channels for i in (0, 5, 10)] == [16, 32, 64]
    x = torch.randn(2, 3, 32, 32)
    assert model.blocks[:6](model.bn1(model.conv1(x))).shape == (2, 32, 16, 16)


def test_gpt_ties_its_head_to_the_token_embedding_and_is_causal() -> None:
    torch.manual_seed(0)
    model = PixelGPT()
    assert model.head.weight is model.token_embed.weight
    tokens = model.pixel_tokens(torch.randn(3, 1, 28, 28))
    assert tokens.shape == (3, 49) and 0 <= int(tokens.min()) and int(tokens.max()) < model.levels
    changed = tokens.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % model.levels  # later tokens only
    before, after = model.hidden(tokens), model.hidden(changed)
    torch.testing.assert_close(before[:, :30], after[:, :30])  # position t sees tokens up to t
    assert not torch.allclose(before[:, 30:], after[:, 30:])
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert model.token_embed.weight.grad[model.levels:].abs().sum() > 0  # the class rows, through the head


def test_the_runner_trains_the_gpt(tmp_path) -> None:
    """``model: gpt`` end to end in the runner (AdamW, as transformers train): above chance on the subset."""
    import json

    from fop_asdl.cli import main

    code = main(["train", "--method", "adamw", "--batch-size", "100", "--lr", "0.003", "--no-progress", "--out",
                 str(tmp_path), "--set", "model=gpt", "subset_size=1000", "test_size=500", "epochs=4",
                 "target_accuracy=0.3"])
    assert code == 0
    (run_dir,) = (tmp_path / "b100" / "adamw").iterdir()
    records = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["test_accuracy"] > 0.2  # 10 classes: chance is 0.1
