"""The experiment configuration: one flat dataclass, read from YAML plus ``--set key=value`` overrides.

Its defaults ARE the built-in experiment (``fop-asdl compare`` with no arguments); ``configs/default.yaml``
spells the same values out for users to copy. Every value is checked when the config is built, so a typo
or an impossible value fails before any data is loaded, with a message naming the field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
import yaml

from ..data import DATASETS
from ..models import MODELS

__all__ = [
    "ConfigError",
    "ExperimentConfig",
    "METHODS",
    "load_config",
    "build_config",
    "apply_overrides",
    "field_docs",
]

#: Optimisation methods: the gradient maker and the torch optimizer each one uses.
METHODS: Dict[str, str] = {
    "sgd": "SGD momentum",
    "adamw": "AdamW",
    "kfac": "K-FAC + SGD momentum",
    "fop": "FOP + SGD momentum",
    "fngd": "FNGD + SGD momentum",
    "hylo": "HyLo + SGD momentum",
}
SCHEDULES = ("plateau", "cosine", "constant")
AUGMENTATIONS = ("auto", "none", "crop_flip")


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type or impossible; the message names the field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"config field '{field_name}': {message}")
        self.field = field_name


@dataclass(frozen=True)
class ExperimentConfig:
    """An experiment: what to train, how, and the sweep ``compare`` runs (``train`` runs one point of it).

    The defaults are the built-in experiment: the packaged Fashion-MNIST subset, a small CNN, four
    methods, a small learning-rate grid and two seeds, sized to finish in about 4-5 minutes on 2 quiet
    CPU cores.
    """

    # --- data ---
    dataset: str = "fashion_mnist_subset"
    """mnist, fashion_mnist, cifar10, cifar100, their long-tailed cifar10_lt / cifar100_lt, or
    fashion_mnist_subset (the 5000/1000-image subset shipped in the package; needs no file)."""
    data_dir: Optional[str] = None
    """Folder of <dataset>.npz (mnist.npz, fashion_mnist.npz, cifar10.npz, cifar100.npz); null: $FOP_DATA."""
    download: bool = False
    """Fetch a missing .npz from the official source (md5-checked) into data_dir."""
    imbalance: float = 100.0
    """ρ of the *_lt datasets: class c keeps its first floor(n_max·ρ^(−c/(C−1))) images."""
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
    """small_cnn, mlp, resnet18 (CIFAR ResNet-18) or resnet32 (CIFAR ResNet-32 of the long-tail papers)."""

    # --- the sweep ---
    methods: List[str] = field(default_factory=lambda: ["sgd", "adamw", "kfac", "fop"])
    """Methods to compare: sgd, adamw, kfac, fop, fngd, hylo (all through fop_asdl.make_gradient_maker)."""
    batch_sizes: List[int] = field(default_factory=lambda: [1000])
    """Global batch sizes (one table block and plot panel each); every batch must be >= 2."""
    lr_grid: Dict[str, List[float]] = field(
        default_factory=lambda: {
            "sgd": [0.03, 0.05],
            "adamw": [0.003, 0.006],
            "kfac": [0.03, 0.05],
            "fop": [0.02, 0.03],
            "fngd": [0.05, 0.1],
            "hylo": [0.05, 0.1],
        }
    )
    """Per method, the base learning rates tried (at base_batch; scaled linearly to each batch size)."""
    seeds: List[int] = field(default_factory=lambda: [0, 1])
    """Seeds; the first picks each method's lr from the grid, the others repeat the run at that lr."""

    # --- protocol ---
    base_batch: int = 500
    """Batch size at which lr_grid holds: lr = base_lr · batch / base_batch (linear scaling)."""
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
    label_smoothing: float = 0.1
    """Label smoothing of the cross-entropy loss."""
    weight_decay: float = 5e-4
    """Weight decay: coupled (the optimizer's L2) for SGD, K-FAC and FOP; decoupled for AdamW."""
    momentum: float = 0.9
    """SGD momentum of sgd, kfac and fop (AdamW uses its own betas)."""

    # --- curvature (kfac, fop) ---
    damping: float = 1.0
    """Damping of the curvature (asdl.PreconditioningConfig.damping)."""
    ema_decay: float = 0.05
    """EMA decay of the curvature factors (asdl.PreconditioningConfig.ema_decay)."""
    update_interval: Union[int, str] = "auto"
    """Curvature = preconditioner update interval in steps: an int, or "auto" =
    max(5, round(interval_at_base_batch · base_batch / batch)): shorter as the batch grows, never below 5."""
    interval_at_base_batch: int = 10
    """k of update_interval "auto": the interval at base_batch."""
    fngd_alpha: float = 0.1
    """FNGD's α of the damping λ = α‖K‖_F (it forms coefficients in epoch 1 and reuses them after)."""
    micro_batch_size: Optional[int] = None
    """Gradient accumulation inside the maker (make_gradient_maker(..., micro_batch_size=N)), passed only
    when set and smaller than a rank's batch; null: off."""

    # --- runtime ---
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu", "cuda" or "cuda:N"; under torchrun: cuda:LOCAL_RANK."""
    eval_batch_size: int = 1000
    """Batch size of the test-set evaluation (memory only; no effect on results)."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)

    def epochs_for(self, batch_size: int) -> int:
        return self.epochs if isinstance(self.epochs, int) else self.epochs[batch_size]


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
    ``a.b=v`` sets key ``b`` of the mapping field ``a`` (e.g. ``lr_grid.fop=[0.01,0.02]``)."""
    out = dict(values)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "an override must look like key=value.")
        value = yaml.safe_load(raw) if raw.strip() else None
        name, dot, sub = key.partition(".")
        if dot:
            current = out.get(name, getattr(ExperimentConfig(), name, None))
            if not isinstance(current, dict):
                raise ConfigError(
                    name, f"'{key}' sets a key of a mapping, but '{name}' is not a mapping field."
                )
            out[name] = {**current, _yaml_key(sub): value}
        else:
            out[name] = value
    return out


