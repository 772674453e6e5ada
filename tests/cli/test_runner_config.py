"""The runner's config: built-in defaults = configs/default.yaml, overrides, errors that name the field."""

import dataclasses
import re
from pathlib import Path
from typing import Tuple, Union

import pytest

from fop_asdl.cli.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    build_config,
    field_docs,
    load_config,
)
from fop_asdl.cli.protocol import RunSpec, update_interval
from fop_asdl.cli.search import edges, halton, method_points, search_points

from scaffold import REPO

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_default_yaml_is_the_builtin_default() -> None:
    assert load_config(REPO / "configs" / "default.yaml") == ExperimentConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    for batch in config.batch_sizes:  # every sweep point resolves (epochs map, interval, point values)
        for method in config.methods:
            for point in method_points(config, method):
                RunSpec.at(config, method, batch, point, config.seeds[0]).describe()


def test_every_field_is_documented_in_the_dataclass_and_the_runner_docs() -> None:
    docs = field_docs()
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    assert list(docs) == names and all(docs.values())
    runner_docs = (REPO / "docs" / "runner.md").read_text()
    missing = [n for n in names if not re.search(rf"^\| `{n}` \|", runner_docs, flags=re.MULTILINE)]
    assert not missing, f"docs/runner.md config table lacks {missing}"


def test_overrides_are_yaml_and_reach_into_mappings() -> None:
    values = apply_overrides(
        {},
        [
            "batch_sizes=[1024, 8192]",
            "lr_grid.fop=[0.01,0.02]",
            "micro_batch_size=null",
            "epochs={1024: 3, 8192: 4}",
            "epochs.8192=6",
            "target_accuracy=0.9",
        ],
    )
    config = build_config(values)
    assert config.batch_sizes == [1024, 8192] and config.epochs == {1024: 3, 8192: 6}
    assert config.search_space["fop"] == {"lr": [0.01, 0.02]}  # the older lr_grid.<method> still works
    assert config.search_space["sgd"] == ExperimentConfig().search_space["sgd"]
    assert config.micro_batch_size is None and config.target_accuracy == 0.9
    nested = load_config(overrides=["search_space.fop.damping=[0.1]", "search_space.sgd.lr=[0.1, 0.2]"])
    assert nested.search_space["fop"] == {"lr": [0.02, 0.03], "damping": [0.1]}
    assert nested.search_space["sgd"] == {"lr": [0.1, 0.2]}
    assert ExperimentConfig().search_space["fop"] == {"lr": [0.02, 0.03]}  # the default is not mutated


def test_legacy_lr_grid_files_load_as_lr_only_search_spaces(tmp_path: Path) -> None:
    legacy = tmp_path / "old.yaml"
    legacy.write_text("methods: [sgd, fop]\nlr_grid: {sgd: [0.1, 0.2], fop: [0.01, 0.02]}\n")
    config = load_config(legacy)
    assert config.search == "grid"
    assert config.search_space == {"sgd": {"lr": [0.1, 0.2]}, "fop": {"lr": [0.01, 0.02]}}
    replaced = load_config(legacy, ["lr_grid={sgd: [0.3, 0.4], fop: [0.5, 0.6]}"])
    assert replaced.search_space["sgd"] == {"lr": [0.3, 0.4]}
    legacy.write_text("lr_grid: {sgd: [0.1]}\nsearch_space: {sgd: {lr: [0.1]}}\n")
    with pytest.raises(ConfigError, match="'lr_grid': give search_space or the older lr_grid, not both"):
        load_config(legacy)
    committed = load_config(REPO / "results" / "fashion_mnist_study" / "config.yaml")  # written with lr_grid
    assert committed.search_space["fop"] == {"lr": [0.005, 0.02]}


