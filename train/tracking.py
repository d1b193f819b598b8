"""Progress bar and trackers (TensorBoard, wandb) for the main process."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from wan_model.atomic import append_line, drop_partial_line


class Tracker:
    def __init__(self, recipe, recipe_dict: dict, enabled: bool, start_step: int):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        self.bar = None
        self.t_last = time.perf_counter()
        self.step_times: list[float] = []
        self.preview_times: list[tuple[int, float]] = []  # (step, seconds per render)
        self.held_peak: float | None = None  # training's peak, set aside while a preview renders
        self.predicted_gib: float | None = None  # the memory planner's prediction of the step's peak
        if not enabled:
            return
        out = Path(recipe.run.output_dir)
        name = recipe.run.name or out.name
        self.metrics_file = out / "metrics.jsonl"
        drop_partial_line(self.metrics_file)  # a killed run may have stopped mid-line
        if recipe.tracking.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "logs"))
            self.tb.add_text("recipe", "```\n" + recipe_dict["yaml"] + "\n```", start_step)
        if recipe.tracking.wandb:
            import wandb

            self.wandb = wandb.init(project=recipe.tracking.project, name=name, dir=str(out),
                                    config=recipe_dict["config"], resume="allow")
        from tqdm.auto import tqdm

        self.bar = tqdm(total=recipe.train.max_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True)

    def step(self, step: int, loss: float, lr: float, log: bool, extra: dict | None = None) -> None:
        """`extra`: more fields of the step's metrics.jsonl row (e.g. the sample keys trained)."""
        now = time.perf_counter()
        self.step_times.append(now - self.t_last)
        self.t_last = now
        if not self.enabled:
            return
        sps = self.step_times[-1]
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{sps:.2f}")
        if log:
            metrics = {"train/loss": loss, "train/lr": lr, "train/s_per_step": sps}
            peak = self.take_peak_gib()
            if peak is not None:
                metrics["memory/peak_gib"] = peak  # since the last log
                if self.predicted_gib is not None:
                    metrics["memory/predicted_gib"] = self.predicted_gib
                    if not self.step_times[:-1]:  # the first step: say how the plan held
                        self.bar.write(f"memory: the first step peaked at {peak:.2f} GiB "
                                       f"(predicted {self.predicted_gib:.2f} GiB)")
            rss = host_rss_mib()
            if rss is not None:
                metrics["memory/host_rss_mib"] = rss  # a leak over hours shows here
            append_line(self.metrics_file, json.dumps({"step": step, **metrics, **(extra or {})}))
            if self.tb:
                for k, v in metrics.items():
                    self.tb.add_scalar(k, v, step)
            if self.wandb:
                self.wandb.log(metrics, step=step)

    def log_videos(self, step: int, paths: list[Path], seconds: float | None = None,
                   peak_gib: float | None = None) -> None:
        """A finished preview render: its videos to wandb, its cost to metrics.jsonl and TB."""
        if seconds is not None:
            self.preview_times.append((step, seconds))
        if not self.enabled:
            return
        if seconds is not None:
            row = {"step": step, "validation/seconds": seconds, "validation/videos": len(paths)}
            if peak_gib is not None:
                row["validation/peak_gib"] = peak_gib
            append_line(self.metrics_file, json.dumps(row))
            if self.tb:
                self.tb.add_scalar("validation/seconds", seconds, step)
        if self.wandb:
            import wandb

            log = {"validation/seconds": seconds} if seconds is not None else {}
            if paths:
                log["validation"] = [wandb.Video(str(p), caption=p.stem) for p in paths]
            if log:
                self.wandb.log(log, step=step)

    def log_checkpoint(self, step: int, seconds: float, run_dir: Path) -> None:
        """A written checkpoint: its seconds, the size of the kept step-N/ folders (bounded by
        checkpoint.keep_last) and of the whole run folder (previews and logs add to it)."""
        if not self.enabled:
            return
        kept = sum(folder_mib(p) for p in Path(run_dir).glob("step-*"))
        row = {"step": step, "checkpoint/seconds": seconds, "checkpoint/run_dir_mib": folder_mib(run_dir),
               "checkpoint/kept_mib": kept}
        append_line(self.metrics_file, json.dumps(row))
        if self.tb:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(k, v, step)

    def take_peak_gib(self) -> float | None:
        """Peak CUDA memory of training since the last call (the allocator's counter, no sync)."""
        peak = _take_peak_gib()
        if self.held_peak is not None and peak is not None:
            peak = max(peak, self.held_peak)
        self.held_peak = None
        return peak

    def hold_peak(self) -> None:
        """Before a preview: keep training's peak aside so the render's own peak is measured."""
        self.held_peak = self.take_peak_gib()

    def render_peak_gib(self) -> float | None:
        """After a preview: the render's own peak (training's stays held for the next log)."""
        return _take_peak_gib()

    def reset_clock(self) -> None:
        """After a preview or checkpoint, so its time is not charged to the next step."""
        self.t_last = time.perf_counter()

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def _take_peak_gib() -> float | None:
    """Peak CUDA memory allocated since the last call (the allocator's counter, no sync)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def host_rss_mib() -> float | None:
    """This process's resident host memory (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def folder_mib(folder: Path) -> float:
    """Bytes of every file under `folder`, in MiB."""
    total = 0
    for p in Path(folder).rglob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
        except OSError:  # removed while walking (pruning, a temporary renamed)
            pass
    return total / 2**20


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss} at step {step}: training stopped and no checkpoint was written from "
            "this state. Lower train.optim.lr, keep train.optim.max_grad_norm on, or resume from "
            "the last good step-N/ with checkpoint.resume=latest")
