"""The memory planner: the fastest training plan that fits the card, or why none does.

`train.memory: auto` (or `train.memory_gib: N`) hands the memory levers to this module: whether
blocks are checkpointed, how many keep their self-attention output (selective checkpointing),
whether the others recompute in segments, how many keep their checkpointed inputs in host memory
(offload), how many blocks' frozen weights live in host memory and are streamed in (block swap),
and for LoRA whether the frozen base is stored in fp8. Settings written in the recipe are never changed; the planner only fills
in what is left to it (`null` in the schema).

How a plan's peak is predicted (`Planner.estimate`):
- weights, trained parameters and optimizer state: counted exactly from the model built on the
  meta device with the plan's dtypes and adapters (swapped blocks leave the device, two blocks'
  copies in flight come back);
- activations, gradients and every transient of forward and backward: the step itself is run
  on fake tensors at the real size (`train/memory_trace.py`), one block per run of identical
  blocks, the rest added by arithmetic. This is exact for eager blocks; compiled blocks keep
  fewer intermediates, which a factor measured on the GPU accounts for (`COMPILED_TRANSIENT`).
A plan fits when its prediction, with a margin for the allocator and the libraries' own
buffers, is under the budget, and the host memory it pins (swapped weights, offloaded
checkpoints, the host copy a swapped model is loaded through) is under the host's free RAM.

How plans are ranked: a step-time model from FLOPs and the device's rates (matmul, attention,
host<->device copies; measured in a second on a GPU): recomputed attention where no output is
kept, offload traffic, swap traffic not hidden under compute, blocks recomputed in segments
running uncompiled.
fp8 base weights round the frozen weights (about 3% per element), so a bf16 plan is preferred
unless no bf16 plan fits or it is more than `FP8_PREFERENCE` slower. Recomputing in segments is
chosen only when no plan without it fits (it costs a third forward of the attention segments).

Under DeepSpeed ZeRO (`Sharding`), a full fine-tune's weights, gradients and AdamW state per rank
and the host memory of an offloaded optimizer are DeepSpeed's own estimates
(`estimate_zero3_model_states_mem_needs` and its ZeRO-2 twin), plus the reduce buckets; gradients
leave the traced step as they are reduced.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field, replace

import torch

from wan_model.block_swap import pinned_size
from wan_model.flops import latent_grid

from .memory_trace import BlockKind, StepSetup, StepTrace, build_meta_model, trace_step

GIB = 2**30
# Every kind a checkpointed block can be, in model order; one traced block each serves all plans.
KINDS = [BlockKind(keep_attention=True, offload=True), BlockKind(keep_attention=True),
         BlockKind(offload=True), BlockKind()]
# The same with the blocks that recompute everything doing so in segments (`Plan.segments`).
KINDS_SEGMENTS = KINDS[:2] + [BlockKind(offload=True, segments=True), BlockKind(segments=True)]
# Compiled blocks: their backward transient over the eager one's (measured on an H200 with the
# shipped fast path; see bench/NOTES.md). Eager (and CPU) runs use 1.0.
COMPILED_TRANSIENT = 0.85
# A plan fits when predicted * (1 + MARGIN) + RESERVE <= budget: the caching allocator's
# fragmentation and the CUDA libraries' workspaces are not tensors the trace can see.
MARGIN, RESERVE_GIB = 0.06, 0.5
HOST_RESERVE_GIB = 4.0  # host RAM left to the process itself (libraries, data loading, the OS)
FP8_PREFERENCE = 0.05  # an fp8 plan must be this much faster than the best bf16 one to win
# cuDNN's attention backward keeps float32 accumulators beside the tensors the trace sees: about
# this many float32 copies of the [tokens, dim] activation (measured on an H200, 1.3B width);
# eager blocks about half as many (fit to the H200 runs of 2026-11-30, when swapped blocks ran
# eager: eager 1.3B cases +4..5% and swapped ones +12..15% with the compiled figure).
ATTENTION_WORKSPACE = 4.5
ATTENTION_WORKSPACE_EAGER = 2.25
# An offloaded checkpoint goes to the host on a side stream, under compute, and comes back on it
# under the backward of the block after it (wan_model/checkpointing.py): what the copies cost is
# the part a block's backward does not hide, plus this fraction of the copy for the stream waits.
OFFLOAD_RESIDUAL = 0.05
OPTIMIZER_STATE_BYTES = {"adamw": 8.0, "paged_adamw": 8.0, "adamw8bit": 2.0, "paged_adamw8bit": 2.0,
                         "adafactor": 0.0, "prodigy": 16.0}


@dataclass(frozen=True)
class Plan:
    """The memory levers of a training step; `None` in a recipe means the planner picks."""
    checkpointing: bool = True
    keep_attention: int = 0  # blocks (from the first) keeping their self-attention output
    offload: int = 0  # blocks (from the first) whose checkpointed inputs live in host memory
    block_swap: int = 0  # blocks (from the last) whose frozen weights live in host memory
    base_dtype: str = "bf16"
    segments: bool = False  # blocks recomputing everything do so again per segment in backward

    def counts(self, n: int) -> list[int]:
        """Blocks of each kind of `KINDS`, in the order the model runs them: first those that
        keep attention and offload, then those doing one of the two, then the rest."""
        if not self.checkpointing:
            return [n]
        k, o = min(self.keep_attention, n), min(self.offload, n)
        return [min(k, o), max(k - o, 0), max(o - k, 0), n - max(k, o)]

    def segmented(self, n: int) -> int:
        """How many blocks recompute in segments: those that keep no attention output."""
        return n - min(self.keep_attention, n) if self.checkpointing and self.segments else 0

    def describe(self, n: int) -> str:
        if not self.checkpointing:
            parts = ["no activation checkpointing"]
        elif self.keep_attention >= n:
            parts = ["selective checkpointing (self-attention kept in every block)"]
        elif self.keep_attention > 0:
            parts = [f"selective checkpointing (self-attention kept in {self.keep_attention} of {n} blocks)"]
        else:
            parts = ["full checkpointing"]
        if self.segmented(n):
            parts.append("recomputed in segments")
        if self.checkpointing and self.offload:
            parts.append(f"checkpointed inputs of {min(self.offload, n)} blocks in host memory")
        if self.block_swap:
            parts.append(f"{self.block_swap} blocks swapped from host memory")
        parts.append(f"{self.base_dtype} base weights")
        return ", ".join(parts)


@dataclass(frozen=True)
class Sharding:
    """How DeepSpeed ZeRO splits a full fine-tune's state over the data-parallel ranks. Stage 0:
    every rank holds all of it (one process, DDP)."""
    stage: int = 0
    world: int = 1
    offload_optimizer: bool = False  # fp32 master weights, moments and gradients in host memory
    bucket_elements: int = 500_000_000  # zero_optimization.reduce_bucket_size
    local_ranks: int = 1  # ranks sharing this machine's host RAM

    @staticmethod
    def from_deepspeed(zero_stage: int, ds_config: dict, world: int, local_ranks: int) -> "Sharding":
        zo = ds_config.get("zero_optimization", {}) or {}
        device = (zo.get("offload_optimizer") or {}).get("device", "none")
        bucket = zo.get("reduce_bucket_size", "auto")  # "auto": accelerate fills it in later
        bucket = Sharding.bucket_elements if bucket == "auto" else int(float(bucket))
        return Sharding(int(zero_stage), max(1, world), str(device).lower() in ("cpu", "nvme"),
                        bucket, max(1, min(local_ranks, world)))

    def describe(self) -> str:
        return (f"DeepSpeed ZeRO-{self.stage} over {self.world} rank(s)"
                + (", AdamW state in host memory" if self.offload_optimizer else ""))


@dataclass
class Estimate:
    plan: Plan
    device: int  # predicted peak of allocated device bytes
    host: int  # host bytes the plan pins or needs beyond the process itself
    seconds: float  # predicted step time (used to rank plans)
    parts: dict = field(default_factory=dict)

    reserve: int = 0  # bytes the device's libraries take beside the tensors (CUDA: RESERVE_GIB)

    def needs(self) -> int:
        """Device bytes to set aside for this plan (prediction plus margins)."""
        return int(self.device * (1 + MARGIN) + self.reserve)


@dataclass
class Budget:
    device: int  # bytes the plan may use on the device
    host: int  # bytes of host RAM available
    source: str  # where the device figure comes from, for the report


@dataclass
class Rates:
    """What the step-time model needs of the device (FLOP/s, bytes/s)."""
    matmul: float = 4e11
    attention: float = 2.8e11
    copy: float = 2e10  # pinned host <-> device
    eager_overhead: float = 0.15  # extra time of an uncompiled block over a compiled one

    @staticmethod
    def measure(device) -> "Rates":
        """A quick measurement on a CUDA device (about a second); defaults elsewhere."""
        device = torch.device(device)
        if device.type != "cuda":
            return Rates(matmul=5e10, attention=3e10, copy=1e10, eager_overhead=0.0)
        a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
        host = torch.empty(64 * 2**20, dtype=torch.uint8, pin_memory=True)
        buf = torch.empty_like(host, device=device)
        q = torch.randn(1, 8, 4096, 128, device=device, dtype=torch.bfloat16)

        def timed(fn, reps):
            fn()
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1000 / reps

        from wan_model.attention import attention

        mm = 2 * 4096**3 / timed(lambda: a @ a, 10)
        att = 4 * 4096 * 4096 * 1024 / timed(lambda: attention(q, q, q), 10)
        cp = host.numel() / timed(lambda: buf.copy_(host, non_blocking=True), 5)
        return Rates(matmul=mm, attention=att, copy=cp)


@functools.lru_cache(maxsize=64)
def _traced(cfg, setup: StepSetup, kinds: tuple, device: str) -> StepTrace:
    """Traces are pure functions of their arguments: one per process serves every planner."""
    return trace_step(cfg, setup, list(kinds), device)


@functools.lru_cache(maxsize=16)
def _static_bytes(cfg, setup: StepSetup) -> dict:
    model = build_meta_model(cfg, setup, cfg.num_layers)

    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = [[p for p in b.parameters() if not p.requires_grad] + list(b.buffers()) for b in model.blocks]
    return {"total": nbytes(list(model.parameters()) + list(model.buffers())),
            "total_numel": sum(t.numel() for t in list(model.parameters()) + list(model.buffers())),
            "largest_block_numel": max(sum(p.numel() for p in b.parameters()) for b in model.blocks),
            "block_frozen": [nbytes(ts) for ts in frozen],
            # what a swapped block pins on the host: the pinned allocator rounds each tensor up
            # to a power of two (wan_model/block_swap.py, HostPool)
            "block_pinned": [sum(pinned_size(t.numel() * t.element_size()) for t in ts) for ts in frozen],
            "trained": nbytes(trained),
            "trained_numel": sum(p.numel() for p in trained),
            "largest_trained": max([p.numel() * p.element_size() for p in trained] or [0])}


def tokens_of(cfg, grid: tuple) -> int:
    f, h, w = grid
    pt, ph, pw = cfg.patch_size
    return (f // pt) * (h // ph) * (w // pw)


def rank_grid(cfg, grid: tuple, sp: int) -> tuple:
    """The latent grid a rank of a sequence-parallel group of `sp` plans for: its blocks hold
    1/sp of the tokens (rounded up; the grid cut along whichever axis rounds least), and Ulysses
    attention over 1/sp of the heads keeps as many bytes. The whole-sample parts (patch
    embedding, the gathered output and the loss) are small beside the blocks."""
    if sp <= 1:
        return tuple(grid)
    cuts = []
    for axis, patch in enumerate(cfg.patch_size):
        cut = list(grid)
        cut[axis] = -(-(grid[axis] // patch) // sp) * patch
        cuts.append(tuple(cut))
    return min(cuts, key=lambda g: tokens_of(cfg, g))


class Planner:
    """Estimates and chooses plans for one model, step setup and device."""

    def __init__(self, cfg, setup: StepSetup, device, optimizer: str = "adamw",
                 compiled: bool = False, ema: bool = False, grad_accum: int = 1,
                 rates: Rates | None = None, fixed: dict | None = None, sequence_parallel: int = 1,
                 sharding: Sharding | None = None):
        """`setup` is one rank's share of the step; with `sequence_parallel` N its grid holds 1/N
        of the sample's tokens (`rank_grid`), while its attention still sees all of them.
        `sharding`: DeepSpeed ZeRO's split of a full fine-tune's state (LoRA runs ignore it)."""
        self.cfg, self.setup, self.device = cfg, setup, torch.device(device)
        self.sp = max(1, sequence_parallel)
        self.n = cfg.num_layers
        self.optimizer, self.compiled, self.ema, self.grad_accum = optimizer, compiled, ema, grad_accum
        self.rates = rates or Rates()
        sh = sharding or Sharding()
        self.sharding = sh if sh.stage > 0 and setup.mode == "full" else Sharding()
        self.fixed = {k: v for k, v in (fixed or {}).items() if v is not None}
        # Offload and block swap move bytes from the device to the host: on a CPU they are one.
        self.host_levers = self.device.type != "cpu"

    # -- memory ---------------------------------------------------------------------------
    def _setup(self, plan: Plan) -> StepSetup:
        return replace(self.setup, checkpointing=plan.checkpointing, base_dtype=plan.base_dtype)

    def trace(self, plan: Plan, exact: bool = True) -> tuple[StepTrace, list[int]]:
        """The traced step for this plan: one block per run of the plan's own kinds (exact), or
        one block of every kind with the plan's counts (one trace serves every plan; a traced
        block the plan lacks still leaves a little behind, so this errs on the high side by a
        few percent)."""
        setup = self._setup(plan)
        kinds = (KINDS_SEGMENTS if plan.segments else KINDS) if plan.checkpointing else [BlockKind()]
        counts = plan.counts(self.n)
        if exact:
            kinds = [k for k, c in zip(kinds, counts) if c]
            counts = [c for c in counts if c]
        return _traced(self.cfg, setup, tuple(kinds), str(self.device)), counts

    def static(self, base_dtype: str) -> dict:
        """Bytes of the whole model (meta device) in this base dtype: everything, each block's
        frozen part, the trained parameters."""
        return _static_bytes(self.cfg, replace(self.setup, base_dtype=base_dtype))

    def estimate(self, plan: Plan, exact: bool = True) -> Estimate:
        st = self.static(plan.base_dtype)
        swapped = st["block_frozen"][self.n - plan.block_swap:] if plan.block_swap else []
        in_flight = 2 * max(swapped) if swapped else 0  # the block running and the one prefetched
        weights = st["total"] - sum(swapped) + in_flight
        state_per = OPTIMIZER_STATE_BYTES.get(self.optimizer, 8.0)
        optim = int(st["trained_numel"] * state_per) + (st["trained"] if self.ema else 0)
        grads_kept = st["trained"] if self.grad_accum > 1 else 0  # accumulated across micro-steps
        # the optimizer step: every gradient, plus the update's temporaries (fused AdamW on CUDA
        # none; the per-tensor updates elsewhere about two of the largest parameter)
        step_temp = 2 * st["largest_trained"]
        trace, counts = self.trace(plan, exact)
        # Blocks recomputed in segments run uncompiled: the eager transient.
        compiled = self.compiled and self.device.type == "cuda" and not plan.segmented(self.n)
        scale = COMPILED_TRANSIENT if compiled else 1.0
        # under ZeRO the gradients go into its buckets as they are made: none stays with its block
        kept = replace(trace, grads=[0] * len(trace.grads)) if self.sharding.stage else trace
        activations = kept.peak(counts, transient_scale=scale)
        if self.device.type == "cuda":
            L = tokens_of(self.cfg, self.setup.latent_grid) * self.setup.batch
            workspace = ATTENTION_WORKSPACE if compiled else ATTENTION_WORKSPACE_EAGER
            activations += int(workspace * L * self.cfg.dim * 4)
            # offloaded inputs come back one block early (copied under the backward of the
            # block after them): one block's inputs more, beside what the trace holds
            activations += max((h for c, h in zip(counts, trace.host_saved) if c), default=0)
        optim_step = st["trained"] + step_temp
        optim_host = 0
        if self.sharding.stage:
            # "optimizer" holds the gradient partitions too (DeepSpeed's 18 bytes per parameter
            # include the fp32 gradients its step uses: no step transient); "gradients" the buckets
            weights, grads_kept, optim, optim_host = self._zero_state(st)
            optim_step = 0
        device = weights + optim + grads_kept + max(activations, optim_step)
        pinned = sum(st["block_pinned"][self.n - plan.block_swap:]) if plan.block_swap else 0
        offloaded = trace.host_peak(counts)
        host = pinned + offloaded + optim_host
        if plan.block_swap:  # a swapped model is loaded to the host whole, then moved in part
            host = max(host, st["total"] + max(swapped))
        parts = {"weights": weights, "optimizer": optim, "activations": activations,
                 "swapped_on_host": pinned, "offloaded_on_host": offloaded}
        if self.sharding.stage:
            parts.update(gradients=grads_kept, optimizer_on_host=optim_host)
        reserve = int(RESERVE_GIB * GIB) if self.device.type == "cuda" else 0
        return Estimate(plan, int(device), int(host), self.seconds(plan), parts, reserve)

    def _zero_state(self, st: dict) -> tuple[int, int, int, int]:
        """(weights, reduce buckets, other model states, host bytes) of one rank under DeepSpeed
        ZeRO with bf16, from DeepSpeed's own estimators: bf16 weights (2 bytes per parameter;
        sharded at stage 3, plus the largest layer gathered), and 18 bytes per trained parameter
        of bf16 and fp32 gradients, fp32 master weights and AdamW moments, sharded (2 with the
        optimizer offloaded); on the host, the offloaded optimizer with DeepSpeed's buffer factor
        (0 when it stays on the GPUs). The frozen weights add their bf16 bytes."""
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        sh, n_t, n_all = self.sharding, st["trained_numel"], st["total_numel"]
        local, nodes = sh.local_ranks, max(1, sh.world // sh.local_ranks)
        largest = st["largest_block_numel"]
        if sh.stage >= 3:
            host, states, gathered = estimate_zero3_model_states_mem_needs(
                n_t, largest, num_gpus_per_node=local, num_nodes=nodes, cpu_offload=sh.offload_optimizer,
                cpu_offload_params=False, zero_init=False)
            weights = 2 * n_all // sh.world + gathered
        else:
            host, states = estimate_zero2_model_states_mem_needs(
                n_t, num_gpus_per_node=local, num_nodes=nodes, cpu_offload=sh.offload_optimizer)
            weights = 2 * n_all
        buckets = min(2 * 2 * sh.bucket_elements, 4 * n_t)  # the bf16 reduce bucket, double-buffered
        optim = states - (weights - 2 * (n_all - n_t) // (sh.world if sh.stage >= 3 else 1))
        return int(weights), int(buckets), int(optim), int(host) if sh.offload_optimizer else 0

    # -- time -----------------------------------------------------------------------------
    def seconds(self, plan: Plan) -> float:
        """Predicted step time; what matters is the order it puts plans in."""
        cfg, setup, r = self.cfg, self.setup, self.rates
        L = tokens_of(cfg, setup.latent_grid) * setup.batch
        d, f = cfg.dim, cfg.ffn_dim
        ctx = cfg.text_len + (cfg.clip_tokens if cfg.is_i2v else 0)
        linear = 2 * L * (6 * d * d + 2 * d * f) + 2 * ctx * 2 * d * d  # per block, forward
        # Ulysses: a rank attends with 1/N of the heads over the whole sequence, i.e. its
        # L tokens' share of all L * N keys
        self_attn = 4 * L * (L * self.sp) * d
        attn = self_attn + 4 * L * ctx * d
        fwd = linear / r.matmul + attn / r.attention
        bwd = (1 if setup.mode == "lora" else 2) * linear / r.matmul + 2 * attn / r.attention
        t_block = fwd + bwd
        x_bytes = L * d * 4  # a checkpointed input: the float32 residual stream
        st = self.static(plan.base_dtype)
        total = 0.0
        for i in range(self.n):
            t = t_block
            if plan.checkpointing:
                t += linear / r.matmul + (attn - (self_attn if i < plan.keep_attention else 0)) / r.attention
                if i < plan.offload:
                    t += max(0.0, x_bytes / r.copy - bwd) + OFFLOAD_RESIDUAL * x_bytes / r.copy
            segmented = i >= self.n - plan.segmented(self.n)  # the blocks keeping no attention
            if segmented:  # the attention segments recomputed once more (torch keeps the FFN
                # segment's activations from the block's recompute: its backward comes first)
                t += fwd - 2 * L * 2 * d * f / r.matmul
            swapped = i >= self.n - plan.block_swap
            if swapped:  # fetched before the forward and again for the backward
                passes = 2 if plan.checkpointing else 1
                t += passes * max(0.0, st["block_frozen"][i] / r.copy - fwd) + 0.02 * st["block_frozen"][i] / r.copy
            if self.device.type == "cuda" and not (self.compiled and not segmented):
                t *= 1 + r.eager_overhead
            if plan.base_dtype == "fp8":
                t += 0.02 * linear / r.matmul * (3 if plan.checkpointing else 2)
            total += t
        return total

    # -- choice ---------------------------------------------------------------------------
    def candidates(self) -> list[Plan]:
        """Every plan the recipe leaves open (explicit settings fixed), as a coarse grid."""
        fx, n = self.fixed, self.n
        swappable = self.setup.mode == "lora" and self.host_levers
        grid = sorted(set(range(0, n + 1, max(1, n // 10))) | {n})
        host_grid = grid if self.host_levers else [0]
        bases = [fx["base_dtype"]] if "base_dtype" in fx else (
            ["bf16", "fp8"] if self.setup.mode == "lora" and self.setup.base_dtype != "fp32" else [self.setup.base_dtype])
        ckpts = [fx["checkpointing"]] if "checkpointing" in fx else [False, True]
        out = []
        for base in bases:
            for ck in ckpts:
                keeps = [fx["keep_attention"]] if "keep_attention" in fx else (grid if ck else [0])
                offs = [fx["offload"]] if "offload" in fx else (host_grid if ck else [0])
                swaps = [fx["block_swap"]] if "block_swap" in fx else (host_grid if (ck and swappable) else [0])
                segs = [fx["segments"]] if "segments" in fx else ([False, True] if ck else [False])
                for seg in segs:
                    for s in swaps:
                        for o in offs:
                            for k in keeps:
                                if seg and k >= n:
                                    continue  # no block recomputes everything: nothing to segment
                                out.append(Plan(ck, min(k, n), min(o, n), min(s, n), base, bool(seg and ck)))
        return out

    def choose(self, budget: Budget, exact_checks: int = 6) -> "Choice":
        """The fastest plan whose exact prediction fits. Every candidate is first estimated from
        one trace of all block kinds (high by a few percent); the fastest few that fit or nearly
        fit are then traced exactly."""
        rough, rejected_host = [], []
        for plan in self.candidates():
            est = self.estimate(plan, exact=False)
            if est.host > budget.host and est.needs() <= budget.device:
                rejected_host.append(est)
            elif est.needs() <= budget.device * 1.1:
                rough.append(est)
        rough.sort(key=self._rank)
        fits = []
        for est in rough:
            if len(fits) >= 1 and self._rank(est) > self._rank(fits[0]):
                break  # already slower than a plan known to fit
            if exact_checks <= 0:
                break
            exact_checks -= 1
            est = self.estimate(est.plan)
            if est.needs() <= budget.device and est.host <= budget.host:
                fits.append(est)
                fits.sort(key=self._rank)
        if not fits:  # fall back on the rough candidates in rank order, checked exactly
            for e in rough:  # (the rough estimate errs high: near the limit it may not fit)
                if e.host <= budget.host:
                    exact = self.estimate(e.plan)
                    if exact.needs() <= budget.device and exact.host <= budget.host:
                        fits = [exact]
                        break
        if not fits:
            frugal = min((self.estimate(p, exact=False) for p in self.candidates()), key=lambda e: e.needs())
            return Choice(None, budget, frugal, rejected_host, self.n)
        return Choice(fits[0], budget, None, rejected_host, self.n)

    def _rank(self, e: Estimate) -> tuple:
        fp8 = e.plan.base_dtype == "fp8" and "base_dtype" not in self.fixed
        # segments are the last resort: any plan without them ranks first (measured on an H200:
        # the 14B at 16 GiB 19.1 s/step with segments, 15.7 s at 24 GiB without)
        last = e.plan.segments and "segments" not in self.fixed
        return (last, e.seconds * (1 + FP8_PREFERENCE if fp8 else 1), e.device)


@dataclass
class Choice:
    best: Estimate | None
    budget: Budget
    frugal: Estimate | None  # the least memory any plan needs, when none fits
    rejected_host: list
    n: int

    def report(self) -> str:
        b = self.budget
        if self.best is None:
            text = (f"memory: no plan fits {b.device / GIB:.2f} GiB ({b.source}); the most frugal "
                    f"({self.frugal.plan.describe(self.n)}) needs {self.frugal.needs() / GIB:.2f} GiB")
            if self.rejected_host:
                least = min(e.host for e in self.rejected_host)
                text += (f"; {len(self.rejected_host)} plans that fit the device need more host RAM "
                         f"(at least {least / GIB:.1f} GiB) than the {b.host / GIB:.1f} GiB available")
            return text
        e = self.best
        lines = [f"memory plan for {b.device / GIB:.1f} GiB ({b.source}): {e.plan.describe(self.n)}",
                 f"  predicted peak {e.device / GIB:.2f} GiB (weights {e.parts['weights'] / GIB:.2f}, "
                 f"optimizer {e.parts['optimizer'] / GIB:.2f}, activations {e.parts['activations'] / GIB:.2f}); "
                 f"host memory for swap/offload {e.host / GIB:.1f} GiB"]
        if self.rejected_host:
            fastest = min(self.rejected_host, key=lambda x: x.seconds)
            if fastest.seconds < e.seconds:
                lines.append(f"  not chosen: {fastest.plan.describe(self.n)} (faster) needs "
                             f"{fastest.host / GIB:.1f} GiB of host RAM, {b.host / GIB:.1f} GiB available")
        return "\n".join(lines)


def device_budget(device, memory_gib: float = 0.0) -> Budget:
    """The device bytes a run may use: `memory_gib` when set, else what the card has free."""
    host = max(0, host_available() - int(HOST_RESERVE_GIB * GIB))
    device = torch.device(device)
    if memory_gib and memory_gib > 0:
        return Budget(int(memory_gib * GIB), host, f"train.memory_gib={memory_gib:g}")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return Budget(int(free), host, f"free on {name}, {total / GIB:.0f} GiB in all")
    return Budget(host, host, "host RAM (training on the CPU)")


def host_available() -> int:
    """MemAvailable of the host (what can be allocated without swapping), in bytes."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # pragma: no cover - other systems

    return int(psutil.virtual_memory().available)


