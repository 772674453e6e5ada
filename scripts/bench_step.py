"""Per-step time and peak memory of SGD, K-FAC and FOP on one model, batch and update interval.

What is measured. Every method gets its own copy of the same initial weights (deepcopy of one model
built under ``--seed``), its own SGD optimizer (lr 0.01, momentum 0.9) and its own gradient maker. One
*cycle* is INTERVAL steps of that maker: one curvature step (``step_index % INTERVAL == 0``, counted from
0 per maker) followed by INTERVAL-1 plain steps. After ``--warmup-cycles`` unmeasured cycles per method,
``--cycles`` cycles are measured, interleaved round robin (cycle c of sgd, kfac, fop, then cycle c+1...)
so that drift in machine load hits all methods alike. A step is ``zero_grad``, ``setup_model_call``,
``setup_loss_call``, ``forward_and_backward`` and ``opt.step()``, timed with ``time.perf_counter``
(on CUDA after a synchronize). Inputs are random tensors under a fixed seed: this is a speed benchmark,
the loss values mean nothing. On such unlearnable data, lr 0.01 with damping 1e-3 drives K-FAC and FOP
to NaN within a few steps (K-FAC then runs on NaNs, FOP refuses the step), so after every step,
outside the timed region, the weights are copied back to their initial values: each step does the
full work (forward, backward, curvature, inversion, optimizer update) at representative values.

Peak memory. CUDA: ``torch.cuda.reset_peak_memory_stats`` before and ``max_memory_allocated`` after each of
a method's measured cycles. CPU: the resident set size (RSS) from ``/proc/self/statm``, sampled every ~1 ms
by a background thread, attributed to the method whose steps are running. RSS only falls when freed memory
goes back to the OS, so the script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` (unless already
set), which pins glibc's mmap threshold: every block >= 64 KiB is mmapped and returned on free, so the
transient tensors of one method do not stay resident under the next; ``malloc_trim(0)`` (untimed) before
each method's cycle returns what smaller blocks freed. Reported per method: the absolute peak, and the
*increment* = peak minus the RSS (or allocated bytes) just before its first measured step; with warmup, the
makers' persistent state (curvature, inverses) is already in the baseline, so the increment is the per-step
working memory (without warmup it includes that state). The *footprint* compared between methods is that
increment plus the method's own persistent state counted tensor by tensor (weights, grads, optimizer
state, Kronecker/unit-wise factors and inverses), so other methods' state in the same process drops out. The absolute peak also holds the other methods' live
models and state (one process). The < 64 KiB blocks and the 1 ms sampling period make the CPU figure
approximate (a few MB). Cost: every large tensor is now a fresh mmap whose pages fault in on first touch
(SGD, SmallCNN b256: ~39k instead of ~6k minor faults, ~50 ms more system CPU on ~0.4 s; ResNet-18 b32:
~290k instead of ~50k, ~0.3 s on ~5 s), an overhead per byte allocated in every step. ``--no-pin-malloc``
skips the re-exec for timings without it (glibc's dynamic threshold; the CPU memory figures then overstate,
as freed heap blocks stay resident within a method's cycle).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not ("MALLOC_MMAP_THRESHOLD_" in os.environ or "--no-pin-malloc" in sys.argv):
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})

import argparse  # noqa: E402  (the imports follow the re-exec on purpose: torch loads once)
import copy  # noqa: E402
import ctypes  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Callable, Dict, List, Optional, Tuple  # noqa: E402

import asdl  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from fop_asdl import make_gradient_maker  # noqa: E402
from fop_asdl.models import SmallCNN, resnet18_cifar  # noqa: E402

MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...], int, int]] = {
    # name: (builder, input shape, classes, default batch)
    "small_cnn": (SmallCNN, (1, 28, 28), 10, 256),
    "resnet18": (resnet18_cifar, (3, 32, 32), 10, 128),
}
_LIBC = ctypes.CDLL("libc.so.6")
INPUT_NOTE = ("random inputs and labels under a fixed seed (speed benchmark; losses are meaningless); "
              "weights reset to their initial values after every step, untimed")
MB = 2 ** 20


class RssSampler(threading.Thread):
    """Samples this process's RSS every ``period`` s; keeps the maximum per active method name."""

    def __init__(self, period: float = 1e-3):
        super().__init__(daemon=True)
        self.period, self.peaks, self.active = period, {}, None
        self._fd, self._page = os.open("/proc/self/statm", os.O_RDONLY), os.sysconf("SC_PAGE_SIZE")
        self._lock, self._done = threading.Lock(), threading.Event()

    def rss(self) -> int:
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def sample(self) -> None:
        with self._lock:  # a sample is never attributed to the method that ran before or after it
            if self.active is not None:
                self.peaks[self.active] = max(self.peaks.get(self.active, 0), self.rss())

    def set_active(self, name: Optional[str]) -> None:
        self.sample()
        with self._lock:
            self.active = name
        self.sample()

    def run(self) -> None:
        while not self._done.wait(self.period):
            self.sample()

    def stop(self) -> None:
        self._done.set()


