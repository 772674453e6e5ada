"""Bytes communicated and step time of DDP-style SGD, sharded K-FAC, sharded FOP (and HyLo) on several ranks.

What runs. For each world size W in ``--world-sizes`` the script spawns W ranks itself
(``torch.multiprocessing.start_processes``, start method "spawn", a ``file://`` store in a temporary
directory). Backend gloo (default): every rank runs on the CPU with ``torch.set_num_threads(1)`` (and
``OMP_NUM_THREADS=1``), so a world size above the core count time-shares the cores and its step times
include that. Backend nccl: one process per GPU, ``torch.cuda.set_device(rank)``, model and inputs on that
GPU. Every rank builds the same model under ``--seed`` and, for each method, its own copy of it, an SGD
optimizer (lr 0.01, momentum 0.9) and ``fop_asdl.make_gradient_maker(method, model, config)`` with
``asdl.PreconditioningConfig(damping=1.0, ema_decay=0.05, curvature_upd_interval=INTERVAL,
preconditioner_upd_interval=INTERVAL)``. With W > 1 ranks the makers run sharded by themselves: "sgd"
all-reduces every gradient once per step (as DDP does), "kfac" reduces each block's mean gradient to the
block's owner, "fop" reduces each block's g1 and g2 to its owner (``sub_batches="auto"``); the owners
broadcast the preconditioned blocks. On request (``--methods``) "hylo_kis" and "hylo_kid" run HyLo
(``switch_policy="kis"`` / ``"kid"``, ``compression_ratio=0.1``): its refresh steps all-gather every block's
kept rows (and KID's Y_i) and the owners broadcast one r×r matrix per block; its plain steps all-reduce the
gradients, as "sgd" does. Every rank draws its own random local batch (``--batch-size`` samples
per rank, ``torch.randn``/``randint`` from a ``torch.Generator`` seeded with ``--seed``, the rank and the
batch index; ``--seed`` also seeds ``torch.manual_seed`` before the model is built).
This is a communication and speed benchmark: the losses mean nothing. On such unlearnable data the
weights could drift to NaN, so after every step, outside the measured region, they are copied back to
their initial values (as in scripts/bench_step.py): every step does the full work at representative values.

What one step is and how it is measured. Each method first runs ``--warmup-steps`` unmeasured steps (the
first of them a curvature step, which also allocates the factors and inverses), then ``--cycles`` x
INTERVAL measured steps, interleaved round robin by cycles of INTERVAL steps (cycle c of sgd, kfac, fop,
then cycle c+1, ...) so that drift in machine load hits all methods alike. A step is a curvature step when
its maker's step counter is a multiple of INTERVAL (curvature and inverses are updated), else a plain step;
both kinds are reported apart. One measured step, on every rank:

    barrier; [rank 0: read lo TX] ; t0 ; zero_grad, setup_model_call, setup_loss_call,
    forward_and_backward, opt.step() ; t1 ; barrier ; [rank 0: read lo TX] ; reset weights

- Step time: t1 - t0 with ``time.perf_counter`` (after ``torch.cuda.synchronize`` on GPU), on every rank;
  the step's time is the maximum over the ranks (a synchronous step is as slow as its slowest rank).
  Reported: median and mean over the measured steps, plain and curvature steps apart.
- Nominal bytes: the difference of ``maker._sync.comm.bytes`` (a Counter per collective kind) across the
  step: the average number of bytes one rank receives under a bandwidth-optimal algorithm (ring
  all-reduce 2·S·(W-1)/W, reduce to one rank and broadcast from one S·(W-1)/W). It is the same on every
  rank; rank 0's is reported, per kind in the JSON.
- Wire bytes (gloo only): the transmit-bytes counter of the loopback interface ``lo`` in
  ``/proc/net/dev``, read by rank 0 after each of the two barriers. All ranks talk over lo (gloo is given
  ``GLOO_SOCKET_IFNAME=lo``), so the difference is the traffic of all ranks in the step; it is divided by W
  for a per-rank average comparable with the nominal figure. It includes what the nominal count leaves out:
  IP/TCP headers, gloo's own framing and pairing messages, TCP ACKs, and the bytes of the closing barrier.
  The barrier's share is measured: ``--barrier-samples`` times "barrier; read; barrier; read" with no step
  between, whose median is subtracted from every step (and reported). Gloo's collectives need not be
  bandwidth-optimal, so wire bytes may exceed the nominal ones by more than the framing: on this project's
  machine gloo's all-reduce and broadcast matched the nominal count within 1 %, but its reduce (as if a
  reduce-scatter and a gather to the root) cost 1.5x the nominal bytes at W=2 and 1.26x at W=4 for
  0.4-4 MB buffers, and 2.1x / 1.35x for a 10 MB one; K-FAC and FOP use reduce, SGD only all-reduce.
  By default (``--netns private``, needs root) the ranks run in a fresh network namespace of their own, so
  lo carries only their traffic; with ``--netns shared`` (or where that namespace cannot be made) lo is the
  machine's, and other processes' loopback traffic adds noise (the per-step median filters most of it).
  Between a rank leaving the closing barrier and rank 0 reading the counter, another rank may already send
  its next barrier message: a few hundred bytes of jitter, which the barrier measurement, made the same way,
  shares. With nccl the data moves over NVLink/PCIe/shared memory, not lo: no wire bytes are reported.

Reported besides: the parameter count of the model and how many parameters sit in curvature blocks
(the others, if any, travel in the all-reduce of every step), the bytes of one DDP all-reduce of all
gradients (2·(W-1)/W·P·element size), and the ratios FOP/SGD and K-FAC/SGD of the plain-step bytes
(nominal and wire). The design target is FOP <= 1.5x SGD's single all-reduce on plain steps: FOP reduces
two gradients per block to its owner (2·S·(W-1)/W) and broadcasts one result (S·(W-1)/W), against SGD's
2·S·(W-1)/W. One markdown table per world size is printed; everything, with per-step values, goes to
``--json``.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import fcntl
import json
import os
import shlex
import socket
import statistics
import struct
import sys
import tempfile
import time
import warnings
from collections import Counter
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Tuple

import asdl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bench_common import asdl_step, restore
from fop_asdl import make_gradient_maker
from fop_asdl.distributed import destroy_process_group
from fop_asdl.models import MLP, SmallCNN, resnet18_cifar

MODELS: Dict[str, Tuple[Callable[[], nn.Module], Tuple[int, ...], int]] = {
    # name: (builder, input shape of one sample, classes)
    "small_cnn": (SmallCNN, (1, 28, 28), 10),
    "mlp": (MLP, (1, 28, 28), 10),
    "resnet18": (resnet18_cifar, (3, 32, 32), 10),
}
METHODS = ("sgd", "kfac", "fop")
OPTIONAL_METHODS = ("hylo_kis", "hylo_kid")  # make_gradient_maker("hylo", switch_policy=...)
N_BATCHES = 4  # distinct random local batches per rank, used in turn
KIB = 1024.0


# --- loopback counter and private network namespace --------------------------------------------------
def lo_tx() -> int:
    """Bytes transmitted so far on the loopback interface of this network namespace (/proc/net/dev)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, fields = line.partition(":")
            if name.strip() == "lo":
                return int(fields.split()[8])  # 8 receive fields, then transmit bytes
    raise RuntimeError("no 'lo' interface in /proc/net/dev")


