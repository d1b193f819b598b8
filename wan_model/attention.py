"""The one place that picks the attention kernel.

`attention(q, k, v, k_lens)` takes [B, L, heads, head_dim] tensors and returns the same layout.
Backends:
- "sdpa": torch scaled_dot_product_attention with torch's own kernel order.
- "cudnn", "flash", "efficient", "math": torch SDPA with that kernel tried first (the others stay
  as fallbacks for shapes it does not support, e.g. the VAE's 384-wide single head).
- "flash_attn": the flash-attn 3 or 2 package (varlen when keys are padded), when importable.
- "fa4": FlashAttention 4 (the `flash-attn-4` package) behind torch SDPA's flash kernel, through
  torch's own bridge (`torch.nn.attention._fa4`, activated in its registry of flash attention
  implementations): compiled blocks and selective checkpointing see the same SDPA op as before.
  The bridge calls this module's `_flash_attn_fwd`/`_flash_attn_bwd`, which adapt flash-attn-4
  4.0's results to what torch 2.11's bridge unpacks. Hopper and datacenter Blackwell only.
- "auto" (default): on a GPU where FlashAttention 4 is installed and runs (compute capability
  9.x or 10.x), "fa4": 1.20x cuDNN's forward and 1.13x its forward + backward for 12 heads x
  32,760 tokens on an H200, same error; else cuDNN first (1.7x torch's own flash kernel there).
  Which of the two needs the device: `set_backend(name, device)`, called where the model is
  placed; without a device "auto" means cuDNN first.
The choice is process-wide SDPA state, not a context manager around each call, so compiled
blocks trace plain SDPA calls; with FlashAttention 4 routed, unmasked half-precision attention
calls SDPA's flash op directly (on the GPU, some sampling runs found cuDNN first in the kernel
order again by their first attention call; what reset it was not found). A key-padding mask is
built only where some key is padding (SDPA then takes the next kernel in its order).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "flash_attn", "fa4")
_SDPA_PINNED = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_backend = "auto"
_fa4_active = False  # torch SDPA's flash kernel is FlashAttention 4 (set_backend routes it)
_FA4_IMPL = "wantune-fa4"  # our entry in torch's registry of flash attention implementations
fa4_calls = {"forward": 0, "backward": 0}  # calls that reached FlashAttention 4 (bench and tests read them)


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


def fa4_problem(device) -> str | None:
    """Why FlashAttention 4 cannot run attention on `device`; None when it can."""
    import torch.nn.attention as nn_attention

    bridge = getattr(nn_attention, "_fa4", None)
    if not hasattr(bridge, "register_flash_attention_fa4") or not hasattr(nn_attention, "activate_flash_attention_impl"):
        return f"this torch ({torch.__version__}) cannot route SDPA to it (torch 2.11 or later can)"
    try:
        found = importlib.util.find_spec("flash_attn.cute") is not None
    except ImportError:
        found = False
    if not found:
        return "flash-attn-4 is not installed (pip install 'wantune[fa4]')"
    device = torch.device(device)
    if device.type != "cuda":
        return f"it runs on CUDA GPUs, not on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return (f"{torch.cuda.get_device_name(device)} is compute capability {major}.{minor}; it runs on "
                "9.x (Hopper) and 10.x (datacenter Blackwell)")
    return None


def _without_zero_strides(t):
    """`t`, or the same memory seen with a nonzero stride on its size-1 dims: a compiled graph can
    give those stride 0 (so can `empty_like` of such a tensor, which is how torch's bridge makes
    the output), and FlashAttention 4 refuses any stride 0 as a broadcast dimension."""
    if not isinstance(t, torch.Tensor) or not any(st == 0 and n == 1 for st, n in zip(t.stride(), t.size())):
        return t
    extent = max((st * n for st, n in zip(t.stride(), t.size()) if n > 1), default=1)
    return t.as_strided(t.size(), [extent if st == 0 and n == 1 else st for st, n in zip(t.stride(), t.size())])


def _fa4_args(args, kwargs):
    return [_without_zero_strides(a) for a in args], {k: _without_zero_strides(v) for k, v in kwargs.items()}


def _flash_attn_fwd(*args, **kwargs):
    """FlashAttention 4's forward as torch's bridge calls it: the bridge unpacks exactly (out, lse)
    (torch 2.11), flash-attn-4 4.0 returns more."""
    from flash_attn.cute import interface

    fa4_calls["forward"] += 1
    args, kwargs = _fa4_args(args, kwargs)
    out, lse = interface._flash_attn_fwd(*args, **kwargs)[:2]
    return out, lse


def _flash_attn_bwd(*args, **kwargs):
    """FlashAttention 4's backward as torch's bridge calls it: (dq, dk, dv)."""
    from flash_attn.cute import interface

    fa4_calls["backward"] += 1
    args, kwargs = _fa4_args(args, kwargs)
    return tuple(interface._flash_attn_bwd(*args, **kwargs)[:3])


def _route_flash_to_fa4(on: bool) -> None:
    """Make torch SDPA's flash kernel FlashAttention 4 (on) or torch's own again (off)."""
    global _fa4_active
    if on == _fa4_active:
        return
    import torch.nn.attention as nn_attention

    if on:
        from torch.nn.attention import _fa4

        nn_attention.register_flash_attention_impl(
            _FA4_IMPL, register_fn=functools.partial(_fa4.register_flash_attention_fa4, module_path=__name__))
        nn_attention.activate_flash_attention_impl(_FA4_IMPL)
    else:
        nn_attention.restore_flash_attention_impl()
    _fa4_active = on


def set_backend(name: str, device=None) -> None:
    """Choose the kernel for every later call (recipe field `attention_backend`). `device`: where
    the model runs; "auto" picks FlashAttention 4 only for a CUDA device it runs on."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    if name == "flash_attn" and _FLASH_ATTN is None:
        raise ValueError("attention backend 'flash_attn' asked for, but neither flash-attn 3 "
                         "(flash_attn_interface) nor flash-attn 2 (flash_attn) is importable; "
                         "install one or choose 'auto'")
    if name == "fa4":
        where = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        problem = fa4_problem(where)
        if problem:
            raise ValueError(f"attention backend 'fa4' asked for, but {problem}; choose 'auto' "
                             "(FlashAttention 4 where it runs, else cuDNN first)")
    fa4 = name == "fa4" or (name == "auto" and device is not None and torch.device(device).type == "cuda"
                            and fa4_problem(device) is None)
    _route_flash_to_fa4(fa4)
    _backend = name
    if fa4:
        _set_sdpa_order(SDPBackend.FLASH_ATTENTION)
    else:
        _set_sdpa_order(SDPBackend.CUDNN_ATTENTION if name == "auto" else _SDPA_PINNED.get(name))


def kernel() -> str:
    """The kernel unmasked attention runs now: "fa4", or the backend's name ("cudnn" for auto)."""
    if _fa4_active:
        return "fa4"
    return "cudnn" if _backend == "auto" else _backend


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str, device=None):
    old, old_device = _backend, ("cuda" if _fa4_active else None)
    set_backend(name, device)
    try:
        yield
    finally:
        set_backend(old, old_device)


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


def _flash_op_takes(q, k, v) -> bool:
    """Inputs FlashAttention 4 runs: CUDA, one half-precision dtype, head dims up to 256 in steps
    of 8 (Wan's are 128). Others go through SDPA's choice (e.g. float32 under autocast)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0)


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
    if _fa4_active and mask is None and _flash_op_takes(q, k, v):
        # SDPA's flash op itself (FlashAttention 4 behind it), whatever the kernel order says
        return torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[0].transpose(1, 2)
    if backend in _SDPA_PINNED and not _HAS_PRIORITY:
        with sdpa_kernel(_SDPA_PINNED[backend]):
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    return out.transpose(1, 2)


_HAS_PRIORITY = hasattr(torch._C, "_set_sdp_priority_order")
set_backend("auto")
