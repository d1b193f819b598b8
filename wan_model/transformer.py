"""The Wan 2.1 DiT (`WanModel`), with module names identical to the official checkpoint.

Dtype policy (as the official model): the time embedding, modulation, all LayerNorms and the
RMSNorm arithmetic, the gated residual adds (so the residual stream) and the head run in
float32; the Linears and the patch embedding run in the compute dtype (bf16 under autocast, or
the weights' dtype). RoPE tables are built once per grid shape and device and then reused.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from . import checkpointing
from .attention import attention
from .configs import DiTConfig
from .fp8 import feed_forward
from .rope import RopeCache, apply_rope

# Parameters kept in float32 when the rest of the model is loaded in bf16/fp16.
FP32_PATTERNS = ("modulation", "norm", "time_embedding", "time_projection", "head.head", "img_emb.proj.0",
                 "img_emb.proj.4")


def keep_fp32(name: str) -> bool:
    return any(p in name for p in FP32_PATTERNS)


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[cos(t f), sin(t f)] with f_j = 10000^(-j/half); float64 as the official code, then float32."""
    half = dim // 2
    pos = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float64).div(half))
    sinusoid = torch.outer(pos, freqs)
    return torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float()


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, times a weight over the full dim."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back to the input dtype."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        self.sequence_parallel = None  # a SequenceParallel: x holds this rank's tokens only

    def forward(self, x, rope):
        b, s, _ = x.shape
        n = self.num_heads
        v = self.v(x).view(b, s, n, -1)
        q = apply_rope(self.norm_q(self.q(x)).view(b, s, n, -1), rope).to(v.dtype)
        k = apply_rope(self.norm_k(self.k(x)).view(b, s, n, -1), rope).to(v.dtype)
        if self.sequence_parallel is not None:  # the whole sequence, this rank's heads
            return self.o(self.sequence_parallel.attention(q, k, v, attention).flatten(2))
        return self.o(attention(q, k, v).flatten(2))


