"""Leaving ``torch.distributed``'s process group so that none of the backend's threads outlives it.

``torch.distributed.destroy_process_group()`` drops torch's own references to the group; the backend (gloo's
worker and transport threads) goes with the last reference. A module imported after ``init_process_group``
may keep one: ``torch.distributed.nn.functional`` binds ``group.WORLD`` into its default arguments when it
is imported, and the first ``torch.optim`` optimizer of a process imports it (through ``torch._dynamo``).
The group then lives on into the interpreter's shutdown. A gloo worker that drops a finished collective's
tensors there needs the GIL, and CPython ends a thread that asks for the GIL during shutdown with
``pthread_exit``, whose unwinding through gloo's noexcept ``~AsyncWork`` aborts the process: ``terminate
called without an active exception`` (SIGABRT), now and then, after every step was done.

Importing ``fop_asdl`` imports ``torch.distributed.nn`` first (``compat``, fix 14), so those defaults
bind ``None`` (no group yet); :func:`destroy_process_group` then frees the backend, and joins its threads,
while Python still runs, and warns where something else still holds the group.
"""
from __future__ import annotations

import gc
import warnings
import weakref

import torch
import torch.distributed as dist

__all__ = ["destroy_process_group"]


def destroy_process_group(barrier: bool = True) -> None:
    """Wait for every rank (``barrier``: no rank closes its connections while a peer still talks to it;
    pass False after an error, where a peer may never come), then destroy the group and check it is gone."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = weakref.ref(dist.group.WORLD)
    try:
        if barrier:
            nccl = dist.get_backend() == "nccl"
            dist.barrier(**({"device_ids": [torch.cuda.current_device()]} if nccl else {}))
    finally:
        dist.destroy_process_group()
    if world() is not None:
        gc.collect()  # a reference cycle may hold it
    if world() is not None:
        warnings.warn("fop_asdl: the process group is still referenced after destroy_process_group(), so "
                      "its backend's threads live on into the interpreter's exit, where gloo may abort the "
                      "process ('terminate called without an active exception'). Import fop_asdl before "
                      "init_process_group and drop your references to the group (a DDP module, "
                      "ZeroRedundancyOptimizer, ShardedGradScaler) before destroying it.", RuntimeWarning,
                      stacklevel=2)
