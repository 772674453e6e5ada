"""A study is one code version: ``--resume`` refuses a process whose library code, uncommitted library
changes, torch threads or arithmetic libraries differ from the study's first process, unless
``--allow-mixed-study``, which the record then shows; a config field added since a checkpoint keeps it
resumable."""

import json
from pathlib import Path

import pytest
import torch

import fop_asdl.cli.environment as environment_module
import fop_asdl.cli.train as train_module
from fop_asdl.cli import main
from fop_asdl.cli.batches import load_data
from fop_asdl.cli.config import load_config
from fop_asdl.cli.distributed import Topology
from fop_asdl.cli.environment import PACKAGE_ROOT, code_differences, git_state
from fop_asdl.cli.protocol import RunSpec
from fop_asdl.cli.report import results_markdown

from scaffold import SLICE

ARGS = ["train", "--method", "sgd", "--batch-size", "100", "--lr", "0.1", "--no-progress", "--set", *SLICE,
        "epochs=1"]


def _lines(out: Path) -> list:
    return [json.loads(line) for line in (out / "environment.jsonl").read_text().splitlines()]


def _at_another_commit(monkeypatch, **changes) -> None:
    """This process runs another library: git_state reports another commit (and the package's tree)."""
    here = git_state(PACKAGE_ROOT) or {"commit": "a" * 40, "dirty": False, "library": "b" * 40,
                                       "library_changes": None}
    monkeypatch.setattr(environment_module, "git_state", lambda root: {**here, **changes})


def test_a_resume_at_a_changed_commit_is_refused_and_with_the_override_recorded(tmp_path: Path, monkeypatch,
                                                                                  capsys) -> None:
    args = ARGS + ["--out", str(tmp_path)]
    assert main(args) == 0
    capsys.readouterr()
    _at_another_commit(monkeypatch, commit="0" * 40, library="1" * 40)
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "differs in: library commit." in err and "--allow-mixed-study" in err
    assert len(_lines(tmp_path)) == 1  # refused before anything was written

    assert main(args + ["--resume", "--allow-mixed-study"]) == 0
    first, resumed = _lines(tmp_path)
    assert "resumed_despite" not in first and resumed["resumed_despite"] == ["library commit"]
    assert resumed["git"]["commit"] == "0" * 40
    (summary,) = tmp_path.glob("b100/sgd/*/summary.json")  # the finished run, re-reported by this process
    assert json.loads(summary.read_text())["environment"]["resumed_despite"] == ["library commit"]
    table = results_markdown(load_config(tmp_path / "config.yaml"), [], [first, resumed])
    assert table.count("Resumed with --allow-mixed-study although library commit differed") == 1
    # The override is needed on every later resume: the study's first process still ran other code.
    assert main(args + ["--resume"]) == 2


def test_other_threads_or_uncommitted_library_changes_are_refused(tmp_path: Path, monkeypatch, capsys) -> None:
    args = ARGS + ["--out", str(tmp_path)]
    assert main(args) == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert main(args + ["--resume"]) == 2
    finally:
        torch.set_num_threads(threads)
    assert "differs in: torch threads." in capsys.readouterr().err
    _at_another_commit(monkeypatch, library_changes="0123456789abcdef")
    assert main(args + ["--resume"]) == 2
    assert "differs in: uncommitted library changes." in capsys.readouterr().err
    monkeypatch.undo()
    assert main(args + ["--resume"]) == 0  # the same code and threads: resumed
    assert "resumed_despite" not in _lines(tmp_path)[-1]


def test_what_counts_as_other_code() -> None:
    record = {"git": {"commit": "c1", "dirty": False, "library": "t1", "library_changes": None},
              "threads": {"torch": 4}, "versions": {"fop_asdl": "0.1.0", "torch": "2.13.0", "numpy": "2.4"}}

    def changed(**parts):
        return code_differences(record, {**record, **parts})

    assert changed() == []
    assert changed(git={**record["git"], "commit": "c2"}) == []  # a commit that left the library alone
    assert changed(git={**record["git"], "library": "t2"}) == ["library commit"]
    assert changed(versions={**record["versions"], "torch": "2.14.0"}) == ["torch version"]
    assert changed(versions={"fop_asdl": "0.1.0", "torch": "2.13.0"}) == []  # not recorded by both: not compared
    older = {**record, "git": {"commit": "c1", "dirty": True}}  # a record from before the library fields
    assert code_differences(older, {**record, "git": {"commit": "c1", "dirty": False}}) == [
        "uncommitted library changes"]
    assert code_differences(older, record) == ["uncommitted library changes"]
    assert code_differences({**record, "git": None}, record) == ["library commit"]  # installed vs checkout
    installed = {**record, "git": None}
    assert code_differences(installed, {**installed, "versions": {**record["versions"], "fop_asdl": "0.2"}}) == [
        "library version"]


def test_a_field_added_after_a_checkpoint_keeps_it_resumable(tmp_path: Path) -> None:
    """A checkpoint written before ``others_lr`` existed ran with its default: it resumes, and is refused
    for a run that sets another value."""
    args = ARGS + ["--out", str(tmp_path)]
    assert main(args) == 0
    (checkpoint,) = tmp_path.glob("b100/sgd/*/checkpoint.pt")
    state = torch.load(checkpoint, weights_only=True)
    del state["config"]["others_lr"]
    torch.save(state, checkpoint)
    assert main(args + ["--resume"]) == 0

    config = load_config(overrides=SLICE + ["epochs=1"])
    cpu = torch.device("cpu")
    for others_lr, refused in ((config.others_lr, False), (0.5, True)):
        spec = RunSpec(load_config(overrides=SLICE + ["epochs=1", f"others_lr={others_lr}"]), "sgd", 100, 0.1, 0)
        trainer = train_module.Trainer(spec, load_data(config, cpu), Topology(0, 1, cpu))
        if refused:
            with pytest.raises(train_module.RunDirError, match="others_lr"):
                trainer.load_state_dict(state)
        else:
            trainer.load_state_dict(state)