def largest_grid(buckets, batch: int = 1) -> tuple[tuple, int]:
    """(latent grid, batch) of the sample with the most tokens among `buckets` (width, height,
    frames); a batch holds samples of one bucket."""
    best = max(buckets, key=lambda b: math.prod(latent_grid(b.width, b.height, b.frames)))
    return latent_grid(best.width, best.height, best.frames), batch


# ---- the recipe's side ----------------------------------------------------------------------

def fixed_levers(t, n: int) -> dict:
    """The levers a recipe sets itself (they always win), as Plan fields."""
    fixed = {}
    if t.gradient_checkpointing is not None:
        fixed["checkpointing"] = t.gradient_checkpointing
    if t.checkpoint_mode == "full":
        fixed["keep_attention"] = 0
    elif t.selective_blocks is not None:
        fixed["keep_attention"] = n if t.selective_blocks < 0 else t.selective_blocks
    if t.checkpoint_offload is not None:
        fixed["offload"] = n if t.checkpoint_offload < 0 else t.checkpoint_offload
    if t.block_swap is not None:
        fixed["block_swap"] = t.block_swap
    if t.checkpoint_segments is not None:
        fixed["segments"] = bool(t.checkpoint_segments)
    if t.mode == "full":
        fixed["base_dtype"] = "fp32"
    elif t.base_dtype is not None:
        fixed["base_dtype"] = t.base_dtype
    return fixed


