"""Measuring and handing back memory: `peak_of(fn)` for the memory planner and the GPU tests,
`free_memory()` between stages.

On CUDA the allocator's own counters are read. The CPU has no such counters, so there the
tensors `fn` creates through torch ops are counted as they appear and as they are freed (a
dispatch mode over this thread's ops): enough to see whether a stage's working set grows with
its input, and to check a prediction on tiny models without a GPU.
"""
from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 2**30


@dataclass
class Peak:
    result: Any  # what fn returned
    start: int  # bytes allocated on the device when fn started (0 on the CPU: only new tensors count)
    peak: int  # the most bytes allocated at any moment during fn
    peak_reserved: int | None = None  # CUDA: the most bytes the caching allocator held

    @property
    def added(self) -> int:
        """What fn itself needed on top of what was there before."""
        return self.peak - self.start

    def __str__(self) -> str:
        text = f"peak {self.peak / GIB:.2f} GiB (+{self.added / GIB:.2f} GiB)"
        if self.peak_reserved is not None:
            text += f", reserved {self.peak_reserved / GIB:.2f} GiB"
        return text


def peak_of(fn: Callable[[], Any], device: str | torch.device | None = None) -> Peak:
    """Run fn() and report the most memory allocated on `device` meanwhile (default: the current
    CUDA device if there is one, else the CPU). On CUDA this resets the device's peak counters."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        return Peak(result, start, torch.cuda.max_memory_allocated(device),
                    torch.cuda.max_memory_reserved(device))
    if device.type != "cpu":
        raise ValueError(f"peak_of: no memory counters for device {device}; use cuda or cpu")
    with _HostCount() as count:
        result = fn()
    return Peak(result, 0, count.peak)


class _HostCount(TorchDispatchMode):
    """Bytes of live CPU storages created by ops under this mode (views and in-place results
    share their input's storage and count once; storages that existed before are not counted)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in inputs and key not in self.live:
                    self.live[key] = storage.nbytes()
                    self.now += self.live[key]
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(storage, self._freed, key)
        return out

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def free_memory() -> None:
    """Collect garbage and hand the allocators' cached memory back: the device's, and the pinned
    host memory a streamed model leaves cached (gigabytes the rest of the run would not get)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        empty_host = (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
                      or getattr(torch._C, "_host_emptyCache", None))  # older torch
        if empty_host is not None:
            empty_host()
