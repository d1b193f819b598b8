"""One Triton pass per row (token) for the per-token float8 quantisation of a float8 GEMM's input.

With float8 GEMMs (`wan_model.fp8`) every block Linear's input is quantised per token:
`quantize_tokens(x)`, a reduction over the row (its largest value) and a pass that writes the
float8 row. Compiled, Inductor fuses that with what produces x (the norm and modulation, the
FFN's GELU, the gradient through GELU), but rows of 1,536 to 13,824 are past its persistent
reductions (1,024), so the kernel loops over each row twice: once for the largest value, once to
write, reading its inputs and recomputing x both times. Measured on an H200 (65,520 x 8,960
bf16), the FFN's GELU + quantisation: 2.11 ms, where reading u once and writing the float8 row
is ~0.5 ms of memory traffic. Here each program holds one row in registers: x is read once and
the row written once, with the same arithmetic as `quantize_tokens` (the factor 448 / amax
rounded to x's dtype, the product rounded, clamped, cast to e4m3, every rounding to nearest
even; the row's divisions IEEE-rounded as torch's). Two prologues, chosen at compile time:

- `gelu`: x is the FFN's hidden row u and the row quantised is `gelu_tanh(u)` rounded to u's
  dtype, computed as u / (1 + exp(-2z)) (the same function: one exp, no cancellation where u is
  negative), so a GELU value can differ from torch's in its last bit;
- `col_scale`: the row quantised is `x * col_scale` rounded to x's dtype (col_scale [cols] in
  x's dtype): the output gradient times the weight's row scales in a float8 input gradient.

Used by `wan_model.fp8` when asked (`FP8Linear.quant_kernel`, `FP8Linear.fused_gelu`);
`available()` says whether it can run on a tensor's device.
"""
from __future__ import annotations

from typing import Optional

import torch

from .fp8 import FP8_MAX

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - CPU installs may have no Triton
    triton = None

# runs of the op (eager calls, or traces into a compiled block): the bench reads them. Counted in
# the op's body, which torch.compile does not trace, so no compiled graph guards on them.
calls = {"rows": 0, "gelu": 0}


def available(x: torch.Tensor) -> bool:
    return triton is not None and hasattr(torch.library, "triton_op") and x.is_cuda


if triton is not None:
    @triton.jit
    def _quantize_tokens_kernel(x_ptr, c_ptr, q_ptr, scale_ptr, cols, x_row_stride, q_row_stride,
                                FP8_MAX: tl.constexpr, INV_MAX: tl.constexpr, BLOCK: tl.constexpr,
                                GELU: tl.constexpr, COL_SCALE: tl.constexpr):
        DTYPE = x_ptr.dtype.element_ty  # bf16 or fp16: every rounding below is to it
        row = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        mask = c < cols
        x = tl.load(x_ptr + row * x_row_stride + c, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            z = 0.7978845608028654 * (x + 0.044715 * x * x * x)  # sqrt(2 / pi) (u + 0.044715 u^3)
            # 0.5 u (1 + tanh z) = u / (1 + exp(-2z)): one exp, no cancellation in the negative tail;
            # the fast division (2 ulp of float32, far below the bf16 rounding that follows): an
            # IEEE-rounded one per element made the kernel compute-bound (2.90 ms at 65,520 x 8,960
            # on an H200, against Inductor's 1.95)
            x = tl.fdiv(x, 1.0 + tl.exp(-2.0 * z)).to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        if COL_SCALE:
            s = tl.load(c_ptr + c, mask=mask, other=0.0).to(tl.float32)
            x = (x * s).to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)  # masked lanes are 0
        # (div_rn takes tensors: the constants enter as FP8_MAX + 0 * amax)
        inv = tl.minimum(tl.div_rn(FP8_MAX + 0.0 * amax, amax), INV_MAX)
        inv = inv.to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        y = (x * inv).to(DTYPE, fp_downcast_rounding="rtne").to(tl.float32)
        y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
        # e4m3 (rounded to nearest even); a float32 q gets y itself (the interpreter's float8 cast
        # is not the GPU's, so the CPU test casts there)
        tl.store(q_ptr + row * q_row_stride + c, y.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, tl.div_rn(1.0 + 0.0 * inv, inv))


def launch(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, col_scale: torch.Tensor | None = None,
           gelu: bool = False, launcher=None) -> None:
    """x [rows, cols] (unit column stride) -> q [rows, cols] float8 e4m3 (or float32: the values
    before the cast) and scale [rows, 1] float32, written in place. `launcher` wraps the kernel
    (torch.library.wrap_triton inside the custom op); called bare it runs under Triton's
    interpreter too (the CPU test)."""
    rows, cols = x.shape
    block = triton.next_power_of_2(cols)
    kernel = launcher(_quantize_tokens_kernel) if launcher is not None else _quantize_tokens_kernel
    # without col_scale its pointer is x's, never read (COL_SCALE is a compile-time False)
    kernel[(rows,)](x, x if col_scale is None else col_scale, q, scale, cols, x.stride(0), q.stride(0),
                    FP8_MAX=FP8_MAX, INV_MAX=torch.finfo(x.dtype).max, BLOCK=block, GELU=gelu,
                    COL_SCALE=col_scale is not None,
                    num_warps=16 if block >= 8192 else 8 if block >= 2048 else 4)


if triton is not None and hasattr(torch.library, "triton_op"):  # torch >= 2.6
    @torch.library.triton_op("wantune::quantize_tokens", mutates_args=())
    def _quantize_tokens_op(x: torch.Tensor, col_scale: Optional[torch.Tensor],
                            gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
        calls["rows"] += 1
        calls["gelu"] += int(gelu)
        q = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
        scale = torch.empty((x.shape[0], 1), device=x.device, dtype=torch.float32)
        launch(x, q, scale, col_scale, gelu, launcher=torch.library.wrap_triton)
        return q, scale


def quantize_tokens(x: torch.Tensor, col_scale: torch.Tensor | None = None,
                    gelu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_tokens(x)` for a 2-D half-precision x on a GPU, in one pass: (float8 e4m3
    [rows, cols], float32 scale [rows, 1]); with `gelu`, of `gelu_tanh(x)`; with `col_scale`
    ([cols]), of `x * col_scale` (both rounded to x's dtype). A custom op, so a compiled block
    calls it."""
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"quantize_tokens takes a 2-D bf16 or fp16 tensor, got {x.dtype} {tuple(x.shape)}")
    if col_scale is not None:
        if col_scale.shape != (x.shape[1],):
            raise ValueError(f"quantize_tokens: col_scale {tuple(col_scale.shape)} for rows of {x.shape[1]}")
        col_scale = col_scale.to(x.dtype).contiguous()
    return torch.ops.wantune.quantize_tokens(x.contiguous(), col_scale, gelu)
