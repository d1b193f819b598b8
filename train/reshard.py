"""Resuming on another number of ranks (GPUs, or processes on several machines).

The data position needs nothing here: the sampler counts the global batches consumed, and any
number of ranks continue that one stream (data/dataset.py); every batch keeps its random draws
(loop.batch_generators). A plain checkpoint (LoRA or full fine-tuning under DDP) holds whole
tensors and loads on any number of ranks as it is.

What is cut by rank is DeepSpeed's ZeRO state: the optimizer partitions (and under ZeRO-3 the
weights). A checkpoint written by W ranks is converted by DeepSpeed's own `ds_to_universal`
into its universal layout (one folder per parameter with its fp32 weights and optimizer
moments), which the engine re-partitions over the new ranks when `checkpoint.load_universal`
is set. The conversion goes to a hidden folder beside the checkpoints, written under a
temporary name and renamed when complete, and is removed once every rank has loaded it; the
user's step-N/ is never changed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path


def _trainer(checkpoint_dir: Path) -> dict:
    return json.loads((Path(checkpoint_dir) / "trainer.json").read_text())


def saved_world(checkpoint_dir: Path, trainer: dict | None = None) -> int | None:
    """How many ranks wrote the checkpoint (recorded with its data position; None: not recorded,
    an older checkpoint that the sampler refuses with its own message)."""
    world = (trainer or _trainer(checkpoint_dir)).get("sampler", {}).get("world")
    return None if world is None else int(world)


def saved_processes(checkpoint_dir: Path) -> int | None:
    """How many processes wrote the DeepSpeed state (ZeRO partitions over all of them). With
    sequence parallel that is more than the data position's ranks (groups of N share a sample);
    checkpoints from before this was recorded had no sequence parallel, so the two were equal."""
    trainer = _trainer(checkpoint_dir)
    if "processes" in trainer:
        return int(trainer["processes"])
    return saved_world(checkpoint_dir, trainer)


def deepspeed_state_dir(acc, checkpoint_dir: Path, work_dir: Path) -> Path:
    """The folder `acc.load_state` reads the DeepSpeed state from. The same number of processes
    reads step-N/deepspeed as written; another number gets a universal conversion, and the engine
    is told to load it that way. Call before `acc.prepare` (the engine reads its config there)."""
    world = saved_processes(checkpoint_dir)
    if world is None or world == acc.num_processes:
        return Path(checkpoint_dir) / "deepspeed"
    target = Path(work_dir) / f".universal-{Path(checkpoint_dir).name}"
    if acc.is_main_process and not target.exists():
        _convert_to_universal(Path(checkpoint_dir) / "deepspeed", target)
    acc.wait_for_everyone()
    if not target.is_dir():
        raise FileNotFoundError(f"{target}: the universal conversion of {checkpoint_dir} is missing on "
                                "this machine; several machines need one shared run.output_dir")
    acc.state.deepspeed_plugin.deepspeed_config["checkpoint"] = {"load_universal": True}
    return target


def _convert_to_universal(state_dir: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal over every tag folder accelerate wrote (one per model). The
    engine does not record `universal_checkpoint_info` outside Megatron; the converter's own
    `inject_missing_state` supplies it (in memory, the checkpoint files stay as they are)."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a conversion interrupted earlier
    tmp.mkdir(parents=True)
    tags = sorted(p for p in state_dir.iterdir() if p.is_dir())
    if not tags:
        raise FileNotFoundError(f"{state_dir} holds no DeepSpeed checkpoint (no tag folder)")
    for tag in tags:
        # one worker each: an extract worker holds a whole rank's optimizer file in memory (84 GB
        # per rank for the 14B on 2 GPUs), and no process is forked from one that holds CUDA
        ds_to_universal(Namespace(input_folder=str(tag), output_folder=str(tmp / tag.name),
                                  num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                  strict=True, inject_missing_state=True))
        (tmp / "latest_universal").write_text(tag.name)
    tmp.rename(target)


def done_with(acc, state_dir: Path, checkpoint_dir: Path) -> None:
    """After every rank loaded: remove a universal conversion (it is as large as the checkpoint)."""
    if Path(state_dir).parent == Path(checkpoint_dir):
        return
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(state_dir, ignore_errors=True)


def place_optimizer_steps(optimizer) -> int:
    """Put each optimizer step counter where its optimizer needs it, as torch's own
    `load_state_dict` does: a fused (or capturable) torch optimizer keeps `step` as a float32
    tensor on its parameter's device. DeepSpeed's universal load sets the counter as it was
    saved, a CPU tensor, and the first fused AdamW step on the GPU then stops ("state_steps is on
    cpu"). Under ZeRO-3 the state is keyed by flat fp32 partitions that sit in a param group only
    during DeepSpeed's step (its param groups are empty in between), so a partition in no group
    follows the groups' setting. Returns how many counters were moved."""
    import torch

    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper, then DeepSpeed's, then torch's
        optimizer = optimizer.optimizer
    groups = getattr(optimizer, "param_groups", [])
    on_device = {id(p): bool(g.get("fused") or g.get("capturable")) for g in groups for p in g["params"]}
    default = any(g.get("fused") or g.get("capturable") for g in groups)
    moved = 0
    for p, state in getattr(optimizer, "state", {}).items():
        step = state.get("step") if isinstance(state, dict) else None
        if not on_device.get(id(p), default) or not isinstance(step, torch.Tensor):
            continue
        if step.device != p.device or step.dtype != torch.float32:
            state["step"] = step.to(device=p.device, dtype=torch.float32)
            moved += 1
    return moved


def describe(checkpoint_dir: Path, sampler, recipe, world: int) -> str:
    """One line on where the data stream continues, and what changed with the number of ranks."""
    state = sampler.state_dict()
    where = (f"data: epoch {state['epoch']}, {state['position']} of {sampler.per_epoch} global "
             f"batches done")
    then = saved_world(checkpoint_dir)
    if then is None or then == world:
        return where
    accum = recipe.train.grad_accum
    then_accum = _saved_grad_accum(checkpoint_dir, accum)
    line = (f"{where}; written by {then} rank(s), continued by {world}: the rest of the epoch is "
            f"shared over {world}, each batch keeps its noise and timesteps")
    if then * then_accum != world * accum:
        line += (f". A step now takes {world * accum} batches instead of {then * then_accum}"
                 + (f"; train.grad_accum={then * then_accum // world} keeps the original global batch"
                    if (then * then_accum) % world == 0 else ""))
    return line


def _saved_grad_accum(checkpoint_dir: Path, default: int) -> int:
    import yaml

    try:
        saved = yaml.safe_load((Path(checkpoint_dir) / "recipe.yaml").read_text())
        return int(saved["train"]["grad_accum"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return default
