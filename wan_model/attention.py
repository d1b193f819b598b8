"""The one place that picks the attention kernel.

`attention(q, k, v, k_lens)` takes [B, L, heads, head_dim] tensors and returns the same layout.
Backends:
- "sdpa" (default off CUDA): torch scaled_dot_product_attention, letting torch choose.
- "cudnn", "flash", "efficient", "math": torch SDPA pinned to that kernel.
- "flash_attn": the flash-attn 3 or 2 package (varlen when keys are padded), when importable.
- "auto": on CUDA the fastest kernel measured for Wan shapes (cuDNN SDPA, then flash-attn 3,
  then torch's flash), on CPU plain SDPA.
A key-padding mask is built only when some key is padding (`k_lens` shorter than the keys).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "flash_attn")
_SDPA_PINNED = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_backend = "auto"


def _import_flash_attn():
    try:  # flash-attn 3 (Hopper)
        from flash_attn_interface import flash_attn_func, flash_attn_varlen_func
        return 3, flash_attn_func, flash_attn_varlen_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
        return 2, flash_attn_func, flash_attn_varlen_func
    except ImportError:
        return None


_FLASH_ATTN = _import_flash_attn()


def set_backend(name: str) -> None:
    """Choose the kernel for every later call (recipe field `attention_backend`)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    if name == "flash_attn" and _FLASH_ATTN is None:
        raise ValueError("attention backend 'flash_attn' asked for, but neither flash-attn 3 "
                         "(flash_attn_interface) nor flash-attn 2 (flash_attn) is importable; "
                         "install one or choose 'auto'")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def _resolve(q: torch.Tensor, masked: bool) -> str:
    if _backend != "auto":
        return _backend
    if q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return "sdpa"
    if masked:
        return "flash_attn" if _FLASH_ATTN is not None else "sdpa"
    return "cudnn"


def _flash_attn(q, k, v, k_lens):
    _, func, varlen = _FLASH_ATTN
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    if k_lens is None:
        out = func(q, k, v)
    else:
        b, lq, h, d = q.shape
        lk = k.shape[1]
        keep = torch.arange(lk, device=k.device)[None, :] < k_lens[:, None]
        cu_k = F.pad(k_lens.cumsum(0, dtype=torch.int32), (1, 0))
        cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
        out = varlen(q.reshape(b * lq, h, d), k[keep], v[keep], cu_q, cu_k, lq, lk)
        out = out.reshape(b, lq, h, d)
    return out[0] if isinstance(out, tuple) else out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              k_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(head_dim). q [B,Lq,H,D], k/v [B,Lk,H,D] -> [B,Lq,H,D].

    `k_lens` [B] (optional) gives the number of real keys per sample; keys beyond it are masked.
    Pass it only where padding exists (callers know that from shapes, so no device sync here).
    """
    backend = _resolve(q, k_lens is not None)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, k_lens).to(q.dtype)
    mask = None
    if k_lens is not None:
        mask = torch.arange(k.shape[1], device=k.device)[None, :] < k_lens[:, None]
        mask = mask[:, None, None, :]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if backend in _SDPA_PINNED:
        with sdpa_kernel(_SDPA_PINNED[backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)
