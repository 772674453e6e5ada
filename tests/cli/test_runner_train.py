"""The runner end to end on small slices: `train`, `compare`, outputs, bit-identical resume, run options."""

import importlib.metadata
import json
import math
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import fop_asdl
import fop_asdl.cli.protocol as protocol
import fop_asdl.cli.train as train_module
from fop_asdl.cli import main
from fop_asdl.cli.compare import MethodResult
from fop_asdl.cli.config import load_config
from fop_asdl.cli.distributed import Topology
from fop_asdl.cli.protocol import RunSpec, build_gradient_maker
from fop_asdl.cli.report import accuracy_by_batch
from fop_asdl.models import SmallCNN

from scaffold import REPO, SLICE, assert_resumed_run_equal, epoch_records

CPU = torch.device("cpu")
TOPO = Topology(0, 1, CPU)


def _git_head():
    """What the environment record must say: this checkout's commit, or None outside a git checkout."""
    repo = REPO
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "--show-toplevel", "HEAD"],
                          capture_output=True, text=True)
    if head.returncode != 0 or Path(head.stdout.split()[0]).resolve() != repo:
        return None

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout

    return {"commit": head.stdout.split()[1],
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip()),
            "library": git("rev-parse", "HEAD:fop_asdl").strip(),  # the package's tree at the commit
            "library_changed": bool(git("status", "--porcelain", "--untracked-files=all", "--", "fop_asdl"))}


def test_train_one_epoch_writes_records_summary_and_checkpoint(tmp_path: Path, capsys) -> None:
    one_epoch = ["train", "--method", "fop", "--batch-size", "100", "--lr", "0.05", "--no-progress",
                 "--out", str(tmp_path), "--set", *SLICE, "epochs=1", "target_accuracy=0.3"]
    code = main(one_epoch)
    assert code == 0
    run_dir = tmp_path / "b100" / "fop" / "lr0.05_seed0"
    (record,) = epoch_records(run_dir)
    assert record["epoch"] == 1 and record["steps"] == 6 and record["lr"] == pytest.approx(0.05)
    assert 0.0 < record["train_loss"] < 3.0 and 0.3 <= record["test_accuracy"] <= 1.0
    assert record["train_seconds"] > 0 and record["eval_seconds"] > 0 and record["load_average"] >= 0
    for block in ("conv1", "conv2", "fc1", "fc2"):
        beta, eta = record["fop_stats"][block]["beta"], record["fop_stats"][block]["eta"]
        assert -0.5 <= beta["min"] <= beta["mean"] <= beta["max"] <= 0.5 and beta["steps"] == 6
        assert 0.0 <= eta["min"] <= eta["mean"] <= eta["max"] <= 2.0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_to_target"] == 1 and summary["train_seconds_to_target"] == record["train_seconds"]
    assert summary["seeds"] == {"model_init": 0, "data_order": 0, "augmentation": 1}
    assert summary["run"]["update_interval"] == 10 and summary["config"]["subset_size"] == 600
    assert set(torch.load(run_dir / "checkpoint.pt", weights_only=True)) >= {
        "model",
        "optimizer",
        "scheduler",
        "maker",
        "batches",
        "rng",
        "history",
    }
    coverage = summary["coverage"]  # what FOP does with each parameter, printed once at the run's start
    assert coverage["counts"] == {"preconditioned": {"parameters": 8, "elements": coverage["counts"]
                                                     ["preconditioned"]["elements"]}}
    assert {p["name"] for p in coverage["parameters"]} == {f"{b}.{k}" for b in ("conv1", "conv2", "fc1", "fc2")
                                                            for k in ("weight", "bias")}
    captured = capsys.readouterr()
    assert captured.err.count(coverage["summary"]) == 1
    assert json.loads(captured.out)["best_accuracy"] == record["test_accuracy"]
    (environment,) = [json.loads(line) for line in (tmp_path / "environment.jsonl").read_text().splitlines()]
    assert summary["environment"] == environment
    assert environment["command"] == "fop-asdl " + shlex.join(one_epoch)
    assert environment["versions"]["torch"] == torch.__version__
    assert environment["versions"]["asdl"] == importlib.metadata.version("asdfghjkl")
    assert environment["versions"]["fop_asdl"] == fop_asdl.__version__
    git, expected = environment["git"], _git_head()
    if expected is None:
        assert git is None
    else:
        assert [git[k] for k in ("commit", "dirty", "library")] == [expected[k] for k in ("commit", "dirty", "library")]
        assert (git["library_changes"] is not None) == expected["library_changed"]
    assert environment["threads"]["torch"] == torch.get_num_threads() and environment["cpu"]
    assert environment["device"] == "cpu" and environment["gpu"] is None and environment["world_size"] == 1
    # The same folder again without --resume is refused rather than overwritten.
    assert main(one_epoch) == 2
    assert "--resume" in capsys.readouterr().err


