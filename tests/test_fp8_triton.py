"""The FFN's GELU + per-token float8 quantisation as one Triton pass (`wan_model.fp8_triton`),
and when `wan_model.fp8.feed_forward` uses it.

On the CPU the kernel runs under Triton's interpreter (a subprocess: TRITON_INTERPRET is read at
import). The interpreter rounds float32 to bf16 by truncation (the GPU to nearest even) and its
float8 cast is wrong near powers of two (127.9 -> 64), so there the kernel writes its values
before the e4m3 cast, torch casts them, and the check is closeness to `quantize_tokens(gelu(u))`
(fp16 exact scales and nearly every byte; bf16 within one step); on the GPU, byte for byte.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wan_model import fp8_triton
from wan_model.fp8 import FP8Linear, feed_forward, quantize_linears_, quantize_tokens

REPO = Path(__file__).resolve().parents[1]

INTERPRETED = r"""
import json, torch, torch.nn.functional as F
from wan_model import fp8_triton
from wan_model.fp8 import quantize_tokens
g = torch.Generator().manual_seed(0)
out = []
for dtype in (torch.float16, torch.bfloat16):
    for rows, cols in ((5, 8960), (4, 100)):
        u = (torch.randn(rows, cols, generator=g) * 3).to(dtype)
        u[1] = 0  # a zero row: the amax floor (its factor 448 / 1e-12 capped at fp16's range)
        u[2, :6] = torch.tensor([9.0, -9.0, 1e-3, -1e-3, 0.5, -5.0])  # the GELU's far ends
        y = torch.empty(rows, cols)  # float32: the values before the kernel's e4m3 cast
        s = torch.empty(rows, 1)
        fp8_triton.launch(u, y, s)
        q = y.to(torch.float8_e4m3fn)
        rq, rs = quantize_tokens(F.gelu(u.float(), approximate="tanh").to(dtype))  # as on a GPU
        deq, ref = q.float() * s, rq.float() * rs
        out.append({"dtype": str(dtype), "cols": cols,
                    "scale_rel": ((s - rs).abs() / rs).max().item(),
                    "over_step": ((deq - ref).abs() - (ref.abs() / 8 + rs * 2 ** -9)).max().item(),
                    "same_bytes": (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item()})
print(json.dumps(out))
"""


def test_kernel_is_quantize_tokens_of_gelu_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 4
    for r in rows:
        bf16 = "bfloat16" in r["dtype"]
        # the row scales: exact in fp16; bf16 truncated by the interpreter (one bf16 step)
        assert r["scale_rel"] <= (2 ** -7 if bf16 else 1e-6), r
        assert r["over_step"] <= 0, r  # every value within one e4m3 step of the reference
        if not bf16:
            assert r["same_bytes"] > 0.95, r


def _ffn(width=64, hidden=128, approximate="tanh"):
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate=approximate),
                        nn.Linear(hidden, width)).requires_grad_(False)
    quantize_linears_(ffn, include=lambda name: True, fp8_matmul=True)
    return ffn


@pytest.fixture
def stand_in(monkeypatch):
    """The kernel replaced by the reference arithmetic (counted), as if on a GPU with Triton."""
    seen = []

    def reference(u):
        seen.append(tuple(u.shape))
        return quantize_tokens(F.gelu(u, approximate="tanh"))

    monkeypatch.setattr(fp8_triton, "available", lambda x: True)
    monkeypatch.setattr(fp8_triton, "gelu_quantize_rows", reference)
    return seen


def test_feed_forward_fused_path_is_the_ffn(stand_in):
    ffn = _ffn()
    assert type(ffn[2]) is FP8Linear and ffn[2].fp8_matmul
    ffn[2].fused_gelu = True
    h = torch.randn(2, 5, 64).to(torch.bfloat16)
    with torch.no_grad():
        fused = feed_forward(ffn, h)
        plain = ffn(h)
    assert stand_in == [(10, 128)]  # one call over every token's hidden row
    assert fused.shape == plain.shape and fused.dtype == plain.dtype
    assert torch.equal(fused, plain)  # the same quantisation, GEMM, scales and bias


@pytest.mark.parametrize("why", ["grad", "not asked", "erf GELU", "bf16 Linear"])
def test_feed_forward_keeps_the_plain_path(stand_in, why):
    ffn = _ffn(approximate="none" if why == "erf GELU" else "tanh")
    ffn[2].fused_gelu = why != "not asked"
    if why == "bf16 Linear":
        ffn[2] = nn.Linear(128, 64).to(torch.bfloat16).requires_grad_(False)
    h = torch.randn(3, 64).to(torch.bfloat16)
    with torch.set_grad_enabled(why == "grad"):
        out = feed_forward(ffn, h.requires_grad_(why == "grad"))
        assert torch.equal(out, ffn(h))
    assert stand_in == []


def test_place_dit_asks_for_it_on_the_ffn_only():
    from wan_model.configs import FLAVOURS
    from wan_model.sampler import place_dit
    from wan_model.transformer import WanModel

    model = place_dit(WanModel(FLAVOURS["tiny-t2v"].dit).to(torch.bfloat16), "cpu", fp8_matmul=True,
                      fused_gelu=True)
    asked = sorted(n for n, m in model.named_modules() if getattr(m, "fused_gelu", False))
    assert asked and all(n.endswith(".ffn.2") for n in asked)
    assert len(asked) == len(model.blocks)


def test_the_model_runs_its_ffns_through_it(stand_in):
    """A placed model with `fused_gelu` sends each block's FFN through the kernel at inference,
    with the plain path's output."""
    from wan_model.configs import FLAVOURS
    from wan_model.sampler import place_dit
    from wan_model.transformer import WanModel

    cfg = FLAVOURS["tiny-t2v"].dit
    torch.manual_seed(0)
    model = place_dit(WanModel(cfg).to(torch.bfloat16), "cpu", fp8_matmul=True, fused_gelu=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    ctx = [torch.randn(7, cfg.text_dim, generator=g).to(torch.bfloat16)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(x, torch.tensor([700.0]), ctx)
        assert len(stand_in) == cfg.num_layers
        for b in model.blocks:
            b.ffn[2].fused_gelu = False
        plain = model(x, torch.tensor([700.0]), ctx)
    assert len(stand_in) == cfg.num_layers
    assert torch.equal(fused, plain)


@pytest.mark.gpu
def test_kernel_is_quantize_tokens_of_gelu_on_the_gpu():
    if not torch.cuda.is_available() or not fp8_triton.available(torch.empty(1, device="cuda")):
        pytest.skip("needs a GPU with Triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    u = (torch.randn(4096, 8960, generator=g, device="cuda") * 3).to(torch.bfloat16)
    q, s = fp8_triton.gelu_quantize_rows(u)
    rq, rs = quantize_tokens(F.gelu(u, approximate="tanh"))
    same = (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item()
    rows_same = (s == rs).float().mean().item()
    print(f"\nfused GELU + quantisation vs Inductor-free torch: bytes {same:.6f} equal, scales {rows_same:.6f}")
    assert same > 0.999 and rows_same > 0.99
    ffn = _ffn(1536, 8960).cuda()
    ffn[2].fused_gelu = True
    h = torch.randn(2, 4096, 1536, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = fp8_triton.calls["gelu_quantize_rows"]
        compiled = torch.compile(feed_forward)(ffn, h)
        assert fp8_triton.calls["gelu_quantize_rows"] > before  # traced into the compiled graph
        ffn[2].fused_gelu = False
        plain = ffn(h)
    err = ((compiled.float() - plain.float()).norm() / plain.float().norm()).item()
    print(f"compiled fused FFN vs plain: relative error {err:.2e}")
    assert err < 1e-2
