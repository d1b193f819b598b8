"""One Triton kernel for the FFN's GELU and the per-token float8 quantisation that follows it.

At inference with float8 GEMMs, the input of each block's second FFN Linear is
`quantize_tokens(gelu_tanh(u))` over rows of the FFN width (8,960 for the 1.3B, 13,824 for the
14B). Inductor fuses that into one reduction, but a row that wide is past its persistent
reductions (1,024), so the kernel loops over the row twice: once for the row's largest value,
once to write the float8 row, reading u and computing its tanh both times. Measured on an H200
(65,520 x 8,960 bf16): 2.11 ms, where reading u once and writing the float8 row is ~0.5 ms of
memory traffic. Here each program holds one row in registers: u is read once, GELU computed
once, the row written once, with the same arithmetic as `quantize_tokens(gelu(u))` (the GELU
rounded to u's dtype, the factor 448 / amax rounded to it, the product rounded, clamped, cast
to e4m3, every rounding to nearest even). Only the GELU is computed differently, as
u / (1 + exp(-2z)) (the same function: one exp, no cancellation where u is negative), so a GELU
value can differ from torch's in its last bf16 bit.

Used by `wan_model.fp8.feed_forward` when asked (`FP8Linear.fused_gelu`); `available()` says
whether it can run on a tensor's device.
"""
from __future__ import annotations

import torch

from .fp8 import FP8_MAX

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - CPU installs may have no Triton
    triton = None

calls = {"gelu_quantize_rows": 0}  # eager calls, or traces into a compiled block (the bench reads it)


def available(x: torch.Tensor) -> bool:
    return triton is not None and hasattr(torch.library, "triton_op") and x.is_cuda


if triton is not None:
    @triton.jit
    def _gelu_quantize_rows(u_ptr, q_ptr, scale_ptr, cols, u_row_stride, q_row_stride,
                            FP8_MAX: tl.constexpr, INV_MAX: tl.constexpr, BLOCK: tl.constexpr):
        DTYPE = u_ptr.dtype.element_ty  # bf16 or fp16: every rounding below is to it
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < cols
        u = tl.load(u_ptr + row * u_row_stride + c, mask=mask, other=0.0).to(tl.float32)
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)  # sqrt(2 / pi) (u + 0.044715 u^3)
        # 0.5 u (1 + tanh z) = u / (1 + exp(-2z)): one exp, no cancellation in the negative tail
        g = (u / (1.0 + tl.exp(-2.0 * z))).to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(g), axis=0), 1e-12)  # masked lanes are 0
        inv = tl.minimum(FP8_MAX / amax, INV_MAX).to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        y = (g * inv).to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
        # e4m3 (rounded to nearest even); a float32 q gets y itself (the interpreter's float8 cast
        # is not the GPU's, so the CPU test casts there)
        tl.store(q_ptr + row * q_row_stride + c, y.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, 1.0 / inv)


def launch(u: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, launcher=None) -> None:
    """u [rows, cols] (rows contiguous) -> q [rows, cols] float8 e4m3 (or float32: the values
    before the cast) and scale [rows, 1] float32, written in place. `launcher` wraps the kernel
    (torch.library.wrap_triton inside the custom op); called bare it runs under Triton's
    interpreter too (the CPU test)."""
    rows, cols = u.shape
    block = triton.next_power_of_2(cols)
    kernel = launcher(_gelu_quantize_rows) if launcher is not None else _gelu_quantize_rows
    kernel[(rows,)](u, q, scale, cols, u.stride(0), q.stride(0), FP8_MAX=FP8_MAX,
                    INV_MAX=torch.finfo(u.dtype).max, BLOCK=block,
                    num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)


if triton is not None and hasattr(torch.library, "triton_op"):  # torch >= 2.6
    @torch.library.triton_op("wantune::gelu_quantize_rows", mutates_args=())
    def _gelu_quantize_rows_op(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.empty(u.shape, device=u.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty((u.shape[0], 1), device=u.device, dtype=torch.float32)
        launch(u, q, scale, launcher=torch.library.wrap_triton)
        return q, scale


def gelu_quantize_rows(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_tokens(gelu_tanh(u))` for a 2-D half-precision u on a GPU, in one pass: (float8
    e4m3 [rows, cols], float32 scale [rows, 1]). A custom op, so a compiled block calls it."""
    if u.dim() != 2 or u.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"gelu_quantize_rows takes a 2-D bf16 or fp16 tensor, got {u.dtype} {tuple(u.shape)}")
    calls["gelu_quantize_rows"] += 1
    return torch.ops.wantune.gelu_quantize_rows(u.contiguous())
