"""Our training step with every speed lever switchable, for tools/bench.py and the GPU tests.

Levers (`StepSettings`): attention kernel, activation checkpointing (none / full / selective,
which keeps the self-attention outputs so backward does not recompute attention / offload,
which keeps checkpointed block inputs in host memory), frozen base dtype (bf16 / fp8), block
swap, torch.compile of the blocks, fused AdamW. The step keeps the loss on the device and
never reads a device value on the host, so consecutive steps queue without gaps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from train.adapters import add_lora, select_full
from train.config import FullConfig, LoraConfig
from train.objective import flow_loss, noisy_input
from wan_model import attention
from wan_model.transformer import WanModel

# The reference's targets: diffusers to_q/to_k/to_v/to_out.0 (both attentions), ffn.net.0.proj,
# ffn.net.2 -- in official names:
REFERENCE_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                     "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
CHECKPOINTING = ("none", "full", "selective", "offload")


@dataclass
class StepSettings:
    mode: str = "lora"  # lora | full
    attention: str = "cudnn"  # cudnn | flash | efficient | flash_attn | sdpa | auto
    checkpointing: str = "selective"  # none | full | selective | offload
    selective_blocks: int = -1  # selective: blocks (from the first) whose self-attention is kept; -1 all
    base_dtype: str = "bf16"  # bf16 | fp8 (LoRA) ; full fine-tuning keeps fp32 master weights
    block_swap: int = 0
    compile: bool = False
    fused_adamw: bool = True
    lora_rank: int = 32
    lr: float = 1e-4
    targets: list = field(default_factory=lambda: list(REFERENCE_TARGETS))

    def label(self) -> str:
        parts = [self.mode, f"attn={self.attention}", f"ckpt={self.checkpointing}"]
        if self.checkpointing == "selective" and self.selective_blocks >= 0:
            parts[-1] += f"[{self.selective_blocks}]"
        if self.mode == "lora":
            parts.append(f"base={self.base_dtype}")
        if self.block_swap:
            parts.append(f"swap={self.block_swap}")
        parts.append("compile" if self.compile else "eager")
        parts.append("fused-adamw" if self.fused_adamw else "adamw")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def with_changes(s: StepSettings, **kw) -> StepSettings:
    return replace(s, **kw)


# ---- attention and checkpointing: the model's own switches ----------------------------------

def set_attention(name: str, compiled: bool = False) -> None:
    """The project's entry point: puts the kernel first in torch's SDPA order process-wide (so
    compiled blocks trace plain SDPA calls). "sdpa" restores torch's own order."""
    attention.set_backend(name)


def install_block_runner(model: WanModel, checkpointing: str, compile_blocks: bool,
                         selective_blocks: int = -1) -> None:
    """Set the model's checkpointing switches (the checkpoint sits inside each block's forward,
    so a compiled block compiles its checkpoint too) and compile the blocks if asked."""
    if checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing {checkpointing!r}: one of {CHECKPOINTING}")
    model.gradient_checkpointing = checkpointing != "none"
    model.checkpoint_mode = "selective" if checkpointing == "selective" else "full"
    model.selective_blocks = selective_blocks
    model.checkpoint_offload = checkpointing == "offload"
    if compile_blocks:
        model.compile_blocks()


# ---- model + optimizer ----------------------------------------------------------------------

def prepare_model(model: WanModel, s: StepSettings, device) -> tuple[WanModel, list]:
    """Apply the levers to a loaded model; returns (model, trained parameters)."""
    device = torch.device(device)
    if s.base_dtype == "fp8":
        if s.mode != "lora":
            raise ValueError("base_dtype fp8 is for LoRA only")
        from wan_model.fp8 import quantize_linears_

        quantize_linears_(model, work_device=device)
    if s.mode == "lora":
        model.requires_grad_(False)
        add_lora(model, LoraConfig(rank=s.lora_rank, alpha=float(s.lora_rank), targets=list(s.targets)))
    else:
        select_full(model, FullConfig())
    if s.block_swap:
        from wan_model.block_swap import enable_block_swap

        enable_block_swap(model, s.block_swap, device)
    else:
        model.to(device)
    set_attention(s.attention, s.compile)
    install_block_runner(model, s.checkpointing, s.compile, s.selective_blocks)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def make_optimizer(params, s: StepSettings, device) -> torch.optim.Optimizer:
    fused = s.fused_adamw and torch.device(device).type == "cuda"
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01, fused=fused or None,
                             foreach=None if fused else True)


@dataclass
class Batch:
    latents: torch.Tensor  # [B,16,F,H,W] float32
    context: torch.Tensor  # [B,512,text_dim] (all rows real: the reference's text length 512)


def make_batch(cfg, width: int, height: int, frames: int, device, seed: int = 0, batch: int = 1,
               text_len: int | None = None) -> Batch:
    from bench.flops import latent_grid

    g = torch.Generator(device=device).manual_seed(seed)
    f, h, w = latent_grid(width, height, frames)
    latents = torch.randn(batch, cfg.out_dim, f, h, w, generator=g, device=device)
    ctx = torch.randn(batch, text_len or cfg.text_len, cfg.text_dim, generator=g, device=device)
    return Batch(latents, ctx)


class TrainStep:
    """One optimizer step on a fixed batch with fresh noise and noise level each call; returns
    the loss as a device tensor (no host sync)."""

    def __init__(self, model: WanModel, params: list, settings: StepSettings, batch: Batch, device,
                 seed: int = 0, autocast: bool = True):
        self.model, self.params, self.settings = model, params, settings
        self.batch = batch
        self.device = torch.device(device)
        self.optimizer = make_optimizer(params, settings, self.device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.autocast = autocast
        self.context = batch.context.to(torch.bfloat16 if autocast else torch.float32)

    def loss(self) -> torch.Tensor:
        x0 = self.batch.latents
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device)
        s = torch.rand(x0.shape[0], generator=self.generator, device=self.device)
        x_s, target = noisy_input(x0, noise, s)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            pred = self.model(x_s, s * 1000.0, self.context)
        return flow_loss(pred, target, s, "none")

    def __call__(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def build_step(load_model, s: StepSettings, batch: Batch, device, seed: int = 0,
               autocast: bool = True) -> TrainStep:
    """`load_model(dtype, device)` -> WanModel. LoRA loads the base in bf16 (fp8 quantises it);
    full fine-tuning loads float32 master weights and trains under bf16 autocast. With block
    swap the model is loaded to the host and only what stays resident goes to the device."""
    dtype = torch.float32 if (s.mode == "full" or not autocast) else torch.bfloat16
    load_device = "cpu" if s.block_swap else device
    model = load_model(dtype, load_device)
    model, params = prepare_model(model, s, device)
    return TrainStep(model, params, s, batch, device, seed=seed, autocast=autocast)
