"""Step time and peak memory of the methods of the switch, ASDL's own K-FAC and AdamW, each in its own process.

    python scripts/bench_step.py --model small_cnn --batch-size 256 [--interval 10] [--cycles 2]
    python scripts/bench_step.py --model resnet18 --batch-size 128 --cycles 1 --methods kfac,fop
    python scripts/bench_step.py --model gpt --methods adamw,kfac,fop,fngd,hylo

Methods: every name of ``fop_asdl.GRADIENT_MAKERS`` (default options, except those in :data:`OPTIONS`),
``asdl_kfac``, ``adamw`` (the ``"sgd"`` maker feeding ``torch.optim.AdamW``, lr 1e-3) and ``bare`` (no maker:
``loss.backward()`` on the model's cross-entropy, the floor of the ``"sgd"`` maker). Models: the small
CNN, CIFAR ResNet-18, the patch mixer (16 tokens of 64 channels) and the small GPT with its tied embedding
and LM head (49 pixel tokens), from ``fop_asdl.models``.

What is measured. Every method runs in a fresh Python process (as a user's training run would), with the
same initial weights (built under ``--seed``), an SGD optimizer (lr 0.01, momentum 0.9; AdamW for ``adamw``)
and its gradient maker from ``make_gradient_maker``; ``asdl_kfac`` is ``asdl.KfacGradientMaker`` itself, with only the
CPU fix it needs to run (fop_asdl's NVTX stand-in) and ``data_size`` set. One *cycle* is INTERVAL steps:
a curvature step, then INTERVAL-1 plain steps (HyLo: a refresh, then steps on the stored kernel; FNGD:
after the warm-up cycles, whose steps are its coefficient epoch, every step reuses its coefficients, so
its "curvature" column is a plain step too: ``scripts/bench_fngd.py`` times its coefficient steps). After
``--warmup-cycles`` unmeasured cycles, ``--cycles`` cycles are timed. With ``--inverse-interval K`` (a
multiple of INTERVAL; George et al.'s amortised eigenbasis) a cycle is K steps, a curvature step every
INTERVAL and the inversion (EKFAC's eigendecomposition) on the first. A step is ``zero_grad``,
``setup_model_call``, ``setup_loss_call``, ``forward_and_backward`` and ``opt.step()``. Inputs are random
tensors under a fixed seed (the losses mean nothing); the weights are copied back after every step,
untimed, so that every step does the full work at representative values instead of running into NaN on
unlearnable data.

Reported per method: mean, plain-step and curvature-step times (wall clock; on CUDA the time between two
CUDA events recorded around the step, the device queue empty before it; CPU time of the process beside
it, which other load on the machine inflates less), and peak memory in two measures:

* ``peak_rss_mib``: the process's peak resident set size (``ru_maxrss``) over the timed cycles, with the
  default allocator: what a user whose job is killed for memory meets. It includes the interpreter,
  torch and the model (the same for every method, so ratios understate relative differences).
* ``live_peak_mib`` (plain / curvature): the peak bytes of tensors created during one step and still
  referenced, counted tensor by tensor with :class:`fop_asdl.diagnostics.memory.LiveTensorBytes` in one more,
  untimed cycle (CUDA: ``max_memory_allocated`` minus the bytes allocated before the step).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Tuple

import asdl
import torch
import torch.nn.functional as F
from torch import nn

from bench_common import asdl_step
from fop_asdl import GRADIENT_MAKERS, make_gradient_maker
from fop_asdl.diagnostics.memory import LiveTensorBytes
from fop_asdl.models import Mixer, PixelGPT, SmallCNN, resnet18_cifar

warnings.filterwarnings("ignore", message="Using a non-full backward hook")

MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...], int, int]] = {
    # name: (builder, input shape, classes, default batch)
    "small_cnn": (SmallCNN, (1, 28, 28), 10, 256),
    "resnet18": (resnet18_cifar, (3, 32, 32), 10, 128),
    "mixer": (Mixer, (1, 28, 28), 10, 250),
    "gpt": (PixelGPT, (1, 28, 28), 10, 256),
}
DEFAULT_METHODS = ("sgd", "kfac", "asdl_kfac", "fop")
METHODS = tuple(GRADIENT_MAKERS) + ("asdl_kfac", "adamw", "bare")
#: Options a maker needs beyond the config: FNGD's epoch (its coefficients come from the warm-up cycle),
#: HyLo refreshing by KIS every interval, K-BFGS's learning rate (its second pass steps back by it).
OPTIONS: Dict[str, Callable[[argparse.Namespace], Dict]] = {
    "fngd": lambda args: {"iters_per_epoch": args.inverse_interval * args.warmup_cycles or 1},
    "hylo": lambda args: {"switch_policy": "kis"},
    "kbfgs": lambda args: {"lr": 0.01},
}
MIB = 2 ** 20


class Runner:
    """One method: its model copy, optimizer, gradient maker, step counter and timings."""

    def __init__(self, name: str, model: nn.Module, init: List[torch.Tensor], args: argparse.Namespace):
        self.name, self.model, self.device = name, copy.deepcopy(model), torch.device(args.device)
        self.params, self.init = list(self.model.parameters()), init
        if name == "adamw":
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        else:
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        config = asdl.PreconditioningConfig(data_size=args.batch_size, damping=1e-2, ema_decay=0.05,
                                            curvature_upd_interval=args.interval,
                                            preconditioner_upd_interval=args.inverse_interval)
        if name == "bare":
            self.gm = None
        elif name == "asdl_kfac":
            self.gm = asdl.KfacGradientMaker(self.model, config)
        else:
            maker = "sgd" if name == "adamw" else name
            self.gm = make_gradient_maker(maker, self.model, config, **OPTIONS.get(maker, lambda a: {})(args))
        self.step_index, self.interval = 0, args.interval
        self.period = args.inverse_interval  # one cycle: one inversion
        self.times: List[Tuple[bool, float, float]] = []  # (curvature step?, wall s, process CPU s)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _events(self) -> Optional[Tuple[torch.cuda.Event, torch.cuda.Event]]:
        """On CUDA, (start, end) events with start recorded: the step's time on the device's own clock."""
        if self.device.type != "cuda":
            return None
        events = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        events[0].record()
        return events

    def step(self, x: torch.Tensor, t: torch.Tensor) -> None:
        if self.gm is None:
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x), t).backward()
            self.opt.step()
        else:
            asdl_step(self.gm, self.model, self.opt, x, t)

    def cycle(self, batches: List[Tuple[torch.Tensor, torch.Tensor]], measure: bool,
              peaks: Optional[Dict[str, int]] = None) -> None:
        """One inversion period of steps (INTERVAL by default); ``measure``: record their times; ``peaks``:
        record each kind's live-bytes peak."""
        for _ in range(self.period):
            x, t = batches[self.step_index % len(batches)]
            curvature = self.step_index % self.interval == 0
            self._sync()
            wall, cpu = time.perf_counter(), time.process_time()
            events = self._events()
            if peaks is None:
                self.step(x, t)
            else:
                kind = "curvature" if curvature else "plain"
                peaks[kind] = max(peaks.get(kind, 0), self._live_peak(x, t))
            if events:
                events[1].record()
            self._sync()
            elapsed = time.perf_counter() - wall if not events else events[0].elapsed_time(events[1]) / 1000
            if measure:
                self.times.append((curvature, elapsed, time.process_time() - cpu))
            with torch.no_grad():  # untimed: keep the weights finite on random data (see the docstring)
                for p, p0 in zip(self.params, self.init):
                    p.copy_(p0)
            self.step_index += 1

    def _live_peak(self, x: torch.Tensor, t: torch.Tensor) -> int:
        if self.device.type == "cuda":
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.step(x, t)
            return torch.cuda.max_memory_allocated(self.device) - before
        with LiveTensorBytes() as counter:
            self.step(x, t)
        return counter.peak


