"""The runner's method table (fop_asdl/cli/methods.py): every entry complete and in agreement with the
library's makers, the rest of the runner naming no method, a new method being one entry, and the runner's
modules free of import circles."""

import ast
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Set

import asdl
import pytest
import torch
from torch import nn

import fop_asdl.cli.protocol as protocol
from fop_asdl import make_gradient_maker
from fop_asdl.cli import main
from fop_asdl.cli.config import ConfigError, ExperimentConfig, load_config
from fop_asdl.cli.experiment import ExperimentSettings
from fop_asdl.cli.methods import (
    LR,
    METHODS,
    MOMENTUM,
    WEIGHT_DECAY,
    EpochStart,
    Hyperparameter,
    MakerInputs,
    MethodSpec,
    OptimizerSpec,
    searchable,
)
from fop_asdl.cli.protocol import RunSpec, build_gradient_maker
from fop_asdl.cli.search import method_points
from fop_asdl.optim import baselines
from fop_asdl.registry import GRADIENT_MAKERS

from scaffold import REPO, SLICE

PACKAGE = REPO / "fop_asdl"
CLI = PACKAGE / "cli"


# --- every entry complete -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(METHODS))
def test_every_entry_is_complete(name: str) -> None:
    method = METHODS[name]
    assert method.name == name and method.label and method.optimizer.label
    assert method.maker in GRADIENT_MAKERS
    names = method.hyperparameter_names
    assert names[0] == "lr" and len(set(names)) == len(names)
    fields = {f.name: f for f in dataclasses.fields(ExperimentSettings)}
    defaults = ExperimentSettings()
    for h in method.hyperparameters[1:]:  # lr is the base lr; every other one is a config field
        assert h.name in fields, f"{name} searches {h.name!r}, which is no config field"
        assert h.valid(getattr(defaults, h.name)), f"the default {h.name} is outside its range {h.valid_text}"
    options = method.options(MakerInputs(ExperimentConfig(), steps_per_epoch=7))
    assert isinstance(options, dict) and not {"micro_batch_size", "kl_clip", "lr"} & set(options)
    assert method.epoch_start is None or callable(method.epoch_start)
    assert method.preconditioning or not method.takes_others_optimizer  # the hybrid splits by the maker's blocks
    assert not (method.own_parameters and method.takes_others_optimizer)  # one way to choose AdamW's share
    assert set(method.libraries) <= set(baselines.PINNED)  # a library it needs is in the baselines extra
    space = list(defaults.search_space[name])  # in the order of a point's dimensions
    assert [n for n in method.hyperparameter_names if n in space] == space


def test_one_config_field_has_one_range() -> None:
    ranges = searchable()
    assert list(ranges) == ["lr", "weight_decay", "momentum", "damping", "ema_decay", "fngd_alpha", "others_lr"]
    assert all(isinstance(h, Hyperparameter) for h in ranges.values())


@pytest.mark.parametrize("name", list(METHODS))
def test_the_table_agrees_with_the_makers_on_what_they_take(name: str) -> None:
    """What the table withholds (FNGD's and the plain maker's kl_clip) the maker refuses; what it passes,
    the maker takes."""
    method = METHODS[name]
    options = method.options(MakerInputs(ExperimentConfig(), steps_per_epoch=7))

    def build(**extra):
        config = (asdl.PreconditioningConfig(curvature_upd_interval=1, preconditioner_upd_interval=1)
                  if method.preconditioning else None)
        lr = {"lr": lambda: 0.1} if method.needs_lr and "lr" not in extra else {}
        return make_gradient_maker(method.maker, nn.Sequential(nn.Linear(4, 3)), config, **options, **lr, **extra)

    build()
    clipped = dict(kl_clip=0.01, lr=lambda: 0.1)
    if method.takes_kl_clip:
        build(**clipped)
    else:
        with pytest.raises(TypeError, match="kl_clip"):
            build(**clipped)
    if method.takes_ema_bias_correction:
        build(ema_bias_correction=True)


def test_hylo_hears_of_each_epoch_and_of_lr_drops() -> None:
    calls = []
    maker = SimpleNamespace(on_epoch_start=lambda epoch, dropped: calls.append((epoch, dropped)))
    METHODS["hylo"].epoch_start(EpochStart(maker, None, 3, True))
    assert calls == [(3, True)]
    assert [m for m in METHODS if METHODS[m].epoch_start is not None] == ["hylo"]
    assert [m for m in METHODS if METHODS[m].block_stats] == ["fop", "fop_ekfac"]


