"""One launch of a real entry point (`accelerate launch train.py ...`, `... tools/cache.py ...`)
for the multi-GPU bench: its log, wall time, peak memory per GPU and of the host, and an
optional early stop once the run has logged enough steps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def accelerate_cmd(procs: int, script: str, args: list[str], config: Path | None = None,
                   cpu: bool = False) -> list[str]:
    """`accelerate launch` as a user types it: a config file for DeepSpeed, plain flags otherwise."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is not None:
        cmd += ["--config_file", str(config), "--num_processes", str(procs)]
    else:
        cmd += (["--multi_gpu"] if procs > 1 else []) + [
            "--num_processes", str(procs), "--num_machines", "1", "--dynamo_backend", "no",
            "--mixed_precision", "no" if cpu else "bf16"]
    return cmd + [str(REPO / script), *args]


@dataclass
class Launched:
    returncode: int
    seconds: float
    log: Path
    gpu_peak_gib: dict[int, float] = field(default_factory=dict)  # nvidia-smi memory.used
    host_peak_gib: float | None = None  # MemTotal - MemAvailable
    stopped_early: bool = False

    def tail(self, n: int = 2500) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


class _Sampler(threading.Thread):
    """Polls GPU and host memory once a second while a launch runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.gpu: dict[int, float] = {}
        self.host = 0.0
        self.halt = threading.Event()

    def run(self):
        while not self.halt.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used",
                                      "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
                for line in out.strip().splitlines():
                    i, used = (x.strip() for x in line.split(","))
                    self.gpu[int(i)] = max(self.gpu.get(int(i), 0.0), float(used) / 1024)
            except (OSError, ValueError, subprocess.SubprocessError):
                pass
            self.host = max(self.host, _host_used_gib())
            self.halt.wait(1.0)


def _host_used_gib() -> float:
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        kib = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
        return kib / 2**20
    except (OSError, KeyError, ValueError):
        return 0.0


def run(cmd: list[str], log: Path, timeout: float, stop_after_steps: int = 0,
        metrics: Path | None = None, env: dict | None = None) -> Launched:
    """Run `cmd` in its own session with output to `log`. With `stop_after_steps`, the run is
    stopped (SIGTERM to its session, then SIGKILL) once `metrics` holds that many step rows."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sampler = _Sampler()
    sampler.start()
    t0 = time.perf_counter()
    stopped = False
    with log.open("w") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            while proc.poll() is None:
                if time.perf_counter() - t0 > timeout:
                    out.write(f"\n[bench] stopped: over its {timeout:.0f} s budget\n")
                    _stop(proc)
                    break
                if stop_after_steps and metrics is not None and len(step_rows(metrics)) >= stop_after_steps:
                    out.write(f"\n[bench] stopped after {stop_after_steps} steps, as planned\n")
                    stopped = True
                    _stop(proc)
                    break
                time.sleep(1.0)
        finally:
            if proc.poll() is None:
                _stop(proc)
    sampler.halt.set()
    sampler.join(timeout=15)
    return Launched(proc.returncode, time.perf_counter() - t0, log, dict(sampler.gpu),
                    round(sampler.host, 1) if sampler.host else None, stopped)


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def step_rows(metrics: Path) -> list[dict]:
    if not metrics.exists():
        return []
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line being written
            continue
        if "train/loss" in row:
            rows.append(row)
    return rows
