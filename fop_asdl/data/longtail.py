"""Long-tailed versions of balanced datasets (CIFAR-10/100-LT, (Fashion-)MNIST-LT), as in the long-tail
literature.

Class c of C keeps n_c = floor(n_max · ρ^(−c/(C−1))) samples, ρ the imbalance factor (largest over
smallest class): the first n_c of that class in array order, so the subset is fixed, needs no RNG, and
nests (a larger ρ keeps a subset of a smaller one's samples). n_max is the smallest class's count, so
that every class can supply its n_c: the same as the common count on CIFAR and Fashion-MNIST, 5421
(class 5) on MNIST, whose classes hold 5421-6742 training images.
"""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

__all__ = ["long_tail_counts", "long_tail_indices"]


def long_tail_counts(n_max: int, num_classes: int, imbalance: float) -> List[int]:
    """n_c for c = 0..C−1: ``n_max`` for class 0 down to ``n_max / imbalance`` for the last class."""
    if num_classes < 2 or imbalance < 1:
        raise ValueError(f"need at least 2 classes and an imbalance factor >= 1; got {num_classes}, "
                         f"{imbalance}.")
    return [math.floor(n_max * imbalance ** (-c / (num_classes - 1))) for c in range(num_classes)]


def long_tail_indices(labels: Tensor, imbalance: float, num_classes: int) -> Tensor:
    """Ascending indices of the samples kept: the first n_c of each class c, n_max the smallest class
    count."""
    one_hot = torch.nn.functional.one_hot(labels, num_classes)
    n_max = int(one_hot.sum(0).min())
    counts = torch.tensor(long_tail_counts(n_max, num_classes, imbalance), device=labels.device)
    rank_in_class = (one_hot.cumsum(0) * one_hot).sum(1) - 1  # 0 for the first sample of its class, ...
    return torch.nonzero(rank_in_class < counts[labels]).flatten()
