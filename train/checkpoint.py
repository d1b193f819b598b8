"""Resume state: `step-N/` folders written atomically, pruned to `keep_last`, found for resume.

A checkpoint holds everything needed to continue: the trained tensors (adapter or weights),
optimizer, scheduler, EMA, RNG states, the data sampler position, the step, and the resolved
recipe. It is written into a hidden temporary folder and renamed into place, so an interrupted
write never leaves a half checkpoint that `resume: latest` could pick up.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from wan_model import faults
from wan_model.atomic import (WriteError, remove_dir, replace_dir, save_safetensors_atomic,
                              save_torch_atomic, sweep_stale_temps, temp_path, tensor_bytes,
                              write_text_atomic)
from wan_model.loading import load_error_summary

STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # numpy's state as plain values and a tensor, so state.pt loads with weights_only=True
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = []
    d = Path(output_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = STEP_RE.match(p.name)
            if m and p.is_dir() and (p / "trainer.json").exists():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume(resume: str, output_dir: str | Path) -> Path | None:
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    p = Path(resume)
    if not (p / "trainer.json").exists():
        raise ValueError(f"checkpoint.resume={resume!r}: {p} is not a complete step-N/ checkpoint "
                         "(no trainer.json); use 'latest' or a step-N/ folder of a run")
    return p


def last_good(output_dir: str | Path) -> str:
    found = list_checkpoints(output_dir)
    return f"{found[-1][1].name}/" if found else "no earlier checkpoint"


@contextmanager
def checkpoint_folder(output_dir: Path, step: int, needed: int | None):
    """A hidden temporary folder to fill, renamed to step-N/ once complete. A failed write
    removes it and says what the checkpoint needed; the earlier checkpoints are untouched."""
    final = output_dir / f"step-{step}"
    tmp = temp_path(final)
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        yield tmp
        faults.point(f"checkpoint step-{step}: written, before rename")
        replace_dir(tmp, final)
        faults.point(f"checkpoint step-{step}: renamed")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        cause = e.__cause__ if isinstance(e, WriteError) and isinstance(e.__cause__, OSError) else e
        raise WriteError(f"checkpoint step-{step} ({getattr(e, 'what', 'its folder')})", final, cause,
                         needed, fix=f"{last_good(output_dir)} is intact: free space, then continue "
                                     "with checkpoint.resume=latest") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def prune_checkpoints(output_dir: str | Path, keep_last: int, keep: Path | None = None) -> None:
    """Remove all but the newest `keep_last` step-N/ (0 = keep all); `keep` (the one just
    written) is never removed. Called only once the new checkpoint is complete."""
    if keep_last <= 0:
        return
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        if keep is None or old.resolve() != Path(keep).resolve():
            remove_dir(old)
            faults.point(f"checkpoint: pruned {old.name}")


def sweep(output_dir: str | Path) -> None:
    """Before a run: remove what killed runs left (temporary checkpoints, exports, previews)."""
    output_dir = Path(output_dir)
    sweep_stale_temps(output_dir)
    for leftover in output_dir.glob(".step-*.tmp"):  # DeepSpeed's rank-shared temporary folder
        shutil.rmtree(leftover, ignore_errors=True)
    for folder in [output_dir / "export", *output_dir.glob("samples/step-*")]:
        sweep_stale_temps(folder)


def save_checkpoint(output_dir: str | Path, step: int, trained: dict[str, torch.Tensor],
                    optimizer, scheduler, sampler_state: dict, recipe_yaml: str,
                    ema: dict | None = None, extra: dict | None = None, keep_last: int = 0,
                    write_more=None) -> Path:
    """Write step-N/ atomically (main process only), then prune older ones. `write_more(folder)`
    adds files (an export) inside the folder before it is complete, so they appear together."""
    output_dir = Path(output_dir)
    trained = {k: v.detach() for k, v in trained.items()}
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
    needed = tensor_bytes(trained) + tensor_bytes(ema or {}) + tensor_bytes(state) + len(recipe_yaml)
    with checkpoint_folder(output_dir, step, needed) as tmp:
        save_safetensors_atomic(trained, tmp / "trained.safetensors")
        if ema is not None:
            save_safetensors_atomic(ema, tmp / "ema.safetensors")
        save_torch_atomic(state, tmp / "state.pt")
        write_text_atomic(tmp / "recipe.yaml", recipe_yaml)
        if write_more is not None:
            write_more(tmp)
        write_text_atomic(tmp / "trainer.json", json.dumps(  # last: its presence marks a whole folder
            {"step": step, "sampler": sampler_state, **(extra or {})}, indent=2))
    final = output_dir / f"step-{step}"
    prune_checkpoints(output_dir, keep_last, keep=final)
    return final


def load_checkpoint(path: Path) -> dict:
    """A step-N/ folder -> its tensors and state. state.pt is read with weights_only=True: a file
    holding pickled code is refused, never run."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        with torch.serialization.safe_globals(_NUMPY_GLOBALS):  # numpy RNG state of older checkpoints
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        out = {"trained": load_file(str(path / "trained.safetensors")), "state": state,
               "trainer": json.loads((path / "trainer.json").read_text())}
        if (path / "ema.safetensors").exists():
            out["ema"] = load_file(str(path / "ema.safetensors"))
    except Exception as e:
        raise CheckpointError(
            f"{path}: this checkpoint cannot be read ({load_error_summary(e)}). "
            "A file of it is truncated, damaged or holds more than tensors and plain values (wantune "
            "never unpickles code). Resume from an earlier step-N/ (checkpoint.resume=PATH) or delete "
            "this folder") from e
    return out


