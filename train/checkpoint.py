"""Resume state: `step-N/` folders written atomically, pruned to `keep_last`, found for resume.

A checkpoint holds everything needed to continue: the trained tensors (adapter or weights),
optimizer, scheduler, EMA, RNG states, the data sampler position, the step, and the resolved
recipe. It is written into a hidden temporary folder and renamed into place, so an interrupted
write never leaves a half checkpoint that `resume: latest` could pick up.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from wan_model.loading import save_safetensors_atomic

STEP_RE = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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


def save_checkpoint(output_dir: str | Path, step: int, trained: dict[str, torch.Tensor],
                    optimizer, scheduler, sampler_state: dict, recipe_yaml: str,
                    ema: dict | None = None, extra: dict | None = None, keep_last: int = 0) -> Path:
    """Write step-N/ atomically (main process only) and prune older ones."""
    output_dir = Path(output_dir)
    final = output_dir / f"step-{step}"
    tmp = output_dir / f".step-{step}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_safetensors_atomic({k: v.detach().cpu() for k, v in trained.items()}, tmp / "trained.safetensors")
    if ema is not None:
        save_safetensors_atomic({k: v.cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, tmp / "state.pt")
    (tmp / "recipe.yaml").write_text(recipe_yaml)
    (tmp / "trainer.json").write_text(json.dumps({"step": step, "sampler": sampler_state, **(extra or {})},
                                                 indent=2))
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for _, old in list_checkpoints(output_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    from safetensors.torch import load_file

    state = torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    out = {"trained": load_file(str(path / "trained.safetensors")), "state": state,
           "trainer": json.loads((path / "trainer.json").read_text())}
    if (path / "ema.safetensors").exists():
        out["ema"] = load_file(str(path / "ema.safetensors"))
    return out


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
        (tmp / "recipe.yaml").write_text(recipe_yaml)
        (tmp / "trainer.json").write_text(json.dumps(
            {"step": step, "sampler": sampler_state, "scheduler": scheduler.state_dict()}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if keep_last > 0:
            for _, old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    acc.wait_for_everyone()
    return final