def default_plan(t, n: int) -> Plan:
    """`train.memory: off`: the recipe's levers, and the fast defaults where it leaves them null."""
    f = fixed_levers(t, n)
    keep = f.get("keep_attention", n)
    return Plan(checkpointing=f.get("checkpointing", True), keep_attention=keep,
                offload=f.get("offload", 0), block_swap=f.get("block_swap", 0),
                base_dtype=f.get("base_dtype", "bf16"), segments=f.get("segments", False))


def apply_plan(recipe, plan: Plan, n: int):
    """A copy of the recipe with every memory lever set to the plan's value."""
    out = copy.deepcopy(recipe)
    t = out.train
    t.gradient_checkpointing = plan.checkpointing
    t.checkpoint_mode = "selective" if plan.keep_attention > 0 else "full"
    t.selective_blocks = -1 if plan.keep_attention >= n else plan.keep_attention
    t.checkpoint_offload = -1 if (plan.offload >= n and plan.offload > 0) else plan.offload
    t.block_swap = plan.block_swap
    t.checkpoint_segments = plan.segments and plan.checkpointing
    if t.mode == "lora":
        t.base_dtype = plan.base_dtype
    return out


def step_setup(recipe, grid: tuple, batch: int) -> StepSetup:
    t = recipe.train
    return StepSetup(mode=t.mode, base_dtype="fp32" if t.mode == "full" else (t.base_dtype or "bf16"),
                     autocast=t.mixed_precision == "bf16", lora_rank=recipe.lora.rank,
                     lora_targets=tuple(recipe.lora.targets), use_dora=recipe.lora.use_dora,
                     full_parts=tuple(recipe.full.parts), batch=batch, latent_grid=tuple(grid))


