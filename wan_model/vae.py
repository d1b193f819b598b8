"""The Wan 2.1 3-D causal VAE: video [B,3,T,H,W] in [-1,1] <-> normalised latents [B,16,T',H/8,W/8].

`WanVAE` reproduces the official `WanVAE` wrapper: chunked causal encode (1, 4, 4, ... frames),
posterior mean only (no sampling), `(mu - mean) / std`; decode one latent frame at a time,
clamped to [-1, 1]. T = 1 + 4k frames give 1 + k latent frames; extra frames are dropped, as in
the official code. Spatial tiling bounds memory at 720p (each tile runs over the whole time
axis with its own caches; tiles are blended linearly where they overlap).

`load_vae` reads the official `Wan2.1_VAE.pth`, a diffusers `vae/` folder, or a ComfyUI
single `.safetensors` file.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .configs import VAEConfig
from .convert_vae import diffusers_layout, official_layout, vae_name_from_diffusers
from .loading import (WeightsError, assign_weights, check_keys, expected_shapes, open_weights,
                      strip_prefix)
from .vae_blocks import CausalConv3d, Decoder3d, Encoder3d, FeatureCache, RMS_norm

SPATIAL = 8  # pixels per latent along H and W
TEMPORAL = 4  # frames per latent frame after the first
FILE_PREFIXES = ("first_stage_model.", "vae.")


@dataclass(frozen=True)
class Tiling:
    """Spatial tiles of `tile_px` pixels, neighbours overlapping by `overlap_px` (multiples of 8)."""

    tile_px: int = 256
    overlap_px: int = 64

    def __post_init__(self):
        if self.tile_px % SPATIAL or self.overlap_px % SPATIAL:
            raise ValueError(f"tiling: tile_px={self.tile_px} and overlap_px={self.overlap_px} "
                             f"must be multiples of {SPATIAL}")
        if not 0 <= self.overlap_px < self.tile_px:
            raise ValueError(f"tiling: overlap_px={self.overlap_px} must be >= 0 and smaller than "
                             f"tile_px={self.tile_px}")

    @classmethod
    def of(cls, value) -> "Tiling | None":
        if value is None or isinstance(value, Tiling):
            return value
        tile_px, overlap_px = value
        return cls(int(tile_px), int(overlap_px))


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles covering [0, size); the last tile is flush with the end."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    return list(range(0, size - tile, stride)) + [size - tile]


def _ramp(length: int, overlap: int, ramp_in: bool, ramp_out: bool) -> torch.Tensor:
    """Blend weights along one axis: rise over `overlap` where a neighbour precedes, fall where one follows."""
    w = torch.ones(length)
    if overlap > 0:
        up = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        if ramp_in:
            w[:overlap] = torch.minimum(w[:overlap], up)
        if ramp_out:
            w[-overlap:] = torch.minimum(w[-overlap:], up.flip(0))
    return w


class WanVAE(nn.Module):
    """Module names match the official `Wan2.1_VAE.pth` (encoder.*, conv1, conv2, decoder.*)."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        c = config
        self.config = config
        self.encoder = Encoder3d(c.dim, c.z_dim * 2, c.dim_mult, c.num_res_blocks, c.temperal_downsample)
        self.conv1 = CausalConv3d(c.z_dim * 2, c.z_dim * 2, 1)  # quant conv
        self.conv2 = CausalConv3d(c.z_dim, c.z_dim, 1)  # post-quant conv
        self.decoder = Decoder3d(c.dim, c.z_dim, c.dim_mult, c.num_res_blocks, c.temperal_downsample[::-1])
        self.tiling: Tiling | None = None
        self.channels_last = False
        self.encode_chunk = 1  # latent frames per causal chunk after the first (official: 1)
        self.decode_chunk = 1

    # -- settings -------------------------------------------------------------------------
    def enable_tiling(self, tile_px: int = 256, overlap_px: int = 64) -> None:
        self.tiling = Tiling(tile_px, overlap_px)

    def disable_tiling(self) -> None:
        self.tiling = None

    def use_channels_last(self, on: bool = True) -> "WanVAE":
        """Keep 3-D conv weights and activations channels-last (faster cuDNN convs on GPUs;
        the same numbers)."""
        fmt = torch.channels_last_3d if on else torch.contiguous_format
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                m.weight.data = m.weight.data.contiguous(memory_format=fmt)
        self.channels_last = on
        return self

    def set_chunks(self, encode: int = 1, decode: int = 1) -> "WanVAE":
        """Latent frames per causal chunk after the first one (the official passes use 1: four
        video frames per encoder call, one latent frame per decoder call).

        Every temporal layer is causal and carries the frames it needs from chunk to chunk, so
        any chunk length computes the same function; longer chunks give the GPU bigger
        convolutions (the deepest levels see one 104x60 frame per official chunk at 480p) and
        fewer launches, for memory that grows with the chunk."""
        for name, n in (("encode", encode), ("decode", decode)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"set_chunks: {name}={n!r} must be a whole number of latent frames >= 1")
        self.encode_chunk, self.decode_chunk = encode, decode
        return self

    def fuse_elementwise(self, on: bool = True) -> "WanVAE":
        """Inference through fused kernels (wan_model.vae_fused): every residual block's
        bias + RMS norm + SiLU written straight into the next causal convolution's input (a
        Triton kernel on CUDA, torch.compile elsewhere), the last bias and shortcut as one add,
        and the other norms compiled.

        On an H100 this takes an 832x480x81 encode from 0.91 s to 0.50 s. Numbers agree with
        eager to bf16 rounding. The first call of each new shape compiles (seconds)."""
        if on and torch.cuda.is_available():
            from . import vae_triton

            if vae_triton.triton is None:  # torch.compile needs Triton for CUDA code too
                import warnings

                warnings.warn("the VAE's fused kernels need Triton, which is not installed: the VAE "
                              "runs eager (pip install triton, or set data.vae_compile=false to "
                              "silence this)", stacklevel=2)
                on = False
        for m in self.modules():
            if isinstance(m, RMS_norm):
                m.fused = on
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.conv1.weight.dtype

    def _stats(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.config.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, std

    # -- public API -----------------------------------------------------------------------
    def encode(self, video: torch.Tensor, tile=None) -> torch.Tensor:
        """[B,3,T,H,W] in [-1,1] -> float32 normalised latents [B,z,(T-1)//4+1,H/8,W/8].

        `tile`: a Tiling or (tile_px, overlap_px); None uses `enable_tiling`'s setting.
        """
        _check_video(video)
        x = video.to(self.conv1.weight.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        tiling = Tiling.of(tile) or self.tiling
        mu = self._tiled(self._encode_tile, x, tiling, in_scale=SPATIAL, out_scale=1)
        mean, std = self._stats(mu.device)
        return (mu.float() - mean) / std

    def decode(self, latents: torch.Tensor, tile=None) -> torch.Tensor:
        """Normalised latents [B,z,T',h,w] -> float32 video [B,3,1+4(T'-1),8h,8w] in [-1,1]."""
        if latents.dim() != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"decode expects latents [B,{self.config.z_dim},T,h,w], "
                             f"got shape {tuple(latents.shape)}")
        mean, std = self._stats(latents.device)
        z = (latents.float() * std + mean).to(self.conv1.weight.device, self.dtype)
        x = self.conv2(z)  # pointwise, so it may run before the spatial split
        tiling = Tiling.of(tile) or self.tiling
        video = self._tiled(self._decode_tile, x, tiling, in_scale=1, out_scale=SPATIAL)
        return video.float().clamp_(-1.0, 1.0)

    # -- chunked causal passes (one fresh cache per call: nothing carries over) ------------
    def _encode_tile(self, x: torch.Tensor) -> torch.Tensor:
        cache = FeatureCache()
        step = TEMPORAL * self.encode_chunk
        usable = 1 + TEMPORAL * ((x.shape[2] - 1) // TEMPORAL)  # frames past 1 + 4k are dropped, as officially
        bounds = [(0, 1)] + [(s, min(s + step, usable)) for s in range(1, usable, step)]
        outs = []
        for start, end in bounds:
            cache.next_chunk()
            outs.append(self.encoder(x[:, :, start:end], cache))
        mu, _log_var = self.conv1(torch.cat(outs, dim=2)).chunk(2, dim=1)
        return mu

    def _decode_tile(self, x: torch.Tensor) -> torch.Tensor:
        cache = FeatureCache()
        outs = []
        bounds = [(0, 1)] + [(s, min(s + self.decode_chunk, x.shape[2]))
                             for s in range(1, x.shape[2], self.decode_chunk)]
        for start, end in bounds:
            cache.next_chunk()
            outs.append(self.decoder(x[:, :, start:end], cache))
        return torch.cat(outs, dim=2)

    def _tiled(self, fn, x: torch.Tensor, tiling: Tiling | None, in_scale: int, out_scale: int):
        """Run `fn` over spatial tiles (laid out on the latent grid) and blend the outputs."""
        lat_h, lat_w = x.shape[-2] // in_scale, x.shape[-1] // in_scale
        if tiling is None:
            return fn(x)
        tile, overlap = tiling.tile_px // SPATIAL, tiling.overlap_px // SPATIAL
        rows, cols = tile_starts(lat_h, tile, overlap), tile_starts(lat_w, tile, overlap)
        if len(rows) == 1 and len(cols) == 1:
            return fn(x)
        out = weight = None
        for top in rows:
            for left in cols:
                th, tw = min(tile, lat_h), min(tile, lat_w)
                piece = x[..., top * in_scale:(top + th) * in_scale, left * in_scale:(left + tw) * in_scale]
                y = fn(piece).float()
                if out is None:
                    out = y.new_zeros(*y.shape[:3], lat_h * out_scale, lat_w * out_scale)
                    weight = y.new_zeros(lat_h * out_scale, lat_w * out_scale)
                ov = overlap * out_scale
                w = (_ramp(th * out_scale, ov, top > 0, top + th < lat_h)[:, None]
                     * _ramp(tw * out_scale, ov, left > 0, left + tw < lat_w)[None, :]).to(y.device)
                rs = slice(top * out_scale, (top + th) * out_scale)
                cs = slice(left * out_scale, (left + tw) * out_scale)
                out[..., rs, cs] += y * w
                weight[rs, cs] += w
                del y
        return out / weight


def _check_video(video: torch.Tensor) -> None:
    if video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(f"encode expects video [B,3,T,H,W] in [-1,1], got shape {tuple(video.shape)}")
    h, w = video.shape[-2:]
    if h % SPATIAL or w % SPATIAL:
        raise ValueError(f"encode: height {h} and width {w} must be multiples of {SPATIAL} "
                         "(multiples of 16 for the DiT); resize or crop the video")


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

def infer_vae_config(shapes: dict[str, tuple], latents_stats: dict | None = None) -> VAEConfig:
    """A VAEConfig from official-name shapes. Unreadable parts fall back to the defaults, so
    that `check_keys` can then name exactly what does not fit."""
    d = VAEConfig()
    dim = _first_dim(shapes, [("encoder.conv1.weight", 0), ("decoder.head.2.weight", 1)], d.dim)
    z_dim = _first_dim(shapes, [("conv2.weight", 0), ("decoder.conv1.weight", 1)], d.z_dim)
    num_res_blocks, stages = official_layout(shapes)
    per_stage = num_res_blocks + 1
    dim_mult, temporal = [], []
    for s in range(stages):
        last_res = s * per_stage + num_res_blocks - 1
        out = shapes.get(f"encoder.downsamples.{last_res}.residual.6.weight")
        dim_mult.append(out[0] // dim if out else (d.dim_mult[s] if s < len(d.dim_mult) else 1))
        if s != stages - 1:
            temporal.append(f"encoder.downsamples.{s * per_stage + num_res_blocks}.time_conv.weight" in shapes)
    stats = latents_stats or {}
    return VAEConfig(dim=dim, z_dim=z_dim, dim_mult=tuple(dim_mult), num_res_blocks=num_res_blocks,
                     temperal_downsample=tuple(temporal),
                     latents_mean=tuple(stats.get("latents_mean", d.latents_mean)),
                     latents_std=tuple(stats.get("latents_std", d.latents_std)))


def _first_dim(shapes, candidates, default: int) -> int:
    for name, axis in candidates:
        if name in shapes:
            return int(shapes[name][axis])
    return default


# Keys that identify other components, so a wrong file gets a helpful message.
_OTHER_COMPONENTS = [
    (r"^(patch_embedding|blocks\.\d+\.self_attn|blocks\.\d+\.attn1|condition_embedder)\.", "a Wan DiT (transformer)"),
    (r"^(token_embedding|blocks\.\d+\.attn\.q|shared|encoder\.block\.\d+)", "the umT5 text encoder"),
    (r"^(visual\.|vision_model\.|textual\.|log_scale)", "the CLIP image encoder"),
]


def _guess_other_component(names) -> str | None:
    for pattern, what in _OTHER_COMPONENTS:
        if any(re.match(pattern, n) for n in names):
            return what
    return None


def _resolve_vae_path(path: Path) -> tuple[Path, dict | None]:
    """A file, a diffusers `vae/` folder, a diffusers repo root, or an official checkpoint folder."""
    if not path.is_dir():
        return path, None
    if (path / "Wan2.1_VAE.pth").exists():  # an official checkpoint folder (its config.json is the DiT's)
        return path / "Wan2.1_VAE.pth", None
    if (path / "vae").is_dir():  # a diffusers repo root
        path = path / "vae"
    config = None
    if (path / "config.json").exists():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise WeightsError(f"{path / 'config.json'}: not valid JSON ({e})") from e
    return path, config


def load_vae(path: str | os.PathLike, dtype: torch.dtype | None = torch.float32,
             device: torch.device | str = "cpu") -> WanVAE:
    """Load the Wan 2.1 VAE from `Wan2.1_VAE.pth`, a diffusers `vae/` folder (or repo root), or a
    ComfyUI `.safetensors` (official names, optional `first_stage_model.`/`vae.` prefix).

    Built on the meta device and filled tensor by tensor (peak memory ~ one copy). Parameters are
    frozen (`requires_grad=False`) and the module is in eval mode; `dtype=None` keeps the file's.
    """
    path, folder_config = _resolve_vae_path(Path(path))
    source = open_weights(path, "VAE")
    where = source.describe
    to_plain = strip_prefix(source.keys(), FILE_PREFIXES)
    other = _guess_other_component(to_plain.values())
    if other is not None:
        raise WeightsError(f"{where}: this looks like {other}, not a VAE (it has no encoder.conv1 / "
                           "decoder tensors of the Wan 2.1 VAE). Pass the VAE file: Wan2.1_VAE.pth, "
                           "a diffusers vae/ folder, or ComfyUI's wan_2.1_vae.safetensors")
    names = _to_official_names(to_plain, where)
    shapes = {names[k]: v for k, v in source.shapes().items()}
    _reject_other_vaes(shapes, where)
    stats = folder_config if folder_config and "latents_mean" in folder_config else None
    config = infer_vae_config(shapes, stats)
    with torch.device("meta"):
        model = WanVAE(config)
    check_keys(expected_shapes(model), shapes, where, "Wan 2.1 VAE",
               hint="expected the 194 tensors of Wan2.1_VAE.pth (official names) or of a diffusers "
                    "AutoencoderKLWan; is the file complete and of the right model?")
    assign_weights(model, source, names, dtype, device)
    source.close()
    return model.eval().requires_grad_(False)


def _to_official_names(to_plain: dict[str, str], where: str) -> dict[str, str]:
    """file name -> official module name (converting diffusers names if that is the layout)."""
    plain = list(to_plain.values())
    if "encoder.conv_in.weight" not in plain and not any(n.startswith("decoder.up_blocks.") for n in plain):
        return to_plain
    nrb, stages = diffusers_layout(plain)
    out = {}
    for file_name, name in to_plain.items():
        try:
            out[file_name] = vae_name_from_diffusers(name, nrb, stages)
        except KeyError as e:
            raise WeightsError(f"{where}: unexpected tensor {name!r} in a diffusers-layout VAE "
                               f"({e.args[0]}); is this an AutoencoderKLWan (Wan 2.1) file?") from None
    return out


def _reject_other_vaes(shapes: dict[str, tuple], where: str) -> None:
    conv_in = shapes.get("encoder.conv1.weight")
    if conv_in is not None and conv_in[1] != 3:
        raise WeightsError(f"{where}: encoder.conv1.weight has {conv_in[1]} input channels, not 3: "
                           "this looks like the Wan 2.2 VAE (patchified input), which is a different "
                           "model; pass the Wan 2.1 VAE (Wan2.1_VAE.pth)")
