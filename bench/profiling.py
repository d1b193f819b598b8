"""One call under torch.profiler: the kernel table beside the results, and where the GPU time
went by kind of kernel (attention, GEMM, fused elementwise, copies, other)."""
from __future__ import annotations

import torch

from wantune.bench.timing import sync

# first match wins: attention kernels often carry "gemm" in their names too; Inductor names its
# pointwise and reduction kernels after every op they fuse, so the norm+RoPE kernel that feeds an
# SDPA reads "triton_red_fused__scaled_dot_product_cudnn_attention_..." and is no attention kernel
KINDS = (
    ("fused elementwise (triton)", ("triton_poi_", "triton_red_", "triton_per_")),
    ("attention", ("sdpa", "fmha", "flash", "attention", "attn")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "matmul", "scaled_mm", "_mm_", "wgmma")),
    ("fused elementwise (triton)", ("triton",)),
    ("copies", ("memcpy", "memset", "copy")),  # memory copies and eager dtype casts (copy_ kernels)
    ("optimizer", ("adam", "multi_tensor")),
)


def kind_of(kernel: str) -> str:
    low = kernel.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def breakdown(kernels: list[tuple[str, float]]) -> dict:
    """[(kernel name, device microseconds)] -> {kind: milliseconds}, largest first, with "total"."""
    out: dict[str, float] = {}
    for name, us in kernels:
        kind = kind_of(name)
        out[kind] = out.get(kind, 0.0) + us / 1e3
    out = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    out["total"] = sum(out.values())
    return out


def device_kernels(prof) -> list[tuple[str, float]]:
    """(name, device microseconds) of every kernel and copy the profiler saw on the device."""
    rows = []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            rows.append((e.name, float(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0))))
    return rows


def profile_call(fn, device, name: str, results_dir=None, log=print, grad: bool = False) -> dict | None:
    """Run fn once under torch.profiler (CUDA only); append the op table, headed `name`, to
    profiles.txt beside the results (one file for the run) and return the kernel time by kind (ms)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with torch.set_grad_enabled(grad), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    kinds = breakdown(device_kernels(prof))
    text = table + "\nGPU time by kind of kernel (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in kinds.items())
    if results_dir is not None:
        with open(results_dir / "profiles.txt", "a") as f:
            f.write(f"== {name}\n{text}\n\n")
    log(text)
    return kinds