def planner_for(recipe, cfg, grid: tuple, batch: int, device, rates: Rates | None = None,
                sharding: Sharding | None = None) -> Planner:
    t = recipe.train
    return Planner(cfg, step_setup(recipe, grid, batch), device, optimizer=t.optim.name,
                   compiled=t.compile, ema=t.mode == "full" and recipe.full.ema,
                   grad_accum=t.grad_accum, rates=rates, fixed=fixed_levers(t, cfg.num_layers),
                   sequence_parallel=t.sequence_parallel, sharding=sharding)


class NoPlanFits(RuntimeError):
    """No memory plan fits: the message says the smallest requirement and what would fit."""


def plan_recipe(recipe, cfg, grid: tuple, batch: int, device, log=print, sharding: Sharding | None = None):
    """(recipe with every memory lever set, the chosen Estimate) for this card and this rank's
    share under DeepSpeed ZeRO (`sharding`); raises NoPlanFits, before anything is loaded, when
    nothing fits."""
    n = cfg.num_layers
    t = recipe.train
    if t.memory == "off":
        plan = default_plan(t, n)
        return apply_plan(recipe, plan, n), None
    device = torch.device(device)
    budget = device_budget(device, t.memory_gib)
    sp = recipe.train.sequence_parallel
    planner = planner_for(recipe, cfg, rank_grid(cfg, grid, sp), batch, device,
                          rates=Rates.measure(device) if device.type == "cuda" else None, sharding=sharding)
    choice = planner.choose(budget)
    if choice.best is None:
        raise NoPlanFits(advice(recipe, cfg, grid, batch, choice, planner))
    log(choice.report())
    if planner.sharding.stage:
        e = choice.best
        log(f"  (planned per rank: {planner.sharding.describe()}; gradients {e.parts['gradients'] / GIB:.2f} GiB"
            + (f", {e.parts['optimizer_on_host'] / GIB:.1f} GiB of host memory for the optimizer on this machine"
               if planner.sharding.offload_optimizer else "") + ")")
    if sp > 1:
        log(f"  (planned per rank: sequence parallel {sp}, "
            f"{tokens_of(cfg, planner.setup.latent_grid):,} of {tokens_of(cfg, grid):,} tokens)")
    r = planner.rates
    log(f"  (step-time model {choice.best.seconds:.2f} s at matmul {r.matmul / 1e12:.0f} TFLOP/s, "
        f"attention {r.attention / 1e12:.0f} TFLOP/s, host copies {r.copy / 1e9:.0f} GB/s)")
    return apply_plan(recipe, choice.best.plan, n), choice.best