@pytest.mark.parametrize("name", ["ekfac", "fop_ekfac", "shampoo"])
def test_the_makers_of_issue_23_train_in_the_runner(tmp_path: Path, name: str) -> None:
    """Two epochs of 6 steps with curvature every 2 (steps without curvature between), at the first point of
    the built-in grid: better than chance (10 classes), FOP's β and η reported for FOP over EKFAC, and the
    maker's own state (EKFAC's bases and rescaling, Shampoo's roots) in the checkpoint."""
    point = {k: v[0] for k, v in ExperimentSettings().search_space[name].items()}
    args = ["train", "--method", name, "--batch-size", "100", "--no-progress", "--out", str(tmp_path),
            "--point", *(f"{k}={v}" for k, v in point.items()), "--set", *SLICE, "epochs=2", "update_interval=2"]
    assert main(args) == 0
    (run,) = (tmp_path / "b100" / name).glob("*")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["run"]["point"] == point and summary["best_accuracy"] > 0.2
    assert ("fop_stats_per_epoch" in summary) == (name == "fop_ekfac")
    maker = torch.load(run / "checkpoint.pt", weights_only=True)["maker"]
    assert ("roots" if name == "shampoo" else "ekfac") in maker


# --- the committed studies build what they built --------------------------------------------------------
STUDIES = sorted(REPO.glob("results/*/config.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.parent.name)
def test_every_committed_run_is_named_and_configured_as_it_ran(path: Path) -> None:
    """Each run of a committed study, rebuilt from the study's config and its point: the same folder, the
    same ``run`` record and the same config as its summary.json (``lr_grid``: the older name of
    search_space, in the summaries of the first study)."""
    study, config = path.parent, load_config(path)
    summaries = sorted(study.glob("b*/*/*/summary.json"))
    assert summaries
    for summary_path in summaries:
        summary = json.loads(summary_path.read_text())
        run = summary["run"]
        spec = RunSpec.at(config, run["method"], run["batch_size"], run.get("point", {"lr": run["base_lr"]}),
                          run["seed"])
        assert spec.name == summary_path.parent.relative_to(study).as_posix()
        assert {k: v for k, v in spec.describe().items() if k in run} == run
        ran = json.loads(json.dumps(dataclasses.asdict(spec.config)))  # as JSON wrote it: int keys as strings
        assert {k: v for k, v in summary["config"].items() if k != "lr_grid"} == {
            k: v for k, v in ran.items() if k in summary["config"]}


def test_a_committed_study_builds_the_same_makers(monkeypatch) -> None:
    """results/fashion_mnist_lt100 sets kl_clip for every method: it reaches K-FAC, FOP and HyLo (with the
    run's current lr), not SGD, AdamW or FNGD, whose makers refuse it. Values as the runner built them
    before the method table."""
    seen = []
    monkeypatch.setattr(protocol, "make_gradient_maker",
                        lambda name, model, cfg, **kw: seen.append((name, cfg, kw)))
    config = load_config(REPO / "results" / "fashion_mnist_lt100" / "config.yaml")
    current_lr = lambda: 0.1  # noqa: E731
    for method in config.methods:
        spec = RunSpec.at(config, method, 256, method_points(config, method)[0], 0)
        build_gradient_maker(spec, nn.Linear(4, 3), local_batch=256, steps_per_epoch=7, lr=current_lr)
    clip = {"kl_clip": 0.001, "lr": current_lr}
    assert [(name, kw) for name, _, kw in seen] == [
        ("sgd", {}), ("sgd", {}), ("kfac", clip), ("fop", clip),
        ("fngd", {"iters_per_epoch": 7, "alpha": 0.0464}), ("hylo", {**clip, "iters_per_epoch": 7}),
    ]
    curvature = [(name, cfg.damping, cfg.ema_decay, cfg.curvature_upd_interval, cfg.preconditioner_upd_interval,
                  cfg.ignore_modules) for name, cfg, _ in seen if cfg is not None]
    assert curvature == [("kfac", 0.03, 0.05, 10, 10, None), ("fop", 0.03, 0.05, 10, 10, None),
                         ("hylo", 0.0669, 0.05, 10, 10, None)]
    assert [name for name, cfg, _ in seen if cfg is None] == ["sgd", "sgd", "fngd"]


# --- the rest of the runner names no method -------------------------------------------------------------
def _is_method(node: ast.AST) -> bool:
    """``method``, ``spec.method``, ``r.method``, ..."""
    return (isinstance(node, ast.Name) and node.id.endswith("method")) or (
        isinstance(node, ast.Attribute) and node.attr == "method")


def _names_a_method(node: ast.AST) -> bool:
    if isinstance(node, ast.Constant):
        return node.value in METHODS
    return isinstance(node, (ast.Tuple, ast.List, ast.Set)) and any(_names_a_method(e) for e in node.elts)


@pytest.mark.parametrize("path", sorted(p for p in CLI.glob("*.py") if p.name != "methods.py"),
                         ids=lambda p: p.name)
def test_no_module_but_the_table_branches_on_a_method_name(path: Path) -> None:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            if any(map(_is_method, operands)) and any(map(_names_a_method, operands)):
                found.append(node.lineno)
        elif isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == "METHODS":
            if _names_a_method(node.slice):  # METHODS["fop"]
                found.append(node.lineno)
    assert not found, f"{path.name} branches on a method name at lines {found}"


# --- a new method is one entry --------------------------------------------------------------------------
def test_a_new_method_is_one_table_entry(tmp_path: Path, monkeypatch, capsys) -> None:
    """RMSprop, an optimizer the runner never had, with an epoch hook: one entry, and it is checked,
    searched, trained, checkpointed, reported and listed by --help."""
    epochs: List[int] = []
    rmsprop = OptimizerSpec(
        "RMSprop", (LR, WEIGHT_DECAY, MOMENTUM),
        lambda params, lr, c: torch.optim.RMSprop(params, lr=lr, momentum=c.momentum, weight_decay=c.weight_decay),
    )
    entry = MethodSpec(name="rmsprop", label="RMSprop", optimizer=rmsprop, maker="sgd",
                       epoch_start=lambda e: epochs.append(e.epoch))
    monkeypatch.setitem(METHODS, "rmsprop", entry)

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "rmsprop (RMSprop)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ConfigError, match="rmsprop does not read 'damping'"):
        load_config(overrides=["methods=[rmsprop]", "search_space={rmsprop: {lr: [0.01], damping: [1.0]}}"])
    code = main(["compare", "--no-progress", "--out", str(tmp_path), "--set", *SLICE, "epochs=2",
                 "batch_sizes=[100]", "methods=[sgd, rmsprop]", "seeds=[0]",
                 "search_space={sgd: {lr: [0.1]}, rmsprop: {momentum: [0.5], lr: [0.001]}}"])
    assert code == 0
    assert epochs == [1, 2]
    run = tmp_path / "b100" / "rmsprop" / "lr0.001_momentum0.5_seed0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["momentum"] == 0.5 and summary["run"]["point"] == {"lr": 0.001, "momentum": 0.5}
    assert summary["best_accuracy"] > 0.3  # better than chance (10 classes) after 12 steps
    state = torch.load(run / "checkpoint.pt", weights_only=True)["optimizer"]
    assert all("square_avg" in s for s in state["state"].values())  # RMSprop's, not SGD's
    assert "| 100 | rmsprop @ lr 0.001, momentum 0.5 (0.001) |" in (tmp_path / "results.md").read_text()


# --- the runner's modules: no import circle, the library never imports the runner, sizes ---------------
def _cli_imports(path: Path) -> Set[str]:
    """The runner modules ``path`` imports (any import, TYPE_CHECKING ones included)."""
    modules = {p.stem for p in CLI.glob("*.py")}
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fop_asdl.cli."):
            out.add(node.module.split(".")[2])
    return out & modules


def test_the_runner_has_no_import_circle() -> None:
    graph: Dict[str, Set[str]] = {p.stem: _cli_imports(p) for p in CLI.glob("*.py")}
    done: Set[str] = set()

    def visit(module: str, path: List[str]) -> None:
        if module in path:
            raise AssertionError(f"import circle: {' -> '.join(path[path.index(module):] + [module])}")
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert graph["experiment"] == set() and graph["methods"] == {"experiment"}


def _absolute_imports(path: Path) -> List[str]:
    """Every module ``path`` imports, relative imports resolved (``from ..cli import x``: fop_asdl.cli,
    fop_asdl.cli.x)."""
    package = path.relative_to(REPO).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(part for part in (base, node.module) if part)
            out += [module] + [f"{module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_the_library_never_imports_the_runner() -> None:
    assert "fop_asdl.cli" in _absolute_imports(PACKAGE / "__main__.py")  # the resolution works
    for path in PACKAGE.rglob("*.py"):
        if CLI in path.parents or path.name == "__main__.py":  # __main__: the command's entry point
            continue
        runner = [m for m in _absolute_imports(path) if m == "fop_asdl.cli" or m.startswith("fop_asdl.cli.")]
        assert not runner, f"{path.relative_to(REPO)} imports the runner: {runner}"


@pytest.mark.parametrize("path", sorted(CLI.glob("*.py")), ids=lambda p: p.name)
def test_runner_files_and_classes_stay_small(path: Path) -> None:
    text = path.read_text()
    assert len(text.splitlines()) <= 400
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= 250, f"class {node.name} is over 250 lines"
