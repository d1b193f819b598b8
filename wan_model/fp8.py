"""Frozen base Linears stored as float8 (e4m3) with one scale per output row, upcast on use.

For LoRA on a frozen base this halves the weight memory of bf16 (the 14B blocks go from 28 GB to
14 GB) at the cost of the e4m3 rounding of each weight (3 mantissa bits, about 3% relative per
element; the per-row scale keeps every row's largest value exact in range).

`FP8Linear` is a subclass of `nn.Linear`, so PEFT's LoRA wraps it like any Linear and the module
names stay the official ones (`blocks.0.self_attn.q.base_layer.weight` under LoRA, as for bf16).
Its `weight` parameter holds float8_e4m3fn values and a `weight_scale` buffer [out] (float32)
holds the row scales; `compute_dtype` tells PEFT which dtype to give the adapter (it would
otherwise copy the float8 dtype of `weight`).

The matmul runs in the compute dtype (bf16 under autocast) on a weight dequantised just before
use; backward dequantises again instead of keeping the bf16 copy alive, so the saved state per
Linear is the float8 weight only (that matters without activation checkpointing). Both are
custom ops, so a compiled block keeps exactly that too.

With `fp8_matmul` the matmuls themselves run in float8 (Hopper and Ada tensor cores run e4m3 at
twice the bf16 rate): the input is quantised to e4m3 with one scale per token (row) just before
the GEMM, which multiplies it with the stored float8 weight and both scales into bf16
(`torch._scaled_mm`, row-wise scales). Backward's input gradient likewise: the output gradient,
scaled by the weight's row scales, is quantised per token and multiplied with the float8 weight.
This rounds the activations and gradients too (3 mantissa bits each), so it changes the
numerics beyond the weight rounding; Linears whose sizes are not multiples of 16 (tiny test
models) fall back to the upcast matmul. This path is plain torch ops around `torch._scaled_mm`
(no dequantised weight exists to be kept), so a compiled block fuses each quantisation with the
op that produces its input. The forward GEMMs accumulate in the tensor cores' fast mode
(`use_fast_accum`, as torchao's float8 recipe does for the output GEMM: 2-25% less time per GEMM at
Wan's shapes on an H200, the same error against the exact product at these sizes, where the
e4m3 rounding of the operands dominates); the input gradient keeps full-precision accumulation.
`fast_accum=False` gives full precision in forward too.

The per-token quantisations can run as one Triton pass per row (`FP8Linear.quant_kernel`,
`wan_model.fp8_triton`) instead of the compiled block's fused reduction, which reads each row
of 1,536 to 13,824 twice and recomputes what produced it; at inference the FFN's second Linear
can take its input's GELU into that pass too (`feed_forward`, `FP8Linear.fused_gelu`). Measured
on an H200 (BENCHMARKS.md): the fused GELU takes 22 ms off a 0.91 s sampling step (the sampler
uses it with float8 GEMMs); in a compiled training step the plain pass takes 0.2-1.2% off
(Inductor quantises inside the kernel that makes the input, so a separate pass reads it again,
but in one pass) and 0.8 GiB (1.3B) to 1.3 GiB (14B) off the peak: the trainer's default with
float8 GEMMs (`train.fp8_quant_kernel`; this module's own default stays the torch path).

Call `quantize_linears_(model)` after loading and before or after `add_lora`; do not call
`model.to(dtype)` afterwards (it would cast the float8 weights like any float tensor).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale [out]) with weight ~= q.float() * scale[:, None]."""
    w = weight.detach().float()
    amax = w.abs().amax(dim=1).clamp(min=1e-12)
    scale = amax / FP8_MAX
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[:, None]