def _yaml_key(text: str) -> Any:
    """``epochs.1024`` addresses the int key 1024, ``lr_grid.fop`` the string key 'fop'."""
    value = yaml.safe_load(text)
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else text


# --- validation ---------------------------------------------------------------------------------------
def _check_types(config: ExperimentConfig) -> None:
    hints = typing.get_type_hints(ExperimentConfig)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _matches(value, hints[f.name]):
            raise ConfigError(
                f.name, f"expected {_type_name(hints[f.name])}, got {value!r} ({type(value).__name__})."
            )


def _matches(value: Any, annotation: Any) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        return any(_matches(value, a) for a in args)
    if origin in (list, List):
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if origin in (dict, Dict):
        return isinstance(value, dict) and all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()
        )
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Union:
        return " or ".join(_type_name(a) for a in args)
    if origin in (list, List):
        return f"a list of {_type_name(args[0])}"
    if origin in (dict, Dict):
        return f"a mapping {_type_name(args[0])} -> {_type_name(args[1])}"
    return "null" if annotation is type(None) else annotation.__name__


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ConfigError(name, message)


def _one_of(value: Any, choices: Sequence[str], name: str) -> None:
    _require(value in choices, name, f"unknown value {value!r}; choose one of {', '.join(sorted(choices))}.")


