"""The one place that picks the attention kernel.

`attention(q, k, v, k_lens)` takes [B, L, heads, head_dim] tensors and returns the same layout.
Backends:
- "sdpa": torch scaled_dot_product_attention with torch's own kernel order.
- "cudnn", "flash", "efficient", "math": torch SDPA with that kernel tried first (the others stay
  as fallbacks for shapes it does not support, e.g. the VAE's 384-wide single head).
- "flash_attn": the flash-attn 3 or 2 package (varlen when keys are padded), when importable.
- "auto" (default): cuDNN first on CUDA, the fastest kernel measured for Wan shapes (1.7x torch's
  flash kernel for 12 heads x 32,760 tokens); unmasked attention only, else flash-attn/SDPA.
The choice is process-wide SDPA state, not a context manager around each call, so compiled
blocks trace plain SDPA calls. A key-padding mask is built only where some key is padding.
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


# torch's own kernel order as this process found it ("sdpa" restores exactly this).
_TORCH_ORDER = list(torch._C._get_sdp_priority_order()) if hasattr(torch._C, "_get_sdp_priority_order") else None


def _set_sdpa_order(first: SDPBackend | None) -> None:
    """Put `first` at the head of torch's SDPA kernel order (None: torch's own order)."""
    setter = getattr(torch._C, "_set_sdp_priority_order", None)
    if setter is None or _TORCH_ORDER is None:  # an older torch: attention() pins per call
        return
    order = list(_TORCH_ORDER)
    if first is not None:
        order = [int(first)] + [b for b in order if b != int(first)]
    setter(order)


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
    first = _SDPA_PINNED.get(name)
    _set_sdpa_order(SDPBackend.CUDNN_ATTENTION if name == "auto" else first)


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
    if masked and _FLASH_ATTN is not None and q.device.type == "cuda":
        return "flash_attn"
    return "sdpa"  # with cuDNN first in torch's order (set by set_backend("auto"))


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
    if backend in _SDPA_PINNED and not _HAS_PRIORITY:
        with sdpa_kernel(_SDPA_PINNED[backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


_HAS_PRIORITY = hasattr(torch._C, "_set_sdp_priority_order")
set_backend("auto")
