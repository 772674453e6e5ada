"""The runner's model zoo: vision models built from layers ASDL preconditions (:mod:`.vision`), and
transformers on images (:mod:`.transformers`: a small ViT, a GPT-style causal decoder with tied embeddings).
"""
from __future__ import annotations

from typing import Any, Callable, Dict

from torch import nn

from .transformers import PixelGPT, VisionTransformer
from .vision import (MLP, BasicBlock, CifarResNet, Mixer, PadShortcutBlock, ResNet, SmallCNN, resnet18_cifar,
                     resnet32_cifar)

__all__ = ["SmallCNN", "MLP", "BasicBlock", "ResNet", "resnet18_cifar", "PadShortcutBlock", "CifarResNet",
           "resnet32_cifar", "Mixer", "VisionTransformer", "PixelGPT", "build_model", "MODELS"]

MODELS: Dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "mlp": MLP,
    "resnet18": resnet18_cifar,
    "resnet32": resnet32_cifar,
    "mixer": Mixer,
    "vit": VisionTransformer,
    "gpt": PixelGPT,
}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model called ``name`` (one of :data:`MODELS`); ``kwargs`` go to its constructor."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}.") from None
    return factory(**kwargs)
