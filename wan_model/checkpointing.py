"""Activation checkpointing of DiT blocks: full recompute, or selective.

"selective" keeps the self-attention kernel's outputs (and its softmax statistics) and
recomputes everything else in the backward pass: attention is ~70% of a Wan step's FLOPs and
cheap to keep (one bf16 [tokens, dim] tensor per block), while the Linears, norms and
modulation it skips re-running cost little to recompute. Cross-attention (512 text keys) is
recomputed: keeping it would cost as much memory for almost no time.
"""
from __future__ import annotations

import contextlib

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


def run(fn, *args, mode: str = "full", offload: bool = False):
    """fn(*args) with its activations checkpointed; `offload` keeps what is saved in host memory."""
    if mode not in MODES:
        raise ValueError(f"checkpoint mode {mode!r}: choose one of {MODES}")
    kw = {"context_fn": _selective_context} if mode == "selective" else {}
    ctx = (torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available())
           if offload else contextlib.nullcontext())
    with ctx:
        return checkpoint(fn, *args, use_reentrant=False, **kw)
