"""Helpers shared by the tests that run the trainer and the cache tool end to end."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo.yaml"


def dead_pid() -> int:
    """The pid of a process that has exited (for temporaries a killed run left)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def free_port() -> int:
    """A port no one listens on now, for a 2-process launch (another test session on the same
    machine may hold accelerate's default 29500)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_argv(assets: Path, out: Path, cache: Path, **extra) -> list[str]:
    """recipes/demo.yaml on the tiny corpus and model of `assets`, quiet and small."""
    base = {"model.root": assets / "model", "data.sources": f"[{{path: {assets / 'clips'}}}]",
            "data.cache_dir": cache, "run.output_dir": out, "demo.enabled": False,
            "validation.prompts": "[]", "train.max_steps": 6, "checkpoint.every": 2,
            "checkpoint.keep_last": 0, "tracking.tensorboard": False,
            "train.optim.scheduler": "constant", "train.optim.warmup_steps": 0}
    base.update(extra)
    return [str(DEMO)] + [f"{k}={v}" for k, v in base.items()]


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
