"""Exact tensor memory of a training step, counted on fake tensors at the real size.

The memory planner (`train/memory.py`) needs the peak of a step for settings it has not run.
Instead of a hand formula for every activation, the real code runs here under torch's
`FakeTensorMode` on the target device: every op computes shapes and dtypes only, so a step of
the 14B model at 81 frames costs seconds of host time and no device memory. `LiveBytes`, a
dispatch mode, counts the bytes of each tensor storage from its creation to its release, per
device, so what the step holds at every moment is known exactly for this code path (eager
kernels; compiled blocks are corrected by a measured factor in the planner).

A DiT has many identical blocks. A plan's blocks fall into at most a few kinds (keeps its
self-attention output or not, its checkpointed inputs on the host or not), always in runs, so
the step is traced with ONE block per run and the others are added back by arithmetic: every
extra block of a run adds what one block of that run leaves behind after its forward (`saved`)
for as long as the run is alive, and its gradients once its backward is done. The trace records
the most bytes seen at each "depth" (the number of blocks forwarded and not yet backwarded),
which is what that arithmetic needs (`StepTrace.peak`).
"""
from __future__ import annotations

import contextlib
import re
import weakref
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from wan_model.checkpointing import storage_key


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created while active and still alive, per device type.

    Storages that existed before are not counted (weights, optimizer state, inputs: the caller
    accounts for them), nor are views and in-place results of them. Works on real and fake
    tensors alike (a fake storage has the real size)."""

    def __init__(self, on_alloc=None):
        super().__init__()
        self.live: dict[int, tuple[str, int]] = {}
        self.current: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.ignored: set[int] = set()
        self.on_alloc = on_alloc  # called with the device type after every new storage

    def ignore(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.ignored.add(storage_key(t))

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live or key in self.ignored:
            return
        dev, n = t.device.type, st.nbytes()
        self.live[key] = (dev, n)
        self.current[dev] = self.current.get(dev, 0) + n
        self.peak[dev] = max(self.peak.get(dev, 0), self.current[dev])
        weakref.finalize(st, self._free, key)
        if self.on_alloc is not None:
            self.on_alloc(dev)

    def _free(self, key: int) -> None:
        dev, n = self.live.pop(key, ("", 0))
        if dev:
            self.current[dev] -= n

    def now(self, device_type: str) -> int:
        return self.current.get(device_type, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output sharing an input's storage (a view, an in-place update such as an
        # optimizer's) allocated nothing: only storages no input holds are new.
        inputs = {storage_key(t) for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and storage_key(t) not in inputs:
                self._track(t)
        return out


@dataclass(frozen=True)
class BlockKind:
    """How one DiT block is checkpointed in a plan."""
    keep_attention: bool = False  # selective checkpointing: the self-attention output is kept
    offload: bool = False  # its checkpointed inputs live in host memory
    segments: bool = False  # recomputing everything, it does so a segment at a time


@dataclass(frozen=True)
class StepSetup:
    """Everything about a training step that changes its memory, except the block kinds."""
    mode: str = "lora"  # lora | full
    base_dtype: str = "bf16"  # fp32 | bf16 | fp8 (LoRA) ; full fine-tuning keeps fp32 weights
    autocast: bool = True  # bf16 autocast (mixed_precision bf16)
    checkpointing: bool = True
    lora_rank: int = 32
    lora_targets: tuple = ()
    use_dora: bool = False
    full_parts: tuple = (".*",)
    batch: int = 1
    latent_grid: tuple = (21, 60, 104)  # latent frames, height, width (before patching)


@dataclass
class StepTrace:
    """What one traced step held on the device, per depth, plus the per-block facts."""
    fwd_max: list  # fwd_max[d]: most device bytes seen in the forward while block d-1 runs
    #                (0: before the blocks; n + 1: after them, the head and the loss)
    bwd_max: list  # the same in the backward (0: after it, every gradient present)
    saved: list  # saved[k]: device bytes block k leaves behind after its forward
    held: list  # held[k]: what of that it still holds when the backward starts
    grads: list  # grads[k]: bytes of the gradients of block k's trained parameters
    host_saved: list  # host bytes block k leaves behind (offloaded checkpoints)

    def peak(self, counts: list[int], transient_scale: float = 1.0) -> int:
        """The step's peak device bytes (beyond weights and optimizer state) when traced block
        k stands for counts[k] identical blocks (0: the plan has no block of that kind). `transient_scale` scales what is not kept by
        earlier blocks (compiled blocks recompute with fewer intermediates than eager ones).

        While a run of c blocks is in backward, j of its blocks are done (their gradients
        exist) and c-1-j still hold what they saved: the worst j gives (c-1)*max(saved, grads).
        Runs before it in the forward are all alive, runs after it all done."""
        best = 0
        for backward, row in ((False, self.fwd_max), (True, self.bwd_max)):
            keep = self.held if backward else self.saved
            for d, seen in enumerate(row):
                if seen < 0 or (0 < d <= len(counts) and counts[d - 1] == 0):
                    continue  # the moments of a traced block the plan does not have
                kept = sum(keep[: max(d - 1, 0)])
                extra = 0
                for k, c in enumerate(counts):
                    if k < d - 1 or (k == d - 1 and not backward):
                        extra += (c - 1) * keep[k]
                    elif k == d - 1:
                        extra += (c - 1) * max(keep[k], self.grads[k])
                    elif backward:
                        extra += (c - 1) * self.grads[k]
                best = max(best, kept + transient_scale * (seen - kept) + extra)
        return int(best)

    def host_peak(self, counts: list[int]) -> int:
        return sum(c * h for c, h in zip(counts, self.host_saved))


def fakify_(module: nn.Module, mode, device) -> None:
    """Replace every parameter and buffer of a meta module by a fake tensor on `device`."""
    with mode:
        for m in module.modules():
            for name, p in list(m._parameters.items()):
                if p is not None:
                    fake = torch.empty(p.shape, dtype=p.dtype, device=device)
                    m._parameters[name] = nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(m._buffers.items()):
                if b is not None:
                    m._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def build_meta_model(cfg, setup: StepSetup, num_layers: int):
    """The DiT with `num_layers` blocks on the meta device, in the trainer's dtypes, with LoRA
    (or the full fine-tune's trained parts) applied as `train.adapters` applies them."""
    from wan_model.transformer import meta_model

    from .adapters import add_lora, select_full
    from .config import FullConfig, LoraConfig

    base = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}[setup.base_dtype]
    if setup.mode == "full" or not setup.autocast:
        base = torch.float32 if setup.mode == "full" else base
    model = meta_model(replace(cfg, num_layers=num_layers), base)
    model.requires_grad_(False)
    if setup.mode == "lora" and setup.base_dtype == "fp8":
        from wan_model.fp8 import quantize_linears_

        quantize_linears_(model)
    if setup.mode == "lora":
        targets = list(setup.lora_targets) or LoraConfig().targets
        add_lora(model, LoraConfig(rank=setup.lora_rank, alpha=float(setup.lora_rank),
                                   targets=targets, use_dora=setup.use_dora))
    elif num_layers == cfg.num_layers:
        select_full(model, FullConfig(parts=list(setup.full_parts)))
    else:  # a traced window of blocks: parts naming blocks by index may miss it, so every block
        # in it trains (the most a block's backward can hold); the trained bytes are counted on
        # the whole model
        rxs = [re.compile(x) for x in setup.full_parts]
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("blocks.") or any(rx.search(name) for rx in rxs))
    return model


