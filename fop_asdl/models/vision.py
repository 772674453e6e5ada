"""Vision models built only from layers ASDL's K-FAC preconditions (``nn.Linear``, ``nn.Conv2d`` with
groups=1, ``nn.BatchNorm2d``, ``nn.LayerNorm``), so FOP and K-FAC precondition every parameter and the
comparison with SGD is fair.

Activations use ``F.relu`` and residual sums are out-of-place (``out = out + shortcut``): ASDL's hooks save
each layer's input and hook its output, and in-place ops on those tensors can corrupt what they capture.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SmallCNN", "MLP", "BasicBlock", "ResNet", "resnet18_cifar", "PadShortcutBlock", "CifarResNet",
           "resnet32_cifar", "Mixer"]


class SmallCNN(nn.Module):
    """Two 3x3 conv + max-pool stages and two Linear layers (~207k parameters at 28x28): trains in
    seconds per epoch on a CPU, yet has conv layers, whose K-FAC factors differ from Linear ones."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
                 channels: Sequence[int] = (16, 32), hidden: int = 128):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        side = image_size // 4  # two 2x2 max-pools
        self.fc1 = nn.Linear(c2 * side * side, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs: the setting where K-FAC's Kronecker factors
    are closest to the exact Fisher blocks."""

    def __init__(self, in_features: int = 784, hidden: Sequence[int] = (256,), num_classes: int = 10):
        super().__init__()
        widths = [in_features, *hidden, num_classes]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class _ResidualBlock(nn.Module):
    """The two 3x3 conv + BatchNorm layers of a ResNet basic block, added to ``self.shortcut(x)``."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class BasicBlock(_ResidualBlock):
    """ResNet basic block; a 1x1 conv + BatchNorm shortcut where the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(in_planes, planes, stride)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem without max-pool, four stages, global average pool."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks: List[nn.Module] = []
        in_planes = widths[0]
        for stage, (planes, n) in enumerate(zip(widths, num_blocks)):
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride=2 if stage > 0 and i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> ResNet:
    """ResNet-18 for 32x32 inputs (BasicBlocks [2, 2, 2, 2], ~11.2M parameters)."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels)


class PadShortcutBlock(_ResidualBlock):
    """ResNet basic block with the parameter-free "option A" shortcut of He et al. (2016) for CIFAR: where
    the shape changes, the input is subsampled by 2 and zero-padded along channels (no 1x1 conv)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__(in_planes, planes, stride)
        self.stride = stride
        self.extra_channels = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.extra_channels == 0:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        half = self.extra_channels // 2
        return F.pad(x, (0, 0, 0, 0, half, self.extra_channels - half))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016) used by the long-tail papers (LDAM, ...): 3x3 stem, three stages
    of ``n`` :class:`PadShortcutBlock` (widths 16/32/64, strides 1/2/2), global average pool, Linear;
    Kaiming-normal init of conv and Linear weights as in those papers' code."""

    def __init__(self, n: int, num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 64)):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks: List[nn.Module] = []
        in_planes = widths[0]
        for stage, planes in enumerate(widths):
            for i in range(n):
                blocks.append(PadShortcutBlock(in_planes, planes, stride=2 if stage > 0 and i == 0 else 1))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(F.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet32_cifar(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for 32x32 inputs (3 stages of 5 blocks, 31 conv layers + fc; ~0.46M parameters)."""
    return CifarResNet(5, num_classes=num_classes, in_channels=in_channels)


class MixerBlock(nn.Module):
    """Pre-norm token mixing (a Linear across the tokens) then channel mixing, each with a residual."""

    def __init__(self, tokens: int, dim: int, token_hidden: int, channel_hidden: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.token1, self.token2 = nn.Linear(tokens, token_hidden), nn.Linear(token_hidden, tokens)
        self.channel1, self.channel2 = nn.Linear(dim, channel_hidden), nn.Linear(channel_hidden, dim)

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, tokens, dim)
        mixed = self.token2(F.gelu(self.token1(self.norm1(x).transpose(1, 2))))
        x = x + mixed.transpose(1, 2)
        return x + self.channel2(F.gelu(self.channel1(self.norm2(x))))


class Mixer(nn.Module):
    """A small MLP-Mixer (patch embedding, LayerNorm, token- and channel-mixing Linears): a model family
    whose Linear layers see a token dimension, unlike the CNNs (~60k parameters at the defaults)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 28, patch: int = 7,
                 dim: int = 64, depth: int = 2, token_hidden: int = 32, channel_hidden: int = 128):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of patch {patch}.")
        tokens = (image_size // patch) ** 2
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, dim, token_hidden, channel_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(self.norm(x).mean(1))
