"""Our training step with every speed lever switchable, for tools/bench.py and the GPU tests.

Levers (`StepSettings`): attention kernel, activation checkpointing (none / full / selective,
which keeps the self-attention outputs so backward does not recompute attention / offload,
which keeps checkpointed block inputs in host memory), frozen base dtype (bf16 / fp8), block
swap, torch.compile of the blocks, fused AdamW; or `planned`, which leaves the memory levers
to the trainer's memory planner under the case's memory cap. The model is built by the
trainer's own builder (`train.loop.build_model`) from a recipe made of these settings, so a
case can never time a configuration the trainer cannot run. The step keeps the loss on the
device and never reads a device value on the host, so consecutive steps queue without gaps.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from wantune.train.config import Recipe
from wantune.train.loop import build_model
from wantune.train.memory import apply_plan, default_plan, plan_recipe, planner_for
from wantune.train.objective import flow_loss, noisy_input
from wantune.train.optim import build_optimizer
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
    fp8_matmul: bool = False  # with base_dtype fp8: float8 GEMMs (train.fp8_matmul)
    fp8_fast_accum: bool = True  # their forward accumulation (train.fp8_fast_accum)
    fp8_quant_kernel: bool = True  # their inputs quantised by one Triton pass per row (train.fp8_quant_kernel)
    block_swap: int = 0
    segments: bool = False  # full checkpointing recomputed a segment at a time (train.checkpoint_segments)
    compile: bool = False
    fused_adamw: bool = True
    lora_rank: int = 32
    lr: float = 1e-4
    targets: list = field(default_factory=lambda: list(REFERENCE_TARGETS))
    planned: bool = False  # the memory planner picks checkpointing/offload/swap/base dtype

    def label(self) -> str:
        parts = [self.mode, f"attn={self.attention}"]
        if self.planned:
            parts.append("memory=planned")
        else:
            parts.append(f"ckpt={self.checkpointing}")
            if self.checkpointing == "selective" and self.selective_blocks >= 0:
                parts[-1] += f"[{self.selective_blocks}]"
            if self.segments:
                parts[-1] += "+segments"
            if self.mode == "lora":
                parts.append(f"base={self.base_dtype}" + ("+fp8-gemm" if self.fp8_matmul else "")
                             + ("(exact)" if self.fp8_matmul and not self.fp8_fast_accum else "")
                             + ("+quant-kernel" if self.fp8_matmul and self.fp8_quant_kernel else ""))
            if self.block_swap:
                parts.append(f"swap={self.block_swap}")
        parts.append("compile" if self.compile else "eager")
        parts.append("fused-adamw" if self.fused_adamw else "adamw")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return asdict(self)


def with_changes(s: StepSettings, **kw) -> StepSettings:
    return replace(s, **kw)


def set_attention(name: str) -> None:
    """The project's entry point: puts the kernel first in torch's SDPA order process-wide (so
    compiled blocks trace plain SDPA calls). "sdpa" restores torch's own order."""
    attention.set_backend(name)


def to_recipe(s: StepSettings) -> Recipe:
    """The training recipe these settings stand for (memory levers null when planned)."""
    if s.checkpointing not in CHECKPOINTING:
        raise ValueError(f"checkpointing {s.checkpointing!r}: one of {CHECKPOINTING}")
    r = Recipe()
    t = r.train
    t.mode, t.attention_backend, t.compile = s.mode, s.attention, s.compile
    t.optim.lr, t.optim.weight_decay = s.lr, 0.01
    r.lora.rank, r.lora.alpha, r.lora.targets = s.lora_rank, float(s.lora_rank), list(s.targets)
    if s.planned:
        return _as_the_trainer_checks(r, s)
    t.memory = "off"
    t.gradient_checkpointing = s.checkpointing != "none"
    t.checkpoint_mode = "selective" if s.checkpointing == "selective" else "full"
    t.selective_blocks = s.selective_blocks
    t.checkpoint_offload = -1 if s.checkpointing == "offload" else 0
    t.block_swap = s.block_swap
    t.base_dtype = s.base_dtype if s.mode == "lora" else "fp32"
    t.fp8_matmul = s.fp8_matmul
    t.fp8_fast_accum = s.fp8_fast_accum
    t.fp8_quant_kernel = s.fp8_quant_kernel
    t.checkpoint_segments = s.segments
    return _as_the_trainer_checks(r, s)


