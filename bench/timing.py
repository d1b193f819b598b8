"""Timing and memory helpers: device events around each step, no host sync inside the timed run."""
from __future__ import annotations

import gc
import statistics
import time

import torch

from wan_model.device_memory import free_memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Start/stop marks: CUDA events on a GPU, perf_counter (after a sync) on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks (syncs once, at the end)."""
        sync(self.device)
        if self.device.type == "cuda":
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def time_steps(step, device: torch.device, warmup: int, max_steps: int, max_seconds: float,
               min_steps: int = 2) -> dict:
    """Warm up, probe one step with a sync, then time n back-to-back steps (n fitted to
    `max_seconds`); returns the per-step times, their median and the losses."""
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    step()
    sync(device)
    probe = time.perf_counter() - t0
    n = max(min_steps, min(max_steps, int(max_seconds / max(probe, 1e-6))))
    timer = Timer(device)
    losses = []
    timer.mark()
    for _ in range(n):
        losses.append(step())
        timer.mark()
    times = timer.intervals()
    return {"step_s": statistics.median(times), "times_s": times, "steps": n, "warmup_steps": warmup,
            "warmup_s": warm_s, "probe_s": probe,
            "losses": [float(l) for l in losses if isinstance(l, torch.Tensor) and l.numel() == 1]}


def time_call(fn, device: torch.device) -> float:
    """Seconds for one call, measured with device events (sync at the end only)."""
    timer = Timer(device)
    timer.mark()
    fn()
    timer.mark()
    return timer.intervals()[0]


def median_ms(fn, reps: int = 20, warm: int = 5, device: torch.device = torch.device("cuda")) -> float:
    """Milliseconds for one call of `fn` (a kernel probe's unit): after `warm` calls, the median of
    `reps` calls timed one at a time with device events."""
    for _ in range(warm):
        fn()
    return 1000.0 * statistics.median(time_call(fn, device) for _ in range(reps))


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> dict:
    """Achieved rate of an n^3 matrix product (random normal operands, two sets alternated)."""
    g = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(n, n, generator=g, device=device).to(dtype),
             torch.randn(n, n, generator=g, device=device).to(dtype)) for _ in range(2)]
    for a, b in sets * 2:
        a @ b
    sync(device)
    timer = Timer(device)
    timer.mark()
    for i in range(repeats):
        a, b = sets[i % 2]
        a @ b
        timer.mark()
    t = statistics.median(timer.intervals())
    return {"n": n, "dtype": str(dtype).replace("torch.", ""), "seconds": t, "tflops": 2 * n**3 / t / 1e12}


def reset_memory(device: torch.device) -> None:
    """Between cases: every cached byte back, the pinned host memory of a swapped case too (the
    next case's planner reads the host's free RAM)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free_memory()  # collects garbage first
        torch.cuda.reset_peak_memory_stats(device)
    else:
        gc.collect()


def peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


# The allocator's peak reserved was seen up to 6 MiB over its fraction limit (2026-11-30, H200,
# plans that fill the cap), so a case capped at N GiB runs under N GiB less this much.
CAP_HEADROOM = 64 * 2**20


def set_memory_cap(device: torch.device, gib: float | None) -> float | None:
    """Cap this process's CUDA allocator at `gib` less CAP_HEADROOM (None: lift the cap).
    Returns the fraction."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    frac = 1.0 if gib is None else min(1.0, (gib * 2**30 - CAP_HEADROOM) / total)
    torch.cuda.set_per_process_memory_fraction(frac, device)
    return frac
