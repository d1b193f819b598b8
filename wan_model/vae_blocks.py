"""Building blocks of the Wan 2.1 3-D causal VAE.

Module and attribute names follow the official `WanVAE_` exactly (`residual.0.gamma`,
`resample.1`, `time_conv`, `to_qkv`, `head.2`, ...), so `Wan2.1_VAE.pth` loads with a plain
strict name match. Sequential indices are part of the key names: do not reorder them.

Video is processed causally in chunks. Every temporal convolution keeps the last CACHE_T frames
of its input in a `FeatureCache`, which the next chunk uses instead of zero padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CACHE_T = 2
# Marks an upsample3d slot after the first decoded chunk, whose time_conv was skipped, so that
# latent frame 0 decodes to exactly one frame (the official code uses the same string).
_REP = "Rep"
_LOW_PRECISION = (torch.float16, torch.bfloat16)


class FeatureCache:
    """Per-layer tensors carried from one chunk to the next.

    Layers visit their slot in the same order in every chunk; `next_chunk` rewinds the cursor.
    A new cache per encode/decode call means nothing leaks between calls.
    """

    def __init__(self):
        self.slots: list = []
        self.index = 0

    def next_chunk(self) -> None:
        self.index = 0

    def peek(self):
        return self.slots[self.index] if self.index < len(self.slots) else None

    def store(self, value) -> None:
        if self.index == len(self.slots):
            self.slots.append(value)
        else:
            self.slots[self.index] = value
        self.index += 1


class CausalConv3d(nn.Conv3d):
    """Conv3d padded symmetrically in space and only on the left (past) in time."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        # Space is zero-padded by the convolution itself (no copy of the input); time only on
        # the left, with cached frames of the previous chunk first and zeros for the rest.
        self._time_pad = 2 * pt
        self.padding = (0, ph, pw)

    def forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        pad = self._time_pad
        if pad == 0:
            return super().forward(x)
        parts = [x]
        if cache_x is not None:
            cache_x = cache_x[:, :, -pad:].to(x.device, x.dtype)
            parts.insert(0, cache_x)
            pad -= cache_x.shape[2]
        if pad > 0:
            parts.insert(0, x.new_zeros(*x.shape[:2], pad, *x.shape[3:]))
        return super().forward(torch.cat(parts, dim=2) if len(parts) > 1 else x)

    def forward_cached(self, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
        """Run on one chunk, using and then refreshing this layer's cache slot."""
        if cache is None:
            return self(x)
        previous = cache.peek()
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T and previous is not None:
            # A one-frame chunk: keep the last frame of the previous chunk too.
            keep = torch.cat([previous[:, :, -1:].to(keep.device), keep], dim=2)
        out = self(x, previous)
        cache.store(keep)
        return out


class RMS_norm(nn.Module):
    """`F.normalize(x, dim=channels) * sqrt(C) * gamma` (the official L2-normalise form).

    The normalisation runs in float32 for 16-bit inputs; in float32 this is the official op.
    """

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        shape = (dim, 1, 1) if images else (dim, 1, 1, 1)
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(shape))
        self.fused = False  # set by WanVAE.fuse_elementwise(): compiled kernels (vae_fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and _inference(x, self):
            from .vae_fused import rms_norm
            return rms_norm(x, self.gamma, self.scale)
        xf = x.float() if x.dtype in _LOW_PRECISION else x
        return F.normalize(xf, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        dropping = self.training and self.residual[5].p > 0
        if cache is not None and self.residual[0].fused and not dropping and _inference(x, self):
            from .vae_fused import residual_block
            return residual_block(self, x, cache)
        h = self.shortcut(x)
        for layer in self.residual:
            x = layer.forward_cached(x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (no temporal mixing)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        identity = x
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = self.norm(x)
        qkv = self.to_qkv(x).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2).contiguous()
        q, k, v = qkv.chunk(3, dim=-1)  # each [b*t, 1 head, h*w, c]
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        return x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4) + identity