def enter_private_netns() -> Optional[str]:
    """Move this process (and the ranks it spawns) into a new network namespace and bring its lo up.

    Returns None on success, else why it could not (the caller then measures on the shared lo)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x40000000) != 0:  # CLONE_NEWNET
        return f"unshare(CLONE_NEWNET) failed: {os.strerror(ctypes.get_errno())}"
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)  # struct ifreq: name, flags, padding to 40 bytes
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, siocgifflags, request))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sH22x", b"lo", flags | iff_up))
    return None


# --- one rank ----------------------------------------------------------------------------------------
class Runner:
    """One method on one rank: model copy, optimizer, maker, and its per-step records."""

    def __init__(self, name: str, model: nn.Module, args: argparse.Namespace):
        self.name, self.model = name, copy.deepcopy(model)
        self.params = list(self.model.parameters())
        self.init = [p.detach().clone() for p in self.params]
        self.opt = torch.optim.SGD(self.params, lr=0.01, momentum=0.9)
        config = asdl.PreconditioningConfig(damping=1.0, ema_decay=0.05, curvature_upd_interval=args.interval,
                                            preconditioner_upd_interval=args.interval)
        options = {"switch_policy": name.split("_")[1], "compression_ratio": 0.1} if name in OPTIONAL_METHODS else {}
        self.gm = make_gradient_maker(name.split("_")[0], self.model, config, **options)
        self.comm = self.gm._sync.comm
        self.interval, self.step_index = args.interval, 0
        self.records: List[Dict[str, Any]] = []

    def step(self, x: torch.Tensor, t: torch.Tensor) -> None:
        asdl_step(self.gm, self.model, self.opt, x, t)

    def reset_weights(self) -> None:
        restore(self.params, self.init)


class Rank:
    """This process's view of the run: barriers, clocks and the loopback counter (rank 0 reads it)."""

    def __init__(self, rank: int, device: torch.device, wire: bool):
        self.rank, self.device, self.wire = rank, device, wire
        self._barrier_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}

    def barrier(self) -> None:
        dist.barrier(**self._barrier_kwargs)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def tx(self) -> int:
        return lo_tx() if self.wire and self.rank == 0 else 0

    def barrier_bytes(self) -> int:
        """lo bytes of one barrier, measured exactly as around a step but with nothing in between."""
        self.barrier()
        before = self.tx()
        self.barrier()
        return self.tx() - before

    def measured_step(self, runner: Runner, batch: Tuple[torch.Tensor, torch.Tensor]) -> Dict[str, Any]:
        curvature = runner.step_index % runner.interval == 0
        nominal_before = Counter(runner.comm.bytes)
        self.barrier()
        before = self.tx()
        self.sync()
        start = time.perf_counter()
        runner.step(*batch)
        self.sync()
        seconds = time.perf_counter() - start
        self.barrier()
        wire = self.tx() - before
        nominal = Counter(runner.comm.bytes)
        nominal.subtract(nominal_before)
        return {"step": runner.step_index, "curvature": curvature, "seconds": seconds, "wire_all_ranks": wire,
                "nominal": {kind: float(v) for kind, v in nominal.items() if v}}


