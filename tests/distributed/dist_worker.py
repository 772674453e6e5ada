"""Training pieces for test_distributed.py: the same loop on one process (global batch) or on a rank."""
from __future__ import annotations

import os
import time
import warnings
from typing import Dict, List

import torch

from fop_asdl.distributed import destroy_process_group

import scaffold
from scaffold import (LOCAL, TiedTokenNet, TokenNet, config, conv_ln_net, init_gloo, local_rows, restore,
                      single_process_order, step, train)

STEPS = 5  # interval 2: curvature on steps 0, 2, 4; EMA on


def global_batch(i: int, world_size: int, shape=(1, 6, 6)):
    gen = torch.Generator().manual_seed(1000 + i)
    n = LOCAL * world_size
    if shape == "ids":  # token ids of TiedTokenNet
        return (torch.randint(0, TiedTokenNet.VOCAB, (n, 3), generator=gen),
                torch.randint(0, TiedTokenNet.VOCAB, (n,), generator=gen))
    return torch.randn(n, *shape, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


#: The networks the equivalence runs train, and their input shapes (per sample).
NETS = {"conv_ln": (conv_ln_net, (1, 6, 6)), "tokens": (TokenNet, (5, 3)), "tied": (TiedTokenNet, "ids")}
#: The makers of the tied-weights run, with the options they need on this tiny net.
TIED_MAKERS = {"sgd": {}, "kfac": {}, "fop": {"sub_batches": "halves"}, "fngd": {"iters_per_epoch": 2, "coefficient_scope": "global"},
               "hylo": {"iters_per_epoch": 2, "switch_policy": "kis", "compression_ratio": 1.0}}


def build(name: str, net: str = "conv_ln", **kwargs):
    if name in ("kfac", "fop"):
        kwargs.setdefault("fisher_type", "fisher_emp")
    return scaffold.build(name, NETS[net][0], config(), opt_lr=0.1, **kwargs)


def clip_options(name: str, mode: str) -> Dict[str, object]:
    """kl_clip (small enough that ν < 1) on K-FAC and on FOP's "halves" mode; "ranks" runs unclipped."""
    return {"kl_clip": 1e-4, "lr": 0.1} if name == "kfac" or mode == "halves" else {}


def run_single(name: str, mode: str, world_size: int, steps=range(STEPS), net: str = "conv_ln", **kwargs):
    order = single_process_order(mode, world_size) if name == "fop" else torch.arange(LOCAL * world_size)
    model, maker, opt = build(name, net, **kwargs)

    def batches(i):
        x, t = global_batch(i, world_size, NETS[net][1])
        return x[order], t[order]

    return train(model, maker, opt, steps, batches), model, maker, opt


def rank_batches(rank: int, world_size: int, net: str = "conv_ln"):
    rows = local_rows(rank, world_size)

    def batches(i):
        x, t = global_batch(i, world_size, NETS[net][1])
        return x[rows], t[rows]

    return batches


def equivalence(rank: int, world_size: int, store: str, out: str) -> None:
    """Every mode this world size allows, for FOP and K-FAC: per-step grads, assignment, last stats."""
    init_gloo(rank, world_size, store)
    results: Dict[str, object] = {}
    modes = ["halves"] + (["ranks"] if world_size % 2 == 0 else [])
    for name, mode in [("fop", m) for m in modes] + [("kfac", "-")]:
        kwargs = {"sub_batches": mode} if name == "fop" else {}
        model, maker, opt = build(name, **kwargs, **clip_options(name, mode))
        grads = train(model, maker, opt, range(STEPS), rank_batches(rank, world_size))
        stats = {k: {s: v.clone() for s, v in d.items()} for k, d in getattr(maker, "last_stats", {}).items()}
        results[f"{name}/{mode}"] = {"grads": grads, "assignment": maker.assignment, "stats": stats,
                                     "nu": None if maker.last_nu is None else maker.last_nu.clone(),
                                     "state": maker.state_dict(),
                                     "params": [p.detach().clone() for p in model.parameters()]}
    torch.save(results, f"{out}.{rank}")
    destroy_process_group()


def attention_equivalence(rank: int, world_size: int, store: str, out: str) -> None:
    """FOP ("halves") and K-FAC on TokenNet, whose attention projections are blocks: per-step grads."""
    init_gloo(rank, world_size, store)
    results = {}
    for name in ("fop", "kfac"):
        model, maker, opt = build(name, "tokens", **({"sub_batches": "halves"} if name == "fop" else {}))
        assert any(n.endswith("q_proj") for n, _ in maker.named_modules_for_curvature)
        results[name] = train(model, maker, opt, range(STEPS), rank_batches(rank, world_size, "tokens"))
    torch.save(results, f"{out}.{rank}")
    destroy_process_group()


def tied_equivalence(rank: int, world_size: int, store: str, out: str) -> None:
    """Every maker on TiedTokenNet (a weight used by a block and outside it): per-step grads."""
    import warnings

    init_gloo(rank, world_size, store)
    results = {}
    for name, options in TIED_MAKERS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # construction warnings are not what this run checks
            model, maker, opt = build(name, "tied", **options)
            results[name] = train(model, maker, opt, range(STEPS), rank_batches(rank, world_size, "tied"))
    torch.save(results, f"{out}.{rank}")
    destroy_process_group()


def resume_sharded(rank: int, world_size: int, store: str, out: str, ckpt: str) -> None:
    """Load a single-process checkpoint into a sharded run and train on."""
    init_gloo(rank, world_size, store)
    model, maker, opt = restore(torch.load(ckpt, weights_only=False), *build("fop", sub_batches="halves"))
    train(model, maker, opt, range(3, STEPS + 2), rank_batches(rank, world_size))
    torch.save([p.detach().clone() for p in model.parameters()], f"{out}.{rank}")
    destroy_process_group()


def failing_rank(rank: int, world_size: int, store: str, out: str) -> None:
    """Rank 1 gets a batch too small to split and raises before any collective; rank 0 must not hang."""
    init_gloo(rank, world_size, store, timeout_s=5.0)
    model, maker, opt = build("fop", sub_batches="halves")
    x, t = rank_batches(rank, world_size)(0)
    if rank == 1:
        x, t = x[:1], t[:1]
    start = time.monotonic()
    try:
        step(maker, model, x, t)
        outcome = ("ok", "")
    except Exception as error:  # noqa: BLE001 - the test inspects it
        outcome = (type(error).__name__, str(error))
    torch.save({"outcome": outcome, "seconds": time.monotonic() - start}, f"{out}.{rank}")
    destroy_process_group(barrier=False)  # the ranks did not agree on their last collective


def gloo_threads() -> List[str]:
    """The names of this process's gloo threads (``gloo_tcp_loop``, ``pt_gloo_runloop``; Linux's /proc)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


def teardown(rank: int, world_size: int, store: str, out: str) -> None:
    """FOP on "ranks" (it makes parity groups), optimizer built after init (which imports
    torch.distributed.nn), then fop_asdl's teardown while the maker lives on: the gloo threads left."""
    init_gloo(rank, world_size, store)
    model, maker, opt = build("fop", sub_batches="ranks")
    train(model, maker, opt, range(2), rank_batches(rank, world_size))
    before = gloo_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        destroy_process_group()
    deadline = time.monotonic() + 10.0  # a joined thread may leave /proc a moment after its join returned
    while gloo_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    torch.save({"before": before, "after": gloo_threads(), "warnings": [str(w.message) for w in caught]},
               f"{out}.{rank}")
