"""Host syncs counted on any machine: what would stall a GPU's pipeline, seen on a CPU too.

A device-to-host synchronisation (``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``nonzero()``, a
boolean mask, a copy to the CPU, a linear-algebra error check) costs nothing measurable on a CPU and a
pipeline stall on a GPU, so a step that does one per block is fast in CPU tests and slow where users train.
:class:`HostSyncCounter` counts them from the operators a block of code dispatches, whatever the device:
on a CPU-only machine every tensor is on the CPU, and what is counted is what *would* be a sync on a GPU.
``torch.cuda.set_sync_debug_mode`` is the second witness where CUDA exists (the ``cuda`` tests).

What counts (one per call): scalar reads (``aten._local_scalar_dense``, ``is_nonzero``, ``item``,
``equal``, ``allclose``), outputs whose shape depends on the data (``nonzero``, ``masked_select``, the
``unique`` family, ``repeat_interleave`` without ``output_size``, indexing with a boolean mask),
linear-algebra error checks (``_linalg_check_errors``: ``linalg.cholesky``, ``inv``, ``solve``; and the
kernels that check inside, ``_linalg_eigh``, ``_linalg_svd``, ``linalg_eig``), blocking copies between
the host and a device (either way: a host-to-device copy synchronises the stream), and ``Tensor.tolist()``
/ ``Tensor.numpy()`` (which read memory without dispatching an operator on the CPU). What it cannot see on
a CPU-only machine: a tensor made from Python data with ``device=`` a GPU (``torch.tensor``,
``as_tensor``), which is a host-to-device copy there; the CUDA witness sees it. Meant for tests and
benchmarks; it slows every operator down.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import traceback
import warnings
from typing import Any, Callable, Dict, Iterator, List, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "SyncEvent", "count_syncs", "cuda_sync_debug"]

_aten = torch.ops.aten
_SCALAR_READS = ("_local_scalar_dense", "is_nonzero", "item", "equal", "allclose")
_DATA_DEPENDENT = ("nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
                   "unique_dim_consecutive", "bincount", "histc")
_ERROR_CHECKS = ("_linalg_check_errors", "_linalg_eigh", "_linalg_svd", "linalg_eig", "linalg_lstsq")
_INDEXING = ("index", "index_put", "index_put_", "_index_put_impl_")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_ROOT = os.path.dirname(os.path.abspath(torch.__file__))
_THIS_FILE = os.path.abspath(__file__)


@dataclasses.dataclass
class SyncEvent:
    """One counted sync: the operator (or Tensor method) and where in Python it was called from."""

    op: str
    stack: List[str]

    @property
    def where(self) -> str:
        """The innermost frame outside torch: the line that asked for the sync."""
        return self.stack[-1] if self.stack else "?"


def _crosses(source: Any, target: torch.device, non_blocking: bool) -> bool:
    """A blocking copy between the host and a device: device to host waits for the data, and host to device
    (``torch.tensor(x, device=...)`` too) synchronises the stream unless ``non_blocking`` from pinned memory."""
    return isinstance(source, Tensor) and (source.device.type == "cpu") != (target.type == "cpu") \
        and not non_blocking


def _bool_index(args: Tuple[Any, ...]) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """Within the block, ``events`` lists every host sync (see the module docstring) and ``count`` their
    number. ``stacks=True`` keeps each event's Python stack (frames outside torch), to find where it is."""

    def __init__(self, stacks: bool = True) -> None:
        super().__init__()
        self.stacks = stacks
        self.events: List[SyncEvent] = []
        self._quiet = 0  # > 0 inside a counted Tensor method, whose own operators are not counted again
        self._saved: Dict[str, Callable] = {}

    @property
    def count(self) -> int:
        return len(self.events)

    def by_op(self) -> Dict[str, int]:
        return dict(collections.Counter(e.op for e in self.events))

    def by_place(self) -> Dict[str, int]:
        """Counts by the calling line: the list of places to fix."""
        return dict(collections.Counter(f"{e.op} at {e.where}" for e in self.events))

    def report(self) -> str:
        lines = [f"{self.count} host syncs"]
        lines += [f"  {n} x {place}" for place, n in sorted(self.by_place().items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)

    def _record(self, op: str) -> None:
        if self._quiet:
            return
        stack: List[str] = []
        if self.stacks:
            for frame in traceback.extract_stack()[:-2]:
                path = os.path.abspath(frame.filename)
                if not path.startswith(_TORCH_ROOT) and path != _THIS_FILE:
                    if path.startswith(_PACKAGE_ROOT):
                        path = os.path.relpath(path, os.path.dirname(_PACKAGE_ROOT))
                    elif "site-packages" + os.sep in path:
                        path = path.split("site-packages" + os.sep, 1)[1]
                    stack.append(f"{path}:{frame.lineno} {frame.name}")
        self.events.append(SyncEvent(op, stack))

    # --- operators ------------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self._syncs(name, func, args, kwargs):
            self._record(name)
        return func(*args, **kwargs)

    @staticmethod
    def _syncs(name: str, func, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> bool:
        if name in _SCALAR_READS or name in _DATA_DEPENDENT or name in _ERROR_CHECKS:
            return True
        if name in _INDEXING:
            return _bool_index(args)
        if name == "repeat_interleave":  # tensor repeats: the output's length is their sum
            return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
        if name == "_to_copy":  # .to(), .cpu(), .cuda()
            target = kwargs.get("device")
            return target is not None and _crosses(args[0], torch.device(target), kwargs.get("non_blocking", False))
        if name == "copy_":
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
            return _crosses(args[1], args[0].device, non_blocking)
        return False

    # --- Tensor methods that read memory without an operator on the CPU ---------------------------------
    def __enter__(self):
        for method in ("tolist", "numpy"):
            self._saved[method] = vars(torch.Tensor).get(method)  # None: inherited from the C base class
            setattr(torch.Tensor, method, self._counted(method, getattr(torch.Tensor, method)))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._saved.items():
                if original is None:
                    delattr(torch.Tensor, method)
                else:
                    setattr(torch.Tensor, method, original)
            self._saved.clear()

    def _counted(self, method: str, original: Callable) -> Callable:
        counter = self

        def read(tensor, *args, **kwargs):
            counter._record(method)
            counter._quiet += 1
            try:
                return original(tensor, *args, **kwargs)
            finally:
                counter._quiet -= 1

        return read


def count_syncs(fn: Callable[[], Any], stacks: bool = True) -> Tuple[Any, HostSyncCounter]:
    """(``fn()``, the counter of the host syncs it performed)."""
    with HostSyncCounter(stacks=stacks) as counter:
        out = fn()
    return out, counter



@contextlib.contextmanager
def cuda_sync_debug() -> Iterator[List[str]]:
    """The second witness where CUDA exists: ``torch.cuda.set_sync_debug_mode("warn")`` during the block,
    and the list of the syncs it warned about (filled on exit; empty without CUDA)."""
    found: List[str] = []
    if not torch.cuda.is_available():
        yield found
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            # torch warns once per process that the mode is a prototype: a notice, not a sync
            found.extend(str(w.message) for w in caught
                         if "synchroniz" in str(w.message) and "prototype feature" not in str(w.message))