@torch.library.custom_op("wantune::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b with W dequantised on use. A custom op (opaque to torch.compile): a
    compiled graph could otherwise keep the dequantised bf16 W, or fuse the dequantisation
    into the backward's saved set; its backward saves the float8 W and the scales only."""
    w = dequantize_rows(q, scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("wantune::fp8_linear_input_grad", mutates_args=())
def fp8_linear_input_grad(grad_out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return grad_out @ dequantize_rows(q, scale, grad_out.dtype)


# output shapes for tracing, and autograd: backward keeps the float8 weight and its scales only
fp8_linear.register_fake(lambda x, q, scale, bias: x.new_empty(*x.shape[:-1], q.shape[0]))
fp8_linear_input_grad.register_fake(lambda g, q, scale: g.new_empty(*g.shape[:-1], q.shape[1]))


def _fp8_setup(ctx, inputs, output):
    x, q, scale, bias = inputs
    ctx.save_for_backward(q, scale)


def _fp8_backward(ctx, grad_out):
    q, scale = ctx.saved_tensors
    return (fp8_linear_input_grad(grad_out, q, scale) if ctx.needs_input_grad[0] else None), None, None, None


fp8_linear.register_autograd(_fp8_backward, setup_context=_fp8_setup)


def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D x [M, K] -> (float8 e4m3 [M, K], float32 scale [M, 1]) with x ~= q * scale. Computed in
    x's dtype (bf16 in training: no float32 copy of the activations), with the row's factor
    448 / amax rounded to that dtype and its exact inverse as the scale. The rounding can put a
    row's largest value just past 448; the clamp keeps every value in e4m3's range (e4m3fn has
    no infinity: a cast far past it gives NaN). The factor is capped at x's dtype's largest
    value: a row of zeros (amax floored at 1e-12) would otherwise make it infinite in fp16, and
    its float8 row NaN."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    # the scale is this rounded factor's inverse: no bias
    inv = (FP8_MAX / amax).clamp(max=torch.finfo(x.dtype).max).to(x.dtype)
    q = (x * inv).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, 1.0 / inv.float()


def _quantize(x: torch.Tensor, col_scale: torch.Tensor | None = None,
              kernel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_tokens(x * col_scale)` (col_scale [cols] cast to x's dtype, or none): with `kernel`,
    on a GPU with Triton, as one pass per row (`wan_model.fp8_triton`), otherwise in torch ops
    (which a compiled block fuses with what produces x)."""
    if col_scale is not None:
        col_scale = col_scale.to(x.dtype)
    if kernel and x.dtype in (torch.bfloat16, torch.float16):
        from . import fp8_triton  # imports Inductor (seconds): only where asked

        if fp8_triton.available(x):
            return fp8_triton.quantize_tokens(x, col_scale)
    return quantize_tokens(x if col_scale is None else x * col_scale[None, :])


def _gemm(a: torch.Tensor, scale_a: torch.Tensor, b_t: torch.Tensor, scale_b: torch.Tensor,
          out_dtype: torch.dtype, bias: torch.Tensor | None = None, fast_accum: bool = False) -> torch.Tensor:
    """a [M, K] float8 row-major times b_t [K, N] float8 column-major, with float32 scales
    [M, 1] and [1, N], into out_dtype (`torch._scaled_mm`, row-wise scales)."""
    return torch._scaled_mm(a, b_t, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                            bias=None if bias is None else bias.to(out_dtype), use_fast_accum=fast_accum)


def _weight_gemm(xq: torch.Tensor, sx: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                 out_dtype: torch.dtype, bias: torch.Tensor | None, fast_accum: bool) -> torch.Tensor:
    """A quantised input xq [M, K] (scales sx [M, 1]) times a stored float8 weight q [N, K] with
    its row scales [N]: the forward GEMM of a float8 Linear (q transposed is a view, no copy)."""
    return _gemm(xq, sx, q.t(), scale[None, :].float(), out_dtype, bias, fast_accum)


class FP8Gemm(torch.autograd.Function):
    """y = x W^T + b as one float8 GEMM: x quantised per token, W stored per output row; the
    input gradient likewise. Plain torch ops around `torch._scaled_mm`, so that a compiled block
    fuses each quantisation with the norm, modulation or gate that produces its input (as a
    custom op it was a separate pass over every input: measured 13% slower than bf16 at 1.3B).
    Backward keeps the float8 weight and its scales only: the base is frozen, so no activation
    is needed. `fast_accum`: the forward GEMM accumulates in the fast mode (module notes);
    `quant_kernel`: both quantisations as one Triton pass per row (`_quantize`)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, fast_accum=True, quant_kernel=False):
        ctx.save_for_backward(q, scale)
        ctx.quant_kernel = quant_kernel
        x2 = x.reshape(-1, x.shape[-1])
        xq, sx = _quantize(x2, kernel=quant_kernel)
        y = _weight_gemm(xq, sx, q, scale, x.dtype, bias, fast_accum)
        return y.reshape(*x.shape[:-1], q.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        q, scale = ctx.saved_tensors
        # grad_x = grad_out (diag(scale) q) = (grad_out * scale) q; q transposed in memory for the
        # GEMM's column-major operand (a float8 copy of the weight, freed at once)
        gq, sg = _quantize(grad_out.reshape(-1, grad_out.shape[-1]), scale, ctx.quant_kernel)
        ones = torch.ones(1, q.shape[1], device=q.device, dtype=torch.float32)
        gx = _gemm(gq, sg, q.t().contiguous().t(), ones, grad_out.dtype)
        return gx.reshape(*grad_out.shape[:-1], q.shape[1]), None, None, None, None, None


def feed_forward(ffn: nn.Sequential, h: torch.Tensor) -> torch.Tensor:
    """`ffn(h)` for Wan's FFN (Linear, GELU tanh, Linear). When its second Linear is an FP8Linear
    with float8 GEMMs and `fused_gelu`, no gradient is being recorded and Triton runs on h's
    device, the GELU and that GEMM's per-token quantisation run as one pass over the hidden rows
    (`wan_model.fp8_triton`); otherwise, and for any other FFN, it is `ffn(h)`."""
    lin = ffn[2]
    if (torch.is_grad_enabled() or type(lin) is not FP8Linear or not (lin.fused_gelu and lin.fp8_matmul)
            or not isinstance(ffn[1], nn.GELU) or ffn[1].approximate != "tanh"):
        return ffn(h)
    from . import fp8_triton

    u = ffn[0](h)
    if not fp8_triton.available(u) or u.dtype not in (torch.bfloat16, torch.float16):
        return lin(ffn[1](u))
    with torch.autocast(u.device.type, enabled=False):  # as FP8Linear.forward
        q, sx = fp8_triton.quantize_tokens(u.reshape(-1, u.shape[-1]), gelu=True)
        y = _weight_gemm(q, sx, lin.weight, lin.weight_scale, u.dtype, lin.bias, lin.fast_accum)
    return y.reshape(*u.shape[:-1], lin.out_features)


def _compute_dtype_for(x: torch.Tensor, default: torch.dtype) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else default


class FP8Linear(nn.Linear):
    """A frozen Linear whose weight is float8 e4m3 with per-output-row float32 scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 compute_dtype: torch.dtype = torch.bfloat16, fp8_matmul: bool = False,
                 fast_accum: bool = True):
        super().__init__(in_features, out_features, bias=bias, device=device)
        # float8 GEMMs need both sizes to be multiples of 16 (every Wan Linear is)
        self.fp8_matmul = fp8_matmul and in_features % 16 == 0 and out_features % 16 == 0
        self.fast_accum = fast_accum  # of the forward float8 GEMM (module notes)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=FP8_DTYPE),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        self.compute_dtype = compute_dtype
        # with fp8_matmul: quantise the input and its gradient in one Triton pass per row
        # (`_quantize`); the FFN's second Linear at inference: its input's GELU in that pass too
        # (`feed_forward`). Off unless asked (quantize_linears_, `place_dit`)
        self.quant_kernel = False
        self.fused_gelu = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16,
                    work_device=None, fp8_matmul: bool = False, fast_accum: bool = True) -> "FP8Linear":
        """`work_device`: where to do the arithmetic (e.g. the GPU for a model kept on the host);
        the results go back to the weight's own device."""
        w = linear.weight
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      compute_dtype=compute_dtype, fp8_matmul=fp8_matmul, fast_accum=fast_accum)
        if work_device is not None and torch.device(work_device) != w.device:
            q, scale = quantize_rows(w.to(work_device, non_blocking=True))
            q, scale = q.to(w.device), scale.to(w.device)
        else:
            q, scale = quantize_rows(w)
        new.weight = nn.Parameter(q, requires_grad=False)
        new.weight_scale = scale
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return new

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_rows(self.weight, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad:
            raise RuntimeError("FP8Linear weights are frozen (LoRA base only); full fine-tuning "
                               "needs train.base_dtype fp32 or bf16")
        dtype = _compute_dtype_for(x, self.compute_dtype)
        with torch.autocast(x.device.type, enabled=False):
            if self.fp8_matmul and dtype != torch.float32:
                return FP8Gemm.apply(x.to(dtype), self.weight, self.weight_scale, self.bias, self.fast_accum,
                                     self.quant_kernel)
            return fp8_linear(x.to(dtype), self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (super().extra_repr() + ", weight=float8_e4m3fn (per-row scales)"
                + (f", float8 matmul{'' if self.fast_accum else ' (exact accumulation)'}"
                   + (", Triton row quantisation" if self.quant_kernel else "") if self.fp8_matmul else ""))


def default_include(name: str) -> bool:
    """The transformer blocks' Linears (the bulk of the weights); embeddings and head stay."""
    return name.startswith("blocks.")


def quantize_linears_(model: nn.Module, include: Callable[[str], bool] = default_include,
                      compute_dtype: torch.dtype = torch.bfloat16, work_device=None,
                      fp8_matmul: bool = False, fast_accum: bool = True,
                      quant_kernel: bool = False) -> list[str]:
    """Replace every frozen nn.Linear whose name passes `include` by an FP8Linear, in place.

    Under PEFT LoRA the wrapped `base_layer` is quantised and the adapter left alone. The
    quantised weights are frozen whatever they were before (fp8 is for the frozen LoRA base).
    Returns the names replaced. Quantising runs where the weights are (seconds on a GPU), or
    on `work_device` for a model held in host memory (a 14B model loaded for block swap).
    `fp8_matmul`: the matmuls run in float8 too, `fast_accum` saying how the forward GEMMs
    accumulate and `quant_kernel` how their inputs are quantised (see the module's notes).
    """
    replaced = []
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or "lora_" in name or not include(name):
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = FP8Linear.from_linear(module, compute_dtype, work_device, fp8_matmul, fast_accum)
        new.quant_kernel = quant_kernel and new.fp8_matmul
        setattr(parent, leaf, new)
        replaced.append(name)
    return replaced

