"""FLOP counts of a Wan DiT step (the benchmark and the memory planner; convention in bench/NOTES.md).

Forward FLOPs count matrix products only (2 per multiply-add): the block Linears, the attention
products (QK^T and PV: 4*Lq*Lk*dim per attention), the text MLP, patch embedding and head, and
LoRA adapters (2*tokens*rank*(in+out) per adapted Linear). Elementwise work is not counted.

Training "model FLOPs" (what MFU is computed from):
- full fine-tune: 3 x forward (backward = 2 x forward: input and weight gradients);
- LoRA on a frozen base: Linears 2 x forward (no weight-gradient products for the frozen base),
  attention 3 x forward (its backward has no weights and costs 2 x its forward), adapters 3 x.
"Hardware FLOPs" add what activation checkpointing recomputes: one more forward for full
recompute, one more forward minus the self-attention products for selective checkpointing
(self-attention outputs saved), nothing without checkpointing.
"""
from __future__ import annotations

from dataclasses import dataclass

from wan_model.configs import DiTConfig

VAE_STRIDE = (4, 8, 8)


def latent_grid(width: int, height: int, frames: int) -> tuple[int, int, int]:
    """Latent frames/rows/cols of a clip (VAE stride 4x8x8)."""
    return (frames - 1) // VAE_STRIDE[0] + 1, height // VAE_STRIDE[1], width // VAE_STRIDE[2]


def video_tokens(cfg: DiTConfig, width: int, height: int, frames: int) -> int:
    f, h, w = latent_grid(width, height, frames)
    pt, ph, pw = cfg.patch_size
    return (f // pt) * (h // ph) * (w // pw)


@dataclass
class ForwardFlops:
    tokens: int
    linear: float  # frozen-able Linears inside the blocks + embeddings/head
    self_attention: float  # QK^T and PV of self-attention
    cross_attention: float  # QK^T and PV of cross-attention (text, and image tokens for I2V)
    lora: float  # adapter products

    @property
    def attention(self) -> float:
        return self.self_attention + self.cross_attention

    @property
    def total(self) -> float:
        return self.linear + self.attention + self.lora


def forward_flops(cfg: DiTConfig, width: int, height: int, frames: int, batch: int = 1,
                  text_len: int | None = None, lora_rank: int = 0,
                  lora_targets: tuple = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                                         "cross_attn.q", "cross_attn.k", "cross_attn.v",
                                         "cross_attn.o", "ffn.0", "ffn.2")) -> ForwardFlops:
    """Forward matmul FLOPs of one DiT call on a batch of clips of this size."""
    d, ffn, n_layers = cfg.dim, cfg.ffn_dim, cfg.num_layers
    L = video_tokens(cfg, width, height, frames)
    T = cfg.text_len if text_len is None else text_len
    ctx = T + (cfg.clip_tokens if cfg.is_i2v else 0)
    # (tokens through the Linear, in, out) for every Linear of a block
    shapes = {
        "self_attn.q": (L, d, d), "self_attn.k": (L, d, d), "self_attn.v": (L, d, d),
        "self_attn.o": (L, d, d), "cross_attn.q": (L, d, d), "cross_attn.o": (L, d, d),
        "cross_attn.k": (T, d, d), "cross_attn.v": (T, d, d),
        "ffn.0": (L, d, ffn), "ffn.2": (L, ffn, d),
    }
    if cfg.is_i2v:
        shapes["cross_attn.k_img"] = (cfg.clip_tokens, d, d)
        shapes["cross_attn.v_img"] = (cfg.clip_tokens, d, d)
    block_linear = sum(2 * n * i * o for n, i, o in shapes.values())
    block_lora = sum(2 * shapes[t][0] * lora_rank * (shapes[t][1] + shapes[t][2])
                     for t in lora_targets if t in shapes) if lora_rank else 0
    patch = 2 * L * cfg.in_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2] * d
    text = 2 * cfg.text_len * (cfg.text_dim * d + d * d)  # the text MLP runs on all 512 rows
    head = 2 * L * d * cfg.out_dim * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    time = 2 * (cfg.freq_dim * d + d * d + d * 6 * d)
    linear = n_layers * block_linear + patch + text + head + time
    self_attn = n_layers * 4 * L * L * d
    cross_attn = n_layers * 4 * L * ctx * d
    return ForwardFlops(tokens=L, linear=float(batch * linear), self_attention=float(batch * self_attn),
                        cross_attention=float(batch * cross_attn), lora=float(batch * n_layers * block_lora))


def step_flops(fwd: ForwardFlops, mode: str, checkpointing: str) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one training step; see the module docstring."""
    if mode == "full":
        model = 3 * fwd.total
    elif mode == "lora":
        model = 2 * fwd.linear + 3 * fwd.attention + 3 * fwd.lora
    else:
        raise ValueError(f"mode {mode!r}: lora or full")
    if checkpointing in ("full", "offload"):
        extra = fwd.total
    elif checkpointing.startswith("selective"):
        extra = fwd.total - fwd.self_attention
    elif checkpointing == "none":
        extra = 0.0
    else:
        raise ValueError(f"checkpointing {checkpointing!r}")
    return model, model + extra


def sampling_flops(fwd: ForwardFlops, steps: int, cfg_scale_on: bool = True) -> float:
    """Forward FLOPs of a sampling run: one (or two, with CFG) DiT calls per step."""
    return fwd.total * steps * (2 if cfg_scale_on else 1)
