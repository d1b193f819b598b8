"""Probe: can a float8 self-attention beat cuDNN's bf16 kernel at Wan's shapes, accurately?

Issue 12's remaining targets (1.3B LoRA 2.0x, sampling 1.4x) need attention faster than cuDNN's
bf16 flash attention, which is 70% of those steps. Two candidates, timed against it on one GPU
(12 or 40 heads x 32,760 tokens x 128, the 1.3B and 14B self-attention at 832x480x81), and their
error measured against float32 attention on the first 1,024 queries:
- cuDNN's float8 forward (`sdpa_fp8`, through NVIDIA's cudnn-frontend package; per-tensor e4m3
  Q, K, V and O, softmax P in e4m3), over all keys at once and in key chunks merged through the
  log-sum-exp it returns;
- a Triton kernel with SageAttention's recipe: K smoothed, int8 Q·Kᵀ with per-block scales, P·V
  in e4m3 with per-channel V scales, each block's product added to a float32 accumulator.
Inputs: Gaussian Q and K at two spreads (`spread` 1: flat softmax over the 32,760 keys; 2:
peaky), K and V with a per-channel offset. Needs a Hopper GPU, Triton and, for the cuDNN rows,
`nvidia-cudnn-frontend` (carry its cp312 wheel; not a dependency of the project).

    python3 bench/fp8_attention_probe.py [--out probe.json]
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

E4M3, E4M3_MAX = torch.float8_e4m3fn, 448.0


def cudnn_bf16(q, k, v):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


# --- cuDNN float8 (cudnn-frontend) -------------------------------------------------------------
_GRAPHS: dict = {}


def _cudnn_graph(qshape, qstride, kshape, kstride):
    import cudnn

    key = (qshape, qstride, kshape, kstride)
    if key not in _GRAPHS:
        handle = cudnn.create_handle()
        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
        bhld = lambda s: [s[0], s[2], s[1], s[3]]  # [B, L, H, D] memory seen as [B, H, L, D]
        tq = g.tensor(name="q", dim=bhld(qshape), stride=bhld(qstride), data_type=e4m3)
        tk = g.tensor(name="k", dim=bhld(kshape), stride=bhld(kstride), data_type=e4m3)
        tv = g.tensor(name="v", dim=bhld(kshape), stride=bhld(kstride), data_type=e4m3)
        one = dict(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
        sc = {n: g.tensor(name=n, **one) for n in ("dq", "dk", "dv", "ds", "ss", "so")}
        o, stats, amax_s, amax_o = g.sdpa_fp8(
            q=tq, k=tk, v=tv, descale_q=sc["dq"], descale_k=sc["dk"], descale_v=sc["dv"], descale_s=sc["ds"],
            scale_s=sc["ss"], scale_o=sc["so"], generate_stats=True, attn_scale=1 / math.sqrt(qshape[-1]),
            use_causal_mask=False, name="probe")
        b, n, h, d = qshape
        o.set_output(True).set_dim(bhld(qshape)).set_stride(bhld((n * h * d, h * d, d, 1))).set_data_type(e4m3)
        stats.set_output(True).set_dim([b, h, n, 1]).set_stride([h * n, n, 1, 1]).set_data_type(fp32)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        ws = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)
        _GRAPHS[key] = (g, handle, tq, tk, tv, sc, o, stats, amax_s, amax_o, ws)
    return _GRAPHS[key]


def cudnn_fp8_inputs(q, k, v):
    """Per-tensor e4m3: each tensor's largest magnitude maps to 448; returns (q8, k8, v8, descales)."""
    ds = [(t.abs().amax().float() / E4M3_MAX).reshape(1, 1, 1, 1) for t in (q, k, v)]
    return [(t.float() / s.reshape(())).to(E4M3) for t, s in zip((q, k, v), ds)] + [ds]