class CheckpointError(ValueError):
    """A step-N/ folder that cannot be resumed from; the message names it and the way out."""


def check_trained(saved: dict[str, torch.Tensor], model: dict[str, torch.Tensor], path: Path) -> None:
    """The checkpoint must hold every trained tensor of the model, in its shape: a checkpoint of
    other lora/full settings (another rank, other targets) is named, not half-loaded."""
    missing = sorted(set(model) - set(saved))
    if missing:
        raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} trained tensors (e.g. "
                              f"{missing[:3]}); was it made with other lora/full settings? Resume "
                              "with the recipe it was trained with (its recipe.yaml is beside it)")
    bad = [(k, tuple(saved[k].shape), tuple(model[k].shape)) for k in sorted(model)
           if tuple(saved[k].shape) != tuple(model[k].shape)]
    if bad:
        k, have, want = bad[0]
        raise CheckpointError(f"{path}: {len(bad)} trained tensors have other shapes than this recipe "
                              f"makes (e.g. {k}: checkpoint {have}, recipe {want}; a LoRA rank "
                              "change shows up so). Resume with the settings of its recipe.yaml")


_NUMPY_GLOBALS = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
try:
    _NUMPY_GLOBALS.append(np._core.multiarray._reconstruct)
except AttributeError:  # numpy < 2
    _NUMPY_GLOBALS.append(np.core.multiarray._reconstruct)


def save_deepspeed_checkpoint(acc, output_dir, step: int, scheduler, sampler_state: dict,
                              recipe_yaml: str, keep_last: int = 0, ema: dict | None = None) -> Path:
    """DeepSpeed (ZeRO-2/3) state through accelerate, written by all ranks into a temp folder
    that the main process renames into step-N/ once every rank is done. The EMA (the same on
    every rank) is written by the main process."""
    output_dir = Path(output_dir)
    final = output_dir / f"step-{step}"
    tmp = output_dir / f".step-{step}.tmp"
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "deepspeed"), exclude_frozen_parameters=True)
    acc.wait_for_everyone()
    if acc.is_main_process:
        if ema is not None:
            save_safetensors_atomic({k: v.cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
        write_text_atomic(tmp / "recipe.yaml", recipe_yaml)
        write_text_atomic(tmp / "trainer.json", json.dumps(
            {"step": step, "sampler": sampler_state, "scheduler": scheduler.state_dict(),
             "processes": acc.num_processes}, indent=2))
        replace_dir(tmp, final)
        prune_checkpoints(output_dir, keep_last, keep=final)
    acc.wait_for_everyone()
    return final