def test_compare_picks_lr_per_method_and_reports(tmp_path: Path, capsys) -> None:
    code = main(["compare", "--no-progress", "--out", str(tmp_path), "--set", *SLICE, "epochs=2",
                 "batch_sizes=[100, 200]", "methods=[sgd, fop]",
                 "lr_grid={sgd: [0.001, 0.1], fop: [0.0005, 0.05]}",  # the older form of a grid of lrs
                 "seeds=[0, 1]", "target_accuracy=0.5"])
    assert code == 0
    captured = capsys.readouterr()
    table = captured.out
    assert table == (tmp_path / "results.md").read_text()
    assert "| 100 | sgd @ lr 0.1 (0.1) [edge: lr high] | 2 |" in table
    assert "| 200 | fop @ lr 0.05 (0.1) [edge: lr high] | 2 |" in table
    assert "| 100 | sgd | 0.001 | 0.001 | – |" in table  # lr 0.001 never reaches 50 % in 2 epochs
    _check_paired_errors(table, tmp_path)
    assert (tmp_path / "b100" / "sgd" / "lr0.1_seed1" / "summary.json").exists()
    assert not (tmp_path / "b100" / "sgd" / "lr0.001_seed1").exists()  # only the chosen lr runs other seeds
    (environment,) = [json.loads(line) for line in (tmp_path / "environment.jsonl").read_text().splitlines()]
    assert f"`{environment['command']}`; fop_asdl " in table.split("## Environment")[1]
    for summary in (tmp_path / "b200").glob("*/*/summary.json"):  # every run carries the same record
        assert json.loads(summary.read_text())["environment"] == environment
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["batch_size"], r["method"], r["best_point"], len(r["runs"])) for r in results] == [
        (100, "sgd", {"lr": 0.1}, 2),
        (100, "fop", {"lr": 0.05}, 2),
        (200, "sgd", {"lr": 0.1}, 2),
        (200, "fop", {"lr": 0.05}, 2),
    ]
    for png in ("accuracy_vs_epoch.png", "accuracy_vs_time.png", "accuracy_vs_batch.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "accuracy_vs_time.png, accuracy_vs_batch.png, environment.jsonl" in captured.err
    # The scaling plot's numbers: each method's best accuracy over its seeds, batch by batch.
    scaling = accuracy_by_batch([MethodResult(**r) for r in results])
    for method in ("sgd", "fop"):
        for (batch, mean, low, high), r in zip(scaling[method], [r for r in results if r["method"] == method]):
            best = [s["best_accuracy"] for s in r["runs"]]
            assert (batch, low, high) == (r["batch_size"], min(best), max(best))
            assert mean == pytest.approx(sum(best) / 2)


def _check_paired_errors(table: str, out: Path) -> None:
    """The paired table against the seeds' summaries at the chosen points: FOP's error minus SGD's, seed by
    seed."""
    chosen = {r["method"]: r["runs"] for r in json.loads((out / "results.json").read_text()) if r["batch_size"] == 100}

    def error(method: str, seed: int) -> float:
        (summary,) = [s for s in chosen[method] if s["run"]["seed"] == seed]
        return 100 * (1 - summary["best_accuracy"])

    diffs = [error("fop", s) - error("sgd", s) for s in (0, 1)]
    section = table.split("## Top-1 error")[1].split("## Search")[0]
    cells = {line.split(" | ")[1]: line.split(" | ")[2:] for line in section.splitlines() if line.startswith("| 100 |")}
    mean = f"{sum(diffs) / 2:+.2f}"
    expected = mean if min(diffs) == max(diffs) else f"{mean} ({min(diffs):+.2f}–{max(diffs):+.2f})"
    assert cells["fop"][1].rstrip(" |") == expected
    assert cells["sgd"][1].rstrip(" |") == "–"  # no method is compared with itself


def test_compare_halton_search_over_lr_and_damping(tmp_path: Path, capsys) -> None:
    """Two Halton trials per method: SGD over lr, K-FAC over lr and damping; the table lists them all."""
    code = main(["compare", "--no-progress", "--out", str(tmp_path), "--set", *SLICE, "epochs=1",
                 "batch_sizes=[100]", "methods=[sgd, kfac]", "seeds=[0]", "search=halton", "search_points=2",
                 "search_space={sgd: {lr: [0.01, 0.1]}, kfac: {lr: [0.01, 0.1], damping: [0.01, 1.0]}}"])
    assert code == 0
    table = (tmp_path / "results.md").read_text()
    assert "Trials per method: 2, Halton points, log-uniform in: sgd lr [0.01, 0.1]; kfac lr [0.01, 0.1], " \
           "damping [0.01, 1]." in table
    assert "| batch | method | base lr | damping | lr |" in table
    assert "| 100 | sgd | 0.0316 |  | 0.0316 |" in table and "| 100 | sgd | 0.0178 |  | 0.0178 |" in table
    assert "| 100 | kfac | 0.0316 | 0.0464 | 0.0316 |" in table  # lr u = 1/2, damping u = 1/3
    assert "| 100 | kfac | 0.0178 | 0.215 | 0.0178 |" in table   # lr u = 1/4, damping u = 2/3
    run = tmp_path / "b100" / "kfac" / "lr0.0316_damping0.0464_seed0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["damping"] == 0.0464
    assert summary["run"]["point"] == {"lr": 0.0316, "damping": 0.0464}
    results = json.loads((tmp_path / "results.json").read_text())
    for r in results:  # with two trials the chosen one is the lowest or highest in every dimension
        assert [flag.split()[0] for flag in r["edges"]] == list(r["best_point"])
        assert f"✓ [edge: {', '.join(r['edges'])}]" in table


def test_searched_damping_reaches_the_preconditioning_config(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(
        protocol, "make_gradient_maker", lambda name, model, config, **kw: seen.append(config)
    )
    config = load_config(overrides=["search_space.fop={lr: [0.05, 0.1], damping: [0.01]}"])
    for method in ("fop", "kfac"):
        spec = RunSpec.at(config, method, 500, {"lr": 0.05, "damping": 0.01, "ema_decay": 0.2}, 0)
        build_gradient_maker(spec, SmallCNN(), local_batch=500)
    assert [(c.damping, c.ema_decay) for c in seen] == [(0.01, 0.2), (0.01, 0.2)]


@pytest.mark.parametrize("method, schedule", [("fop", "cosine"), ("adamw", "plateau")])
def test_resume_is_bit_identical(tmp_path: Path, monkeypatch, method: str, schedule: str) -> None:
    """Interrupted after epoch 1 and resumed == uninterrupted: records, weights, optimizer and maker state.
    Fake CIFAR images, so the augmentation generator's state is part of what must survive."""
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "cifar10.npz",
        x_train=rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(96) % 10,
        x_test=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(40) % 10,
    )
    args = ["train", "--method", method, "--batch-size", "32", "--lr", "0.01", "--no-progress", "--data-dir",
            str(tmp_path), "--set", "dataset=cifar10", "epochs=3", f"schedule={schedule}", "plateau_patience=0",
            "base_batch=32", "update_interval=2",
            "warmup=4"]  # 3 steps per epoch: the resumed epoch 2 continues the warm-up
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0

    evaluate = train_module.evaluate
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # during epoch 2's evaluation: the checkpoint holds epoch 1
        return evaluate(*a, **k)

    monkeypatch.setattr(train_module, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--out", str(tmp_path / "split")])
    monkeypatch.setattr(train_module, "evaluate", evaluate)
    assert main(args + ["--out", str(tmp_path / "split"), "--resume"]) == 0

    name = f"b32/{method}/lr0.01_seed0"
    assert_resumed_run_equal(tmp_path / "whole" / name, tmp_path / "split" / name, 3,
                             ("model", "optimizer", "maker", "batches"))
    states = [torch.load(tmp_path / d / name / "checkpoint.pt", weights_only=True) for d in ("whole", "split")]
    assert states[0]["scheduler"] == states[1]["scheduler"]


def test_resume_refuses_a_changed_config(tmp_path: Path, capsys) -> None:
    args = ["train", "--no-progress", "--out", str(tmp_path), "--set", *SLICE, "epochs=1", "batch_sizes=[200]"]
    assert main(args) == 0
    assert main(args + ["--resume", "--set", "damping=0.5"]) == 2
    assert "damping" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0  # unchanged: the finished run is reused
    lines = (tmp_path / "environment.jsonl").read_text().splitlines()  # one per process that ran
    assert [json.loads(line)["command"].endswith("--resume") for line in lines] == [False, True]


def test_resume_with_a_new_target_re_reports_without_training(tmp_path: Path, capsys) -> None:
    """The paper's target (AdamW's best accuracy) is known only after runs: a new target_accuracy re-reports
    finished runs from their records; it is refused where stop_at_target made it end runs."""
    args = ["train", "--no-progress", "--out", str(tmp_path), "--set", *SLICE, "epochs=2",
            "batch_sizes=[200]"]
    assert main(args + ["target_accuracy=0.99"]) == 0
    (summary_path,) = tmp_path.glob("b200/*/*/summary.json")
    records = epoch_records(summary_path.parent)
    assert json.loads(summary_path.read_text())["epochs_to_target"] is None
    target = records[-1]["test_accuracy"]
    assert main(args + [f"target_accuracy={target}", "--resume"]) == 0
    reached = next(r for r in records if r["test_accuracy"] >= target)
    summary = json.loads(summary_path.read_text())
    assert summary["target_accuracy"] == target and summary["epochs_to_target"] == reached["epoch"]
    assert summary["train_seconds_to_target"] == reached["train_seconds_total"]
    assert epoch_records(summary_path.parent) == records  # reported again, not trained again
    assert load_config(tmp_path / "config.yaml").target_accuracy == target

    stopping = tmp_path / "stopping"
    args[args.index(str(tmp_path))] = str(stopping)
    assert main(args + ["stop_at_target=true", "target_accuracy=0.99"]) == 0
    assert main(args + ["stop_at_target=true", f"target_accuracy={target}", "--resume"]) == 2
    assert "target_accuracy" in capsys.readouterr().err


def test_micro_batch_size_is_passed_only_when_set_and_useful(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(
        protocol, "make_gradient_maker", lambda name, model, config, **kw: seen.append((name, kw))
    )
    model = SmallCNN()
    for override, batch in (([], 1024), (["micro_batch_size=256"], 1024), (["micro_batch_size=256"], 256)):
        config = load_config(overrides=override + ["batch_sizes=[1024]"])
        for method in ("adamw", "fop"):
            build_gradient_maker(RunSpec(config, method, batch, 0.1, 0), model, local_batch=batch)
    assert seen == [
        ("sgd", {}),
        ("fop", {}),
        ("sgd", {"micro_batch_size": 256}),
        ("fop", {"micro_batch_size": 256}),
        ("sgd", {}),
        ("fop", {}),
    ]


def _lrs_of_steps(overrides: list, method: str = "sgd", epochs: int = 2) -> tuple:
    """The lr each optimizer step used over ``epochs`` epochs of 6 steps (batch 100 of 600 images), and the
    epochs' records."""
    from fop_asdl.cli.batches import load_data

    config = load_config(overrides=SLICE + [f"epochs={epochs}"] + overrides)
    trainer = train_module.Trainer(RunSpec(config, method, 100, 0.1, 0), load_data(config, CPU), TOPO)
    lrs = []
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    records = [trainer.run_epoch(lambda: None) for _ in range(epochs)]
    return lrs, records


def test_linear_warmup_multiplies_the_cosine_schedule() -> None:
    lrs, records = _lrs_of_steps(["warmup=4", "schedule=cosine"], method="adamw")
    cosine = [0.05 * (1 + math.cos(math.pi * t / 12)) for t in range(12)]
    assert lrs == pytest.approx([c * min(1.0, (t + 1) / 4) for t, c in enumerate(cosine)])
    assert [r["lr"] for r in records] == pytest.approx([cosine[0], cosine[6]])  # the schedule's own lr
    assert _lrs_of_steps(["schedule=cosine"])[0] == pytest.approx(cosine)  # the schedule alone is unchanged


def test_warmup_in_epochs_then_the_plateau_schedule() -> None:
    lrs, records = _lrs_of_steps(["warmup=1.5", "warmup_unit=epochs", "schedule=plateau",
                                  "plateau_patience=0", "plateau_factor=0.5"], method="fop", epochs=3)
    assert lrs[:9] == pytest.approx([0.1 * (t + 1) / 9 for t in range(9)])  # W = round(1.5 · 6) = 9 steps
    assert lrs[9:12] == [0.1] * 3 and lrs[12:] == [records[2]["lr"]] * 6  # then the plateau's own values


def test_ema_bias_correction_is_passed_only_when_true_and_only_to_curvature_makers(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(
        protocol, "make_gradient_maker", lambda name, model, config, **kw: seen.append((name, kw))
    )
    for flag in ("false", "true"):
        config = load_config(overrides=[f"ema_bias_correction={flag}"])
        for method in ("sgd", "adamw", "kfac", "fop"):
            build_gradient_maker(RunSpec(config, method, 500, 0.1, 0), SmallCNN(), local_batch=500)
    on = {"ema_bias_correction": True}
    assert seen == [("sgd", {}), ("sgd", {}), ("kfac", {}), ("fop", {}),
                    ("sgd", {}), ("sgd", {}), ("kfac", on), ("fop", on)]


def test_kl_clip_is_passed_with_the_current_lr_to_curvature_makers_only(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(
        protocol, "make_gradient_maker", lambda name, model, config, **kw: seen.append((name, kw))
    )
    config = load_config(overrides=["kl_clip=0.01"])
    rates = iter([0.2, 0.05])
    for method in ("sgd", "adamw", "kfac", "fop"):
        build_gradient_maker(RunSpec(config, method, 500, 0.1, 0), SmallCNN(), local_batch=500,
                             lr=lambda: next(rates))
    assert [(name, kw.get("kl_clip")) for name, kw in seen] == [("sgd", None), ("sgd", None), ("kfac", 0.01),
                                                                 ("fop", 0.01)]
    assert [kw["lr"]() for _, kw in seen[2:]] == [0.2, 0.05]  # called at each step, so it follows the schedule


def test_each_rank_takes_a_contiguous_slice_of_every_global_batch() -> None:
    from fop_asdl.cli.batches import EpochBatches, load_data

    config = load_config(overrides=SLICE)
    data = load_data(config, torch.device("cpu"))
    whole = list(EpochBatches(data, config, 200, 3, Topology(0, 1, torch.device("cpu"))).epoch())
    parts = [
        list(EpochBatches(data, config, 200, 3, Topology(r, 4, torch.device("cpu"))).epoch())
        for r in range(4)
    ]
    for step, (x, y) in enumerate(whole):
        assert torch.equal(torch.cat([p[step][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[step][1] for p in parts]), y)
    assert len(whole) == 3 and all(len(p[0][1]) == 50 for p in parts)


def test_torchrun_two_ranks_train_checkpoint_and_resume(tmp_path: Path) -> None:
    """Two CPU ranks (gloo): the sharded maker's state is gathered on every rank, rank 0 alone writes."""
    import os
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fop_asdl", "train", "--no-progress", "--method", "fop", "--out", str(tmp_path),
           "--set", *SLICE, "epochs=2", "batch_sizes=[100]"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for extra in ([], ["--resume"]):  # the resume finds the finished run and loads it on both ranks
        done = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count('"best_accuracy"') == 1  # printed by rank 0 only
    records = epoch_records(tmp_path / "b100" / "fop" / "lr0.02_seed0")
    assert [r["epoch"] for r in records] == [1, 2] and all(r["steps"] == 6 for r in records)