class CrossAttention(nn.Module):
    """Text cross-attention; with `image_tokens` > 0 also the I2V image branch (k_img/v_img)."""

    def __init__(self, dim: int, num_heads: int, eps: float, image_tokens: int = 0):
        super().__init__()
        self.num_heads = num_heads
        self.image_tokens = image_tokens
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if image_tokens:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)

    def forward(self, x, context):
        b, n = x.shape[0], self.num_heads
        q = self.norm_q(self.q(x)).view(b, -1, n, self.q.out_features // n)
        if self.image_tokens:
            img, context = context[:, : self.image_tokens], context[:, self.image_tokens:]
        k = self.norm_k(self.k(context)).view(b, -1, n, q.shape[-1])
        v = self.v(context).view(b, -1, n, q.shape[-1])
        q = q.to(v.dtype)
        out = attention(q, k.to(v.dtype), v)
        if self.image_tokens:
            k_img = self.norm_k_img(self.k_img(img)).view(b, -1, n, q.shape[-1])
            v_img = self.v_img(img).view(b, -1, n, q.shape[-1])
            out = out + attention(q, k_img.to(v_img.dtype), v_img)
        return self.o(out.flatten(2))


def _call(fn, *args):
    return fn(*args)


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        dim = cfg.dim
        self.norm1 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(dim, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, cfg.num_heads, cfg.eps,
                                         cfg.clip_tokens if cfg.is_i2v else 0)
        self.norm2 = LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    # the methods that touch the block's weights, for block swap (`wan_model/block_swap.py`)
    SEGMENTS = ("_self_part", "_cross_part", "_ffn_part")

    def forward(self, x, e0, context, rope, compute_dtype, ckpt: str | None = None):
        """x [B,L,dim] float32 residual stream; e0 [B,6,dim] float32. With `ckpt` ("full" or
        "selective") the block's activations are checkpointed; "segments": checkpointed as
        "full", and its recompute in backward checkpointed again per segment (self-attention,
        cross-attention, FFN), so that backward holds one segment's activations at a time, for
        one more forward of the block. The checkpoint sits inside forward so that a compiled
        block compiles it too."""
        if ckpt == "segments":
            return self._checkpointed_segments(x, e0, context, rope, compute_dtype)
        if ckpt is not None:
            return checkpointing.run(self._forward, x, e0, context, rope, compute_dtype, mode=ckpt)
        return self._forward(x, e0, context, rope, compute_dtype)

    @torch._dynamo.disable
    def _checkpointed_segments(self, x, e0, context, rope, compute_dtype):
        """Nested checkpoints run eager in a compiled block (a graph break): the memory lever for
        the tightest plans, where the time goes to recomputing anyway."""
        return checkpointing.run(self._forward, x, e0, context, rope, compute_dtype, True, mode="full")

    def _forward(self, x, e0, context, rope, compute_dtype, segments: bool = False):
        """The block; with `segments` each segment checkpointed from its float32 residual input."""
        run = checkpointing.run if segments else _call
        m = (self.modulation.float() + e0).chunk(6, dim=1)
        x = run(self._self_part, x, m, rope, compute_dtype)
        x = run(self._cross_part, x, context, compute_dtype)
        return run(self._ffn_part, x, m, compute_dtype)

    def _self_part(self, x, m, rope, compute_dtype):
        h = (self.norm1(x) * (1 + m[1]) + m[0]).to(compute_dtype)
        return x + self.self_attn(h, rope).float() * m[2]

    def _cross_part(self, x, context, compute_dtype):
        return x + self.cross_attn(self.norm3(x).to(compute_dtype), context).float()

    def _ffn_part(self, x, m, compute_dtype):
        h = (self.norm2(x) * (1 + m[4]) + m[3]).to(compute_dtype)
        return x + feed_forward(self.ffn, h).float() * m[5]


class Head(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e):
        with torch.autocast(x.device.type, enabled=False):
            m = (self.modulation.float() + e.unsqueeze(1)).chunk(2, dim=1)
            h = self.norm(x.float()) * (1 + m[1]) + m[0]
            return F.linear(h, self.head.weight.float(), self.head.bias.float())


class MLPProj(nn.Module):
    """The I2V image-token MLP (`img_emb`): LN -> Linear -> GELU -> Linear -> LN."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # LayerNorm (eps 1e-5, affine) in float32, as autocast runs it in the official model.
        self.proj = nn.Sequential(LayerNorm(in_dim, 1e-5), nn.Linear(in_dim, in_dim), nn.GELU(),
                                  nn.Linear(in_dim, out_dim), LayerNorm(out_dim, 1e-5))

    def forward(self, x):
        return self.proj(x)


class WanModel(nn.Module):
    """`model(x, t, context, clip_fea=None, y=None)` -> velocity [B, out_dim, F, H, W] float32.

    x [B,16,F,H,W]; t [B] on the 0..1000 scale; context [B,L,text_dim] or a list of [L_i,text_dim]
    (zero-padded to text_len here, as the official model does); I2V: clip_fea [B,257,clip_dim] and
    y [B,20,F,H,W] (mask + first-frame latent), concatenated to x along channels.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size,
                                         stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        if cfg.is_i2v:
            self.img_emb = MLPProj(cfg.clip_dim, dim)
        self.rope = RopeCache(cfg.head_dim)
        self.gradient_checkpointing = False
        self.checkpoint_mode = "full"  # or "selective": keep self-attention outputs
        self.selective_blocks = -1  # selective: only the first N blocks keep them (-1 = all)
        self.offload_blocks = 0  # the first N blocks keep their checkpointed inputs in host memory (-1 = all)
        self.checkpoint_segments = False  # blocks recomputing everything do so a segment at a time
        self.sequence_parallel = None  # set by wan_model.sequence_parallel.attach

    # -- helpers -------------------------------------------------------------------------------
    def compute_dtype(self) -> torch.dtype:
        device_type = self.patch_embedding.weight.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        dtype = self.blocks[0].self_attn.q.weight.dtype if len(self.blocks) else torch.float32
        if dtype in (torch.float32, torch.float16, torch.bfloat16):
            return dtype
        # float8 block weights (wan_model/fp8.py): compute in the dtype the rest was loaded in
        return self.patch_embedding.weight.dtype

    def embed_context(self, context) -> torch.Tensor:
        """Zero-pad every prompt embedding to text_len rows, then the text MLP."""
        text_len = self.cfg.text_len
        if isinstance(context, torch.Tensor) and context.dim() == 3:
            context = list(context.unbind(0))
        rows = []
        for i, c in enumerate(context):
            if c.shape[0] > text_len:
                raise ValueError(f"context[{i}] has {c.shape[0]} tokens; the model takes at most "
                                 f"{text_len} (cut the prompt embedding to its real length)")
            if c.shape[-1] != self.cfg.text_dim:
                raise ValueError(f"context[{i}] has width {c.shape[-1]}, the model expects "
                                 f"{self.cfg.text_dim}")
            rows.append(F.pad(c, (0, 0, 0, text_len - c.shape[0])))
        ctx = torch.stack(rows).to(self.text_embedding[0].weight.device)
        return self.text_embedding(ctx.to(self.compute_dtype()))

    def time_embed(self, t: torch.Tensor):
        with torch.autocast(t.device.type, enabled=False):
            sin = sinusoidal_embedding(self.cfg.freq_dim, t)
            e = F.linear(F.silu(F.linear(sin, self.time_embedding[0].weight.float(),
                                         self.time_embedding[0].bias.float())),
                         self.time_embedding[2].weight.float(), self.time_embedding[2].bias.float())
            e0 = F.linear(F.silu(e), self.time_projection[1].weight.float(),
                          self.time_projection[1].bias.float())
        return e, e0.unflatten(1, (6, self.cfg.dim))

    def keeps_attention(self, index: int) -> bool:
        """Whether block `index` keeps its self-attention output (selective checkpointing)."""
        return self.selective_blocks < 0 or index < self.selective_blocks

    def segmented(self, index: int) -> bool:
        """Whether block `index`, when it recomputes everything, does so in segments."""
        return self.checkpoint_segments

    def offloads(self, index: int) -> bool:
        """Whether block `index` keeps its checkpointed inputs in host memory."""
        return self.offload_blocks < 0 or index < self.offload_blocks

    def _run_block(self, index, block, x, e0, context, rope, dtype):
        swap = getattr(self, "block_swap", None)  # wan_model/block_swap.py
        if swap is None:
            return self._call_block(index, block, x, e0, context, rope, dtype, None)
        with swap.running(index) as keep:  # outside the compiled block, so that it stays compiled
            return self._call_block(index, block, x, e0, context, rope, dtype, keep)

    def _call_block(self, index, block, x, e0, context, rope, dtype, keep):
        if not (self.gradient_checkpointing and torch.is_grad_enabled()):
            return block(x, e0, context, rope, dtype)
        mode = self.checkpoint_mode
        if mode == "selective" and not self.keeps_attention(index):
            mode = "full"  # memory is tight: the later blocks recompute their attention
        if mode == "full" and self.segmented(index):
            mode = "segments"  # tighter still: the recompute in backward too, a segment at a time
        offload = self.offloads(index)
        if not offload and keep is None:
            return block(x, e0, context, rope, dtype, mode)
        rope_parts = rope if isinstance(rope, (tuple, list)) else (rope,)
        inputs = (x, e0, context, *rope_parts) if offload else ()
        with checkpointing.HostOffload(*inputs, keep=keep):  # outside the compiled block
            return block(x, e0, context, rope, dtype, mode)

    def compile_blocks(self, **kwargs) -> None:
        """torch.compile every block (one compiled graph serves all of them: same code, the
        weights are graph inputs). Fuses the float32 norm/modulation/RoPE/gating passes."""
        for block in self.blocks:
            block.compile(**kwargs)

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x, t, context, clip_fea=None, y=None):
        cfg = self.cfg
        if cfg.is_i2v:
            if clip_fea is None or y is None:
                raise ValueError("this is an I2V model: pass clip_fea [B,257,1280] and y [B,20,F,H,W]")
            x = torch.cat([x, y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"x has {x.shape[1]} channels, the model expects {cfg.in_dim}")
        dtype = self.compute_dtype()
        b, _, f, hh, ww = x.shape
        pt, ph, pw = cfg.patch_size
        grid = (f // pt, hh // ph, ww // pw)
        x = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).float()
        rope = self.rope.get(grid, x.device)
        sp = self.sequence_parallel
        if sp is not None:  # from here to the head this rank holds only its share of the tokens
            sp.begin(x.shape[1])
            x, rope = sp.shard(x), tuple(sp.shard(r) for r in rope)
        t = t.to(x.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(b)
        e, e0 = self.time_embed(t)
        context = self.embed_context(context)
        if cfg.is_i2v:
            context = torch.cat([self.img_emb(clip_fea.to(dtype)).to(context.dtype), context], dim=1)
        for i, block in enumerate(self.blocks):
            x = self._run_block(i, block, x, e0, context, rope, dtype)
        x = self.head(x, e)
        if sp is not None:
            x = sp.gather(x)
        return self.unpatchify(x, grid)

    def unpatchify(self, x, grid):
        b = x.shape[0]
        pt, ph, pw = self.cfg.patch_size
        c = self.cfg.out_dim
        x = x.view(b, *grid, pt, ph, pw, c)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, c, grid[0] * pt, grid[1] * ph, grid[2] * pw)


def meta_model(cfg: DiTConfig, dtype: torch.dtype) -> WanModel:
    """The DiT of `cfg` on the meta device in the dtypes `load_transformer` gives it: the float32
    islands (`keep_fp32`) float32, every other parameter `dtype`. For counting bytes: no storage."""
    with torch.device("meta"):
        model = WanModel(cfg)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keep_fp32(name) else dtype)
    return model