def advice(recipe, cfg, grid: tuple, batch: int, choice: Choice, planner: Planner | None = None) -> str:
    """Why nothing fits and the recipe changes that would (`planner`: the one that chose, for
    the per-rank arithmetic of a sharded full fine-tune)."""
    need, have = choice.frugal.needs(), choice.budget.device
    if choice.rejected_host and need <= have:  # the device has room: host RAM is what is short
        least = min(e.host for e in choice.rejected_host)
        if planner is not None and planner.sharding.offload_optimizer:
            lines = [f"no memory plan fits: with the optimizer state in host memory the GPUs have room "
                     f"({have / GIB:.1f} GiB, {choice.budget.source}), but DeepSpeed's own estimate of "
                     f"the host memory this needs is {least / GIB:.1f} GiB on this machine and "
                     f"{choice.budget.host / GIB:.1f} GiB is available. What would fit:",
                     "  - a machine with more RAM"]
            lines.extend(_zero3_advice(choice, planner, offloads=(False,)))
            lines.append("  - fewer trained blocks (full.parts) or LoRA (train.mode=lora)")
            return "\n".join(lines)
        return (f"no memory plan fits: {len(choice.rejected_host)} plans fit the device's "
                f"{have / GIB:.1f} GiB ({choice.budget.source}) for {_geometry(grid, batch)}, but each "
                f"pins at least {least / GIB:.1f} GiB of host RAM (swapped weights, offloaded "
                f"checkpoints) and {choice.budget.host / GIB:.1f} GiB is available "
                f"({HOST_RESERVE_GIB:g} GiB left to the process). What would fit:\n"
                "  - free host memory (other processes) or a machine with more RAM\n"
                "  - fewer frames or a smaller area (data.frame_buckets, data.areas): fewer "
                "offloaded bytes\n"
                "  - a card with more memory: fewer blocks swapped")
    lines = [f"no memory plan fits: the most frugal plan ({choice.frugal.plan.describe(cfg.num_layers)}) "
             f"needs {need / GIB:.1f} GiB for {_geometry(grid, batch)}; the budget is "
             f"{have / GIB:.1f} GiB ({choice.budget.source}). What would fit:"]
    parts = choice.frugal.parts
    act = parts["activations"]
    static = need - act * (1 + MARGIN)
    if act > 0 and static < have:  # activations scale with tokens: the largest share that fits
        share = (have - static) / (1 + MARGIN) / act
        f, h, w = grid
        frames = max(1, int((f - 1) * share)) * 4 + 1 if f > 1 else 1
        lines.append(f"  - fewer frames: at most about {frames} frames at this size "
                     f"(data.frame_buckets), or about {share:.0%} of the pixel area (data.areas)")
    if recipe.train.mode == "full":
        lines.append("  - LoRA instead of a full fine-tune (train.mode=lora)")
        lines.extend(_zero3_advice(choice, planner or planner_for(recipe, cfg, grid, batch, "cpu")))
    elif "base_dtype" in fixed_levers(recipe.train, cfg.num_layers) and recipe.train.base_dtype != "fp8":
        lines.append("  - train.base_dtype: null (or fp8) lets the frozen base be stored in fp8")
    lines.append("  - or a card with more free memory (close other programs using it)")
    return "\n".join(lines)