def cudnn_fp8(q, k, v, chunk: int, inputs=None):
    """cuDNN's float8 forward over key chunks, merged by log-sum-exp; O's scale comes from V's
    (|O| <= max |V|). `inputs`: cudnn_fp8_inputs' result, to time the kernel alone."""
    import cudnn

    q8, k8, v8, (dq, dk, dv) = inputs or cudnn_fp8_inputs(q, k, v)
    p_scales = torch.tensor([1 / E4M3_MAX, E4M3_MAX], device=q.device).reshape(2, 1, 1, 1)
    outs, lses = [], []
    for s0 in range(0, k.shape[1], chunk):
        kc, vc = k8[:, s0:s0 + chunk], v8[:, s0:s0 + chunk]
        g, handle, tq, tk, tv, sc, to, ts, ta, tb, ws = _cudnn_graph(tuple(q8.shape), q8.stride(), tuple(kc.shape), kc.stride())
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
        out = torch.empty_like(q8)
        lse = torch.empty(q.shape[0], q.shape[2], q.shape[1], 1, device=q.device)
        amax = torch.empty(2, 1, 1, 1, device=q.device)
        g.execute({tq: q8, tk: kc, tv: vc, sc["dq"]: dq, sc["dk"]: dk, sc["dv"]: dv, sc["ds"]: p_scales[0:1],
                   sc["ss"]: p_scales[1:2], sc["so"]: 1 / dv, to: out, ts: lse, ta: amax[0:1], tb: amax[1:2]},
                  ws, handle=handle)
        outs.append(out)
        lses.append(lse)
    w = torch.softmax(torch.stack(lses), dim=0).squeeze(-1).transpose(2, 3)[..., None]  # [C, B, L, H, 1]
    return (sum(wc * oc.float() for wc, oc in zip(w, outs)) * dv.reshape(())).to(q.dtype)


