"""What is trained: PEFT LoRA on the DiT's Linears, or chosen parameters in full (with EMA)."""
from __future__ import annotations

import re

import torch
from torch import nn

from .config import DEFAULT_LORA_TARGETS, FullConfig, LoraConfig

I2V_ONLY = ("cross_attn.k_img", "cross_attn.v_img")


def resolve_lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """Full module names of the block Linears that the targets name.

    A target is a module-name suffix ('self_attn.q', 'ffn.0') or a regex prefixed 're:' matched
    against the full name. A target that matches nothing is an error, except the I2V-only
    defaults on a T2V model.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("blocks.")]
    chosen, unmatched = [], []
    is_default = list(targets) == DEFAULT_LORA_TARGETS
    for target in targets:
        if target.startswith("re:"):
            rx = re.compile(target[3:])
            hits = [n for n in linears if rx.fullmatch(n) or rx.search(n)]
        else:
            hits = [n for n in linears if n.endswith("." + target) or n == target]
        if not hits and not (is_default and target in I2V_ONLY):
            unmatched.append(target)
        chosen += [h for h in hits if h not in chosen]
    if unmatched:
        examples = sorted({n.split(".", 2)[2] for n in linears})
        raise ValueError(f"lora.targets {unmatched} match no Linear in the transformer blocks; "
                         f"valid names are {examples} (or 're:<regex>' over full names)")
    return chosen


def add_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Inject PEFT LoRA layers in place (module names stay official); returns the targets."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    targets = resolve_lora_targets(model, list(cfg.targets))
    peft_cfg = PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                              target_modules=targets, use_dora=cfg.use_dora, init_lora_weights=True)
    inject_adapter_in_model(peft_cfg, model)
    for name, p in model.named_parameters():
        is_lora = "lora_" in name
        p.requires_grad_(is_lora)
        if is_lora and p.dtype != torch.float32:
            p.data = p.data.float()  # adapter weights train in float32 whatever the base dtype
    return targets


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors, named as PEFT names them inside the model (with '.default')."""
    return {k: v.detach() for k, v in model.state_dict().items() if "lora_" in k}


def select_full(model: nn.Module, cfg: FullConfig) -> list[str]:
    """Turn on gradients for parameters matching any of cfg.parts; error if none matches."""
    rxs = [re.compile(p) for p in cfg.parts]
    chosen = []
    for name, p in model.named_parameters():
        on = any(rx.search(name) for rx in rxs)
        p.requires_grad_(on)
        if on:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"full.parts {list(cfg.parts)} match no parameter of the transformer")
    return chosen


class EMA:
    """Exponential moving average of the trained parameters (float32, same device)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.names = list(params)
        self.shadow = [p.detach().float().clone() for p in params.values()]

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        current = [params[n].detach().float() for n in self.names]
        torch._foreach_lerp_(self.shadow, current, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(sd[n])
