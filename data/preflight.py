"""Before any work: the model files in place (a Hub repo id downloaded) and every problem the
model and data sections and the files can tell, found at once, so that a run never caches for
an hour and then stops on something that was knowable at the start. train/preflight.py adds the
training side.
"""
from __future__ import annotations

import os
from pathlib import Path

from wan_model.paths import ModelPaths

from .config import DataConfig

CACHE_COMPONENTS = ("config", "vae", "text_encoder", "tokenizer", "clip")  # "config": the DiT's config.json


def fetch_model(paths: ModelPaths, components, state) -> None:
    """Download a repo id's files on the main process while the others wait, then let them read
    the cache (`state`: an accelerate Accelerator or PartialState)."""
    if state.is_main_process:
        paths.fetch(components)
    state.wait_for_everyone()
    if not state.is_main_process:
        paths.fetch(components, local_only=True)


def writable_problem(path: str, key: str) -> str | None:
    """None when `path` is a folder that can be written, or can be made; else what is wrong."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        return f"{key}={path}: is a file, not a folder"
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{key}={path}: {probe} is a file, so the folder cannot be made there; choose another path"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{key}={path}: {probe} is not writable for this user; choose a folder you can write to"
    return None


def data_problems(paths: ModelPaths, cfg: DataConfig, components=CACHE_COMPONENTS) -> tuple[bool, list[str]]:
    """(whether the run is I2V, every problem found). `components` are the model parts the
    command loads; the CLIP tower only counts for I2V."""
    problems = []
    try:
        model_i2v, unknown = paths.is_i2v(), ""
    except ValueError as e:  # model.transformer holds another component, or no Wan DiT
        model_i2v, unknown = None, str(e)
        problems.append(unknown)
    where = paths.transformer or paths.root
    if cfg.conditioning == "auto":
        i2v = bool(model_i2v)
        if model_i2v is None and not unknown:
            problems.append(f"cannot tell whether {where} is a T2V or an I2V model (no config.json beside "
                            "the DiT): set data.conditioning=t2v or i2v, or model.flavour")
    else:
        i2v = cfg.conditioning == "i2v"
        if model_i2v is not None and model_i2v != i2v:
            fix = ("use an I2V checkpoint (e.g. Wan-AI/Wan2.1-I2V-14B-480P) or data.conditioning=auto" if i2v
                   else "set data.conditioning=auto: an I2V model trains with its first-frame conditioning")
            problems.append(f"data.conditioning={cfg.conditioning}, but {where} is "
                            f"{'an I2V' if model_i2v else 'a T2V'} model: {fix}")
    problems += paths.missing_files([c for c in components if c != "config" and (c != "clip" or i2v)])
    if not cfg.cache_dir:
        problems.append("data.cache_dir is empty: set it to the folder the cache is written to")
    elif problem := writable_problem(cfg.cache_dir, "data.cache_dir"):
        problems.append(problem)
    for i, source in enumerate(cfg.sources):
        if source.path and not Path(source.path).expanduser().exists():
            problems.append(f"data.sources[{i}].path={source.path}: no such file or folder")
    return i2v, problems


def report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s), found before any work:\n  - " + "\n  - ".join(problems)
