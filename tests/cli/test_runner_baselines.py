"""The baselines of docs/baselines.md in the runner: each trains on the packaged data, resumes bit-identically
through ``--resume``, and is refused with the command that installs its library when that is missing."""

import re
import sys
from pathlib import Path

import pytest
import torch

import fop_asdl.cli.train as train_module
from fop_asdl.cli import main
from fop_asdl.cli.batches import load_data
from fop_asdl.cli.config import ConfigError, ExperimentConfig, load_config
from fop_asdl.cli.methods import METHODS
from fop_asdl.cli.protocol import RunSpec, build_optimizer
from fop_asdl.models import SmallCNN
from fop_asdl.optim import baselines
from fop_asdl.optim.hybrid import HybridOptimizer

from scaffold import REPO, SLICE, assert_resumed_run_equal, epoch_records

BASELINES = [name for name, m in METHODS.items() if m.libraries]
#: A base lr at which each trains in a few steps (inside its built-in range; probed on the packaged subset).
LR = {"lars": 3.0, "lamb": 0.02, "soap": 0.005, "shampoo_grafted": 0.001, "muon": 0.05,
      "adamw_schedulefree": 0.003}


def test_the_baselines_are_the_issues_six() -> None:
    assert BASELINES == ["lars", "lamb", "soap", "shampoo_grafted", "muon", "adamw_schedulefree"]
    assert set(LR) == set(BASELINES)


@pytest.mark.parametrize("method", BASELINES)
def test_trains_and_resumes_bit_identically(tmp_path: Path, monkeypatch, method: str) -> None:
    """Two epochs of 6 steps, whole and interrupted as epoch 2 starts then resumed: the same records, weights
    and optimizer state (SOAP's bases and Shampoo's roots are refreshed every 6 steps: the resumed epoch
    uses those of step 6, from the checkpoint), and better than chance (10 classes)."""
    args = ["train", "--method", method, "--batch-size", "100", "--point", f"lr={LR[method]}", "--no-progress",
            "--set", *SLICE, "epochs=2", "update_interval=6"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0

    train_epoch, calls = train_module.Trainer._train_epoch, []

    def interrupted(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the checkpoint holds epoch 1
        return train_epoch(self, *a, **k)

    monkeypatch.setattr(train_module.Trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "split")])
    monkeypatch.setattr(train_module.Trainer, "_train_epoch", train_epoch)
    assert main(args + ["--out", str(tmp_path / "split"), "--resume"]) == 0

    (run,) = (tmp_path / "whole").glob(f"b100/{method}/*")  # the first trial's other values in its name
    whole = assert_resumed_run_equal(run, tmp_path / "split" / run.relative_to(tmp_path / "whole"), 2,
                                     ("model", "optimizer", "scheduler", "batches", "rng"))
    assert max(r["test_accuracy"] for r in whole) > 0.3


def test_muon_steps_the_hidden_matrices_and_adamw_the_rest() -> None:
    config = load_config(overrides=["base_batch=100", "others_lr=0.002", "others_weight_decay=0.1"])
    model = SmallCNN()
    optimizer = build_optimizer(RunSpec(config, "muon", 200, 0.05, 0), model, maker=None)
    assert isinstance(optimizer, HybridOptimizer)
    muon, adamw = optimizer.optimizers
    assert [p for g in muon.param_groups for p in g["params"]] == [model.conv2.weight, model.fc1.weight]
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for g in adamw.param_groups for p in g["params"]] == [
        "conv1.weight", "conv1.bias", "conv2.bias", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert isinstance(adamw, torch.optim.AdamW)
    assert (muon.param_groups[0]["lr"], adamw.param_groups[0]["lr"]) == (0.1, 0.004)  # both scaled by 200/100
    assert adamw.param_groups[0]["weight_decay"] == 0.1


def test_soap_and_shampoo_refresh_at_the_runs_update_interval() -> None:
    config = load_config(overrides=["base_batch=100", "interval_at_base_batch=10"])
    for method, key in (("soap", "precondition_frequency"), ("shampoo_grafted", None)):
        spec = RunSpec(config, method, 400, 0.001, 0)  # auto: max(5, round(10 · 100 / 400)) = 5
        optimizer = build_optimizer(spec, SmallCNN(), maker=None)
        steps = optimizer.param_groups[0][key] if key else optimizer.preconditioning_compute_steps
        assert steps == spec.interval == 5


def test_schedulefree_is_checkpointed_in_eval_mode(tmp_path: Path) -> None:
    """The checkpoint holds x, the weights evaluated (and reported), with the optimizer in eval mode (the
    resume test above switches it back to y, as a step in eval mode would raise)."""
    args = ["train", "--method", "adamw_schedulefree", "--batch-size", "100", "--lr", "0.003", "--no-progress",
            "--out", str(tmp_path), "--set", *SLICE, "epochs=1"]
    assert main(args) == 0
    (run,) = tmp_path.glob("b100/*/*")
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert [g["train_mode"] for g in state["optimizer"]["param_groups"]] == [False]
    model = SmallCNN()
    model.load_state_dict(state["model"])
    data = load_data(load_config(overrides=SLICE), torch.device("cpu"))
    assert train_module.evaluate(model, data.x_test, data.y_test, 100) == epoch_records(run)[0]["test_accuracy"]


# --- a missing library ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", BASELINES)
def test_refused_with_the_install_command_when_its_library_is_missing(tmp_path: Path, monkeypatch, capsys,
                                                                      method: str) -> None:
    (library,) = METHODS[method].libraries
    monkeypatch.setitem(sys.modules, library, None)  # `import library` now raises ImportError
    install = 'pip install ".[baselines]"'
    with pytest.raises(ConfigError, match=re.escape(install)):
        load_config(overrides=[f"methods=[{method}]"])
    assert main(["train", "--method", method, "--lr", "0.01", "--no-progress", "--out", str(tmp_path),
                 "--set", *SLICE]) == 2
    err = capsys.readouterr().err
    assert f"method {method!r} needs {library}" in err and install in err and baselines.PINNED[library] in err
    assert not list(tmp_path.glob("b*"))  # refused before any run started
    with pytest.raises(baselines.MissingLibraryError, match=re.escape(install)):
        METHODS[method].optimizer.build([torch.nn.Parameter(torch.zeros(2, 2))], 0.01, ExperimentConfig())


def test_the_pins_are_the_extra_of_pyproject() -> None:
    text = (REPO / "pyproject.toml").read_text()
    extra = re.search(r"^baselines = \[(.*)\]$", text, flags=re.MULTILINE).group(1)
    assert [s.strip().strip('"') for s in extra.split(",")] == list(baselines.PINNED.values())
    assert re.search(r'^dev = \[.*"fop_asdl\[baselines\]".*\]', text, flags=re.MULTILINE)  # CI tests them
