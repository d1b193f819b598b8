"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def build_optimizer(params, cfg: OptimConfig, device_type: str):
    params = [p for p in params if p.requires_grad]
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, betas=tuple(cfg.betas), eps=cfg.eps,
                                 fused=device_type == "cuda", **kw)
    if cfg.name in ("adamw8bit", "paged_adamw8bit", "paged_adamw"):
        import bitsandbytes as bnb

        cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
               "paged_adamw": bnb.optim.PagedAdamW}[cfg.name]
        return cls(params, betas=tuple(cfg.betas), eps=cfg.eps, **kw)
    if cfg.name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, scale_parameter=False, relative_step=False, warmup_init=False, **kw)
    if cfg.name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ValueError("train.optim.name=prodigy needs the prodigyopt package: "
                             "pip install 'wantune[prodigy]'") from None
        return Prodigy(params, betas=tuple(cfg.betas), eps=cfg.eps, **kw)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return 1.0
    span = max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.scheduler == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * (1 - progress)


def build_scheduler(optimizer, cfg: OptimConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, max_steps))
