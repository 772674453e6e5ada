"""The runner's config: built-in defaults = configs/default.yaml, overrides, errors that name the field."""

import dataclasses
import re
from pathlib import Path

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

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_default_yaml_is_the_builtin_default() -> None:
    assert load_config(REPO / "configs" / "default.yaml") == ExperimentConfig()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid(path: Path) -> None:
    config = load_config(path)
    for batch in config.batch_sizes:  # every sweep point resolves (epochs map, interval)
        for method in config.methods:
            RunSpec(config, method, batch, config.lr_grid[method][0], config.seeds[0]).describe()


def test_every_field_is_documented_in_the_dataclass_and_the_readme() -> None:
    docs = field_docs()
    names = [f.name for f in dataclasses.fields(ExperimentConfig)]
    assert list(docs) == names and all(docs.values())
    readme = (REPO / "README.md").read_text()
    missing = [n for n in names if not re.search(rf"^\| `{n}` \|", readme, flags=re.MULTILINE)]
    assert not missing, f"README config table lacks {missing}"


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
    assert (
        config.lr_grid["fop"] == [0.01, 0.02] and config.lr_grid["sgd"] == ExperimentConfig().lr_grid["sgd"]
    )
    assert config.micro_batch_size is None and config.target_accuracy == 0.9


@pytest.mark.parametrize(
    "override, field, message",
    [
        ("batch_size=512", "batch_size", "unknown field; did you mean 'batch_sizes'"),
        ("colour=red", "colour", "unknown field"),
        ("epochs=ten", "epochs", "expected int or a mapping"),
        ("batch_sizes=512", "batch_sizes", "expected a list of int"),
        ("damping=true", "damping", "expected float"),
        ("methods=[sgd, 3]", "methods", "expected a list of str"),
        ("lr_grid.fop=[-0.1]", "lr_grid.fop", "must be > 0"),
        ("lr_grid.kfac=[]", "lr_grid.kfac", "has no learning rates"),
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
def test_bad_values_fail_naming_the_field(override: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(overrides=[override])
    assert info.value.field == field and f"'{field}'" in str(info.value)


def test_bad_yaml_file_fails_naming_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("methods: [fop]\nlr_gird: {fop: [0.1]}\n")
    with pytest.raises(ConfigError, match="'lr_gird': unknown field; did you mean 'lr_grid'"):
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
