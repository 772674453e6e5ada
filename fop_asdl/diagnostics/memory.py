"""Live tensor bytes, counted tensor by tensor: a memory figure that no allocator policy can blur.

The process's peak RSS is what a user meets, but it also holds freed blocks that the allocator kept.
:class:`LiveTensorBytes` counts instead the storages that the operators run inside it create and that
are still referenced, by any tensor, at each moment: on CPU the analogue of
``torch.cuda.max_memory_allocated``. It sees every operator of the forward and backward passes (autograd
runs them on the calling thread on CPU), slows them down, and is meant for benchmarks and tests.
"""
from __future__ import annotations

import weakref
from typing import Dict

from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """Within the block, ``live`` is the bytes of the storages created inside it that some tensor still
    references, and ``peak`` the largest value ``live`` took. Storages that existed before are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tensors: Dict[int, int] = {}  # storage address -> tensors referencing it
        self._bytes: Dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor) and tensor.device.type != "meta":
                self._track(tensor)
        return out

    def _track(self, tensor: Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key == 0:  # an empty tensor holds no memory
            return
        if key not in self._tensors:
            self._tensors[key], self._bytes[key] = 0, storage.nbytes()
            self.live += self._bytes[key]
            self.peak = max(self.peak, self.live)
        self._tensors[key] += 1
        # A tensor's Python object lives exactly as long as its C++ tensor once Python has seen it.
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        self._tensors[key] -= 1
        if self._tensors[key] == 0:
            del self._tensors[key]
            self.live -= self._bytes.pop(key)
