"""Smoke tests of the benchmark scripts: tiny runs end to end; the JSON has the expected keys and numbers."""
import json
import subprocess
import sys
from typing import Tuple

import torch
from torch.profiler import ProfilerActivity, profile

from scaffold import REPO, script_module

ROOT = REPO


def run_script(name: str, *args: str, prints: Tuple[str, ...] = ("| method |", "| total batch |")) -> None:
    """Run ``scripts/<name>`` to the end; its output shows one of ``prints`` (its table's header)."""
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert any(text in done.stdout for text in prints)


def test_bench_dist_two_ranks(tmp_path):
    out = tmp_path / "dist.json"
    run_script("bench_dist.py", "--world-sizes", "2", "--model", "mlp", "--batch-size", "8",
               "--interval", "2", "--cycles", "1", "--warmup-steps", "1", "--barrier-samples", "2",
               "--json", str(out))
    result = json.loads(out.read_text())["results"][0]
    assert result["world_size"] == 2
    assert result["model"]["parameters"] == result["model"]["parameters_in_curvature_blocks"] > 0
    for name in ("sgd", "kfac", "fop"):
        for kind in ("plain", "curvature"):
            m = result["methods"][name][kind]
            assert m["n_steps"] == 1
            assert m["nominal_bytes_per_rank"] > 0 and m["wire_bytes_per_rank"] > 0
            assert m["step_seconds_median"] > 0 and m["step_seconds_mean"] > 0
    # DDP-style SGD moves every gradient once: exactly one all-reduce of all parameters (+ the two counts,
    # the loss and the loss's two normalizer terms: 5 float32 scalars, 2·S·(W−1)/W = S bytes at W = 2)
    sgd = result["methods"]["sgd"]["plain"]["nominal_bytes_per_rank"]
    assert abs(sgd - result["ddp_allreduce_bytes_per_rank"]) <= 5 * 4
    assert 1.0 <= result["ratios"]["fop/sgd_plain_nominal_bytes_per_rank"] <= 1.51


def test_bench_memory_fresh_process_per_measurement(tmp_path):
    out = tmp_path / "memory.json"
    run_script("bench_memory.py", "--model", "mlp", "--methods", "fop", "--micro-batch-size", "8",
               "--multiples", "2", "--no-reference", "--json", str(out))
    data = json.loads(out.read_text())
    (result,) = data["results"]
    assert result["method"] == "fop" and result["total_batch"] == 16 and result["micro_batch_size"] == 8
    assert result["maker"] == "FOPGradientMaker" and result.get("error") is None
    assert result["peak_increment_mib"] > 0 and result["baseline_bytes"] > 0
    assert data["max_over_min_increment"]["fop"] == 1.0


def test_bench_vit_one_process_per_method(tmp_path):
    out = tmp_path / "vit.json"
    run_script("bench_vit.py", "--batch-sizes", "4", "--interval", "2", "--cycles", "1", "--dim", "8", "--depth", "1",
               "--heads", "2", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    assert [r["method"] for r in results] == ["adamw", "kfac", "fop"]
    for r in results:
        assert r["step_seconds_mean"] > 0 and r["live_peak_bytes"] > 0 and r["peak_rss_bytes"] > 2 ** 20


def test_bench_hylo_small_run(tmp_path):
    out = tmp_path / "hylo.json"
    run_script("bench_hylo.py", "--batch-size", "8", "--interval", "2", "--cycles", "1", "--json", str(out))
    results = json.loads(out.read_text())["results"]
    for name in ("sgd", "kfac", "hylo_kis", "hylo_kid"):
        assert results[name]["steps"] == 2 and results[name]["peak_refresh_mib"] > 0
    assert results["hylo"]["mean_s"] == 0.25 * results["hylo_kid"]["mean_s"] + 0.75 * results["hylo_kis"]["mean_s"]


def test_bench_step_one_process_per_method(tmp_path):
    out = tmp_path / "step.json"
    run_script("bench_step.py", "--batch-size", "8", "--interval", "2", "--cycles", "1", "--warmup-cycles", "0",
               "--methods", "sgd,kfac,fop", "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert sorted(results) == ["fop", "kfac", "sgd"]
    for r in results.values():
        assert r["peak_rss_mib"] > 1 and r["wall"]["mean_s"] > 0 and r["steps"] == 2


def test_bench_interleaved_rotates_the_methods_in_one_process(tmp_path):
    out = tmp_path / "interleaved.json"
    run_script("bench_interleaved.py", "--batch-size", "8", "--interval", "2", "--rounds", "3", "--warmup-cycles", "0",
               "--methods", "asdl_kfac,kfac,sgd", "--out", str(out), prints=("plain / asdl_kfac",))
    data = json.loads(out.read_text())
    # each round times every method once, starting one method later than the round before
    assert [list(r) for r in data["rounds"]] == [["asdl_kfac", "kfac", "sgd"], ["kfac", "sgd", "asdl_kfac"],
                                                 ["sgd", "asdl_kfac", "kfac"]]
    summary = data["summary"]
    assert summary["asdl_kfac"]["plain_over_asdl_kfac_range"] == [1.0, 1.0]
    for name in ("kfac", "sgd"):
        plain = sorted(r[name]["plain"] / r["asdl_kfac"]["plain"] for r in data["rounds"])
        assert summary[name]["plain_over_asdl_kfac_median"] == plain[1] > 0
        assert summary[name]["curvature_s_median"] > 0


def test_bench_floor_small_run(tmp_path):
    out = tmp_path / "floor.json"
    run_script("bench_floor.py", "--model", "small_cnn", "--interval", "2", "--repeats", "1", "--json", str(out),
               prints=("| small_cnn, 256 |",))
    r = json.loads(out.read_text())["small_cnn"]
    assert r["kfac_plain_s"] > 0 and r["kfac_curvature_s"] > 0 and r["preconditioning_s"] > 0
    assert r["plain_floor"] == (r["kfac_plain_s"] + 2 * r["preconditioning_s"]) / r["kfac_plain_s"] > 1


def test_bench_fngd_small_run(tmp_path):
    out = tmp_path / "fngd.json"
    run_script("bench_fngd.py", "--batch-size", "8", "--batches", "2", "--interval", "2", "--rounds", "1",
               "--json", str(out))
    data = json.loads(out.read_text())
    assert data["results"]["kfac"]["steps"] == 2 and data["results"]["fngd"]["steps"] == 1
    assert data["fngd_bank_bytes"] > 0


def test_profile_step_counts_the_operators_that_compute(tmp_path):
    """The counter sees a product and an elementwise kernel, not the views and allocations around them; a
    preconditioning maker's plain step computes more than SGD's."""
    a, b, c_scale = torch.randn(4, 3), torch.randn(3, 5), torch.tensor(2.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        c = (a @ b).view(20).t().unsqueeze(0) * c_scale  # mm and mul compute; view, t, unsqueeze do not
    assert c.shape == (1, 20) and script_module("profile_step").compute_ops(prof) == 2
    out = tmp_path / "profile.json"
    run_script("profile_step.py", "--model", "small_cnn", "--batch-size", "8", "--steps", "1", "--methods",
               "sgd,kfac", "--out", str(out), prints=("=== kfac: plain step",))
    results = json.loads(out.read_text())["results"]
    assert 0 < results["sgd"]["compute_ops_per_step"] < results["kfac"]["compute_ops_per_step"]
