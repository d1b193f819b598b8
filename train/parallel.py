"""How the processes of a run share the work: data-parallel groups of `train.sequence_parallel`.

With sequence parallel N, consecutive ranks form groups of N (on one machine, so the
all-to-alls stay on NVLink): the ranks of a group train the same sample, each on 1/N of its
tokens (wan_model.sequence_parallel). Everything that decides *which* sample and *which*
noise (the data sampler, the per-micro-step generators) therefore takes the data-parallel rank
and size, not the process's. The gradient all-reduce stays over all processes: see the
gradient note in wan_model/sequence_parallel.py for why that yields one GPU's gradient.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class Layout:
    rank: int  # this process among all
    world: int  # all processes
    sp: int  # ranks per sequence-parallel group (1 = off)

    @property
    def dp_rank(self) -> int:
        """Which sample stream this process trains (shared by its group)."""
        return self.rank // self.sp

    @property
    def dp_size(self) -> int:
        return self.world // self.sp

    @property
    def sp_rank(self) -> int:
        """Which share of each sample's tokens this process holds."""
        return self.rank % self.sp

    def groups(self) -> list[list[int]]:
        return [list(range(g * self.sp, (g + 1) * self.sp)) for g in range(self.dp_size)]


def before_process_group() -> None:
    """Call before the process group is created (before `Accelerator()`) in a run of several
    processes.

    Some libraries bind the default group into their functions' defaults when first imported
    (`group=GroupMember.WORLD`: torch.distributed.nn, which torch._dynamo imports lazily, e.g. the
    first time a model is built under `torch.device("meta")`; deepspeed.comm, which accelerate
    imports). Imported after the group exists, they keep it alive past `destroy_process_group`,
    so gloo's worker threads are still running when the interpreter exits, and one of them
    releasing a tensor then aborts the process ("terminate called without an active exception")
    after all its work is done, now and then. Imported first, their defaults are None and the
    group is torn down at the end of the run (tests/clean_exit.py checks it on every run)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    import torch.distributed.nn  # noqa: F401

    try:
        import deepspeed.comm  # noqa: F401
    except ImportError:  # not installed: nothing imports it later either
        pass


# Work done by the main process alone (the corpus scan, previews, exports, a universal checkpoint
# conversion, a model download before caching) keeps the other ranks waiting in a collective;
# NCCL's 10-minute default would stop a healthy run. A rank that dies is still noticed at once:
# the launcher stops the others.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1):
    """The run's Accelerator (train.py and tools/cache.py): the launcher's settings, the early
    imports of `before_process_group`, gloo on CPU and the long collective timeout when several
    processes run. `mixed_precision` is train.mixed_precision ("bf16" or anything else: none)."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    before_process_group()
    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # CPU worlds of several processes need gloo (else each rank believes it is alone)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        handlers.append(InitProcessGroupKwargs(backend=backend, timeout=COLLECTIVE_TIMEOUT))
    return Accelerator(mixed_precision="bf16" if mixed_precision == "bf16" else "no",
                       gradient_accumulation_steps=grad_accum, kwargs_handlers=handlers,
                       step_scheduler_with_optimizer=False)


def make_layout(rank: int, world: int, sp: int) -> Layout:
    if sp > 1 and world % sp:
        raise ValueError(f"train.sequence_parallel={sp} needs a number of processes that it divides; "
                         f"this run has {world} (launch {sp}, {2 * sp}, ... processes, e.g. "
                         f"accelerate launch --num_processes {sp} train.py ...)")
    return Layout(rank, world, sp)


def check_heads(sp: int, heads: int, flavour: str) -> None:
    """Every rank needs a head; an uneven split runs attention at the pace of the fullest rank."""
    even = [n for n in range(1, heads + 1) if heads % n == 0]
    if sp > heads:
        raise ValueError(f"train.sequence_parallel={sp}: the {flavour} transformer has {heads} attention "
                         f"heads and every rank needs at least one; choose one of {even}")
    if heads % sp:
        warnings.warn(f"train.sequence_parallel={sp}: the {heads} attention heads of {flavour} split "
                      f"unevenly ({-(-heads // sp)} on some ranks, {heads // sp} on others), so "
                      f"attention runs at the pace of the fullest rank; {even} split evenly",
                      stacklevel=2)


def enable(model, layout: Layout):
    """Split `model`'s tokens over this process's group; returns the SequenceParallel (or None).
    Every process must call this: each group is created collectively, in the same order."""
    if layout.sp == 1:
        return None
    import torch.distributed as dist

    from wan_model.configs import flavour_of
    from wan_model.sequence_parallel import SequenceParallel, attach

    check_heads(layout.sp, model.cfg.num_heads, flavour_of(model.cfg) or "this")
    mine = None
    for ranks in layout.groups():
        group = dist.new_group(ranks)
        if layout.rank in ranks:
            mine = group
    sp = SequenceParallel(mine, model.cfg.num_heads)
    attach(model, sp)
    return sp
