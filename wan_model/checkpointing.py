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
compute. In the backward pass the first unpack of a block's inputs also starts copying back the
inputs of the block before it (the next one backward needs) on the side stream, so each copy
back runs under a block's backward: one block's inputs more on the device, no wait.
"""
from __future__ import annotations

import weakref

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


def storage_key(t: torch.Tensor) -> int:
    """The identity of the storage under `t` (views share it); fake tensors have one too."""
    return t.untyped_storage()._cdata


def _empty_as(t: torch.Tensor, **kw) -> torch.Tensor:
    """An uninitialised tensor of t's size, strides and dtype (a compiled backward checks them)."""
    return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, **kw)


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


class _Group:
    """The tensors one HostOffload context moved to the host (one block call), linked to the
    group entered before it, whose inputs the backward pass needs next."""

    last = None  # weakref to the group entered last

    def __init__(self):
        prev = _Group.last() if _Group.last is not None else None
        self.prev = weakref.ref(prev) if prev is not None else None
        _Group.last = weakref.ref(self)
        self.items: list[list] = []  # [device, host, D2H done, device copy, H2D done]
        self.started = False

    def add(self, device, host, done) -> int:
        self.items.append([device, host, done, None, None])
        return len(self.items) - 1

    def start(self) -> None:
        """Copy every item back to the device on the side stream (CUDA; on CPU, plainly)."""
        if self.started:
            return
        self.started = True
        for item in self.items:
            device, host, done = item[:3]
            if done is None:
                item[3] = _empty_as(host, device=device).copy_(host)
                continue
            side = _side_stream(device)
            with torch.cuda.stream(side):
                # allocated on the side stream: memory the compute stream freed may still be
                # read by its queued kernels, and only that stream may reuse it at once
                side.wait_event(done)
                out = _empty_as(host, device=device).copy_(host, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(side)
            item[3], item[4] = out, ready

    def take(self, index: int) -> torch.Tensor:
        self.start()
        device, host, done, out, ready = self.items[index]
        if out is None:  # unpacked before (a graph kept for a second backward): copy again
            if done is not None:
                torch.cuda.current_stream(device).wait_event(done)
            return _empty_as(host, device=device).copy_(host, non_blocking=done is not None)
        if ready is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(ready)
            out.record_stream(current)  # made on the side stream, used (and freed) on this one
        self.items[index][3] = None  # autograd holds it now
        prev = self.prev() if self.prev is not None else None
        if prev is not None:  # the inputs of the block before, needed next in backward
            prev.start()
        return out


def _pack(group: _Group, keys: set, t: torch.Tensor):
    if t.device.type == "cpu" or storage_key(t) not in keys or not _dense(t):
        return None, t
    if not _real_cuda(t):  # the planner's fake tensors: the same bytes, moved plainly
        host = _empty_as(t, device="cpu").copy_(t)
        return group, group.add(t.device, host, None)
    host = _empty_as(t, pin_memory=True)
    side = _side_stream(t.device)
    side.wait_stream(torch.cuda.current_stream(t.device))
    with torch.cuda.stream(side):
        host.copy_(t, non_blocking=True)
    t.record_stream(side)  # its memory is reused only once the copy has read it
    done = torch.cuda.Event()
    done.record(side)
    return group, group.add(t.device, host, done)


def _unpack(packed):
    group, what = packed
    return what if group is None else group.take(what)


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Within it, what autograd saves of `tensors` (a block's inputs) lives in host memory.
    `keep(t)`, if given, sees every saved tensor first and may claim it, returning (unpack
    function, payload): block swap keeps a swapped block's weights as references (one context
    for both: saved-tensor hooks do not nest)."""

    def __init__(self, *tensors, keep=None):
        keys = {storage_key(t) for t in tensors if isinstance(t, torch.Tensor) and t.device.type != "cpu"}
        group = _Group() if keys else None

        def pack(t):
            kept = keep(t) if keep is not None else None
            if kept is not None:
                return kept
            return _unpack, (_pack(group, keys, t) if group is not None else (None, t))
        super().__init__(pack, lambda packed: packed[0](packed[1]))
