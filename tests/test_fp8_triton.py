"""The per-token float8 quantisation as one Triton pass per row (`wan_model.fp8_triton`), with
the FFN's GELU or the weight's row scales as its prologue, and when `wan_model.fp8` uses it.

On the CPU the kernel runs under Triton's interpreter (a subprocess: TRITON_INTERPRET is read at
import). The interpreter rounds float32 to bf16 by truncation (the GPU to nearest even) and its
float8 cast is wrong near powers of two (127.9 -> 64), so there the kernel writes its values
before the e4m3 cast, torch casts them, and the check is closeness to `quantize_tokens` (fp16
exact scales and nearly every byte; bf16 within one step); on the GPU, byte for byte.
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
        col = (torch.rand(cols, generator=g) * 1e-2).to(dtype)  # weight row scales: amax / 448
        for kind in ("plain", "gelu", "col_scale"):
            y = torch.empty(rows, cols)  # float32: the values before the kernel's e4m3 cast
            s = torch.empty(rows, 1)
            fp8_triton.launch(u, y, s, col if kind == "col_scale" else None, gelu=kind == "gelu")
            q = y.to(torch.float8_e4m3fn)
            x = {"plain": u, "col_scale": u * col[None, :],  # as on a GPU: GELU in float32
                 "gelu": F.gelu(u.float(), approximate="tanh").to(dtype)}[kind]
            rq, rs = quantize_tokens(x)
            deq, ref = q.float() * s, rq.float() * rs
            out.append({"dtype": str(dtype), "cols": cols, "kind": kind,
                        "scale_rel": ((s - rs).abs() / rs).max().item(),
                        "over_step": ((deq - ref).abs() - (ref.abs() / 8 + rs * 2 ** -9)).max().item(),
                        "same_bytes": (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item()})
print(json.dumps(out))
"""


def test_kernel_is_quantize_tokens_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", INTERPRETED], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(rows) == 12
    for r in rows:
        bf16 = "bfloat16" in r["dtype"]
        # the row scales: exact in fp16; bf16 truncated by the interpreter (one bf16 step)
        assert r["scale_rel"] <= (2 ** -7 if bf16 else 1e-6), r
        assert r["over_step"] <= 0, r  # every value within one e4m3 step of the reference
        if not bf16:
            assert r["same_bytes"] > (0.95 if r["kind"] == "gelu" else 0.999), r


def _ffn(width=64, hidden=128, approximate="tanh"):
    torch.manual_seed(0)
    ffn = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate=approximate),
                        nn.Linear(hidden, width)).requires_grad_(False)
    quantize_linears_(ffn, include=lambda name: True, fp8_matmul=True)
    return ffn


@pytest.fixture
def stand_in(monkeypatch):
    """The kernel replaced by the reference arithmetic (each call's shape and prologue recorded),
    as if on a GPU with Triton."""
    seen = []

    def reference(x, col_scale=None, gelu=False):
        seen.append((tuple(x.shape), "gelu" if gelu else "col_scale" if col_scale is not None else "plain"))
        if gelu:
            x = F.gelu(x, approximate="tanh")
        if col_scale is not None:
            assert col_scale.dtype == x.dtype and col_scale.shape == (x.shape[1],)
            x = x * col_scale[None, :]
        return quantize_tokens(x)

    monkeypatch.setattr(fp8_triton, "available", lambda x: True)
    monkeypatch.setattr(fp8_triton, "quantize_tokens", reference)
    return seen


def test_feed_forward_fused_path_is_the_ffn(stand_in):
    ffn = _ffn()
    assert type(ffn[2]) is FP8Linear and ffn[2].fp8_matmul
    ffn[2].fused_gelu = True
    h = torch.randn(2, 5, 64).to(torch.bfloat16)
    with torch.no_grad():
        fused = feed_forward(ffn, h)
        plain = ffn(h)
    assert stand_in == [((10, 128), "gelu")]  # one call over every token's hidden row
    assert fused.shape == plain.shape and fused.dtype == plain.dtype
    assert torch.equal(fused, plain)  # the same quantisation, GEMM, scales and bias


def test_float8_linear_quantises_through_it_in_forward_and_backward(stand_in):
    """`quant_kernel`: the input (plain) and the output gradient (times the weight's row scales)
    go through the kernel, with the torch path's output and input gradient bit for bit."""
    torch.manual_seed(0)
    lin = FP8Linear.from_linear(nn.Linear(64, 32).requires_grad_(False), fp8_matmul=True)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    gy = torch.randn(2, 5, 32).to(torch.bfloat16)
    outs = {}
    for kernel in (False, True):
        lin.quant_kernel = kernel
        xi = x.clone().requires_grad_(True)
        y = lin(xi)
        y.backward(gy)
        outs[kernel] = (y.detach(), xi.grad)
    assert stand_in == [((10, 64), "plain"), ((10, 32), "col_scale")]
    assert "Triton row quantisation" in repr(lin)
    assert torch.equal(outs[True][0], outs[False][0]) and torch.equal(outs[True][1], outs[False][1])