def _as_the_trainer_checks(r: Recipe, s: StepSettings) -> Recipe:
    """`r`, or a ValueError with the train section's problems the trainer would refuse it for
    (the model and data sections are filled in by the bench)."""
    problems = [p for p in r.problems() if p.startswith("train.")]
    if problems:
        raise ValueError(f"bench settings {s.label()}: the trainer refuses them: {'; '.join(problems)}")
    return r


def resolve(s: StepSettings, cfg, grid: tuple, batch: int, device, cap_gib: float | None,
            log=print) -> tuple[Recipe, object]:
    """(recipe with every lever set, the planner's estimate of its peak). Planned settings are
    planned for `cap_gib` (the card's free memory without a cap)."""
    recipe = to_recipe(s)
    if s.planned:
        recipe.train.memory_gib = cap_gib or 0.0
        return plan_recipe(recipe, cfg, grid, batch, device, log=log)
    n = cfg.num_layers
    plan = default_plan(recipe.train, n)
    recipe = apply_plan(recipe, plan, n)
    return recipe, planner_for(recipe, cfg, grid, batch, device).estimate(plan)


def make_optimizer(params, s: StepSettings, device) -> torch.optim.Optimizer:
    if s.fused_adamw or torch.device(device).type != "cuda":
        from wantune.train.config import OptimConfig

        return build_optimizer(params, OptimConfig(name="adamw", lr=s.lr, weight_decay=0.01),
                               torch.device(device).type)
    return torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01, foreach=True)  # the lever


@dataclass
class Batch:
    latents: torch.Tensor  # [B,16,F,H,W] float32
    context: torch.Tensor  # [B,512,text_dim] (all rows real: the reference's text length 512)
    extra: dict = field(default_factory=dict)  # I2V: clip_fea [B,257,clip_dim], y [B,20,F,H,W]


def make_batch(cfg, width: int, height: int, frames: int, device, seed: int = 0, batch: int = 1,
               text_len: int | None = None) -> Batch:
    from wan_model.flops import latent_grid

    g = torch.Generator(device=device).manual_seed(seed)
    f, h, w = latent_grid(width, height, frames)
    latents = torch.randn(batch, cfg.out_dim, f, h, w, generator=g, device=device)
    ctx = torch.randn(batch, text_len or cfg.text_len, cfg.text_dim, generator=g, device=device)
    extra = {}
    if cfg.is_i2v:
        extra = {"clip_fea": torch.randn(batch, cfg.clip_tokens, cfg.clip_dim, generator=g, device=device),
                 "y": torch.randn(batch, cfg.in_dim - cfg.out_dim, f, h, w, generator=g, device=device)}
    return Batch(latents, ctx, extra)


class TrainStep:
    """One optimizer step on a fixed batch with fresh noise and noise level each call; returns
    the loss as a device tensor (no host sync)."""

    recipe = None  # the resolved training recipe the model was built from
    estimate = None  # the memory planner's estimate of the step's peak

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
            pred = self.model(x_s, s * 1000.0, self.context, **self.batch.extra)
        return flow_loss(pred, target, s, "none")

    def __call__(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def build_step(load_model, s: StepSettings, batch: Batch, device, cfg, seed: int = 0,
               autocast: bool = True, cap_gib: float | None = None, log=print) -> TrainStep:
    """`load_model(dtype, device)` -> WanModel of config `cfg` with random weights. The model is
    built by the trainer's builder from these settings (planned under `cap_gib` if `s.planned`)."""
    grid = tuple(batch.latents.shape[2:])
    recipe, estimate = resolve(s, cfg, grid, batch.latents.shape[0], device, cap_gib, log=log)
    if not autocast:
        recipe.train.mixed_precision = "no"
    model, _ = build_model(recipe, device, load=load_model)
    params = [p for p in model.parameters() if p.requires_grad]
    step = TrainStep(model, params, s, batch, device, seed=seed, autocast=autocast)
    step.recipe, step.estimate = recipe, estimate
    return step
