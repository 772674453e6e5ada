"""Validation of an experiment's settings (:class:`~.experiment.ExperimentSettings`): types from the
annotations, then every value, so an impossible experiment fails before any data is loaded, with a message
naming the field. :class:`~.config.ExperimentConfig` runs it whenever a config is built."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Dict, List, Sequence, Union

import torch

from ..data import DATASETS
from ..models import MODELS
from .errors import ConfigError
from .experiment import ExperimentSettings
from .methods import METHODS, in_range, missing_library, searchable
from .search import SEARCH_MODES, method_points, point_text
from .warmup import WARMUP_UNITS

__all__ = ["check_config"]

SCHEDULES = ("plateau", "cosine", "constant")
AUGMENTATIONS = ("auto", "none", "crop_flip")


def check_config(config: ExperimentSettings) -> None:
    """Raise :class:`ConfigError` for the first wrong type or impossible value."""
    _check_types(config)
    _check_values(config)
    _check_search(config)


def _check_types(config: ExperimentSettings) -> None:
    hints = typing.get_type_hints(type(config))
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


def _check_values(c: ExperimentSettings) -> None:
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
        missing = missing_library(METHODS[m])
        _require(missing is None, "methods", str(missing))
    _require(len(set(c.methods)) == len(c.methods), "methods", f"has duplicates: {c.methods}.")
    _require(len(c.batch_sizes) > 0, "batch_sizes", "must hold at least one batch size.")
    for b in c.batch_sizes:
        _require(b >= 2, "batch_sizes", f"every batch must be >= 2 (FOP splits it in two halves), got {b}.")
    _require(
        len(set(c.batch_sizes)) == len(c.batch_sizes), "batch_sizes", f"has duplicates: {c.batch_sizes}."
    )
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
    _one_of(c.warmup_unit, WARMUP_UNITS, "warmup_unit")
    _require(c.warmup >= 0, "warmup", f"must be >= 0, got {c.warmup}.")
    _require(c.warmup_unit == "epochs" or float(c.warmup).is_integer(), "warmup",
             f"warmup_unit steps needs a whole number of steps, got {c.warmup}.")
    _require(0 <= c.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {c.label_smoothing}.")
    for h in searchable().values():  # the config's value of every searchable field
        if h.name != "lr":
            value = getattr(c, h.name)
            _require(h.valid(value), h.name, f"must be {h.valid_text}, got {value}.")
    _require(c.kl_clip is None or c.kl_clip > 0, "kl_clip", f"must be > 0 or null, got {c.kl_clip}.")
    if c.others_optimizer is not None:
        _one_of(c.others_optimizer, ["adamw"], "others_optimizer")
    _require(c.others_lr > 0, "others_lr", f"must be > 0, got {c.others_lr}.")
    _require(c.others_weight_decay >= 0, "others_weight_decay", f"must be >= 0, got {c.others_weight_decay}.")
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


def _check_search(c: ExperimentSettings) -> None:
    """Known methods and hyperparameters, valid values, distinct trials, and the same number of trials for
    every method of the study (the equal-budget rule)."""
    _one_of(c.search, SEARCH_MODES, "search")
    if c.search == "grid":
        _require(c.search_points is None, "search_points",
                 f"only for search: halton (a grid's size is its number of trials); got {c.search_points}.")
    else:
        _require(c.search_points is not None and c.search_points >= 1, "search_points",
                 f"search: halton needs the number of trials per method, >= 1; got {c.search_points}.")
    for m in c.methods:
        _require(bool(c.search_space.get(m)), f"search_space.{m}",
                 f"method '{m}' is in methods but has no search space.")
    trials = {}
    for m, space in c.search_space.items():
        _one_of(m, list(METHODS), "search_space")
        _require("lr" in space, f"search_space.{m}",
                 f"must search lr (the base learning rate); it has {sorted(space)}.")
        reads = METHODS[m].hyperparameter_names
        for name, values in space.items():
            where = f"search_space.{m}.{name}"
            _require(name in reads, where, f"{m} does not read '{name}'; it reads {', '.join(reads)}.")
            _check_space_values(c.search, name, values, where)
        points = method_points(c, m)
        for p in points:  # a value rounded to 3 digits may leave its range (momentum 0.99996 -> 1.0)
            for name, v in p.items():
                _require(in_range(name, v), f"search_space.{m}.{name}",
                         f"the trial {point_text(p)}, rounded to 3 digits, leaves {name} {_range(name)}: "
                         f"narrow the range.")
        texts = [point_text(p) for p in points]
        repeated = sorted({t for t in texts if texts.count(t) > 1})
        _require(not repeated, f"search_space.{m}", f"trials repeat ({'; '.join(repeated)}): widen the range "
                                                      f"(Halton values keep 3 significant digits).")
        trials[m] = len(points)
    studied = {m: trials[m] for m in c.methods}
    _require(len(set(studied.values())) == 1, "search_space",
             f"every method must get the same number of trials (equal budget); got "
             f"{', '.join(f'{m} {n}' for m, n in studied.items())}.")


def _check_space_values(mode: str, name: str, values: List[float], where: str) -> None:
    for v in values:
        _require(in_range(name, v), where, f"values of {name} must be {_range(name)}, got {v}.")
    if mode == "grid":
        _require(len(values) > 0, where, "lists no values.")
        _require(len(set(values)) == len(values), where, f"has duplicates: {values}.")
    else:
        _require(len(values) == 2 and 0 < values[0] < values[1], where,
                 f"search: halton needs [low, high] with 0 < low < high (log-uniform), got {values}.")


def _range(name: str) -> str:
    return searchable()[name].valid_text