def _zero3_advice(choice: Choice, planner: Planner, offloads=(False, True)) -> list[str]:
    """The fewest GPUs of this card on which ZeRO-3 would fit the most frugal plan, with the
    optimizer state on the GPUs and in host memory (same per-rank accounting as the plan)."""
    out = []
    for offload in offloads:
        config = "zero3_offload.yaml" if offload else "zero3.yaml"
        zero = copy.copy(planner)
        for gpus in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64):
            zero.sharding = Sharding(3, gpus, offload, planner.sharding.bucket_elements, min(gpus, 8))
            e = zero.estimate(choice.frugal.plan, exact=False)
            if e.needs() <= choice.budget.device:
                ram = (f" and about {e.parts['optimizer_on_host'] / GIB:.0f} GiB of host RAM per machine of "
                       f"{min(gpus, 8)} GPUs for the optimizer state" if offload else "")
                out.append(f"  - the full fine-tune sharded over {gpus} or more such GPUs with DeepSpeed ZeRO-3{ram} "
                           f"(accelerate launch --config_file recipes/accelerate/{config} ...)")
                break
    return out


def _geometry(grid: tuple, batch: int) -> str:
    f, h, w = grid
    return f"{batch} x {(f - 1) * 4 + 1} frames at {w * 8}x{h * 8}"