class Runner:
    """One method: model copy, optimizer, gradient maker, its step counter and its timings."""

    def __init__(self, name: str, model: nn.Module, init: List[torch.Tensor], args: argparse.Namespace):
        self.name, self.model, self.device = name, copy.deepcopy(model), torch.device(args.device)
        self.params, self.init = list(self.model.parameters()), init
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        config = asdl.PreconditioningConfig(data_size=args.batch_size, damping=1e-3, ema_decay=0.05,
                                            curvature_upd_interval=args.interval,
                                            preconditioner_upd_interval=args.interval)
        self.gm = make_gradient_maker(name, self.model, config)
        self.step_index, self.interval, self.times, self.curv = 0, args.interval, [], []
        self.baseline: Optional[int] = None
        self.cuda_peak, self.error, self.state = 0, None, 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def cycle(self, batches: List[Tuple[torch.Tensor, torch.Tensor]], measure: bool) -> None:
        for _ in range(self.interval):
            x, t = batches[self.step_index % len(batches)]
            self._sync()
            start = time.perf_counter()
            self.opt.zero_grad(set_to_none=True)
            dummy_y = self.gm.setup_model_call(self.model, x)
            self.gm.setup_loss_call(F.cross_entropy, dummy_y, t)
            y, loss = self.gm.forward_and_backward()
            self.opt.step()
            self._sync()
            if measure:
                self.times.append(time.perf_counter() - start)
                self.curv.append(self.step_index % self.interval == 0)
            del y, loss, dummy_y
            with torch.no_grad():  # untimed: keep the weights finite on random data (see the docstring)
                for p, p0 in zip(self.params, self.init):
                    p.copy_(p0)
            self.step_index += 1


