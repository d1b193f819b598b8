"""Block swap: the frozen weights of the last N transformer blocks live in pinned host memory and
are streamed to the GPU just before each block runs, on a side CUDA stream, while the previous
block computes.

For cards too small for the model. With activation checkpointing (the intended use) a swapped
block's weights are needed three times per step: forward, the recompute in backward, and the
backward itself. Each call of a swapped block installs freshly copied device tensors into the
block (new Parameter objects; the host copies are never touched), so autograd keeps exactly the
copies it saved and frees them when it is done with them; nothing else keeps them alive. Without
checkpointing autograd saves every block's weights for backward, so swapping then saves no
memory (it still gives the same numbers).

Trainable parameters (LoRA adapters, or a full fine-tune) stay on the device: the optimizer and
the gradients must find them there. Only frozen parameters and buffers are swapped.

Prefetch order follows the pass: forward runs blocks 0..L-1, the checkpointed backward recomputes
L-1..0, so while block i runs the next swapped block in the current direction is copied. The
swapped blocks are the last N, so the turn from forward to backward reuses the copy of block L-1.

Compiled blocks: the Wan DiT calls each block through `BlockSwap.running` (outside the compiled
region), which installs the weights for the call and hands the model a saved-tensor packer: a
compiled block's activation checkpoint is inside its graph, so the graph saves the weights it
needs for its backward, and the packer keeps them as a reference to the block, fetched again when
the backward unpacks them. The wrappers below then stand aside (they are traced through), so a
swapped block runs compiled, with its weights fetched twice per step (forward, backward).

On a CPU device the same code path runs with plain copies and no streams (tests use it).

The umT5 text encoder streams all its blocks the same way (forward only, `host_modules` keeps
its 2 GB embedding table on the host, where it is only gathered from).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .checkpointing import storage_key

try:  # the hooks' copies must stay invisible to selective checkpointing's dispatch modes, which
    # require the recompute to replay exactly the forward's ops (a cached copy would not)
    from torch.utils._python_dispatch import _disable_current_modes
except ImportError:  # pragma: no cover - older torch
    _disable_current_modes = contextlib.nullcontext


@dataclass
class _Entry:
    module: nn.Module
    name: str
    is_param: bool
    host: torch.Tensor


class HostPool:
    """Where the host copies of swapped weights live (pinned for CUDA).

    torch's pinned allocator rounds every request up to a power of two, so weights pinned one
    by one hold up to twice their size (an 84 MB umT5 FFN weight takes 128 MB, a 142 MB 14B
    one 256 MB); `bytes()` counts that. `packed` instead fills a few buffers of one power-of-two
    size first-fit, losing only their unused tails; the copies then share storage, so it is for
    weights that are never saved from the model (the streamed text encoder)."""

    ARENA = 256 * 2**20
    ALIGN = 512  # bytes: every packed copy starts aligned for any dtype and for fast DMA

    def __init__(self, total: int, pinned: bool, packed: bool = False):
        self.pinned, self.packed = pinned, packed
        # tiny models (tests) get one small buffer, not a quarter of a gigabyte
        self.arena = min(self.ARENA, pinned_size(total))
        self.buffers: list[list] = []  # packed: [uint8 tensor, bytes used]
        self.single = 0  # bytes held by copies made one by one

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        nbytes = t.numel() * t.element_size()
        if not self.packed:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned)
            self.single += pinned_size(nbytes) if self.pinned else nbytes
        else:
            need = -(-nbytes // self.ALIGN) * self.ALIGN
            slot = next((b for b in self.buffers if b[1] + need <= b[0].numel()), None)
            if slot is None:  # a tensor larger than the arena gets a buffer of its own size
                slot = [torch.empty(max(self.arena, pinned_size(need)), dtype=torch.uint8,
                                    pin_memory=self.pinned), 0]
                self.buffers.append(slot)
            start, slot[1] = slot[1], slot[1] + need
            host = slot[0][start:start + nbytes].view(t.dtype).view(t.shape)
        host.copy_(t.detach())
        return host

    def bytes(self) -> int:
        return self.single + sum(b[0].numel() for b in self.buffers)


def pinned_size(n: int) -> int:
    """Bytes torch's pinned allocator takes for a request of `n` bytes: the next power of two."""
    return 1 << max(n - 1, 1).bit_length()


