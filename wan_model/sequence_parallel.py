"""Sequence parallelism for the Wan DiT (DeepSpeed-Ulysses): N ranks share one sample's tokens.

Each rank of a group keeps 1/N of the video tokens through every block. Everything in a block
is per token except self-attention, so only self-attention talks to the other ranks: an
all-to-all turns "my tokens, all heads" into "all tokens, my heads" for q, k and v, each rank
runs ordinary full-length attention over its heads, and a second all-to-all turns the result
back into "my tokens, all heads". RoPE is applied before the exchange with each shard's own
slice of the table (true positions); cross-attention needs no exchange (local queries, every
rank holds the whole text); the head runs on the shard and its small output is gathered, so
unpatchify and the loss see the whole sample.

Why this and not `deepspeed.sequence.layer.DistributedAttention` or torch/accelerate context
parallelism: the algorithm is DeepSpeed-Ulysses', written on torch's differentiable functional
collectives (`all_to_all_single_autograd`) because
- token counts that N does not divide (848x480, or 75 tokens on a tiny test model) and head
  counts it does not divide (12 heads on 8 ranks) are split unevenly by the collective's split
  sizes: no padded keys, so no attention mask that would push cuDNN/flash off their fast path;
  DeepSpeed's even path asserts divisibility and its uneven-head path needs Megatron-style
  process-group globals;
- the exchange is a traceable operator, so compiled blocks compile it (DeepSpeed's all-to-all is
  an autograd.Function filling a buffer through deepspeed.comm, which dynamo cannot trace), and
  LoRA/DDP runs need no DeepSpeed engine; ZeRO runs use it unchanged;
- the same code runs over gloo, so the equality with one process is tested on CPUs.
Ring attention (torch's `context_parallel`, accelerate's `cp_size`) overlaps K/V passing with
compute but is CUDA-kernel only, needs FSDP2 in accelerate, and cuts each attention into N
smaller kernels; Ulysses keeps one full-length cuDNN call per rank, and at N = 2..8 on NVLink
its four all-to-alls per block cost a few percent of a 720p step.

Gradients: the gathered output's backward sums the N identical upstream gradients of a group
(every rank computes the same loss), so each rank holds N times its part of the sample's
gradient; the data-parallel all-reduce then averages over all N * D ranks, which gives exactly
the one-GPU gradient of the D samples. Under activation checkpointing the recompute runs the
same exchanges in the same order on every rank of a group (selective checkpointing keeps the
attention kernel's output; the exchanges around it are recomputed, as its inputs are needed).
"""
from __future__ import annotations

import contextlib
from itertools import accumulate

import torch


def shard_sizes(total: int, n: int) -> list[int]:
    """How `total` tokens (or heads) split over n ranks: the first total % n take one more."""
    q, r = divmod(total, n)
    return [q + (i < r) for i in range(n)]


def tokens_per_rank(tokens: int, n: int) -> int:
    """The most tokens a rank of an n-rank group holds: what sizes its activations."""
    return shard_sizes(tokens, n)[0]


def _offsets(sizes: list[int]) -> list[int]:
    return [0, *accumulate(sizes)][:-1]


class SequenceParallel:
    """The ranks of `group` share each sample's tokens. `heads`: the model's attention heads."""

    def __init__(self, group, heads: int):
        import torch.distributed as dist

        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.size > heads:
            raise ValueError(f"sequence parallel over {self.size} ranks needs at least as many "
                             f"attention heads; this model has {heads}")
        self.head_sizes = shard_sizes(heads, self.size)
        self.token_sizes: list[int] = []  # set by begin() for each forward

    # -- tokens ---------------------------------------------------------------------------------
    def begin(self, tokens: int) -> None:
        """Called by the model at every forward with the sample's full token count."""
        self.token_sizes = shard_sizes(tokens, self.size)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of a full-length tensor (a view)."""
        return x.narrow(dim, _offsets(self.token_sizes)[self.rank], self.token_sizes[self.rank])

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L_r, C] shards -> [B, L, C] on every rank; backward sums the ranks' gradients."""
        pieces = self._exchange([x] * self.size, [x.shape[0] * n * x.shape[2] for n in self.token_sizes])
        return torch.cat([p.view(x.shape[0], n, x.shape[2]) for p, n in zip(pieces, self.token_sizes)], 1)

    # -- attention ------------------------------------------------------------------------------
    def attention(self, q, k, v, attend):
        """Self-attention over the group's full sequence. q, k, v [B, L_r, H, D] (this rank's
        tokens, all heads) -> [B, L_r, H, D]; `attend` is the local kernel (wan_model.attention)."""
        b, n_local, _, d = q.shape
        if n_local != self.token_sizes[self.rank]:
            raise RuntimeError(f"sequence parallel: rank {self.rank} got {n_local} tokens, expected "
                               f"{self.token_sizes[self.rank]} (begin() was not called for this input)")
        mine = self.head_sizes[self.rank]
        # my tokens x every rank's heads -> every rank's tokens x my heads (q, k, v in one exchange)
        qkv = torch.stack((q, k, v))  # [3, B, L_r, H, D]
        parts = [qkv.narrow(3, o, h) for o, h in zip(_offsets(self.head_sizes), self.head_sizes)]
        pieces = self._exchange(parts, [3 * b * n * mine * d for n in self.token_sizes])
        full = torch.cat([p.view(3, b, n, mine, d) for p, n in zip(pieces, self.token_sizes)], dim=2)
        out = attend(*full.unbind(0))  # [B, L, mine, D]
        # every rank's tokens x my heads -> my tokens x every rank's heads
        parts = [out.narrow(1, o, n) for o, n in zip(_offsets(self.token_sizes), self.token_sizes)]
        pieces = self._exchange(parts, [b * n_local * h * d for h in self.head_sizes])
        return torch.cat([p.view(b, n_local, h, d) for p, h in zip(pieces, self.head_sizes)], dim=2)

    def _exchange(self, parts: list[torch.Tensor], recv_numel: list[int]) -> list[torch.Tensor]:
        """Send parts[j] to rank j; returns the flat pieces received from each rank, in rank
        order. Differentiable: the backward is the reverse exchange."""
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        send = torch.cat([p.reshape(-1) for p in parts])
        recv = all_to_all_single_autograd(send, recv_numel, [p.numel() for p in parts], self.group)
        return list(recv.split(recv_numel))


def attach(model, sp: SequenceParallel | None) -> None:
    """Make `model` (a WanModel) split its tokens over `sp`'s group (None: run whole)."""
    model.sequence_parallel = sp
    for block in model.blocks:
        block.self_attn.sequence_parallel = sp


@contextlib.contextmanager
def disabled(model):
    """Run `model` whole on this rank alone (previews on the main process), then restore."""
    sp = model.sequence_parallel
    attach(model, None)
    try:
        yield model
    finally:
        attach(model, sp)