# --- Triton: int8 Q·Kᵀ, float8 P·V (SageAttention's recipe) -------------------------------------
@triton.jit
def _sage_block(acc, l_i, m_i, q, q_scale, K, V, KS, start, offs_n, offs_d, L_k, skn, svd,
                BN: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:  # only the last, partial block of keys
        keep = (start + offs_n) < L_k
        k = tl.load(K + (start + offs_n)[None, :] * skn + offs_d[:, None], mask=keep[None, :], other=0)
        v = tl.load(V + (start + offs_n)[:, None] + offs_d[None, :] * svd, mask=keep[:, None], other=0.0)
    else:
        k = tl.load(K + (start + offs_n)[None, :] * skn + offs_d[:, None])
        v = tl.load(V + (start + offs_n)[:, None] + offs_d[None, :] * svd)
    s = tl.dot(q, k).to(tl.float32) * (q_scale * tl.load(KS + start // BN))
    if MASKED:
        s = tl.where(keep[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot((p * 448.0).to(tl.float8e4nv), v)  # fresh product, fp32 sum
    return acc, l_i, m_new


@triton.jit
def _sage_fwd(Q, K, V, QS, KS, VS, O, sqm, sqh, skn, skh, svh, svd, som, soh, H, L_q, L_k, n_qb, n_kb,
              D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    pid_m, h = tl.program_id(0), tl.program_id(1)
    offs_m, offs_n, offs_d = pid_m * BM + tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, D)
    rows = offs_m[:, None] < L_q
    q = tl.load(Q + h * sqh + offs_m[:, None] * sqm + offs_d[None, :], mask=rows, other=0)
    q_scale = tl.load(QS + h * n_qb + pid_m)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    full = (L_k // BN) * BN
    for start in range(0, full, BN):
        acc, l_i, m_i = _sage_block(acc, l_i, m_i, q, q_scale, K + h * skh, V + h * svh, KS + h * n_kb,
                                    start, offs_n, offs_d, L_k, skn, svd, BN, False)
    if full < L_k:
        acc, l_i, m_i = _sage_block(acc, l_i, m_i, q, q_scale, K + h * skh, V + h * svh, KS + h * n_kb,
                                    full, offs_n, offs_d, L_k, skn, svd, BN, True)
    out = acc * (tl.load(VS + h * D + offs_d)[None, :] / 448.0) / l_i[:, None]
    tl.store(O + h * soh + offs_m[:, None] * som + offs_d[None, :], out.to(O.dtype.element_ty), mask=rows)


def _int8_blocks(x, block):
    """[L, H, D] float -> int8 [L, H, D], scales [H, ceil(L / block)] (largest magnitude -> 127)."""
    n, h, d = x.shape
    nb = -(-n // block)
    xp = F.pad(x, (0, 0, 0, 0, 0, nb * block - n)).view(nb, block, h, d)
    scale = (xp.abs().amax(dim=(1, 3)) / 127).clamp_min(1e-20)  # [nb, H]
    x8 = (xp / scale[:, None, :, None]).round().clamp(-127, 127).to(torch.int8).view(nb * block, h, d)[:n]
    return x8, scale.t().contiguous()


def triton_sage(q, k, v, bm=128, bn=128, warps=8, stages=3):
    """Batch 1 only (the probe's shapes)."""
    q, k, v = q[0], k[0], v[0]
    d = q.shape[-1]
    q8, qs = _int8_blocks(q.float() * (1.4426950408889634 / math.sqrt(d)), bm)
    kf = k.float()
    k8, ks = _int8_blocks(kf - kf.mean(dim=0, keepdim=True), bn)
    vs = (v.float().abs().amax(dim=0) / E4M3_MAX).clamp_min(1e-20)  # [H, D]
    v8 = (v.float() / vs).to(E4M3).permute(1, 2, 0).contiguous()  # [H, D, L]: tokens contiguous
    out = torch.empty_like(q)
    n, h = q.shape[0], q.shape[1]
    _sage_fwd[(triton.cdiv(n, bm), h)](q8, k8, v8, qs, ks, vs, out, q8.stride(0), q8.stride(1), k8.stride(0),
                                       k8.stride(1), v8.stride(0), v8.stride(1), out.stride(0), out.stride(1),
                                       h, n, k.shape[0], qs.shape[1], ks.shape[1], D=d, BM=bm, BN=bn,
                                       num_warps=warps, num_stages=stages)
    return out[None]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the results here as JSON")
    a = ap.parse_args(argv)
    try:
        import cudnn
        frontend = cudnn.__version__ if hasattr(cudnn, "__version__") else "?"
    except ImportError:
        cudnn, frontend = None, None
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "cudnn": torch.backends.cudnn.version(), "cudnn_frontend": frontend, "rows": []}
    tokens, n_err = 32760, 1024
    for heads, spread in ((12, 1.0), (12, 2.0), (40, 1.0)):
        g = torch.Generator(device="cuda").manual_seed(heads)
        shape = (1, tokens, heads, 128)
        q = (torch.randn(shape, device="cuda", generator=g) * spread).bfloat16()
        k = (torch.randn(shape, device="cuda", generator=g) * spread + torch.randn(heads, 128, device="cuda", generator=g)).bfloat16()
        v = (torch.randn(shape, device="cuda", generator=g) + 0.5 * torch.randn(heads, 128, device="cuda", generator=g)).bfloat16()
        exact = F.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q[:, :n_err], k, v))).transpose(1, 2)
        flops = 4 * tokens ** 2 * 128 * heads
        cands = {"cudnn bf16": lambda: cudnn_bf16(q, k, v), "triton int8 QK + fp8 PV": lambda: triton_sage(q, k, v)}
        if cudnn is not None:
            pre = cudnn_fp8_inputs(q, k, v)
            cands["cudnn fp8, kernel alone (inputs quantised before)"] = lambda: cudnn_fp8(q, k, v, tokens, pre)
            for chunk in (tokens, 8192, 4096, 2048):
                cands[f"cudnn fp8, {chunk}-key chunks"] = lambda c=chunk: cudnn_fp8(q, k, v, c)
        base = None
        for name, fn in cands.items():
            err = ((fn()[:, :n_err].float() - exact).norm() / exact.norm()).item()
            s = triton.testing.do_bench(fn, warmup=5, rep=300) / 1e3
            base = base or s
            row = {"heads": heads, "spread": spread, "kernel": name, "ms": round(s * 1e3, 3),
                   "tflops": round(flops / s / 1e12), "vs_cudnn_bf16": round(base / s, 3), "rel_error": round(err, 4)}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