class OutOfDeviceMemory(RuntimeError):
    """The device ran out of memory during training despite the plan."""

    @classmethod
    def explain(cls, recipe, estimate: Estimate | None, error: Exception) -> "OutOfDeviceMemory":
        t = recipe.train
        lines = [f"out of GPU memory during training ({str(error).splitlines()[0][:200]})"]
        if estimate is not None:
            lines.append(f"the memory plan predicted a peak of {estimate.device / GIB:.2f} GiB; other "
                         "programs may have taken memory since, or this step needs more than predicted")
            lines.append(f"  - plan for less: train.memory_gib={max(1.0, estimate.needs() / GIB - 2):.0f} "
                         "(the planner then saves more with checkpointing, offload and block swap)")
        else:
            lines.append("  - let the planner choose the memory levers: train.memory=auto and the "
                         "levers (gradient_checkpointing, checkpoint_offload, block_swap, base_dtype) null")
        lines.append("  - or train fewer frames or a smaller area (data.frame_buckets, data.areas)")
        if t.mode == "full":
            lines.append("  - or LoRA (train.mode=lora), or several GPUs with DeepSpeed ZeRO-3")
        lines.append("the last complete step-N/ checkpoint is intact: resume with checkpoint.resume=latest")
        return cls("\n".join(lines))
