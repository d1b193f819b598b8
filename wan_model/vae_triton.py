"""One Triton kernel for the VAE's `silu(RMS_norm(x + bias))` on channels-last activations.

Each program normalises a block of rows (one row = the C channels of one pixel, contiguous in
channels-last memory) in registers: x is read once and the result written once, straight into
its place in the next convolution's input buffer (after the frames carried from the previous
chunk). torch.compile splits the same op into a reduction and a pointwise kernel that reads x a
second time. Used on CUDA when Triton is importable; `available()` says whether it is.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - CPU installs have no Triton
    triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:
    @triton.jit
    def _norm_silu_rows(x_ptr, out_ptr, bias_ptr, gamma_ptr, rows, channels, x_batch_stride,
                        out_batch_stride, scale, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        b = tl.program_id(1).to(tl.int64)
        mask = (r[:, None] < rows) & (c[None, :] < channels)
        offs = r.to(tl.int64)[:, None] * channels + c[None, :]
        x = tl.load(x_ptr + b * x_batch_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + c, mask=c < channels, other=0.0).to(tl.float32)[None, :]
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        y = x / tl.maximum(norm, 1e-12)[:, None]  # F.normalize
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded to the activation dtype, as eager
        y = y * scale * tl.load(gamma_ptr + c, mask=c < channels, other=0.0).to(tl.float32)[None, :]
        if SILU:
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + b * out_batch_stride + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def norm_silu_into(x: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor,
                   scale: float, silu: bool = True) -> None:
    """x [B, T, N, C] contiguous (a canonical channels-last view) -> out [B, T, N, C], a view
    whose rows are contiguous within each batch item (e.g. a slice along T of a bigger buffer)."""
    bsz, t, n, c = x.shape
    rows = t * n
    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(64, 8192 // block_c))
    grid = (triton.cdiv(rows, block_r), bsz)
    _norm_silu_rows[grid](x, out, bias if bias is not None else gamma, gamma, rows, c, x.stride(0),
                          out.stride(0), float(scale), HAS_BIAS=bias is not None, SILU=silu,
                          BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4 if block_c <= 256 else 8)