def test_quant_kernel_is_asked_for_float8_gemms_only(stand_in):
    from wan_model.configs import FLAVOURS
    from wan_model.sampler import place_dit
    from wan_model.transformer import WanModel

    ffn = nn.Sequential(nn.Linear(64, 128), nn.GELU(approximate="tanh"), nn.Linear(128, 24))
    quantize_linears_(ffn.requires_grad_(False), include=lambda name: True, fp8_matmul=True,
                      quant_kernel=True)
    assert ffn[0].quant_kernel and not ffn[2].quant_kernel  # 24 outputs: no float8 GEMM, upcast
    model = place_dit(WanModel(FLAVOURS["tiny-t2v"].dit).to(torch.bfloat16), "cpu", fp8_matmul=True,
                      quant_kernel=True)
    f8 = [m for m in model.modules() if type(m) is FP8Linear]
    assert f8 and all(m.quant_kernel == m.fp8_matmul for m in f8) and any(m.quant_kernel for m in f8)
    model = place_dit(WanModel(FLAVOURS["tiny-t2v"].dit).to(torch.bfloat16), "cpu", fp8_matmul=True)
    assert not any(getattr(m, "quant_kernel", False) for m in model.modules())


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
    for fp8_matmul, fused in ((True, True), (False, False)):  # by default: with float8 GEMMs only
        model = place_dit(WanModel(FLAVOURS["tiny-t2v"].dit).to(torch.bfloat16), "cpu", fp8=True,
                          fp8_matmul=fp8_matmul)
        assert sum(getattr(m, "fused_gelu", False) for m in model.modules()) == fused * len(model.blocks)
    model = place_dit(WanModel(FLAVOURS["tiny-t2v"].dit).to(torch.bfloat16), "cpu", fp8_matmul=True,
                      fused_gelu=False)
    assert not any(getattr(m, "fused_gelu", False) for m in model.modules())


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
@pytest.mark.parametrize("kind", ["plain", "col_scale", "gelu"])
def test_kernel_is_quantize_tokens_on_the_gpu(kind):
    """Byte for byte torch's eager arithmetic (the GELU's last bit aside: its form differs)."""
    if not torch.cuda.is_available() or not fp8_triton.available(torch.empty(1, device="cuda")):
        pytest.skip("needs a GPU with Triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    u = (torch.randn(4096, 8960, generator=g, device="cuda") * 3).to(torch.bfloat16)
    u[1] = 0
    col = (torch.rand(8960, generator=g, device="cuda") * 1e-2).to(torch.bfloat16)
    q, s = fp8_triton.quantize_tokens(u, col if kind == "col_scale" else None, gelu=kind == "gelu")
    x = {"plain": u, "col_scale": u * col[None, :], "gelu": F.gelu(u, approximate="tanh")}[kind]
    rq, rs = quantize_tokens(x)
    same = (q.view(torch.uint8) == rq.view(torch.uint8)).float().mean().item()
    rows_same = (s == rs).float().mean().item()
    print(f"\nTriton {kind} quantisation vs torch eager: bytes {same:.6f} equal, scales {rows_same:.6f}")
    if kind == "gelu":
        assert same > 0.999 and rows_same > 0.99
    else:
        assert same == 1.0 and rows_same == 1.0


def _rel(a: torch.Tensor, truth: torch.Tensor) -> float:
    return ((a.double() - truth).norm() / truth.norm()).item()


@pytest.mark.gpu
def test_kernels_run_in_compiled_graphs():
    """The fused FFN at inference, and a float8 Linear's forward and backward with the kernel,
    compiled: the op is traced into the graphs, and against the float64 result of the same
    (dequantised) weights each is as close as the eager torch path (float8 rounding, ~3%)."""
    if not torch.cuda.is_available() or not fp8_triton.available(torch.empty(1, device="cuda")):
        pytest.skip("needs a GPU with Triton")
    ffn = _ffn(1536, 8960).cuda()
    w0, w2 = (ffn[i].dequantized_weight(torch.float64) for i in (0, 2))
    b0, b2 = (ffn[i].bias.double() for i in (0, 2))
    h = torch.randn(2, 4096, 1536, device="cuda", dtype=torch.bfloat16)
    truth = F.gelu(h.double() @ w0.t() + b0, approximate="tanh") @ w2.t() + b2
    with torch.no_grad():
        before = fp8_triton.calls["gelu"]
        ffn[2].fused_gelu = True
        compiled = torch.compile(feed_forward)(ffn, h)
        assert fp8_triton.calls["gelu"] > before  # traced into the compiled graph
        ffn[2].fused_gelu = False
        plain = ffn(h)
    fused_err, plain_err = _rel(compiled, truth), _rel(plain, truth)
    print(f"FFN against float64: compiled with the fused kernel {fused_err:.3e}, eager torch {plain_err:.3e}")
    assert fused_err < 1.1 * plain_err and plain_err < 0.1
    lin = ffn[0]
    x64 = h.double().requires_grad_(True)
    y64 = F.gelu(x64 @ w0.t() + b0, approximate="tanh")
    y64.backward(torch.ones_like(y64))
    results = {}
    for kernel in (True, False):
        lin.quant_kernel = kernel
        x = h.clone().requires_grad_(True)
        before = fp8_triton.calls["rows"]
        fn = torch.compile(lambda t: F.gelu(lin(t), approximate="tanh")) if kernel else (
            lambda t: F.gelu(lin(t), approximate="tanh"))
        y = fn(x)
        y.backward(torch.ones_like(y))
        if kernel:
            assert fp8_triton.calls["rows"] >= before + 2  # forward and backward
        results[kernel] = (_rel(y.detach(), y64.detach()), _rel(x.grad, x64.grad))
    print(f"float8 Linear against float64, (output, input gradient): compiled with the kernel "
          f"{results[True][0]:.3e}, {results[True][1]:.3e}; eager torch {results[False][0]:.3e}, "
          f"{results[False][1]:.3e}")
    for i in (0, 1):
        assert results[True][i] < 1.1 * results[False][i] and results[False][i] < 0.1
