"""Probe: the Triton row quantisation (`wan_model.fp8_triton`) alone, against Inductor's.

Every float8 GEMM quantises its input per token (`wan_model.fp8.quantize_tokens`). Compiled,
Inductor fuses that into the kernel that produces the input; the one-pass Triton kernel reads
the row once. Timed here at the shapes of a 1.3B step, one GPU, same inputs:
- the FFN's GELU + quantisation, 65,520 x 8,960 (sampling, cond + uncond) and 32,760 x 8,960;
- the plain quantisation at 32,760 x 8,960 and x 1,536, and with the weight's row scales (the
  input gradient's form);
each as `torch.compile` of the torch ops and as the kernel, with the bytes each must move (one
read of the input, one float8 write) and the rate that gives, and the share of float8 bytes and
scales equal to eager torch's.

    PYTHONPATH=. python3 bench/fp8_kernel_probe.py [--out probe.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from wantune.bench.timing import median_ms
from wan_model import fp8_triton
from wan_model.fp8 import quantize_tokens

CASES = [  # name, rows, cols, form
    ("GELU + quantisation, sampling cond+uncond", 65520, 8960, "gelu"),
    ("GELU + quantisation, training", 32760, 8960, "gelu"),
    ("quantisation, FFN-out input", 32760, 8960, "plain"),
    ("quantisation, 1,536 wide", 32760, 1536, "plain"),
    ("quantisation with row scales, 1,536 wide", 32760, 1536, "col_scale"),
    ("quantisation with row scales, 8,960 wide", 32760, 8960, "col_scale"),
]


def torch_form(form):
    if form == "gelu":
        return lambda x, s: quantize_tokens(F.gelu(x, approximate="tanh"))
    if form == "col_scale":
        return lambda x, s: quantize_tokens(x * s[None, :])
    return lambda x, s: quantize_tokens(x)


def kernel_form(form):
    return lambda x, s: fp8_triton.quantize_tokens(x, s if form == "col_scale" else None, gelu=form == "gelu")


def row(name, rows, cols, form) -> dict:
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(rows, cols, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    s = (torch.rand(cols, device="cuda", generator=g) * 0.01 + 1e-3).to(torch.bfloat16)
    moved = rows * cols * 3 + rows * 4 + (cols * 2 if form == "col_scale" else 0)  # read bf16, write e4m3 + scales
    out = {"case": name, "rows": rows, "cols": cols, "form": form, "bytes_gb": round(moved / 1e9, 3)}
    eager = torch_form(form)(x, s)
    compiled = torch.compile(torch_form(form), dynamic=False)
    for label, fn in (("inductor", compiled), ("kernel", kernel_form(form))):
        ms = median_ms(lambda: fn(x, s))
        out[f"{label}_ms"] = round(ms, 4)
        out[f"{label}_gb_s"] = round(moved / ms / 1e6, 0)
        q, sc = fn(x, s)
        out[f"{label}_bytes_equal"] = round((q.view(torch.uint8) == eager[0].view(torch.uint8)).float().mean().item(), 6)
        out[f"{label}_scales_equal"] = round((sc == eager[1]).float().mean().item(), 6)
    out["kernel_speedup"] = round(out["inductor_ms"] / out["kernel_ms"], 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not fp8_triton.available(torch.zeros(1, device="cuda")):
        raise SystemExit("fp8_kernel_probe: needs a CUDA GPU with Triton")
    src, dst = (torch.ones(1 << 30, dtype=torch.uint8, device="cuda") for _ in range(2))
    copy_ms = median_ms(lambda: dst.copy_(src))  # what this GPU's memory moves: read + write
    del src, dst
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_gb_s": round(2 * (1 << 30) / copy_ms / 1e6, 0), "rows": []}
    print(f"{result['device']}, torch {result['torch']}: a 1 GiB device copy moves {result['copy_gb_s']:.0f} GB/s")
    for case in CASES:
        r = row(*case)
        result["rows"].append(r)
        print(f"{r['case']:48s} {r['rows']:>6d} x {r['cols']:<5d} inductor {r['inductor_ms']:.3f} ms "
              f"({r['inductor_gb_s']:.0f} GB/s)  kernel {r['kernel_ms']:.3f} ms ({r['kernel_gb_s']:.0f} GB/s)  "
              f"{r['kernel_speedup']:.2f}x; equal to eager: bytes {r['inductor_bytes_equal']:.4%} / "
              f"{r['kernel_bytes_equal']:.4%}, scales {r['inductor_scales_equal']:.4%} / {r['kernel_scales_equal']:.4%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