def local_batches(args: argparse.Namespace, rank: int, device: torch.device
                  ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    _, shape, classes = MODELS[args.model]
    batches = []
    for i in range(N_BATCHES):
        gen = torch.Generator().manual_seed(args.seed + 1 + 1000 * rank + i)
        batches.append((torch.randn(args.batch_size, *shape, generator=gen).to(device),
                        torch.randint(0, classes, (args.batch_size,), generator=gen).to(device)))
    return batches


def model_summary(runners: List[Runner]) -> Dict[str, Any]:
    """Parameter count, parameters inside curvature blocks (from the K-FAC/FOP maker), block owners."""
    params = [p for p in runners[0].model.parameters() if p.requires_grad]
    curv = next((r for r in runners if hasattr(r.gm, "named_modules_for_curvature")), None)
    in_blocks = 0
    if curv is not None:
        block_params = {id(p) for _, m in curv.gm.named_modules_for_curvature for p in m.parameters()
                        if p.requires_grad}
        in_blocks = sum(p.numel() for p in curv.model.parameters() if id(p) in block_params)
    return {"parameters": sum(p.numel() for p in params), "parameters_in_curvature_blocks": in_blocks,
            "element_size": params[0].element_size(),
            "block_owners": dict(curv.gm.assignment) if curv is not None else {}}


def rank_main(rank: int, world_size: int, args: argparse.Namespace, store: str, out: str) -> None:
    """One rank: build the three methods, warm up, measure, and (rank 0) write the raw records to ``out``."""
    torch.set_num_threads(1)
    # ASDL 0.1a5 registers non-full backward hooks; torch warns about it once per process
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=args.timeout))
    finished = False
    try:
        me = Rank(rank, device, wire=args.backend == "gloo")
        builder, _, _ = MODELS[args.model]
        torch.manual_seed(args.seed)
        model = builder().to(device).train()
        runners = [Runner(name, model, args) for name in args.methods]
        batches = local_batches(args, rank, device)
        for r in runners:
            for _ in range(args.warmup_steps):
                r.step(*batches[r.step_index % N_BATCHES])
                r.reset_weights()
                r.step_index += 1
        barrier = [me.barrier_bytes() for _ in range(args.barrier_samples)]
        for cycle in range(args.cycles):
            for r in runners:
                if rank == 0:
                    print(f"  W={world_size} cycle {cycle + 1}/{args.cycles} {r.name}", file=sys.stderr,
                          flush=True)
                for _ in range(args.interval):
                    r.records.append(me.measured_step(r, batches[r.step_index % N_BATCHES]))
                    r.reset_weights()
                    r.step_index += 1
        # the step time of a synchronous step is that of the slowest rank
        times = torch.tensor([rec["seconds"] for r in runners for rec in r.records], dtype=torch.float64,
                             device=device)
        dist.all_reduce(times, op=dist.ReduceOp.MAX)
        slowest = iter(times.tolist())
        for r in runners:
            for rec in r.records:
                rec["seconds"] = next(slowest)
        if rank == 0:
            with open(out, "w") as f:
                fop = next((r for r in runners if r.name == "fop"), None)
                json.dump({"model": model_summary(runners), "barrier_wire_all_ranks": barrier,
                           "sub_batches": fop.gm._sync.sub_batches if fop is not None else None,
                           "records": {r.name: r.records for r in runners}}, f)
        finished = True
    finally:
        destroy_process_group(barrier=finished)  # no gloo thread outlives the group (fop_asdl.distributed)