class _Upsample2x(nn.Module):
    """Nearest-exact x2 in H and W, computed in float32 (as the official `Upsample`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """downsample2d / downsample3d / upsample2d / upsample3d, applied frame by frame in space."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(_Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        if self.mode == "upsample3d" and cache is not None:
            x = self._upsample_time(x, cache)
        b, c, t, h, w = x.shape
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
        x = x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)
        if self.mode == "downsample3d" and cache is not None:
            x = self._downsample_time(x, cache)
        return x

    def _upsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        previous = cache.peek()
        if previous is None:  # first chunk: one latent frame -> one frame, no time_conv
            cache.store(_REP)
            return x
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T:
            before = torch.zeros_like(keep) if _is_rep(previous) else previous[:, :, -1:].to(keep.device)
            keep = torch.cat([before, keep], dim=2)
        x_in = x
        x = self.time_conv(x) if _is_rep(previous) else self.time_conv(x, previous)
        cache.store(keep)
        # Channels [0:c] and [c:2c] become frames 2t and 2t+1.
        b, c, t, h, w = x_in.shape
        x = x.reshape(b, 2, c, t, h, w)
        return torch.stack((x[:, 0], x[:, 1]), dim=3).reshape(b, c, t * 2, h, w)

    def _downsample_time(self, x: torch.Tensor, cache: FeatureCache) -> torch.Tensor:
        previous = cache.peek()
        if previous is None:  # first chunk (one frame): nothing to pair it with yet
            cache.store(x.clone())
            return x
        keep = x[:, :, -1:].clone()
        x = self.time_conv(torch.cat([previous[:, :, -1:].to(x.device), x], dim=2))
        cache.store(keep)
        return x


def _is_rep(value) -> bool:
    return isinstance(value, str) and value == _REP


def _inference(x: torch.Tensor, module: nn.Module) -> bool:
    """True when no gradient can flow (the fused kernels are for inference only)."""
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for p in module.parameters())


def _run_sequence(layers: nn.Sequential, x: torch.Tensor, cache: FeatureCache | None) -> torch.Tensor:
    if (len(layers) == 3 and isinstance(layers[0], RMS_norm) and isinstance(layers[2], CausalConv3d)
            and cache is not None and layers[0].fused and _inference(x, layers)):
        from .vae_fused import head  # the head: norm -> SiLU -> causal conv, fused
        return head(layers, x, cache)
    for layer in layers:
        if isinstance(layer, CausalConv3d):
            x = layer.forward_cached(x, cache)
        elif isinstance(layer, (ResidualBlock, AttentionBlock, Resample)):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


def _middle(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim),
                         ResidualBlock(dim, dim, dropout))


def _head(dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(RMS_norm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out_dim, 3, padding=1))


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temperal_downsample,
                 dropout: float = 0.0):
        super().__init__()
        dims = [dim * u for u in [1, *dim_mult]]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "downsample3d" if temperal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = _middle(dims[-1], dropout)
        self.head = _head(dims[-1], z_dim)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.conv1.forward_cached(x, cache)
        x = _run_sequence(self.downsamples, x, cache)
        x = _run_sequence(self.middle, x, cache)
        return _run_sequence(self.head, x, cache)


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int, dim_mult, num_res_blocks: int, temperal_upsample,
                 dropout: float = 0.0):
        super().__init__()
        dims = [dim * u for u in [dim_mult[-1], *dim_mult[::-1]]]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = _middle(dims[0], dropout)
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the previous upsample halved the channels
                in_dim = in_dim // 2
            for _ in range(num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim, dropout))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                layers.append(Resample(out_dim, "upsample3d" if temperal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = _head(dims[-1], 3)

    def forward(self, x: torch.Tensor, cache: FeatureCache | None = None) -> torch.Tensor:
        x = self.conv1.forward_cached(x, cache)
        x = _run_sequence(self.middle, x, cache)
        x = _run_sequence(self.upsamples, x, cache)
        return _run_sequence(self.head, x, cache)
