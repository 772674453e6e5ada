"""Peak memory of one training step against the total batch size, at a fixed micro-batch size.

What is measured. For each method (``sgd``, ``kfac``, ``fop``) and each total batch N = k x M for k in
``--multiples`` (default 4, 8, 16, 32 with M = ``--micro-batch-size`` = 128), one process builds the model
(``--model``, default the small CNN on 1x28x28 inputs; seeded), N random inputs and labels, an SGD optimizer
(lr 0.01, momentum 0.9) and ``fop_asdl.make_gradient_maker(method, model, config, micro_batch_size=M)`` with
``asdl.PreconditioningConfig(damping=1.0, ema_decay=0.05, curvature_upd_interval=2,
preconditioner_upd_interval=2)``, then runs two steps on the whole batch: a curvature step (curvature and
inverses updated) and a plain step. A step is ``zero_grad``, ``setup_model_call``, ``setup_loss_call``,
``forward_and_backward`` and ``opt.step()``; with micro-batches ``forward_and_backward`` runs ceil(N / M)
forward/backward passes of at most M samples and the step equals the unsplit one. Reported is the peak
*increment*: the peak during the two steps minus the memory in use right before the first step (model,
inputs, maker: the baseline). It therefore holds what the first steps create and keep (gradients, momentum,
curvature factors and inverses: the same for every N) plus the transient working memory of the worst
step. For reference, the same is measured WITHOUT micro-batching (``micro_batch_size=None``) at the
smallest and the largest N, where the working memory grows with N. The target is a flat curve with
micro-batches: max/min of each method's increments across the N values <= 1.10.

Each (method, N, micro-batch) measurement runs in a FRESH process (the script re-invokes itself with the
internal ``--child`` flag), so no measurement inherits another's heap, caches or allocator state.

CPU (default): the peak is the kernel's own high-water mark of the resident set size, ``VmHWM`` in
``/proc/self/status``, reset to the current RSS right before the first step by writing "5" to
``/proc/self/clear_refs`` (Linux >= 4.0). This is exact at page granularity and sees spikes of any length,
unlike sampling ``/proc/self/statm`` from a thread (which misses peaks shorter than its period), and unlike
``getrusage(...).ru_maxrss``, which cannot be reset and so also covers the imports and the data set-up
before the steps. The baseline is the RSS at the same moment, after ``gc.collect()`` and ``malloc_trim(0)``.
RSS only falls when freed memory goes back to the OS, so each child runs with ``MALLOC_MMAP_THRESHOLD_=65536``
in its environment: glibc then mmaps every block >= 64 KiB and unmaps it on free (see
scripts/bench_step.py), and the peak is that of live memory rather than of a heap that never shrinks;
blocks under 64 KiB can still stay resident (a few MiB at most). CUDA (``--device cuda``): the baseline is
``torch.cuda.memory_allocated()`` and the peak ``torch.cuda.max_memory_allocated()`` after
``torch.cuda.reset_peak_memory_stats()`` right before the first step: tensor memory only, not the caching
allocator's reserve nor the CUDA context.

Each child uses ``--threads`` torch threads (default 1). Inputs are random under ``--seed``: the losses
mean nothing. One table is printed (rows: N; columns: each method's increment in MiB; last row: each
method's max/min), then the reference rows; everything goes to ``--json``.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import subprocess
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

MODELS: Dict[str, Tuple[str, Tuple[int, ...], int]] = {
    # name: (builder in fop_asdl.models, input shape of one sample, classes)
    "small_cnn": ("SmallCNN", (1, 28, 28), 10),
    "mlp": ("MLP", (1, 28, 28), 10),
    "resnet18": ("resnet18_cifar", (3, 32, 32), 10),
}
METHODS = ("sgd", "kfac", "fop")
MIB = 2.0 ** 20
MMAP_THRESHOLD = "65536"


# --- one measurement (child process) -----------------------------------------------------------------
def status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_rss_high_water_mark() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(args: argparse.Namespace, method: str, total: int, micro: Optional[int]) -> Dict[str, Any]:
    """Build everything, take the baseline, run a curvature step and a plain step, return the peak."""
    import asdl
    import torch
    import torch.nn.functional as F

    from fop_asdl import make_gradient_maker, models

    warnings.filterwarnings("ignore", message="Using a non-full backward hook")  # ASDL 0.1a5's hooks
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    builder, shape, classes = MODELS[args.model]
    torch.manual_seed(args.seed)
    model = getattr(models, builder)().to(device).train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(total, *shape, generator=gen).to(device)
    t = torch.randint(0, classes, (total,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    config = asdl.PreconditioningConfig(damping=1.0, ema_decay=0.05, curvature_upd_interval=2,
                                        preconditioner_upd_interval=2)
    gm = make_gradient_maker(method, model, config, micro_batch_size=micro)
    cuda = device.type == "cuda"

    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        reset_rss_high_water_mark()
        baseline = status_kib("VmRSS") * 1024
    seconds, losses = [], []
    for _ in range(2):  # step 0: curvature (interval 2), step 1: plain
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        dummy_y = gm.setup_model_call(model, x)
        gm.setup_loss_call(F.cross_entropy, dummy_y, t)
        _, loss = gm.forward_and_backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
        losses.append(float(loss))
        del dummy_y, loss
    peak = torch.cuda.max_memory_allocated(device) if cuda else status_kib("VmHWM") * 1024
    return {"method": method, "total_batch": total, "micro_batch_size": micro, "baseline_bytes": baseline,
            "peak_bytes": peak, "peak_increment_mib": (peak - baseline) / MIB, "step_seconds": seconds,
            "losses": losses, "maker": type(gm).__name__, "threads": torch.get_num_threads()}


# --- the parent: one fresh process per measurement ---------------------------------------------------
def run_child(args: argparse.Namespace, method: str, total: int, micro: Optional[int]) -> Dict[str, Any]:
    """Re-invoke this script for one measurement; its last stdout line is the JSON result."""
    command = [sys.executable, os.path.abspath(__file__), "--child", f"{method}:{total}:{micro or 0}",
               "--model", args.model, "--device", args.device, "--seed", str(args.seed)]
    command += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        return {"method": method, "total_batch": total, "micro_batch_size": micro, "peak_increment_mib": None,
                "error": last}
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_over_min(values: List[Optional[float]]) -> Optional[float]:
    if not values or any(v is None or v <= 0 for v in values):
        return None
    return max(values) / min(values)


def fmt(value: Optional[float], spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def print_tables(results: List[Dict[str, Any]], args: argparse.Namespace, totals: List[int],
                 methods: List[str]) -> Dict[str, Optional[float]]:
    """The table of increments (micro-batched), the max/min row, the reference rows; returns max/min."""
    by_key = {(r["method"], r["total_batch"], r["micro_batch_size"]): r for r in results}

    def increment(method: str, total: int, micro: Optional[int]) -> Optional[float]:
        return (by_key.get((method, total, micro)) or {}).get("peak_increment_mib")

    m_size = args.micro_batch_size
    what = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS (VmHWM)"
    print(f"\n## peak memory increment of a curvature step + a plain step, MiB ({what} minus the baseline "
          f"right before the first step); {args.model}, micro_batch_size {m_size}\n")
    header = ("| total batch | " + " | ".join(f"{m} MiB" for m in methods) + " |\n"
              + "|---|" + "---|" * len(methods))
    print(header)
    for n in totals:
        print(f"| {n} ({n // m_size} x {m_size}) | "
              + " | ".join(fmt(increment(m, n, m_size)) for m in methods) + " |")
    ratios = {m: max_over_min([increment(m, n, m_size) for n in totals]) for m in methods}
    verdict = lambda r: "flat" if r is not None and r <= 1.10 else "NOT flat"  # noqa: E731
    print(f"| max / min ({totals[0]}..{totals[-1]}) | "
          + " | ".join(f"{fmt(ratios[m], '.3f')} ({verdict(ratios[m])})" for m in methods) + " |")
    if args.reference:
        print("\nreference, without micro-batching (micro_batch_size=None):\n")
        print(header)
        for n in sorted({totals[0], totals[-1]}):
            print(f"| {n} (one pass) | " + " | ".join(fmt(increment(m, n, None)) for m in methods) + " |")
    for r in results:
        if r.get("error"):
            print(f"\n{r['method']} N={r['total_batch']} micro={r['micro_batch_size']} FAILED: {r['error']}")
    return ratios


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="small_cnn",
                   help="small_cnn and mlp take 1x28x28 inputs, resnet18 3x32x32; 10 classes")
    p.add_argument("--micro-batch-size", type=int, default=128, help="M: samples per forward/backward pass")
    p.add_argument("--multiples", default="4,8,16,32", help="total batches N = k x M for these k")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of sgd,kfac,fop")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="skip the runs without micro-batching at the smallest and largest N")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per child; 0: torch's default. The memory figures barely depend on "
                        "it; one thread keeps a child's time predictable on a shared machine (several "
                        "OpenMP threads spin-wait when other processes hold the cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench_results/memory.json", help="where the results go")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: METHOD:N:M, one measurement
    args = p.parse_args()

    if args.child is not None:
        method, total, micro = args.child.split(":")
        print(json.dumps(measure(args, method, int(total), int(micro) or None)))
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if set(methods) - set(METHODS) or not methods:
        p.error(f"--methods must be a subset of {','.join(METHODS)}")
    if args.micro_batch_size < 1:
        p.error("--micro-batch-size must be >= 1")
    totals = sorted(int(k) * args.micro_batch_size for k in args.multiples.split(","))
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda asked but CUDA is not available")
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)

    plan: List[Tuple[str, int, Optional[int]]] = [(m, n, args.micro_batch_size)
                                                   for n in totals for m in methods]
    if args.reference:
        plan += [(m, n, None) for n in sorted({totals[0], totals[-1]}) for m in methods]
    results = []
    for i, (method, total, micro) in enumerate(plan, 1):
        start = time.perf_counter()
        r = run_child(args, method, total, micro)
        results.append(r)
        outcome = f"FAILED: {r['error']}" if r.get("error") else f"+{r['peak_increment_mib']:.1f} MiB"
        print(f"[{i}/{len(plan)}] {method} N={total} micro={micro}: {outcome} "
              f"({time.perf_counter() - start:.1f} s)", file=sys.stderr, flush=True)

    print(f"# bench_memory: `{command}`; every measurement in a fresh process"
          + ("" if args.device == "cuda" else f" with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"))
    ratios = print_tables(results, args, totals, methods)

    memory_method = (
        "torch.cuda.max_memory_allocated after reset_peak_memory_stats right before the first step, minus "
        "memory_allocated then" if args.device == "cuda" else
        "VmHWM (/proc/self/status) after resetting it with '5' > /proc/self/clear_refs right before the "
        f"first step, minus VmRSS then (after gc.collect and malloc_trim(0)); "
        f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"command": command, "args": vars(args), "totals": totals, "memory_method": memory_method,
                   "steps": "one curvature step then one plain step (interval 2)",
                   "max_over_min_increment": ratios, "results": results}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