def _mean(values: List[float]) -> Optional[float]:
    return statistics.fmean(values) if values else None


def worker(args: argparse.Namespace) -> Dict:
    """One method in this process: times, peak RSS, live-bytes peaks."""
    builder, in_shape, classes, _ = MODELS[args.model]
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = builder().to(device).train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [(torch.randn(args.batch_size, *in_shape, generator=gen).to(device),
                torch.randint(0, classes, (args.batch_size,), generator=gen).to(device)) for _ in range(2)]
    runner = Runner(args.worker, model, [p.detach().clone() for p in model.parameters()], args)
    del model
    for c in range(args.warmup_cycles + args.cycles):
        runner.cycle(batches, measure=c >= args.warmup_cycles)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peaks: Dict[str, int] = {}
    runner.cycle(batches, measure=False, peaks=peaks)
    times = runner.times
    out = {"peak_rss_mib": peak_rss / MIB, "live_peak_mib": {k: v / MIB for k, v in peaks.items()},
           "maker": type(runner.gm).__name__ if runner.gm is not None else None, "steps": len(times)}
    for key, index in (("wall", 1), ("cpu", 2)):
        out[key] = {"mean_s": _mean([s[index] for s in times]),
                    "plain_s": _mean([s[index] for s in times if not s[0]]),
                    "curvature_s": _mean([s[index] for s in times if s[0]])}
    return out


