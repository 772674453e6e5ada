"""scripts/gpu_check.sh where CI runs, without CUDA: it starts, finds no device, says so, exits 0 and writes
the JSON that says so; its plan runs files that exist; the ``cuda`` tests are skipped with their reason."""
import json
import os
import subprocess
import sys

import pytest
import torch

from scaffold import REPO, script_module

ROOT = REPO
ENV = {**os.environ, "PYTHON": sys.executable,
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run the checks")


@no_cuda
def test_without_cuda_it_says_so_exits_0_and_writes_why(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--out", str(tmp_path)], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA device" in done.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["cuda"] is False and "is_available() is False" in report["reason"]
    assert report["stages"] == {} and report["machine"]["torch"] == torch.__version__


def test_the_plan_runs_files_that_exist_within_eight_minutes():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--plan", "--data-dir", "/data"],
                          env=ENV, capture_output=True, text=True, timeout=60, check=True)
    plan = {stage["name"]: stage["command"] for stage in json.loads(done.stdout)}
    assert list(plan) == ["tests", "syncs", "bench_b512", "bench_b2048", "bench_gpt", "epoch_kfac", "epoch_fop"]
    for command in plan.values():
        for arg in command:
            if arg.startswith(("scripts/", "configs/", "tests/")):
                assert (ROOT / arg).is_file(), arg
    assert plan["tests"][plan["tests"].index("-m", 3) + 1] == "cuda"
    for batch in ("512", "2048"):
        bench = plan[f"bench_b{batch}"]
        assert bench[bench.index("--batch-size") + 1] == batch and bench[bench.index("--device") + 1] == "cuda"
        assert bench[bench.index("--methods") + 1] == "sgd,asdl_kfac,kfac,fop"
    for method in ("kfac", "fop"):
        epoch = plan[f"epoch_{method}"]
        assert epoch[epoch.index("--method") + 1] == method and "device=cuda" in epoch and "/data" in epoch
    # every stage's limit is cut to what is left of the budget
    assert script_module("gpu_check").DEFAULT_BUDGET_S <= 8 * 60 - 10


@no_cuda
def test_the_cuda_tests_are_skipped_with_the_reason():
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda",
                           str(ROOT / "tests" / "engine" / "test_cuda.py")], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert "skipped" in done.stdout and "passed" not in done.stdout
    assert "needs a CUDA device: torch.cuda.is_available() is False" in done.stdout


def test_bench_syncs_counts_per_step_kind_on_this_machine(tmp_path):
    out = tmp_path / "syncs.json"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_syncs.py"), "--methods", "sgd,kfac", "--steps",
                    "4", "--batch-size", "4", "--out", str(out)], env=ENV, capture_output=True, text=True,
                   timeout=300, check=True)
    results = json.loads(out.read_text())["results"]
    assert {m: {k: r["syncs"] for k, r in kinds.items()} for m, kinds in results.items()} == \
        {"sgd": {"plain": 0}, "kfac": {"curvature": 2, "plain": 1}}
