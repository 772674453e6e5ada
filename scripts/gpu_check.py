"""The GPU checks in one command (issue 24 item 3); ``scripts/gpu_check.sh`` runs it.

    scripts/gpu_check.sh [--data-dir DIR] [--out results/gpu] [--budget 470] [--plan]

On a machine with a CUDA device, within ``--budget`` seconds (default 470: under 8 minutes with the start),
one stage after the other, each in its own process with a timeout, every result under ``--out``:

1. ``tests``: ``pytest -m cuda tests/engine/test_cuda.py`` (every method on CUDA tensors against the CPU; fp16 with
   a GradScaler and bf16 autocast against the CPU float32 step; host syncs with
   ``torch.cuda.set_sync_debug_mode`` as a second witness; the runner's ``device: cuda``;
   ``torchrun --nproc_per_node 1`` on NCCL) -> ``pytest_cuda.xml``, summarised in ``gpu_check.json``;
2. ``syncs``: ``scripts/bench_syncs.py --device cuda`` on CIFAR ResNet-18 (batch 32) for the first five
   methods, ASDL's K-FAC and the three whose steps read decompositions' flags (EKFAC, Shampoo, SENG) ->
   ``syncs_resnet18.json``;
3. ``bench_b512``, ``bench_b2048``: ``scripts/bench_step.py --device cuda`` on CIFAR ResNet-18 for sgd,
   asdl_kfac, kfac, fop (CUDA-event times, ``torch.cuda.max_memory_allocated``) ->
   ``bench_step_resnet18_b{512,2048}.json``;
4. ``bench_gpt``: the same on the small GPT (tied embedding and LM head; 49 tokens) at batch 512 for AdamW,
   K-FAC, FOP, FNGD and HyLo -> ``bench_step_gpt_b512.json``;
5. ``epoch_kfac``, ``epoch_fop``: one epoch of ``configs/cifar10_resnet18.yaml`` at batch 2048 (CIFAR-10 from
   ``--data-dir``, default ``$FOP_DATA`` or ``../shared/data``) -> ``epoch_{kfac,fop}.json`` (the run's
   epochs and summary; its checkpoint is left in a temporary folder).

``gpu_check.json`` holds the machine (GPU, driver, torch, CUDA), every stage's command, status, seconds
and output tail, and the headline figures (step-time ratios, syncs per plain step, seconds per epoch). A
stage that no longer fits the budget is recorded as skipped. Without a CUDA device the script says so,
writes ``gpu_check.json`` with ``"cuda": false`` and the reason, and exits 0. Exit codes: 0 every stage
passed (or no CUDA device), 1 a stage failed or timed out, 2 bad arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
BENCH_METHODS = "sgd,asdl_kfac,kfac,fop"
DEFAULT_BUDGET_S = 470  # the stages' seconds: with the interpreter's start, under 8 minutes


def cuda_machine() -> Dict[str, Any]:
    """What this machine has: {"cuda": bool, ...}; every CUDA call guarded."""
    out: Dict[str, Any] = {"python": platform.python_version(), "host": platform.node()}
    try:
        import torch
    except Exception as error:  # noqa: BLE001 - any failure to import means no GPU run
        return {**out, "cuda": False, "reason": f"torch does not import: {error}"}
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda)
    try:
        available = torch.cuda.is_available()
    except Exception as error:  # noqa: BLE001
        return {**out, "cuda": False, "reason": f"torch.cuda.is_available() raised: {error}"}
    if not available:
        built = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build of torch"
        return {**out, "cuda": False, "reason": f"torch.cuda.is_available() is False ({built})"}
    try:
        props = torch.cuda.get_device_properties(0)
        out.update(cuda=True, device_count=torch.cuda.device_count(), gpu=props.name,
                   capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2 ** 30, 1),
                   cudnn=torch.backends.cudnn.version(), nccl=_nccl_version(torch))
    except Exception as error:  # noqa: BLE001
        return {**out, "cuda": False, "reason": f"CUDA is reported but unusable: {error}"}
    out["driver"] = _driver()
    return out


def _nccl_version(torch) -> Optional[str]:
    try:
        return ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:  # noqa: BLE001
        return None


def _driver() -> Optional[str]:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
        return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def stages(args: argparse.Namespace, scratch: Path) -> List[Dict[str, Any]]:
    """Every stage: name, command, the most seconds it may take, and what it writes."""
    py, out = sys.executable, args.out
    bench = [py, "scripts/bench_step.py", "--model", "resnet18", "--device", "cuda", "--methods", BENCH_METHODS,
             "--interval", "10", "--cycles", "1", "--warmup-cycles", "1"]
    epoch = [py, "-m", "fop_asdl", "train", "--config", "configs/cifar10_resnet18.yaml", "--batch-size", "2048",
             "--no-progress", "--data-dir", str(args.data_dir), "--set", "epochs=1", "batch_sizes=[2048]",
             "device=cuda"]
    return [
        {"name": "tests", "limit": 200, "command": [py, "-m", "pytest", "-m", "cuda", "-q", "-rs", "-p",
                                                     "no:cacheprovider", "tests/engine/test_cuda.py",
                                                     "--junitxml", str(out / "pytest_cuda.xml")]},
        {"name": "syncs", "limit": 90, "command": [py, "scripts/bench_syncs.py", "--model", "resnet18", "--device",
                                                    "cuda", "--batch-size", "32", "--steps", "4", "--methods",
                                                    "sgd,kfac,fop,fngd,hylo,asdl_kfac,ekfac,shampoo,seng",
                                                    "--out", str(out / "syncs_resnet18.json")]},
        {"name": "bench_b512", "limit": 100, "command": bench + ["--batch-size", "512", "--out",
                                                                 str(out / "bench_step_resnet18_b512.json")]},
        {"name": "bench_b2048", "limit": 150, "command": bench + ["--batch-size", "2048", "--out",
                                                                  str(out / "bench_step_resnet18_b2048.json")]},
        {"name": "bench_gpt", "limit": 100, "command": [
            py, "scripts/bench_step.py", "--model", "gpt", "--device", "cuda", "--methods", "adamw,kfac,fop,fngd,hylo",
            "--interval", "10", "--cycles", "1", "--warmup-cycles", "1", "--batch-size", "512",
            "--out", str(out / "bench_step_gpt_b512.json")]},
        *({"name": f"epoch_{m}", "limit": 100, "needs_data": True, "run_dir": scratch / m,
           "command": epoch + ["--method", m, "--out", str(scratch / m)]} for m in ("kfac", "fop")),
    ]


def run_stage(stage: Dict[str, Any], deadline: float, data_file: Path) -> Dict[str, Any]:
    record: Dict[str, Any] = {"command": shlex.join(stage["command"])}
    if stage.get("needs_data") and not data_file.is_file():
        return {**record, "status": "skipped", "why": f"no {data_file.name} under {data_file.parent} (--data-dir)"}
    limit = min(stage["limit"], deadline - time.monotonic())
    if limit < 20:
        return {**record, "status": "skipped", "why": "the budget is spent (--budget)"}
    print(f"gpu_check: {stage['name']} (at most {limit:.0f} s): {record['command']}", flush=True)
    start = time.monotonic()
    try:
        done = subprocess.run(stage["command"], cwd=ROOT, capture_output=True, text=True, timeout=limit,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [str(ROOT), os.environ.get("PYTHONPATH", "")])})
        status = "passed" if done.returncode == 0 else "failed"
        record.update(returncode=done.returncode, output_tail=(done.stdout + done.stderr)[-4000:])
    except subprocess.TimeoutExpired as expired:
        status = "timed_out"
        tail = (expired.stdout or b"") + (expired.stderr or b"")
        record["output_tail"] = (tail.decode(errors="replace") if isinstance(tail, bytes) else tail)[-4000:]
    record.update(status=status, seconds=round(time.monotonic() - start, 1))
    print(f"gpu_check: {stage['name']} {status} in {record['seconds']} s", flush=True)
    return record


def pytest_summary(path: Path) -> Optional[Dict[str, Any]]:
    if not path.is_file():
        return None
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = {}
    for case in suite.iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag if child.tag != "skipped" else f"skipped: {child.get('message', '')}"
        cases[f"{case.get('classname')}::{case.get('name')}"] = outcome
    return {**{key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}, "cases": cases}


def headlines(out: Path, records: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The figures the issue asks for, read back from the stages' JSON files."""
    found: Dict[str, Any] = {}
    for batch in (512, 2048):
        path = out / f"bench_step_resnet18_b{batch}.json"
        if path.is_file():
            res = json.loads(path.read_text())["results"]
            mean = {m: r["wall"]["mean_s"] for m, r in res.items() if "wall" in r}
            found[f"bench_b{batch}"] = {
                "mean_step_s": mean, "plain_step_s": {m: r["wall"]["plain_s"] for m, r in res.items() if "wall" in r},
                "curvature_step_s": {m: r["wall"]["curvature_s"] for m, r in res.items() if "wall" in r},
                "peak_mib": {m: r["live_peak_mib"] for m, r in res.items() if "live_peak_mib" in r},
                "fop_over_kfac_mean": _ratio(mean, "fop", "kfac"),
                "kfac_over_asdl_kfac_mean": _ratio(mean, "kfac", "asdl_kfac"),
                "kfac_over_sgd_mean": _ratio(mean, "kfac", "sgd"), "fop_over_sgd_mean": _ratio(mean, "fop", "sgd")}
    path = out / "bench_step_gpt_b512.json"
    if path.is_file():
        res = json.loads(path.read_text())["results"]
        found["bench_gpt_b512"] = {m: {k: r["wall"][k] for k in ("plain_s", "curvature_s", "mean_s")}
                                   for m, r in res.items() if "wall" in r}
    path = out / "syncs_resnet18.json"
    if path.is_file():
        found["syncs_resnet18"] = {m: {kind: {"counted": r["syncs"], "cuda_witness": r.get("cuda_witness")}
                                       for kind, r in kinds.items()}
                                   for m, kinds in json.loads(path.read_text())["results"].items()}
    for method in ("kfac", "fop"):
        path = out / f"epoch_{method}.json"
        if path.is_file():
            (record,) = json.loads(path.read_text())["epochs"]
            found[f"epoch_{method}"] = {k: record.get(k) for k in ("train_seconds", "eval_seconds", "steps",
                                                                    "train_loss", "test_accuracy")}
    return found