def run_methods(args: argparse.Namespace, methods: List[str]) -> Dict[str, Dict]:
    """Every method in a fresh process of this script, one after the other."""
    results = {}
    for i, name in enumerate(methods):
        print(f"[{i + 1}/{len(methods)}] {name} ...", file=sys.stderr, flush=True)
        command = [sys.executable, os.path.abspath(__file__), "--worker", name, "--model", args.model,
                   "--batch-size", str(args.batch_size), "--interval", str(args.interval),
                   "--inverse-interval", str(args.inverse_interval),
                   "--cycles", str(args.cycles), "--warmup-cycles", str(args.warmup_cycles),
                   "--seed", str(args.seed), "--device", args.device]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results[name] = {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
            print(f"{name} failed: {results[name]['error']}", file=sys.stderr)
        else:
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


def table(results: Dict[str, Dict], reference: str) -> List[str]:
    """Markdown rows: each figure and its ratio to ``reference``'s."""
    figures = [("mean s", lambda r: r["wall"]["mean_s"]), ("plain s", lambda r: r["wall"]["plain_s"]),
               ("curvature s", lambda r: r["wall"]["curvature_s"]), ("mean CPU s", lambda r: r["cpu"]["mean_s"]),
               ("peak RSS MiB", lambda r: r["peak_rss_mib"]),
               ("live plain MiB", lambda r: r["live_peak_mib"].get("plain")),
               ("live curv. MiB", lambda r: r["live_peak_mib"].get("curvature"))]
    ref = results.get(reference, {})
    rows = ["| method | " + " | ".join(f"{n} (×{reference})" for n, _ in figures) + " |",
            "|---" * (len(figures) + 1) + "|"]
    for name, res in results.items():
        if "error" in res:
            rows.append(f"| {name} | failed: {res['error']} |")
            continue
        cells = []
        for _, get in figures:
            value, base = get(res), get(ref) if "error" not in ref and ref else None
            ratio = f" ({value / base:.3f})" if value and base else ""
            cells.append("-" if value is None else f"{value:.4g}{ratio}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--inverse-interval", type=int, default=None,
                   help="steps between inversions (EKFAC: eigenbases; default --interval), a multiple of it; a "
                        "cycle is that many steps")
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--warmup-cycles", type=int, default=1)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None, help="JSON path (default bench_results/bench_step_MODEL_bBATCH.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    args = p.parse_args()
    args.batch_size = args.batch_size or MODELS[args.model][3]
    args.inverse_interval = args.inverse_interval or args.interval
    if args.inverse_interval % args.interval:
        p.error(f"--inverse-interval {args.inverse_interval} is not a multiple of --interval {args.interval}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    command = shlex.join(["python"] + sys.argv)
    load_before = os.getloadavg()
    results = run_methods(args, methods)
    load = {"before": load_before, "after": os.getloadavg()}  # 1/5/15-min load: other jobs on the cores
    threads = args.threads or torch.get_num_threads()
    print(f"# bench_step: {args.model}, batch {args.batch_size}, interval {args.interval} (inversions every "
          f"{args.inverse_interval}), {args.cycles} timed + "
          f"{args.warmup_cycles} warm-up cycles, {args.device}, {threads} threads, one process per method; "
          f"load average {load['before'][0]:.2f} before, {load['after'][0]:.2f} after")
    print(f"`{command}`\n")
    print("\n".join(table(results, "kfac" if "kfac" in results else methods[0])))
    out = args.out or f"bench_results/bench_step_{args.model}_b{args.batch_size}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"command": command, "args": vars(args), "torch": torch.__version__, "threads": threads,
                   "timer": "CUDA events" if args.device == "cuda" else "time.perf_counter",
                   "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
                   "load_average": load,
                   "memory": {"peak_rss_mib": "ru_maxrss of the method's process over the timed cycles",
                              "live_peak_mib": "peak bytes of tensors created in one step and still referenced"},
                   "results": results}, f, indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