@pytest.mark.parametrize(
    "override, field, message",
    [
        ("batch_size=512", "batch_size", "unknown field; did you mean 'batch_sizes'"),
        ("colour=red", "colour", "unknown field"),
        ("epochs=ten", "epochs", "expected int or a mapping"),
        ("batch_sizes=512", "batch_sizes", "expected a list of int"),
        ("damping=true", "damping", "expected float"),
        ("methods=[sgd, 3]", "methods", "expected a list of str"),
        ("lr_grid.fop=[-0.1, 0.1]", "search_space.fop.lr", "values of lr must be > 0, got -0.1"),
        ("lr_grid.kfac=[]", "search_space.kfac.lr", "lists no values"),
        ("search_space.sgd.damping=[0.1]", "search_space.sgd.damping", "sgd does not read 'damping'"),
        ("search_space.adamw.momentum=[0.9]", "search_space.adamw.momentum", "adamw does not read"),
        ("search_space.fop={damping: [0.1, 1]}", "search_space.fop", "must search lr"),
        ("search_space.fop.lr=[0.01, 0.02, 0.03]", "search_space", "same number of trials (equal budget); "
         "got sgd 2, adamw 2, kfac 2, fop 3"),
        ("search_space.kfac.ema_decay=[0.05, 2]", "search_space.kfac.ema_decay", "must be in (0, 1], got 2"),
        ("search_space.sgd.lr=[0.1, 0.1]", "search_space.sgd.lr", "has duplicates"),
        ("search_space.newton={lr: [0.1]}", "search_space", "unknown value 'newton'"),
        ("search=random", "search", "unknown value 'random'"),
        ("search_points=4", "search_points", "only for search: halton"),
        ("search=halton", "search_points", "needs the number of trials per method"),
        (("search=halton", "search_points=8", "search_space.sgd.lr=[0.1, 0.1001]"), "search_space.sgd",
         "trials repeat"),
        (("search=halton", "search_points=1", "search_space.sgd.momentum=[0.9995, 0.99999]"),
         "search_space.sgd.momentum", "rounded to 3 digits, leaves momentum in [0, 1)"),
        ("warmup=-1", "warmup", ">= 0"),
        ("warmup=2.5", "warmup", "needs a whole number of steps"),
        ("warmup_unit=iterations", "warmup_unit", "unknown value 'iterations'"),
        ("batch_sizes=[1]", "batch_sizes", "must be >= 2"),
        ("methods=[sgd, lbfgs]", "methods", "unknown value 'lbfgs'"),
        ("model=vgg", "model", "unknown value 'vgg'"),
        ("dataset=imagenet", "dataset", "unknown value 'imagenet'"),
        ("target_accuracy=85", "target_accuracy", "fraction"),
        ("epochs={1000: 0}", "epochs", "must be >= 1"),
        ("epochs={1024: 3}", "epochs", "no entry for batch size(s) [1000]"),
        ("update_interval=sometimes", "update_interval", "an int or 'auto'"),
        ("micro_batch_size=1", "micro_batch_size", ">= 2"),
        ("schedule=step", "schedule", "unknown value 'step'"),
        ("ema_decay=0", "ema_decay", "(0, 1]"),
        ("device=tpu", "device", "not a device"),
        ("seeds=[0, 0]", "seeds", "duplicates"),
        ("imbalance=0.5", "imbalance", ">= 1"),
    ],
)
def test_bad_values_fail_naming_the_field(
    override: Union[str, Tuple[str, ...]], field: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(overrides=[override] if isinstance(override, str) else list(override))
    assert info.value.field == field and f"'{field}'" in str(info.value)


def test_bad_yaml_file_fails_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("methods: [fop]\nsearch_spcae: {fop: {lr: [0.1]}}\n")
    with pytest.raises(ConfigError, match="'search_spcae': unknown field; did you mean 'search_space'"):
        load_config(path)


def test_run_point_errors_name_the_field() -> None:
    config = ExperimentConfig()
    with pytest.raises(ConfigError, match="'lr'"):
        RunSpec(config, "fop", 500, -0.1, 0)
    with pytest.raises(ConfigError, match="'batch_size'"):
        RunSpec(config, "fop", 1, 0.1, 0)
    with pytest.raises(ConfigError, match="'method'"):
        RunSpec(config, "newton", 500, 0.1, 0)


def test_protocol_lr_scaling_and_auto_interval() -> None:
    config = load_config(
        overrides=["base_batch=1024", "interval_at_base_batch=20", "batch_sizes=[1024, 8192]"]
    )
    assert RunSpec(config, "fop", 8192, 0.05, 0).lr == pytest.approx(0.4)
    assert [update_interval("auto", 20, b, 1024) for b in (512, 1024, 2048, 4096, 8192)] == [40, 20, 10, 5, 5]
    assert update_interval(7, 20, 8192, 1024) == 7


# --- the equal-budget search -----------------------------------------------------------------------------
def test_halton_is_the_radical_inverse_in_each_prime_base() -> None:
    assert [halton(i, 2) for i in range(1, 9)] == [0.5, 0.25, 0.75, 0.125, 0.625, 0.375, 0.875, 0.0625]
    assert [halton(i, 3) for i in range(1, 5)] == pytest.approx([1 / 3, 2 / 3, 1 / 9, 4 / 9])


def test_halton_points_are_log_uniform_and_rounded_to_3_digits() -> None:
    points = search_points("halton", {"lr": [0.01, 1.0], "damping": [0.001, 0.1]}, 4)
    # lr: 0.01 · 100^u with u = 1/2, 1/4, 3/4, 1/8; damping: 0.001 · 100^v with v = 1/3, 2/3, 1/9, 4/9
    assert points == [{"lr": 0.1, "damping": 0.00464}, {"lr": 0.0316, "damping": 0.0215},
                      {"lr": 0.316, "damping": 0.00167}, {"lr": 0.0178, "damping": 0.00774}]


def test_grid_points_are_every_combination_first_name_slowest() -> None:
    points = search_points("grid", {"lr": [0.1, 0.2], "damping": [1.0, 0.01]}, None)
    assert points == [{"lr": 0.1, "damping": 1.0}, {"lr": 0.1, "damping": 0.01},
                      {"lr": 0.2, "damping": 1.0}, {"lr": 0.2, "damping": 0.01}]


def test_method_points_put_lr_first_whatever_the_yaml_order() -> None:
    spaces = "{sgd: {lr: [0.01, 1]}, kfac: {damping: [0.01, 1], lr: [0.01, 1]}}"
    config = load_config(overrides=["search=halton", "search_points=3", "methods=[sgd, kfac]",
                                    f"search_space={spaces}"])
    sgd, kfac = method_points(config, "sgd"), method_points(config, "kfac")
    assert [p["lr"] for p in sgd] == [p["lr"] for p in kfac] == [0.1, 0.0316, 0.316]
    assert list(kfac[0]) == ["lr", "damping"]


def test_edges_flag_the_lowest_and_highest_values_tried() -> None:
    points = [{"lr": 0.1, "damping": 1.0}, {"lr": 0.2, "damping": 0.5}, {"lr": 0.4, "damping": 0.25}]
    assert edges(points[0], points) == ["lr low", "damping high"]
    assert edges(points[1], points) == []
    assert edges(points[2], points) == ["lr high", "damping low"]
    assert edges({"lr": 0.1}, [{"lr": 0.1}]) == []  # a single value tried is no edge


def test_searched_values_reach_the_run_config_and_its_name() -> None:
    config = load_config(overrides=["search_space.kfac={lr: [0.05, 0.1], damping: [0.01]}",
                                    "search_space.fop={lr: [0.05, 0.1], damping: [0.01]}"])
    spec = RunSpec.at(config, "kfac", 500, {"lr": 0.05, "damping": 0.01}, 1)
    assert spec.config.damping == 0.01 and config.damping == 1.0
    assert spec.name == "b500/kfac/lr0.05_damping0.01_seed1"
    assert spec.describe()["point"] == {"lr": 0.05, "damping": 0.01}
    unordered = RunSpec.at(config, "kfac", 500, {"ema_decay": 0.2, "lr": 0.05, "damping": 0.01}, 0)
    assert unordered.name == "b500/kfac/lr0.05_damping0.01_ema_decay0.2_seed0"  # one folder per point
    with pytest.raises(ConfigError, match="'damping'"):
        RunSpec.at(config, "sgd", 500, {"lr": 0.05, "damping": 0.01}, 0)
    with pytest.raises(ConfigError, match="'damping': must be > 0"):
        RunSpec.at(config, "kfac", 500, {"lr": 0.05, "damping": -1.0}, 0)


def test_train_runs_the_first_trial_unless_point_or_lr_replace_its_values() -> None:
    from fop_asdl.cli.main import _train_point, build_parser

    config = load_config(overrides=["search_space.kfac={lr: [0.05, 0.1], damping: [0.1]}"])
    def point(*args: str, method: str = "kfac") -> RunSpec:
        return _train_point(config, build_parser().parse_args(["train", "--method", method, *args]))

    assert point().point == {"lr": 0.05, "damping": 0.1}
    assert point("--point", "damping=0.01", "ema_decay=0.2").point == {"lr": 0.05, "damping": 0.01,
                                                                        "ema_decay": 0.2}
    assert point("--lr", "0.3").name == "b1000/kfac/lr0.3_damping0.1_seed0"
    with pytest.raises(ConfigError, match="'point': expected NAME=NUMBER"):
        point("--point", "damping")
    with pytest.raises(ConfigError, match="'momentum'"):
        point("--point", "momentum=0.9", method="adamw")
