"""Activation checkpointing of DiT blocks: full recompute, or selective.

"selective" keeps the self-attention kernel's outputs (and its softmax statistics) and
recomputes everything else in the backward pass: attention is ~70% of a Wan step's FLOPs and
cheap to keep (one bf16 [tokens, dim] tensor per block), while the Linears, norms and
modulation it skips re-running cost little to recompute. Cross-attention (512 text keys) is
recomputed: keeping it would cost as much memory for almost no time.

`HostOffload` keeps a block's checkpointed inputs in pinned host memory. It is entered around the
block call, outside the compiled region (torch.compile cannot trace a saved-tensor hooks context:
a context inside the block made every offloaded block run uncompiled), and it moves only the
block's own inputs: a compiled block also saves its weights and the kept attention outputs, which
stay where they are. The device-to-host copy runs on a side stream, under the next block's
compute; the copy back waits for it in the backward pass.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("full", "selective")


def _attention_ops() -> set:
    names = ["_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward"]
    ops = set()
    for n in names:
        op = getattr(torch.ops.aten, n, None)
        if op is not None:
            ops.add(op.default)
    return ops


_SAVE = _attention_ops()


def _policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    if op in _SAVE and args[0].shape[-2] == args[1].shape[-2]:  # self-attention: Lq == Lk
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_policy)


def run(fn, *args, mode: str = "full"):
    """fn(*args) with its activations checkpointed."""
    if mode not in MODES:
        raise ValueError(f"checkpoint mode {mode!r}: choose one of {MODES}")
    kw = {"context_fn": _selective_context} if mode == "selective" else {}
    return checkpoint(fn, *args, use_reentrant=False, **kw)


def _key(t: torch.Tensor) -> int:
    """The identity of the storage under `t` (views share it); fake tensors have one too."""
    return t.untyped_storage()._cdata


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` covers its elements once each, in some order of its dims (copyable by strides)."""
    expect = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.size()) if n != 1):
        if stride != expect:
            return False
        expect *= size
    return True


_STREAMS: dict = {}


def _side_stream(device: torch.device):
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]


def _real_cuda(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cuda" and not is_fake(t)


def _pack(keys: set, t: torch.Tensor):
    if t.device.type == "cpu" or _key(t) not in keys or not _dense(t):
        return None, t, None
    # the copies keep the strides: a compiled backward checks them
    if not _real_cuda(t):  # the planner's fake tensors: the same bytes, moved plainly
        host = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu")
        host.copy_(t)
        return t.device, host, None
    host = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True)
    side = _side_stream(t.device)
    side.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(side):
        host.copy_(t, non_blocking=True)
    t.record_stream(side)  # its memory is reused only once the copy has read it
    done = torch.cuda.Event()
    done.record(side)
    return t.device, host, done


def _unpack(packed):
    device, t, done = packed
    if device is None:
        return t
    if done is not None:
        torch.cuda.current_stream(device).wait_event(done)
    out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device)
    return out.copy_(t, non_blocking=done is not None)


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Within it, what autograd saves of `tensors` (a block's inputs) lives in host memory."""

    def __init__(self, *tensors):
        keys = {_key(t) for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "cpu"}
        super().__init__(lambda t: _pack(keys, t), _unpack)