def _check_values(c: ExperimentConfig) -> None:
    _one_of(c.dataset, list(DATASETS), "dataset")
    _require(c.imbalance >= 1, "imbalance", f"must be >= 1 (largest / smallest class), got {c.imbalance}.")
    _require(
        c.subset_size is None or c.subset_size >= 2, "subset_size", f"must be >= 2, got {c.subset_size}."
    )
    _require(c.test_size is None or c.test_size >= 1, "test_size", f"must be >= 1, got {c.test_size}.")
    _one_of(c.augment, AUGMENTATIONS, "augment")
    _one_of(c.model, list(MODELS), "model")

    _require(len(c.methods) > 0, "methods", "must name at least one method.")
    for m in c.methods:
        _one_of(m, list(METHODS), "methods")
    _require(len(set(c.methods)) == len(c.methods), "methods", f"has duplicates: {c.methods}.")
    _require(len(c.batch_sizes) > 0, "batch_sizes", "must hold at least one batch size.")
    for b in c.batch_sizes:
        _require(b >= 2, "batch_sizes", f"every batch must be >= 2 (FOP splits it in two halves), got {b}.")
    _require(
        len(set(c.batch_sizes)) == len(c.batch_sizes), "batch_sizes", f"has duplicates: {c.batch_sizes}."
    )
    for m in c.lr_grid:
        _one_of(m, list(METHODS), "lr_grid")
    for m in c.methods:
        grid = c.lr_grid.get(m)
        _require(bool(grid), f"lr_grid.{m}", f"method '{m}' is in methods but has no learning rates.")
        for lr in grid:
            _require(lr > 0, f"lr_grid.{m}", f"learning rates must be > 0, got {lr}.")
    _require(len(c.seeds) > 0, "seeds", "must hold at least one seed.")
    _require(len(set(c.seeds)) == len(c.seeds), "seeds", f"has duplicates: {c.seeds}.")
    for s in c.seeds:
        _require(s >= 0, "seeds", f"seeds must be >= 0, got {s}.")

    _require(c.base_batch >= 2, "base_batch", f"must be >= 2, got {c.base_batch}.")
    if isinstance(c.epochs, int):
        _require(c.epochs >= 1, "epochs", f"must be >= 1, got {c.epochs}.")
    else:
        missing = [b for b in c.batch_sizes if b not in c.epochs]
        _require(not missing, "epochs", f"the map has no entry for batch size(s) {missing}.")
        for b, e in c.epochs.items():
            _require(e >= 1, "epochs", f"must be >= 1, got {e} for batch {b}.")
    _require(
        0 < c.target_accuracy <= 1,
        "target_accuracy",
        f"must be a fraction in (0, 1], got {c.target_accuracy}.",
    )
    _one_of(c.schedule, SCHEDULES, "schedule")
    _require(0 < c.plateau_factor < 1, "plateau_factor", f"must be in (0, 1), got {c.plateau_factor}.")
    _require(c.plateau_patience >= 0, "plateau_patience", f"must be >= 0, got {c.plateau_patience}.")
    _require(0 <= c.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {c.label_smoothing}.")
    _require(c.weight_decay >= 0, "weight_decay", f"must be >= 0, got {c.weight_decay}.")
    _require(0 <= c.momentum < 1, "momentum", f"must be in [0, 1), got {c.momentum}.")

    _require(c.damping > 0, "damping", f"must be > 0, got {c.damping}.")
    _require(0 < c.ema_decay <= 1, "ema_decay", f"must be in (0, 1], got {c.ema_decay}.")
    if isinstance(c.update_interval, str):
        _require(
            c.update_interval == "auto",
            "update_interval",
            f"must be an int or 'auto', got {c.update_interval!r}.",
        )
    else:
        _require(c.update_interval >= 1, "update_interval", f"must be >= 1, got {c.update_interval}.")
    _require(
        c.interval_at_base_batch >= 1,
        "interval_at_base_batch",
        f"must be >= 1, got {c.interval_at_base_batch}.",
    )
    _require(
        c.micro_batch_size is None or c.micro_batch_size >= 2,
        "micro_batch_size",
        f"must be >= 2 or null, got {c.micro_batch_size}.",
    )

    try:
        device = torch.device(c.device) if c.device != "auto" else None
    except (RuntimeError, ValueError):
        raise ConfigError("device", f"not a device: {c.device!r} (use auto, cpu, cuda or cuda:N).") from None
    _require(
        device is None or device.type in ("cpu", "cuda"),
        "device",
        f"must be auto, cpu or cuda, got {c.device!r}.",
    )
    _require(c.eval_batch_size >= 1, "eval_batch_size", f"must be >= 1, got {c.eval_batch_size}.")