def trace_step(cfg, setup: StepSetup, kinds: list[BlockKind], device) -> StepTrace:
    """Run one forward + backward of a DiT whose blocks are `kinds`, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .objective import flow_loss

    device = torch.device(device)
    model = build_meta_model(cfg, setup, len(kinds))
    fake = FakeTensorMode()
    fakify_(model, fake, device)
    model.gradient_checkpointing = setup.checkpointing
    model.checkpoint_mode = "selective" if any(k.keep_attention for k in kinds) else "full"
    # each traced block is of its own kind (the model's counts would make them prefixes)
    model.keeps_attention = lambda i: kinds[i].keep_attention
    model.offloads = lambda i: kinds[i].offload
    model.segmented = lambda i: kinds[i].segments
    model.train()

    dev = device.type
    n = len(kinds)
    # depth = blocks forwarded and not yet backwarded; the forward and backward phases are kept
    # apart because the blocks after the current one have gradients only in the backward.
    depth, phase = [0], [0]
    depth_max = [[-1] * (n + 2), [-1] * (n + 2)]  # n + 1: after the last block (head, loss)
    acct = LiveBytes(on_alloc=lambda d: _record(d))
    saved, host_saved = [0] * n, [0] * n
    created: dict[int, set] = {}  # storages each block's forward made

    def _record(d):
        if d == dev:
            row = depth_max[phase[0]]
            row[depth[0]] = max(row[depth[0]], acct.now(dev))

    # A block's module hooks fire in the forward pass only (a checkpoint's recompute calls the
    # block's inner function). A block's share is what the step holds more when the next block
    # (or the head) starts than when it started: by then the model has let go of the block's
    # input, which matters when a checkpoint keeps that input in host memory. In backward, the
    # gradient of block k's output arriving marks the start of its backward, and the last of
    # its trained parameters' gradients its end.
    marks: dict[int, tuple] = {}

    def mark(k, x):
        # block k owns its input (a checkpoint keeps it, or offloads it), not its output
        x_key = storage_key(x)
        marks[k] = (acct.now(dev), acct.now("cpu"), set(acct.live), x_key)
        if k > 0:
            b_dev, b_cpu, b_live, b_key = marks[k - 1]
            saved[k - 1] = marks[k][0] - b_dev
            host_saved[k - 1] = (marks[k][1] - b_cpu) if dev != "cpu" else 0
            created[k - 1] = (marks[k][2] - b_live - {x_key}) | {b_key}
        depth[0] = k + 1

    def pre_hook(k):
        def hook(module, args):
            mark(k, args[0])
        return hook

    def post_hook(k):
        def hook(module, args, out):
            if out.requires_grad:
                out.register_hook(lambda g, k=k: depth.__setitem__(0, k + 1))
        return hook

    def grad_hook(k, waiting):
        def hook(p):
            waiting.discard(id(p))
            if not waiting:
                depth[0] = k
        return hook

    handles = [model.head.register_forward_pre_hook(lambda module, args: mark(n, args[0]))]
    for k, block in enumerate(model.blocks):
        handles.append(block.register_forward_pre_hook(pre_hook(k)))
        handles.append(block.register_forward_hook(post_hook(k)))
        trained = [p for p in block.parameters() if p.requires_grad]
        waiting = {id(p) for p in trained}
        for p in trained:
            handles.append(p.register_post_accumulate_grad_hook(grad_hook(k, waiting)))
    b, (f, h, w) = setup.batch, setup.latent_grid
    with fake:
        latents = torch.empty(b, cfg.out_dim, f, h, w, device=device)
        noise = torch.empty_like(latents)
        s = torch.full((b,), 0.5, device=device)
        context = torch.empty(b, cfg.text_len, cfg.text_dim, device=device, dtype=torch.bfloat16)
        extra = {}
        if cfg.is_i2v:
            extra = {"clip_fea": torch.empty(b, cfg.clip_tokens, cfg.clip_dim, device=device),
                     "y": torch.empty(b, cfg.in_dim - cfg.out_dim, f, h, w, device=device)}
        with acct:
            x_s = (1 - s.view(-1, 1, 1, 1, 1)) * latents + s.view(-1, 1, 1, 1, 1) * noise
            target = noise - latents
            autocast = (torch.autocast(dev, dtype=torch.bfloat16) if setup.autocast
                        else contextlib.nullcontext())
            with autocast:
                pred = model(x_s, s * 1000.0, context, **extra)
            # What each block still holds once the forward is over (autocast's copies of the
            # trained weights are gone): the loss and the backward are counted with this.
            held = [sum(acct.live[key][1] for key in created[k] if key in acct.live and acct.live[key][0] == dev)
                    for k in range(n)]
            phase[0] = 1
            loss = flow_loss(pred, target, s, "none")
            del pred, x_s, target
            loss.backward()
            depth[0] = 0
            _record(dev)
    for hd in handles:
        hd.remove()
    grads = [sum(p.numel() * p.element_size() for p in blk.parameters() if p.requires_grad)
             for blk in model.blocks]
    return StepTrace(fwd_max=depth_max[0], bwd_max=depth_max[1], saved=saved, held=held,
                     grads=grads, host_saved=host_saved)
