"""An experiment's settings: one flat dataclass of fields, each with its meaning in the docstring after it.

Its defaults ARE the built-in experiment (``fop-asdl compare`` with no arguments); ``configs/default.yaml``
spells the same values out for users to copy. This module only declares the fields: the runner builds an
:class:`~fop_asdl.cli.config.ExperimentConfig`, the same fields checked when built (:mod:`.checks`), and
everything that reads a config (the checks, the search, the method table) depends on this module, never
the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

__all__ = ["ExperimentSettings"]


@dataclass(frozen=True)
class ExperimentSettings:
    """An experiment: what to train, how, and the sweep ``compare`` runs (``train`` runs one point of it).

    The defaults are the built-in experiment: the packaged Fashion-MNIST subset, a small CNN, four
    methods, a small learning-rate grid and two seeds, sized to finish in about 4-5 minutes on 2 quiet
    CPU cores.
    """

    # --- data ---
    dataset: str = "fashion_mnist_subset"
    """mnist, fashion_mnist, cifar10, cifar100, their long-tailed mnist_lt / fashion_mnist_lt /
    cifar10_lt / cifar100_lt, or fashion_mnist_subset (the 5000/1000-image subset shipped in the package;
    needs no file)."""
    data_dir: Optional[str] = None
    """Folder of <dataset>.npz (mnist.npz, fashion_mnist.npz, cifar10.npz, cifar100.npz); null: $FOP_DATA."""
    download: bool = False
    """Fetch a missing .npz from the official source (md5-checked) into data_dir."""
    imbalance: float = 100.0
    """ρ of the *_lt datasets: class c keeps its first floor(n_max·ρ^(−c/(C−1))) images (n_max: the
    smallest class's count); the test set stays balanced."""
    test_split: str = "test"
    """Test arrays x_<split>/y_<split> of the .npz: "test", or "test_exact" (CIFAR-10's bit-exact 1000)."""
    subset_size: Optional[int] = None
    """Train on the first N training images only (quick checks); null: all."""
    test_size: Optional[int] = None
    """Evaluate on the first N test images only; null: all."""
    augment: str = "auto"
    """"crop_flip" (random crop, 4-pixel zero padding, + horizontal flip), "none", or "auto" (CIFAR only)."""

    # --- model ---
    model: str = "small_cnn"
    """small_cnn, mlp, resnet18 (CIFAR ResNet-18), resnet32 (CIFAR ResNet-32 of the long-tail papers), mixer,
    vit (a small ViT, fop_asdl.models.VisionTransformer) or gpt (a GPT-style causal decoder with a tied
    embedding and LM head on pixel tokens, fop_asdl.models.PixelGPT)."""

    # --- the sweep ---
    methods: List[str] = field(default_factory=lambda: ["sgd", "adamw", "kfac", "fop"])
    """Methods to compare: sgd, adamw, kfac, fop, fngd, hylo, ASDL's other preconditioners smw_ng, seng,
    diag_ng, kbfgs, kron_psgd, ekfac, fop_ekfac (FOP over EKFAC), shampoo (docs/methods/), and the baselines
    lars, lamb, soap, shampoo_grafted, muon, adamw_schedulefree (docs/baselines.md; pip install
    ".[baselines]"), all through fop_asdl.make_gradient_maker."""
    batch_sizes: List[int] = field(default_factory=lambda: [1000])
    """Global batch sizes (one table block and plot panel each); every batch must be >= 2."""
    search: str = "grid"
    """How search_space becomes each method's trials: "grid" (every combination of the listed values) or
    "halton" (search_points quasi-random points, log-uniform in each [low, high])."""
    search_points: Optional[int] = None
    """halton: N, the number of trials of every method; grid: null (the grid's size, which must then be
    the same for every method: equal budget)."""
    search_space: Dict[str, Dict[str, List[float]]] = field(
        default_factory=lambda: {
            "sgd": {"lr": [0.03, 0.05]},
            "adamw": {"lr": [0.003, 0.006]},
            "kfac": {"lr": [0.03, 0.05]},
            "fop": {"lr": [0.02, 0.03]},
            "fngd": {"lr": [0.05, 0.1]},
            "hylo": {"lr": [0.05, 0.1]},
            # ASDL's other preconditioners: F̃⁻¹g on K-FAC's scale (docs/methods/), K-FAC's lrs; not tuned here
            "smw_ng": {"lr": [0.03, 0.05]},
            "seng": {"lr": [0.03, 0.05]},
            "diag_ng": {"lr": [0.03, 0.05]},
            "kbfgs": {"lr": [0.03, 0.05]},
            "kron_psgd": {"lr": [0.03, 0.05]},
            # EKFAC, FOP over it, SGD-grafted Shampoo (docs/methods/): lr and damping (Shampoo's ε, about its
            # statistics' scale), 4 trials as the baselines'; not tuned here
            "ekfac": {"lr": [0.02, 0.03], "damping": [0.1, 1.0]},
            "fop_ekfac": {"lr": [0.01, 0.02], "damping": [0.1, 1.0]},
            "shampoo": {"lr": [0.03, 0.05], "damping": [0.0001, 0.001]},
            # The baselines: lr and one more hyperparameter, each [low, high] about its paper's value
            # (docs/baselines.md): a Halton range, or the 4 corners of a grid.
            "lars": {"lr": [1.0, 10.0], "weight_decay": [1e-5, 1e-3]},
            "lamb": {"lr": [0.003, 0.03], "weight_decay": [0.001, 0.1]},
            "soap": {"lr": [0.001, 0.01], "weight_decay": [0.001, 0.1]},
            "shampoo_grafted": {"lr": [0.0003, 0.003], "momentum": [0.8, 0.98]},
            "muon": {"lr": [0.02, 0.2], "momentum": [0.8, 0.98]},
            "adamw_schedulefree": {"lr": [0.001, 0.01], "weight_decay": [0.001, 0.1]},
        }
    )
    """Per method, its searched hyperparameters -> grid values, or [low, high] for halton: lr (the base lr
    at base_batch, required) and any other it reads (weight_decay; momentum for sgd, kfac, fop, fngd,
    hylo, lars, shampoo_grafted, muon; damping and ema_decay for kfac, fop and the other makers that read
    them; others_lr for muon). The others keep their config values. lr_grid: {m: [..]} (older configs) is
    read as {m: {lr: [..]}}."""
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    """Seeds; the first picks each method's point of its search, the others repeat the run at that point."""

    # --- protocol ---
    base_batch: int = 500
    """Batch size at which search_space's lr holds: lr = base_lr · batch / base_batch (linear scaling)."""
    epochs: Union[int, Dict[int, int]] = 12
    """Epochs per run: an int, or a map {batch size: epochs} with an entry for every batch size."""
    target_accuracy: float = 0.82
    """Test accuracy (fraction) whose first epoch and training seconds are reported."""
    stop_at_target: bool = False
    """End a run at the first epoch that reaches target_accuracy (saves time; curves stop there)."""
    schedule: str = "plateau"
    """"plateau" (ReduceLROnPlateau on test accuracy, per epoch), "cosine" (per step, to 0) or "constant"."""
    plateau_factor: float = 0.2
    """plateau: multiply the lr by this when the accuracy stalls."""
    plateau_patience: int = 2
    """plateau: epochs without improvement before the lr drops."""
    warmup: float = 0
    """Linear lr warm-up (0: none): step t < W trains at (t+1)/W times the schedule's lr, which the warm-up
    leaves unchanged (the two multiply). W = warmup steps, or round(warmup · steps per epoch) for
    warmup_unit epochs."""
    warmup_unit: str = "steps"
    """"steps" (warmup a whole number) or "epochs" (at the run's batch size; fractions allowed)."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy loss."""
    weight_decay: float = 5e-4
    """Weight decay: coupled (the optimizer's L2) for SGD, K-FAC and FOP; decoupled for AdamW; each
    baseline's own kind (docs/baselines.md)."""
    momentum: float = 0.9
    """SGD momentum of sgd, kfac and fop; the momentum of lars, shampoo_grafted (β₁) and muon (AdamW and the
    other baselines use their papers' betas)."""
    others_optimizer: Optional[str] = None
    """kfac, fop: "adamw" = the paper's transformer protocol: SGD momentum on the preconditioned Linear/Conv
    blocks, AdamW on every other parameter (normalization layers, embeddings, tokens), which the maker then
    does not precondition. null: one SGD for all."""
    others_lr: float = 1e-3
    """others_optimizer's base lr at base_batch, scaled with the batch like the method's lr; also that of
    muon's AdamW (every parameter but the hidden weight matrices)."""
    others_weight_decay: float = 0.05
    """others_optimizer's (decoupled) weight decay; also that of muon's AdamW."""

    # --- curvature (kfac, fop) ---
    damping: float = 1.0
    """Damping of the curvature (asdl.PreconditioningConfig.damping; Shampoo's ε, its roots of L + εI)."""
    ema_decay: float = 0.05
    """EMA decay of the curvature factors (asdl.PreconditioningConfig.ema_decay)."""
    fngd_alpha: float = 0.1
    """FNGD's α of the damping λ = α‖K‖_F (it forms coefficients in epoch 1 and reuses them after)."""
    kl_clip: Optional[float] = None
    """kfac, fop, hylo: trust-region bound κ on the step's squared Fisher norm (make_gradient_maker(...,
    kl_clip=κ, lr=<the run's current lr>)); null: off. 0.01-0.02 lets FOP run at K-FAC's lr (docs/methods/fop.md)."""
    ema_bias_correction: bool = False
    """kfac/fop: divide the curvature EMA by 1 − (1 − ema_decay)^k after k updates (as Adam does), so the
    first steps are not preconditioned by a fraction of the curvature (make_gradient_maker(...,
    ema_bias_correction=True))."""
    update_interval: Union[int, str] = "auto"
    """Curvature = preconditioner update interval in steps (also SOAP's eigenbasis and grafted Shampoo's
    roots): an int, or "auto" =
    max(5, round(interval_at_base_batch · base_batch / batch)): shorter as the batch grows, never below 5."""
    interval_at_base_batch: int = 10
    """k of update_interval "auto": the interval at base_batch."""
    micro_batch_size: Optional[int] = None
    """Gradient accumulation inside the maker (make_gradient_maker(..., micro_batch_size=N)), passed only
    when set and smaller than a rank's batch; null: off."""

    # --- runtime ---
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"; under torchrun: cuda:LOCAL_RANK."""
    eval_batch_size: int = 1000
    """Batch size of the test-set evaluation (memory only; no effect on results)."""

    def epochs_for(self, batch_size: int) -> int:
        return self.epochs if isinstance(self.epochs, int) else self.epochs[batch_size]