def state_bytes(r: "Runner") -> int:
    """Bytes the method keeps between steps: weights, grads, optimizer state and the maker's curvature
    (factors and inverses), counted tensor by tensor, so it needs no memory measurement."""
    tensors = [p for p in r.model.parameters()] + [p.grad for p in r.model.parameters() if p.grad is not None]
    tensors += [v for st in r.opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    for _, module in getattr(r.gm, "named_modules_for_curvature", []):
        matrix = getattr(module, "fisher", None)
        for part, keys in (("kron", ("A", "B", "A_inv", "B_inv")), ("unit", ("data", "inv"))):
            obj = getattr(matrix, part, None) if matrix is not None else None
            tensors += [getattr(obj, k) for k in keys if obj is not None and getattr(obj, k) is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def summary(times: List[float]) -> Dict[str, Optional[float]]:
    return {"mean_s": statistics.fmean(times) if times else None,
            "median_s": statistics.median(times) if times else None, "n": len(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="small_cnn")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--warmup-cycles", type=int, default=1)
    p.add_argument("--methods", default="sgd,kfac,fop")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--no-pin-malloc", action="store_true", help="CPU: keep glibc's dynamic mmap threshold "
                   "(no page-fault overhead in the step times; approximate peak memory); see the docstring")
    args = p.parse_args()
    builder, in_shape, classes, default_batch = MODELS[args.model]
    args.batch_size = args.batch_size or default_batch
    args.out = args.out or f"bench_results/bench_step_{args.model}_b{args.batch_size}.json"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda asked but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)

    torch.manual_seed(args.seed)
    model = builder().to(device).train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    batches = [(torch.randn(args.batch_size, *in_shape, generator=gen).to(device),
                torch.randint(0, classes, (args.batch_size,), generator=gen).to(device)) for _ in range(4)]
    init = [p.detach().clone() for p in model.parameters()]
    runners = [Runner(m, model, init, args) for m in methods]
    del model
    sampler = RssSampler()
    if not cuda:
        sampler.start()
    total = (args.warmup_cycles + args.cycles) * len(runners)
    for c in range(args.warmup_cycles + args.cycles):
        measure = c >= args.warmup_cycles
        for r in [r for r in runners if r.error is None]:
            print(f"\r[{c * len(runners) + runners.index(r) + 1}/{total}] cycle {c} {r.name}   ",
                  end="", file=sys.stderr, flush=True)
            if cuda and measure:
                torch.cuda.synchronize(device)
                r.baseline = torch.cuda.memory_allocated(device) if r.baseline is None else r.baseline
                torch.cuda.reset_peak_memory_stats(device)
            elif not cuda:
                _LIBC.malloc_trim(0)  # untimed: give freed heap pages back, so RSS starts at live memory
                r.baseline = sampler.rss() if measure and r.baseline is None else r.baseline
            if measure:
                r.state = state_bytes(r)
            sampler.set_active(r.name if measure and not cuda else None)
            try:
                r.cycle(batches, measure)
            except Exception as e:  # a failing method is reported and dropped; the others go on
                r.error = f"{type(e).__name__}: {e}"
                print(f"\n{r.name} failed at step {r.step_index}: {r.error}", file=sys.stderr)
            sampler.set_active(None)
            if cuda and measure:
                r.cuda_peak = max(r.cuda_peak, torch.cuda.max_memory_allocated(device))
    print(file=sys.stderr)
    sampler.stop()

    results: Dict[str, Dict] = {}
    for r in runners:
        peak = r.cuda_peak if cuda else sampler.peaks.get(r.name, 0)
        results[r.name] = {
            "all": summary(r.times),
            "plain": summary([t for t, k in zip(r.times, r.curv) if not k]),
            "curvature": summary([t for t, k in zip(r.times, r.curv) if k]),
            "peak_mb": peak / MB, "baseline_mb": (r.baseline or 0) / MB,
            "peak_increment_mb": (peak - (r.baseline or 0)) / MB, "state_mb": r.state / MB,
            "footprint_mb": (r.state + peak - (r.baseline or 0)) / MB, "error": r.error, "step_times_s": r.times}

    def ratio(a: str, b: str, key: Callable[[Dict], Optional[float]]) -> Optional[float]:
        if a in results and b in results and key(results[a]) and key(results[b]):
            return key(results[a]) / key(results[b])
        return None

    mean_time = lambda res: res["all"]["mean_s"]  # noqa: E731
    ratios = {f"{a}/{b}_mean_step_time": ratio(a, b, mean_time)
              for a, b in (("fop", "kfac"), ("kfac", "sgd"), ("fop", "sgd"))}
    ratios["fop/kfac_peak_increment"] = ratio("fop", "kfac", lambda res: res["peak_increment_mb"])
    ratios["fop/kfac_footprint"] = ratio("fop", "kfac", lambda res: res["footprint_mb"])

    fmt = lambda v, spec=".4f": "-" if v is None else format(v, spec)  # noqa: E731
    print(f"# bench_step: {args.model}, batch {args.batch_size}, interval {args.interval}, "
          f"{args.cycles} measured + {args.warmup_cycles} warmup cycles, {args.device}, "
          f"{torch.get_num_threads()} threads; {INPUT_NOTE}")
    print(f"`{command}`  (MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')})\n")
    print("| method | mean s | median s | plain mean s | curv mean s | footprint MB = state + step peak "
          "| time vs kfac | footprint vs kfac |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        print(f"| {name} | {fmt(res['all']['mean_s'])} | {fmt(res['all']['median_s'])} | "
              f"{fmt(res['plain']['mean_s'])} | {fmt(res['curvature']['mean_s'])} | "
              f"{res['footprint_mb']:.1f} = {res['state_mb']:.1f} + {res['peak_increment_mb']:.1f} | "
              f"{fmt(ratio(name, 'kfac', mean_time), '.3f')} | "
              f"{fmt(ratio(name, 'kfac', lambda v: v['footprint_mb']), '.3f')} |")
    print("\n" + ", ".join(f"{k} = {fmt(v, '.3f')}" for k, v in ratios.items()))
    for r in runners:
        if r.error:
            print(f"\n{r.name} FAILED at step {r.step_index} (row = steps before): {r.error}")

    threshold = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    memory_method = ("torch.cuda.max_memory_allocated per measured cycle; increment = peak - "
                     "memory_allocated before the first measured step" if cuda else
                     "RSS from /proc/self/statm sampled every ~1 ms while the method's measured steps run "
                     f"(MALLOC_MMAP_THRESHOLD_={threshold}; 65536: freed blocks >= 64 KiB leave RSS; unset: "
                     "glibc's dynamic threshold, freed heap blocks may stay resident), malloc_trim(0) before "
                     "each cycle; increment = peak - RSS just before its first measured step")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": command, "args": vars(args), "inputs": INPUT_NOTE, "device": str(device),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "malloc_mmap_threshold": threshold, "memory_method": memory_method,
                   "results": results, "ratios": ratios}, f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