def _ratio(values: Dict[str, Optional[float]], a: str, b: str) -> Optional[float]:
    return round(values[a] / values[b], 4) if values.get(a) and values.get(b) else None


def keep_run(stage: Dict[str, Any], out: Path) -> None:
    """The run's epochs and summary into ``out``; the checkpoint stays behind."""
    summaries = list(Path(stage["run_dir"]).rglob("summary.json"))
    if summaries:
        run_dir = summaries[0].parent
        epochs = [json.loads(line) for line in (run_dir / "epochs.jsonl").read_text().splitlines()]
        (out / f"{stage['name']}.json").write_text(json.dumps(
            {"command": shlex.join(stage["command"]), "epochs": epochs,
             "summary": json.loads(summaries[0].read_text())}, indent=1) + "\n")


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "gpu")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="folder of cifar10.npz (default: $FOP_DATA, else ../shared/data beside the repository)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds for all stages together")
    p.add_argument("--only", default=None, help="comma-separated stage names (default: all)")
    p.add_argument("--plan", action="store_true", help="print the stages' commands as JSON; run nothing")
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.data_dir = (args.data_dir or Path(os.environ.get("FOP_DATA") or ROOT.parent / "shared" / "data")).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        planned = stages(args, scratch)
        if args.only:
            planned = [s for s in planned if s["name"] in args.only.split(",")]
        if args.plan:
            print(json.dumps([{"name": s["name"], "limit_s": s["limit"], "command": s["command"]} for s in planned],
                             indent=1))
            return 0
        args.out.mkdir(parents=True, exist_ok=True)
        machine = cuda_machine()
        report: Dict[str, Any] = {"command": shlex.join(["scripts/gpu_check.sh"] + (argv if argv is not None
                                                                                     else sys.argv[1:])),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "machine": machine,
                                  "cuda": machine["cuda"], "stages": {}}
        if not machine["cuda"]:
            report["reason"] = machine["reason"]
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
            print(f"gpu_check: no CUDA device: {machine['reason']}; nothing to run. Wrote {args.out / 'gpu_check.json'}")
            return 0
        print(f"gpu_check: {machine['gpu']} ({machine['memory_gib']} GiB), torch {machine['torch']}, "
              f"CUDA {machine['torch_cuda']}, budget {args.budget:.0f} s", flush=True)
        deadline = time.monotonic() + args.budget
        for stage in planned:
            report["stages"][stage["name"]] = run_stage(stage, deadline, args.data_dir / "cifar10.npz")
            if "run_dir" in stage:
                keep_run(stage, args.out)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")  # kept if killed
        report["pytest"] = pytest_summary(args.out / "pytest_cuda.xml")
        report["headlines"] = headlines(args.out, report["stages"])
        report["seconds"] = round(args.budget - (deadline - time.monotonic()), 1)
        (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        bad = [n for n, r in report["stages"].items() if r["status"] in ("failed", "timed_out")]
        print(f"gpu_check: done in {report['seconds']} s; " + (f"FAILED: {', '.join(bad)}" if bad else "all passed")
              + f". Wrote {args.out / 'gpu_check.json'}")
        return 1 if bad else 0
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
