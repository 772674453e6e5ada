"""HyLo's host-side decisions (HYLO_SPEC §1, §2.5, §4): rows kept per rank, KID/KIS switching, and the
bytes a refresh step communicates. Plain Python on plain numbers: nothing here touches a tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

__all__ = ["DEFAULT_SWITCH_THRESHOLD", "SwitchPolicy", "RefreshTraffic", "local_rows", "relative_change",
           "refresh_traffic"]

# η is not reported (§8.3). Eq. 10 is Accordion's critical-regime test (the paper's ref. [22]), whose
# authors use η = 0.5 throughout; with it, plateau epochs stay on KIS and only sharp changes trigger KID.
DEFAULT_SWITCH_THRESHOLD = 0.5
POLICIES = ("gradient", "epochs", "kid", "kis")


def local_rows(compression_ratio: float, local_batch: int) -> int:
    """r_loc = max(1, ⌊ρ m⌋) (§1); the 1e-9 keeps ⌊0.29·100⌋ = 29 despite float rounding."""
    if not 0 < compression_ratio <= 1:
        raise ValueError(f"compression_ratio must be in (0, 1], got {compression_ratio!r}.")
    if local_batch < 1:
        raise ValueError(f"local_batch must be >= 1, got {local_batch!r}.")
    return max(1, math.floor(compression_ratio * local_batch + 1e-9))


def relative_change(older: float, newer: float) -> float:
    """|‖Δ_{e−1}‖ − ‖Δ_{e−2}‖| / ‖Δ_{e−2}‖ (eq. 10); inf when the older norm is 0 and the newer is not."""
    if older == 0:
        return math.inf if newer != 0 else 0.0
    return abs(newer - older) / older


@dataclass(frozen=True)
class SwitchPolicy:
    """Which factorisation an epoch uses (§2.5). Epochs are 0-based, as in the training loop.

    "gradient": KID for the first ``kid_warmup_epochs``, for ``kid_epochs_after_lr_decay`` epochs from
    each LR decay, while fewer than two epochs of gradient history exist, and when eq. 10 ≥ threshold.
    "epochs": KID inside the half-open epoch windows ``kid_windows`` (the authors' ``--adaptive``).
    "kid" / "kis": one method throughout.
    """

    policy: str = "gradient"
    threshold: float = DEFAULT_SWITCH_THRESHOLD
    kid_warmup_epochs: int = 10
    kid_epochs_after_lr_decay: int = 5
    kid_windows: Tuple[Tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"switch_policy must be one of {POLICIES}, got {self.policy!r}.")
        if not self.threshold >= 0:
            raise ValueError(f"switch_threshold must be >= 0, got {self.threshold!r}.")
        if self.kid_warmup_epochs < 0 or self.kid_epochs_after_lr_decay < 0:
            raise ValueError("kid_warmup_epochs and kid_epochs_after_lr_decay must be >= 0.")
        for window in self.kid_windows:
            if len(window) != 2 or not 0 <= window[0] <= window[1]:
                raise ValueError(f"each KID window must be (start, stop) with 0 <= start <= stop "
                                 f"(epochs, stop excluded), got {window!r}.")
        if self.policy == "epochs" and not self.kid_windows:
            raise ValueError("switch_policy='epochs' needs kid_windows, e.g. ((0, 10), (35, 40)); "
                             "use switch_policy='kis' for KIS throughout.")

    @classmethod
    def from_adaptive(cls, a0: int, a1: int, a2: int) -> "SwitchPolicy":
        """The authors' ``--adaptive a0 a1 a2``: KID in epochs [0, a0) and [a1, a2).

        Their rule is per step (step < a0·T or a1·T < step ≤ a2·T), so it differs from these whole
        epochs only at steps a1·T (KIS there) and a2·T (KID there).
        """
        return cls("epochs", kid_windows=((0, a0), (a1, a2)))

    def method(self, epoch: int, lr_decay_epochs: Sequence[int] = (),
               epoch_grad_norms: Sequence[float] = ()) -> str:
        """"kid" or "kis" for ``epoch``.

        lr_decay_epochs: the epochs at which the LR decayed so far. epoch_grad_norms: ‖Δ_k‖ of the
        completed epochs in order (only the last two are read); the caller reads them off the device
        once per epoch, a sync this decision needs.
        """
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch!r}.")
        if self.policy in ("kid", "kis"):
            return self.policy
        if self.policy == "epochs":
            return "kid" if any(start <= epoch < stop for start, stop in self.kid_windows) else "kis"
        if epoch < self.kid_warmup_epochs:
            return "kid"
        if any(d <= epoch < d + self.kid_epochs_after_lr_decay or d == epoch for d in lr_decay_epochs):
            return "kid"
        if len(epoch_grad_norms) < 2:
            return "kid"
        change = relative_change(float(epoch_grad_norms[-2]), float(epoch_grad_norms[-1]))
        return "kid" if change >= self.threshold else "kis"


@dataclass(frozen=True)
class RefreshTraffic:
    """Bytes of one refresh step (§4): the packed all-gather and the owners' broadcasts of M."""

    gather_sent: int  # per rank: Σ_l r_loc (d_a + d_g) (+ r_loc² for KID) elements
    gather_received: int  # per rank: P times what each rank sends
    broadcast: int  # Σ_l r², r = P·r_loc (one r×r matrix per layer, from its owner)


def refresh_traffic(layer_widths: Sequence[Tuple[int, int]], rows_per_rank: int, world_size: int,
                    method: str, element_size: int = 4) -> RefreshTraffic:
    """Communication of a refresh for layers of widths (d_a, d_g); d_a counts the bias column."""
    if method not in ("kid", "kis"):
        raise ValueError(f"method must be 'kid' or 'kis', got {method!r}.")
    if rows_per_rank < 1 or world_size < 1 or element_size < 1:
        raise ValueError("rows_per_rank, world_size and element_size must all be >= 1.")
    y_elements = rows_per_rank ** 2 if method == "kid" else 0
    sent = sum(rows_per_rank * (d_a + d_g) + y_elements for d_a, d_g in layer_widths)
    rank = world_size * rows_per_rank
    return RefreshTraffic(sent * element_size, world_size * sent * element_size,
                          len(layer_widths) * rank ** 2 * element_size)