# --- summary -----------------------------------------------------------------------------------------
def summarize(raw: Dict[str, Any], world_size: int, wire: bool) -> Dict[str, Any]:
    """Per method and step kind: nominal and wire bytes per rank, step times; plus the ratios to SGD."""
    barrier = statistics.median(raw["barrier_wire_all_ranks"]) if wire else None
    methods: Dict[str, Dict[str, Optional[Dict[str, Any]]]] = {}
    for name, records in raw["records"].items():
        methods[name] = {}
        for kind, is_curv in (("plain", False), ("curvature", True)):
            recs = [r for r in records if r["curvature"] == is_curv]
            if not recs:
                methods[name][kind] = None
                continue
            by_collective: Counter = Counter()
            for r in recs:
                by_collective.update(r["nominal"])
            per_rank = [(r["wire_all_ranks"] - barrier) / world_size for r in recs] if wire else [None]
            seconds = [r["seconds"] for r in recs]
            methods[name][kind] = {
                "n_steps": len(recs),
                "nominal_bytes_per_rank": statistics.median(sum(r["nominal"].values()) for r in recs),
                "nominal_bytes_per_rank_by_collective": {k: v / len(recs) for k, v in by_collective.items()},
                "wire_bytes_per_rank": statistics.median(per_rank) if wire else None,
                "wire_bytes_per_rank_min": min(per_rank) if wire else None,
                "wire_bytes_per_rank_max": max(per_rank) if wire else None,
                "step_seconds_median": statistics.median(seconds),
                "step_seconds_mean": statistics.fmean(seconds),
            }
    model = raw["model"]
    return {"world_size": world_size, "model": model, "sub_batches_fop": raw["sub_batches"],
            "ddp_allreduce_bytes_per_rank": 2 * (world_size - 1) / world_size * model["parameters"]
            * model["element_size"],
            "barrier_wire_bytes_all_ranks_median": barrier, "methods": methods,
            "ratios": {f"{a}/sgd_plain_{key}": plain_ratio(methods, a, key) for a in ("fop", "kfac") + OPTIONAL_METHODS
                       for key in ("nominal_bytes_per_rank", "wire_bytes_per_rank")}}


