"""The experiment configuration: one flat dataclass, read from YAML plus ``--set key=value`` overrides.

Its defaults ARE the built-in experiment (``fop-asdl compare`` with no arguments); ``configs/default.yaml``
spells the same values out for users to copy. Every value is checked when the config is built, so a typo
or an impossible value fails before any data is loaded, with a message naming the field.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml

from .checks import check_config
from .errors import ConfigError
from .methods import METHODS

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "METHODS",
    "LEGACY_LR_GRID",
    "load_config",
    "build_config",
    "apply_overrides",
    "field_docs",
    "training_settings",
    "changed_keys",
]

#: The field that held per-method learning-rate grids before ``search_space``: still read, as
#: ``search_space: {method: {lr: grid}}``, so older configs and results folders load unchanged.
LEGACY_LR_GRID = "lr_grid"


@dataclass(frozen=True)
class ExperimentConfig:
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
    """small_cnn, mlp, resnet18 (CIFAR ResNet-18), resnet32 (CIFAR ResNet-32 of the long-tail papers) or vit
    (a small ViT, fop_asdl.models.VisionTransformer)."""

    # --- the sweep ---
    methods: List[str] = field(default_factory=lambda: ["sgd", "adamw", "kfac", "fop"])
    """Methods to compare: sgd, adamw, kfac, fop, fngd, hylo (all through fop_asdl.make_gradient_maker)."""
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
        }
    )
    """Per method, its searched hyperparameters -> grid values, or [low, high] for halton: lr (the base lr
    at base_batch, required) and any other it reads (weight_decay; momentum but for adamw; damping and
    ema_decay for kfac and fop). The others keep their config values. lr_grid: {m: [..]} (older configs)
    is read as {m: {lr: [..]}}."""
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
    """Weight decay: coupled (the optimizer's L2) for SGD, K-FAC and FOP; decoupled for AdamW."""
    momentum: float = 0.9
    """SGD momentum of sgd, kfac and fop (AdamW uses its own betas)."""
    others_optimizer: Optional[str] = None
    """kfac, fop: "adamw" = the paper's transformer protocol: SGD momentum on the preconditioned Linear/Conv
    blocks, AdamW on every other parameter (normalization layers, embeddings, tokens), which the maker then
    does not precondition. null: one SGD for all."""
    others_lr: float = 1e-3
    """others_optimizer's base lr at base_batch, scaled with the batch like the method's lr."""
    others_weight_decay: float = 0.05
    """others_optimizer's (decoupled) weight decay."""

    # --- curvature (kfac, fop) ---
    damping: float = 1.0
    """Damping of the curvature (asdl.PreconditioningConfig.damping)."""
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
    """Curvature = preconditioner update interval in steps: an int, or "auto" =
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

    def __post_init__(self) -> None:
        check_config(self)

    def epochs_for(self, batch_size: int) -> int:
        return self.epochs if isinstance(self.epochs, int) else self.epochs[batch_size]


def training_settings(values: Mapping[str, Any]) -> Dict[str, Any]:
    """A config (as a dict) without what only changes the report: target_accuracy, unless stop_at_target
    ends runs there. Resume compares these, so a study can be resumed with a target known only after
    some of its runs (the paper's "AdamW's best accuracy"), and its finished runs are re-reported."""
    return {k: v for k, v in values.items() if k != "target_accuracy" or values.get("stop_at_target")}


def changed_keys(current: Mapping[str, Any], saved: Mapping[str, Any]) -> List[str]:
    """The keys whose values differ (a key missing on one side counts as changed), sorted: what resume
    names when it refuses."""
    return sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))


def field_docs() -> Dict[str, str]:
    """Field name -> its docstring (the string literal after it in the class body), for ``--help``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(ExperimentConfig)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def load_config(path: Optional[Union[str, Path]] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The built-in defaults, updated by the YAML file at ``path`` and then by ``overrides``."""
    values: Dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(
                "<file>", f"{path} must hold a mapping of field: value, not {type(loaded).__name__}."
            )
        values.update(loaded)
    values = apply_overrides(values, overrides)
    return build_config(values)


def build_config(values: Mapping[str, Any]) -> ExperimentConfig:
    """``ExperimentConfig(**values)`` with an unknown field reported by name (and the closest known one)."""
    values = _read_legacy(values)
    known = [f.name for f in dataclasses.fields(ExperimentConfig)]
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            raise ConfigError(
                str(name),
                "unknown field"
                + (f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(known)}."),
            )
    return ExperimentConfig(**values)


def apply_overrides(values: Mapping[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply ``key=value`` overrides; values are YAML (``[1024, 8192]``, ``null``, ``{sgd: [0.1]}``) and
    ``a.b.c=v`` sets a key inside the mapping field ``a`` (``search_space.fop.damping=[0.01,1]``,
    ``epochs.8192=6``; ``lr_grid.fop=[..]`` sets ``search_space.fop.lr``)."""
    out = _read_legacy(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "an override must look like key=value.")
        value = yaml.safe_load(raw) if raw.strip() else None
        name, *path = key.split(".")
        if name == LEGACY_LR_GRID:
            if not path:  # a whole lr-only space replaces the search space
                out.pop("search_space", None)
                out = _read_legacy({**out, name: value})
                continue
            name, path = "search_space", [*path, "lr"]
        if not path:
            out[name] = value
            continue
        current = out.get(name, getattr(ExperimentConfig(), name, None))
        if not isinstance(current, dict):
            raise ConfigError(name, f"'{key}' sets a key of a mapping, but '{name}' is not a mapping field.")
        out[name] = node = copy.deepcopy(current)
        for part in path[:-1]:
            node = node.setdefault(_yaml_key(part), {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"'{part}' does not hold a mapping.")
        node[_yaml_key(path[-1])] = value
    return out


def _yaml_key(text: str) -> Any:
    """``epochs.1024`` addresses the int key 1024, ``search_space.fop`` the string key 'fop'."""
    value = yaml.safe_load(text)
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else text


def _read_legacy(values: Mapping[str, Any]) -> Dict[str, Any]:
    """``lr_grid: {m: [lrs]}`` -> ``search_space: {m: {lr: [lrs]}}``; both at once is refused."""
    out = dict(values)
    if LEGACY_LR_GRID not in out:
        return out
    grid = out.pop(LEGACY_LR_GRID)
    if "search_space" in out:
        raise ConfigError(LEGACY_LR_GRID, "give search_space or the older lr_grid, not both.")
    if not isinstance(grid, dict):
        raise ConfigError(LEGACY_LR_GRID, f"expected a mapping method -> list of lrs, got {grid!r}.")
    out["search_space"] = {method: {"lr": lrs} for method, lrs in grid.items()}
    return out
