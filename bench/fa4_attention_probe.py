"""Probe: is FlashAttention 4's Hopper kernel faster than cuDNN's at Wan's shapes, and as exact?

Attention is ~70% of a Wan step and the cuDNN bf16 kernel was the fastest we had. FlashAttention 4
(`flash-attn-4`, written in CuTe DSL) installs from wheels (pure Python plus NVIDIA's
`nvidia-cutlass-dsl` runtime) and has Hopper forward and backward kernels. Timed here against
cuDNN through torch SDPA, same inputs, one GPU:
- forward, and forward + backward, for the 1.3B self-attention (12 heads x 32,760 tokens x 128,
  832x480x81), the sampler's batched conditional + unconditional pass (batch 2) and the 14B's
  40 heads;
- error of the output against float32 attention on the first 1,024 queries (all 32,760 keys);
- error of the three input gradients against float32 attention at 4,096 tokens.

    PYTHONPATH=. python3 bench/fa4_attention_probe.py [--out probe.json]
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wantune.bench.timing import median_ms

TOKENS, HEAD_DIM = 32760, 128
SHAPES = [("1.3B self-attention", 1, 12, True), ("1.3B sampling, cond+uncond", 2, 12, False),
          ("14B self-attention", 1, 40, True)]


def cudnn(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def fa4(q, k, v):
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out


def exact(q, k, v):
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


def timed(fn) -> float:
    return median_ms(fn, reps=10, warm=3)


def inputs(b, h, n, grad=False, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    q, k, v = (torch.randn(b, n, h, HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16) for _ in range(3))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def forward_rows(results):
    for name, b, h, train in SHAPES:
        q, k, v = inputs(b, h, TOKENS)
        flops = 4 * b * h * TOKENS * TOKENS * HEAD_DIM
        row = {"case": name, "batch": b, "heads": h, "tokens": TOKENS}
        with torch.no_grad():
            for kname, fn in (("cudnn", cudnn), ("fa4", fa4)):
                ms = timed(lambda: fn(q, k, v))
                row[f"{kname}_fwd_ms"] = round(ms, 3)
                row[f"{kname}_fwd_tflops"] = round(flops / ms / 1e9, 1)
            ref = exact(q[:, :1024], k, v)
            for kname, fn in (("cudnn", cudnn), ("fa4", fa4)):
                row[f"{kname}_out_err"] = round(rel(fn(q, k, v)[:, :1024], ref), 5)
        if train:
            q, k, v = inputs(b, h, TOKENS, grad=True)
            dout = torch.randn_like(q)
            for kname, fn in (("cudnn", cudnn), ("fa4", fa4)):
                def step():
                    out = fn(q, k, v)
                    torch.autograd.grad(out, (q, k, v), dout)
                ms = timed(step)
                row[f"{kname}_fwd_bwd_ms"] = round(ms, 3)
                row[f"{kname}_fwd_bwd_tflops"] = round(3.5 * flops / ms / 1e9, 1)
            del q, k, v, dout
        print(json.dumps(row), flush=True)
        results.append(row)
        torch.cuda.empty_cache()


def gradient_rows(results, n=4096, h=12):
    q, k, v = inputs(1, h, n, grad=True, seed=1)
    dout = torch.randn_like(q)
    ref = torch.autograd.grad(exact(q, k, v), (q, k, v), dout.float())
    row = {"case": f"gradients, {h} heads x {n} tokens, against float32"}
    for kname, fn in (("cudnn", cudnn), ("fa4", fa4)):
        got = torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        for gname, a, b in zip(("dq", "dk", "dv"), got, ref):
            row[f"{kname}_{gname}_err"] = round(rel(a, b), 5)
        again = torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
        row[f"{kname}_deterministic"] = all(torch.equal(a, b) for a, b in zip(got, again))
    print(json.dumps(row), flush=True)
    results.append(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import importlib.metadata as md

    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "flash_attn_4": md.version("flash-attn-4"),
           "nvidia_cutlass_dsl": md.version("nvidia-cutlass-dsl")}
    print(json.dumps(env), flush=True)
    results: list = []
    gradient_rows(results)
    forward_rows(results)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"environment": env, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
