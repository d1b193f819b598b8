"""Flow-matching objective: x_s = (1-s) x0 + s*noise, target noise - x0, model timestep 1000*s."""
from __future__ import annotations

import math

import torch

from .config import TimestepConfig


def sample_sigmas(cfg: TimestepConfig, n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Noise levels s in [cfg.min, cfg.max], drawn on the host generator then moved (no sync)."""
    if cfg.sampling == "uniform":
        s = torch.rand(n, generator=generator)
    elif cfg.sampling == "logit_normal":
        s = torch.sigmoid(torch.randn(n, generator=generator) * cfg.logit_std + cfg.logit_mean)
    elif cfg.sampling in ("sigmoid", "shift"):
        s = torch.sigmoid(torch.randn(n, generator=generator) * cfg.sigmoid_scale)
        if cfg.sampling == "shift":
            s = shift_sigma(s, cfg.shift)
    else:
        raise ValueError(f"unknown timestep sampling {cfg.sampling!r}")
    s = cfg.min + (cfg.max - cfg.min) * s
    return s.to(device, non_blocking=True)


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def loss_weights(s: torch.Tensor, scheme: str) -> torch.Tensor:
    if scheme == "none":
        return torch.ones_like(s)
    if scheme == "sigma_sqrt":
        return (s.clamp(min=1e-3) ** -2.0).clamp(max=100.0)
    if scheme == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * s + 2 * s**2))
    raise ValueError(f"unknown loss weighting {scheme!r}")


def noisy_input(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor):
    """(x_s, target) for latents x0 [B,C,F,H,W] and noise levels s [B]."""
    sv = s.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - sv) * x0 + sv * noise, noise - x0


def flow_loss(pred: torch.Tensor, target: torch.Tensor, s: torch.Tensor, scheme: str) -> torch.Tensor:
    """Weighted MSE on the velocity, averaged per sample then over the batch."""
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    w = loss_weights(s.float(), scheme)
    return (per_sample * w).mean()