class BlockSwap:
    def __init__(self, model: nn.Module, n_blocks: int, device, prefetch: bool = True,
                 host_modules: tuple[str, ...] = (), packed_host: bool = False):
        blocks = getattr(model, "blocks", None)
        if blocks is None:
            raise ValueError("block swap needs a model with a `blocks` ModuleList (the Wan DiT)")
        if not 0 < n_blocks <= len(blocks):
            raise ValueError(f"block_swap={n_blocks}: choose 1..{len(blocks)} (the model has "
                             f"{len(blocks)} blocks), or 0 to turn block swap off")
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda = self.device.type == "cuda"
        self.prefetch_enabled = prefetch
        self.host_modules = tuple(host_modules)
        self.num_blocks = len(blocks)
        self.swapped = list(range(len(blocks) - n_blocks, len(blocks)))
        frozen = sum(t.numel() * t.element_size() for i in self.swapped for m in blocks[i].modules()
                     for t in [*m._parameters.values(), *m._buffers.values()]
                     if t is not None and not t.requires_grad)
        self.pool = HostPool(frozen, pinned=self.cuda, packed=packed_host)
        self.entries: dict[int, list[_Entry]] = {i: self._to_host(blocks[i]) for i in self.swapped}
        self._move_rest_to_device()
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.ready: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.installed: set[int] = set()
        self.last: int | None = None
        self.fetches = 0  # host->device copies of a whole block, for tests and the benchmark
        self.outer: int | None = None  # the block a caller runs through `running` right now
        self.calls = 0  # calls through `running`: what a saved weight belongs to
        self.saved: tuple | None = None  # (call, device copies) whose backward is unpacking
        self._warned = False
        self.handles = []
        self.wrapped: dict[int, tuple[nn.Module, list[str]]] = {}
        for i, block in enumerate(blocks):
            if i in self.entries:
                # The block's inner forward is wrapped (not its __call__): a block that
                # checkpoints inside its forward recomputes that inner function in backward,
                # and the weights must be fetched again right there. A block checkpointed in
                # segments recomputes each segment later still, after its inner forward has
                # returned: each segment fetches the weights again if they are not installed.
                names = ["_forward" if hasattr(block, "_forward") else "forward"]
                setattr(block, names[0], self._wrap(i, getattr(block, names[0])))
                for name in getattr(block, "SEGMENTS", ()):
                    setattr(block, name, self._wrap(i, getattr(block, name), segment=True))
                    names.append(name)
                self.wrapped[i] = (block, names)
            else:  # resident blocks only start the prefetch of the next swapped block
                self.handles.append(block.register_forward_pre_hook(self._make_pre_hook(i)))

    # -- placement -------------------------------------------------------------------------
    def _to_host(self, block: nn.Module) -> list[_Entry]:
        entries = []
        for module in block.modules():
            for name, p in list(module._parameters.items()):
                if p is None:
                    continue
                if p.requires_grad:
                    p.data = p.data.to(self.device)
                    continue
                host = self._host_copy(p)
                module._parameters[name] = nn.Parameter(host, requires_grad=False)
                entries.append(_Entry(module, name, True, host))
            for name, b in list(module._buffers.items()):
                if b is None:
                    continue
                host = self._host_copy(b)
                module._buffers[name] = host
                entries.append(_Entry(module, name, False, host))
        return entries

    def _host_copy(self, t: torch.Tensor) -> torch.Tensor:
        return self.pool.copy(t)

    def _move_rest_to_device(self) -> None:
        swapped = {(id(e.module), e.name) for es in self.entries.values() for e in es}
        on_host = {id(m) for name in self.host_modules for m in self.model.get_submodule(name).modules()}
        for module in self.model.modules():
            target = torch.device("cpu") if id(module) in on_host else self.device
            for name, p in module._parameters.items():
                if p is not None and (id(module), name) not in swapped and p.device != target:
                    p.data = p.data.to(target)
            for name, b in list(module._buffers.items()):
                if b is not None and (id(module), name) not in swapped and b.device != target:
                    module._buffers[name] = b.to(target)

    # -- transfers -------------------------------------------------------------------------
    def _fetch(self, i: int) -> None:
        """Start copying block i's weights to the device (no-op if already there)."""
        if i in self.ready:
            return
        src = [e.host for e in self.entries[i]]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                out = [t.to(self.device, non_blocking=True) for t in src]
                event = torch.cuda.Event()
                event.record(self.stream)
        else:
            out, event = [t.clone() for t in src], None
        self.ready[i] = (out, event)
        self.fetches += 1

    def _acquire(self, i: int) -> list[torch.Tensor]:
        self._fetch(i)
        out, event = self.ready[i]
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in out:  # the side stream allocated them; the compute stream uses them
                t.record_stream(current)
        return out

    def _install(self, i: int, tensors) -> None:
        for e, t in zip(self.entries[i], tensors):
            if e.is_param:
                e.module._parameters[e.name] = nn.Parameter(t, requires_grad=False)
            else:
                e.module._buffers[e.name] = t

    def _restore_host(self, i: int) -> None:
        for e in self.entries[i]:
            if e.is_param:
                e.module._parameters[e.name] = nn.Parameter(e.host, requires_grad=False)
            else:
                e.module._buffers[e.name] = e.host
        self.installed.discard(i)

    # -- order -----------------------------------------------------------------------------
    def _next_swapped(self, i: int) -> int | None:
        """The swapped block to prefetch while block i runs."""
        last, self.last = self.last, i
        if i == 0 or last is None or i > last:
            step = 1
        elif i < last:
            step = -1
        else:  # the same block twice: forward turning into the checkpointed backward at the end
            step = -1 if i == self.num_blocks - 1 else 1
        j = i + step
        while 0 <= j < self.num_blocks and j not in self.entries:
            j += step
        if 0 <= j < self.num_blocks:
            return j
        # End of a backward pass: the next forward reaches the first swapped block first.
        return self.swapped[0] if step < 0 else None

    def _make_pre_hook(self, i: int):
        @torch._dynamo.disable
        def pre_hook(module, args):
            if self.outer == i:  # `running` has done it
                return
            with _disable_current_modes():
                self._before_block(i)
        return pre_hook

    def _before_block(self, i: int, install: bool = True) -> list[torch.Tensor] | None:
        """Block i is about to run (or, `install` off, its backward to unpack its weights):
        its copies acquired (and installed), the next swapped block's prefetch started."""
        if (torch.is_grad_enabled() and not getattr(self.model, "gradient_checkpointing", False)
                and not self._warned):
            self._warned = True
            warnings.warn("block swap without gradient checkpointing keeps every block's "
                          "weights on the device until backward, so it saves no memory; "
                          "turn on train.gradient_checkpointing", stacklevel=2)
        for k in list(self.installed):  # normally none: each call restores its own on exit
            if k != i:
                self._restore_host(k)
        tensors = None
        if i in self.entries:
            tensors = self._acquire(i)
            if install:
                self._install(i, tensors)
                self.installed.add(i)
        nxt = self._next_swapped(i)
        keep = {i, nxt}
        for k in list(self.ready):
            if k not in keep:
                del self.ready[k]  # autograd still holds what it saved
        if nxt is not None and self.prefetch_enabled:
            self._fetch(nxt)
        return tensors

    def _wrap(self, i: int, inner, segment: bool = False):
        """Weights in, run, host copies back in the module (autograd keeps what it saved):
        for a model calling its blocks itself (the text encoder) and for the recompute in
        backward of an eager checkpoint. A `segment` of block i runs as it is inside the block's
        wrapped forward (the weights are installed); recomputed alone in backward, it installs
        the copies the block fetched (kept until the next block starts) and puts the host copies
        back after."""
        def enter():
            if not segment:
                self._before_block(i)
            else:
                self._install(i, self._acquire(i))
                self.installed.add(i)

        @torch._dynamo.disable
        def fetching(*args, **kwargs):
            with _disable_current_modes():
                enter()
            try:
                return inner(*args, **kwargs)
            finally:
                with _disable_current_modes():
                    self._restore_host(i)

        def swapped(*args, **kwargs):
            # Traced through in a compiled block (`running` installed the weights around it);
            # eagerly, a pass-through while the weights are installed (the segments of a block
            # running, or a block called through `running`), otherwise it fetches them (the
            # recompute in backward).
            if torch.compiler.is_compiling() or i in self.installed:
                return inner(*args, **kwargs)
            return fetching(*args, **kwargs)
        swapped.__wrapped__ = inner
        return swapped

    # -- called from the model -------------------------------------------------------------
    @contextlib.contextmanager
    def running(self, i: int):
        """Around the model's call of block i, outside any compiled region: the prefetch moves on,
        a swapped block gets its weights installed for the call and its host copies back after.
        Yields, for a swapped block, a saved-tensor packer (`checkpointing.HostOffload(keep=)`)
        that keeps what autograd saves of those weights as a reference to this call; its backward
        fetches them again (or takes the prefetched copy). Else None."""
        with _disable_current_modes():
            tensors = self._before_block(i)
        self.outer = i
        try:
            yield None if tensors is None else self._packer(i, tensors)
        finally:
            self.outer = None
            if i in self.entries:
                with _disable_current_modes():
                    self._restore_host(i)

    def _packer(self, i: int, tensors: list[torch.Tensor]):
        keys = {storage_key(t): j for j, t in enumerate(tensors)}
        self.calls += 1
        call = self.calls

        def pack(t: torch.Tensor):
            j = keys.get(storage_key(t))
            if j is None:
                return None
            return self._unpack, (call, i, j, t.size(), t.stride(), t.storage_offset())
        return pack

    def _unpack(self, saved) -> torch.Tensor:
        call, i, j, size, stride, offset = saved
        if self.saved is None or self.saved[0] != call:  # the first weight of this block's backward
            with _disable_current_modes():
                self.saved = (call, self._before_block(i, install=False))
        base = self.saved[1][j]
        if base.size() == size and base.stride() == stride and base.storage_offset() == offset:
            return base
        return base.as_strided(size, stride, offset)

    # -- public ----------------------------------------------------------------------------
    def release(self) -> None:
        """Drop every device copy held here (e.g. before sampling previews)."""
        for k in list(self.installed):
            self._restore_host(k)
        self.ready.clear()
        self.saved = None
        self.last = None

    def remove(self) -> None:
        """Undo: hooks off, every swapped tensor back on the device as a normal weight."""
        self.release()
        for h in self.handles:
            h.remove()
        for block, names in self.wrapped.values():
            for name in names:
                delattr(block, name)  # the class's method again
        self.wrapped.clear()
        for es in self.entries.values():
            for e in es:
                t = e.host.to(self.device)
                if e.is_param:
                    e.module._parameters[e.name] = nn.Parameter(t, requires_grad=False)
                else:
                    e.module._buffers[e.name] = t
        self.entries.clear()
        if getattr(self.model, "block_swap", None) is self:
            del self.model.block_swap

    def host_bytes(self) -> int:
        """Host memory the swapped weights hold (pinned on CUDA), buffers' unused tails included."""
        return self.pool.bytes()


def enable_block_swap(model: nn.Module, n_blocks: int, device, prefetch: bool = True,
                      host_modules: tuple[str, ...] = (), packed_host: bool = False) -> BlockSwap:
    """Keep the frozen weights of the last `n_blocks` blocks in (pinned) host memory and stream
    them in per call; everything else is moved to `device`, except the submodules named in
    `host_modules`, which stay on the host and compute there; `packed_host` packs the host
    copies into shared buffers (see HostPool). Returns the controller, also kept
    as `model.block_swap`. Call after LoRA injection / fp8 quantisation, before `block.compile()`."""
    old = getattr(model, "block_swap", None)
    if isinstance(old, BlockSwap):
        old.remove()
    swap = BlockSwap(model, n_blocks, device, prefetch=prefetch, host_modules=host_modules,
                     packed_host=packed_host)
    model.block_swap = swap
    return swap