def plain_ratio(methods: Dict[str, Any], name: str, key: str) -> Optional[float]:
    """``key`` of ``name``'s plain steps over SGD's; None where either is missing."""
    a = (methods.get(name) or {}).get("plain") or {}
    b = (methods.get("sgd") or {}).get("plain") or {}
    return a[key] / b[key] if a.get(key) is not None and b.get(key) else None


def fmt(value: Optional[float], spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def print_table(res: Dict[str, Any], args: argparse.Namespace) -> None:
    w, model, methods = res["world_size"], res["model"], res["methods"]
    where = "1 thread per rank" if args.backend == "gloo" else "one GPU per rank"
    print(f"\n## world size {w}: {args.model}, local batch {args.batch_size} (global {args.batch_size * w}), "
          f"interval {args.interval}, {args.backend} ({where}), {args.cycles * args.interval} measured steps "
          f"per method after {args.warmup_steps} warm-up\n")
    print("| method | plain KiB/rank nominal | plain KiB/rank wire | curv KiB/rank nominal "
          "| curv KiB/rank wire | plain ms median | plain ms mean | curv ms median | curv ms mean "
          "| plain nominal / SGD | plain wire / SGD |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in methods.items():
        p, c = m["plain"] or {}, m["curvature"] or {}
        cells = [fmt(d.get(k), ".1f", 1 / KIB) for d in (p, c)
                 for k in ("nominal_bytes_per_rank", "wire_bytes_per_rank")]
        cells += [fmt(d.get(k), ".2f", 1e3) for d in (p, c)
                  for k in ("step_seconds_median", "step_seconds_mean")]
        cells += [fmt(plain_ratio(methods, name, k), ".4f")
                  for k in ("nominal_bytes_per_rank", "wire_bytes_per_rank")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    blocks = model["parameters_in_curvature_blocks"]
    print(f"\nparameters {model['parameters']:,}, in curvature blocks {blocks:,} "
          f"({100 * blocks / model['parameters']:.1f} %); one DDP all-reduce of all gradients: "
          f"{res['ddp_allreduce_bytes_per_rank'] / KIB:.1f} KiB/rank; "
          f"FOP sub_batches={res['sub_batches_fop']}")
    if res["barrier_wire_bytes_all_ranks_median"] is not None:
        print(f"empty barrier on lo: {res['barrier_wire_bytes_all_ranks_median']:.0f} B (all ranks; median, "
              f"subtracted from every step)")
    ratios = res["ratios"]
    if ratios["fop/sgd_plain_nominal_bytes_per_rank"] is not None:
        excess = methods["fop"]["plain"]["nominal_bytes_per_rank"] - 1.5 * methods["sgd"]["plain"][
            "nominal_bytes_per_rank"]
        print(f"FOP / SGD plain-step bytes (target <= 1.5): nominal "
              f"{ratios['fop/sgd_plain_nominal_bytes_per_rank']:.4f} (= 1.5 x SGD {excess:+.0f} B/rank), "
              f"wire "
              f"{fmt(ratios['fop/sgd_plain_wire_bytes_per_rank'], '.3f')}; K-FAC / SGD: nominal "
              f"{fmt(ratios['kfac/sgd_plain_nominal_bytes_per_rank'], '.4f')}, wire "
              f"{fmt(ratios['kfac/sgd_plain_wire_bytes_per_rank'], '.3f')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world-sizes", default="2,4", help="comma-separated numbers of ranks, one run each")
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                   help="gloo: CPU ranks; nccl: one GPU per rank (needs as many GPUs as ranks)")
    p.add_argument("--model", choices=sorted(MODELS), default="small_cnn",
                   help="small_cnn and mlp take 1x28x28 inputs, resnet18 3x32x32; 10 classes")
    p.add_argument("--batch-size", type=int, default=64, help="local batch per rank")
    p.add_argument("--interval", type=int, default=10, help="curvature and preconditioner update interval")
    p.add_argument("--cycles", type=int, default=3, help="measured cycles of INTERVAL steps per method")
    p.add_argument("--warmup-steps", type=int, default=2, help="unmeasured steps per method first (>= 1)")
    p.add_argument("--barrier-samples", type=int, default=20, help="empty barriers measured on lo")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of sgd,kfac,fop,hylo_kis,hylo_kid")
    p.add_argument("--netns", choices=["private", "shared"], default="private",
                   help="gloo: run the ranks in a network namespace of their own, so lo carries only their "
                        "traffic (needs root; falls back to shared), or on the machine's lo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective may wait for the other ranks")
    p.add_argument("--json", default="bench_results/dist.json", help="where the results go")
    args = p.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    world_sizes = [int(w) for w in args.world_sizes.split(",")]
    if set(args.methods) - set(METHODS + OPTIONAL_METHODS) or not args.methods:
        p.error(f"--methods must be a subset of {','.join(METHODS + OPTIONAL_METHODS)}")
    if min(world_sizes) < 2:
        p.error("world sizes must be >= 2 (one rank runs the single-process path; see scripts/bench_step.py)")
    if args.barrier_samples < 1:
        p.error("--barrier-samples must be >= 1")
    if args.warmup_steps < 1:
        p.error("--warmup-steps must be >= 1: the first step allocates curvature and inverses")
    if args.backend == "nccl" and torch.cuda.device_count() < max(world_sizes):
        p.error(f"--backend nccl needs one GPU per rank: {max(world_sizes)} asked, "
                f"{torch.cuda.device_count()} visible")
    command = shlex.join([os.path.basename(sys.executable)] + sys.argv)

    netns = "none (nccl)"
    if args.backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ["OMP_NUM_THREADS"] = "1"  # the spawned ranks inherit it before importing torch
        netns = "shared"
        if args.netns == "private":
            why_not = enter_private_netns()
            netns = "private" if why_not is None else "shared"
            if why_not:
                print(f"private network namespace unavailable ({why_not}); measuring on the shared lo",
                      file=sys.stderr)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench_dist_") as tmp:
        for w in world_sizes:
            print(f"world size {w}: spawning {w} ranks ({args.backend})", file=sys.stderr, flush=True)
            store, out = os.path.join(tmp, f"store{w}"), os.path.join(tmp, f"out{w}.json")
            start = time.perf_counter()
            mp.start_processes(rank_main, args=(w, args, store, out), nprocs=w, join=True,
                               start_method="spawn")
            with open(out) as f:
                raw = json.load(f)
            res = summarize(raw, w, wire=args.backend == "gloo")
            res["wall_seconds"] = time.perf_counter() - start
            res["records"] = raw["records"]
            res["barrier_wire_all_ranks"] = raw["barrier_wire_all_ranks"]
            results.append(res)
            print(f"world size {w}: done in {res['wall_seconds']:.0f} s", file=sys.stderr, flush=True)

    print(f"# bench_dist: sgd (DDP-style all-reduce) vs sharded kfac vs sharded fop; `{command}`")
    print(f"random inputs; weights reset after every step (untimed); lo measured in the {netns} network "
          f"namespace; KiB = 1024 B per rank and step; nominal = Communicator count (bandwidth-optimal "
          f"algorithm), wire = lo TX bytes of all ranks / W minus an empty barrier; times: slowest rank "
          f"per step")
    for res in results:
        print_table(res, args)

    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"command": command, "args": vars(args), "torch": torch.__version__, "netns": netns,
                   "cpu_count": os.cpu_count(), "results": results}, f, indent=1)
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
