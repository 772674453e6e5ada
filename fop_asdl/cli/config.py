"""The experiment configuration: :class:`ExperimentConfig`, read from YAML plus ``--set key=value`` overrides.

Its fields, their meaning and their defaults (the built-in experiment, which ``configs/default.yaml``
spells out for users to copy) are declared in :mod:`.experiment`. Every value is checked when the config
is built (:mod:`.checks`), so a typo or an impossible value fails before any data is loaded, with a
message naming the field.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import yaml

from .checks import check_config
from .errors import ConfigError
from .experiment import ExperimentSettings
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
    "with_defaults",
    "changed_keys",
]

#: The field that held per-method learning-rate grids before ``search_space``: still read, as
#: ``search_space: {method: {lr: grid}}``, so older configs and results folders load unchanged.
LEGACY_LR_GRID = "lr_grid"


@dataclass(frozen=True)
class ExperimentConfig(ExperimentSettings):
    """An experiment (the fields of :class:`~.experiment.ExperimentSettings`), checked when built: the
    constructor, ``dataclasses.replace`` and :func:`build_config` raise :class:`ConfigError` for the first
    wrong type or impossible value."""

    def __post_init__(self) -> None:
        check_config(self)


def training_settings(values: Mapping[str, Any]) -> Dict[str, Any]:
    """A config (as a dict) without what only changes the report: target_accuracy, unless stop_at_target
    ends runs there. Resume compares these, so a study can be resumed with a target known only after
    some of its runs (the paper's "AdamW's best accuracy"), and its finished runs are re-reported."""
    return {k: v for k, v in values.items() if k != "target_accuracy" or values.get("stop_at_target")}


def with_defaults(saved: Mapping[str, Any]) -> Dict[str, Any]:
    """A config saved before some field existed, that field at its default: what the run ran with, since a
    new field's default keeps the behaviour from before it. Resume compares this, so a checkpoint stays
    resumable when a field is added (and is refused when the field is set to another value)."""
    return {**dataclasses.asdict(ExperimentConfig()), **saved}


def changed_keys(current: Mapping[str, Any], saved: Mapping[str, Any]) -> List[str]:
    """The keys whose values differ (a key missing on one side counts as changed), sorted: what resume
    names when it refuses."""
    return sorted(k for k in set(current) | set(saved) if current.get(k) != saved.get(k))


def field_docs() -> Dict[str, str]:
    """Field name -> its docstring (the string literal after it in the class body), for ``--help``."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(ExperimentSettings)))
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
