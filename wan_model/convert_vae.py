"""Wan 2.1 VAE: official names <-> diffusers `AutoencoderKLWan` names, and saving in each layout.

The conversion is pure renaming (no transposes, no reshapes). Names are split into a block
prefix (tables below) and the name inside the block; residual blocks rename their insides too.
The decoder's flat `upsamples.N` list maps to `up_blocks.k.resnets.j` / `up_blocks.k.upsamplers.0`,
which depends on `num_res_blocks` and the number of stages (2 and 4 in every released config).
"""
from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from pathlib import Path

import torch

from .configs import VAEConfig
from .loading import save_safetensors_atomic, save_torch_atomic, write_text_atomic

# Block prefixes that do not depend on the config: (official, diffusers).
TOP_PREFIXES = [
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("encoder.conv1.", "encoder.conv_in."),
    ("encoder.middle.0.", "encoder.mid_block.resnets.0."),
    ("encoder.middle.1.", "encoder.mid_block.attentions.0."),
    ("encoder.middle.2.", "encoder.mid_block.resnets.1."),
    ("encoder.head.0.", "encoder.norm_out."),
    ("encoder.head.2.", "encoder.conv_out."),
    ("decoder.conv1.", "decoder.conv_in."),
    ("decoder.middle.0.", "decoder.mid_block.resnets.0."),
    ("decoder.middle.1.", "decoder.mid_block.attentions.0."),
    ("decoder.middle.2.", "decoder.mid_block.resnets.1."),
    ("decoder.head.0.", "decoder.norm_out."),
    ("decoder.head.2.", "decoder.conv_out."),
]

# Inside a residual block: (official, diffusers). Attention and resample insides
# (`norm.gamma`, `to_qkv`, `proj`, `resample.1`, `time_conv`) keep their names.
RESBLOCK_INNER = [
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
]

DIFFUSERS_VERSION = "0.33.0"


def _stage_prefixes(num_res_blocks: int, num_stages: int) -> list[tuple[str, str]]:
    """encoder.downsamples.N and decoder.upsamples.N -> their diffusers block prefixes."""
    pairs = []
    n_encoder = num_stages * num_res_blocks + (num_stages - 1)
    pairs += [(f"encoder.downsamples.{i}.", f"encoder.down_blocks.{i}.") for i in range(n_encoder)]
    i = 0
    for stage in range(num_stages):
        for j in range(num_res_blocks + 1):
            pairs.append((f"decoder.upsamples.{i}.", f"decoder.up_blocks.{stage}.resnets.{j}."))
            i += 1
        if stage != num_stages - 1:
            pairs.append((f"decoder.upsamples.{i}.", f"decoder.up_blocks.{stage}.upsamplers.0."))
            i += 1
    return pairs


def _rename(name: str, prefixes, inner, direction: int) -> str:
    """direction 0: official -> diffusers; 1: diffusers -> official."""
    src, dst = direction, 1 - direction
    for pair in prefixes:
        if name.startswith(pair[src]):
            rest = name[len(pair[src]):]
            for inner_pair in inner:
                if rest.startswith(inner_pair[src]):
                    rest = inner_pair[dst] + rest[len(inner_pair[src]):]
                    break
            return pair[dst] + rest
    side = ("official", "diffusers")[src]
    raise KeyError(f"{name!r} is not a Wan 2.1 VAE tensor name in the {side} layout")


def vae_name_to_diffusers(name: str, num_res_blocks: int = 2, num_stages: int = 4) -> str:
    return _rename(name, TOP_PREFIXES + _stage_prefixes(num_res_blocks, num_stages), RESBLOCK_INNER, 0)


def vae_name_from_diffusers(name: str, num_res_blocks: int = 2, num_stages: int = 4) -> str:
    return _rename(name, TOP_PREFIXES + _stage_prefixes(num_res_blocks, num_stages), RESBLOCK_INNER, 1)


def official_layout(names) -> tuple[int, int]:
    """(num_res_blocks, num_stages) read off official names (the decoder's flat list)."""
    enc = {int(m.group(1)) for n in names if (m := re.match(r"encoder\.downsamples\.(\d+)\.", n))}
    resamples = sorted({int(m.group(1)) for n in names
                        if (m := re.match(r"encoder\.downsamples\.(\d+)\.resample\.", n))})
    if not enc or not resamples:
        return 2, 4
    num_res_blocks = resamples[0]
    return num_res_blocks, len(resamples) + 1


def diffusers_layout(names) -> tuple[int, int]:
    """(num_res_blocks, num_stages) read off diffusers names."""
    stages = {int(m.group(1)) for n in names if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", n))}
    resnets = {int(m.group(1)) for n in names if (m := re.match(r"decoder\.up_blocks\.0\.resnets\.(\d+)\.", n))}
    if not stages or not resnets:
        return 2, 4
    return len(resnets) - 1, len(stages)


def vae_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    nrb, stages = official_layout(sd)
    return OrderedDict((vae_name_to_diffusers(k, nrb, stages), v) for k, v in sd.items())


def vae_from_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    nrb, stages = diffusers_layout(sd)
    return OrderedDict((vae_name_from_diffusers(k, nrb, stages), v) for k, v in sd.items())


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """The `vae/config.json` of a diffusers Wan repo for this config."""
    return {
        "_class_name": "AutoencoderKLWan",
        "_diffusers_version": DIFFUSERS_VERSION,
        "attn_scales": [],
        "base_dim": cfg.dim,
        "dim_mult": list(cfg.dim_mult),
        "dropout": 0.0,
        "latents_mean": list(cfg.latents_mean),
        "latents_std": list(cfg.latents_std),
        "num_res_blocks": cfg.num_res_blocks,
        "temperal_downsample": list(cfg.temperal_downsample),
        "z_dim": cfg.z_dim,
    }


LAYOUTS = ("official", "diffusers", "comfyui")


def save_vae(model, path: str | os.PathLike, layout: str = "official",
             dtype: torch.dtype | None = None) -> Path:
    """Write `model` (a WanVAE) in one of LAYOUTS; returns the file or folder written.

    official: a pickled state dict (`Wan2.1_VAE.pth`; a folder path gets that file name).
    diffusers: a folder with config.json + diffusion_pytorch_model.safetensors (diffusers names).
    comfyui: one .safetensors file with the official names (ComfyUI ships it in 16 bits).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VAE layout {layout!r}; choose one of {LAYOUTS}")
    path = Path(path)
    sd = OrderedDict((k, v.detach().to("cpu", dtype=dtype or v.dtype).contiguous())
                     for k, v in model.state_dict().items())
    if layout == "official":
        out = path / "Wan2.1_VAE.pth" if path.is_dir() else path
        save_torch_atomic(sd, out)
        return out
    if layout == "comfyui":
        out = path / "wan_2.1_vae.safetensors" if path.is_dir() else path
        save_safetensors_atomic(sd, out, metadata={"format": "pt"})
        return out
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(vae_to_diffusers(sd), path / "diffusion_pytorch_model.safetensors",
                            metadata={"format": "pt"})
    text = json.dumps(diffusers_vae_config(model.config), indent=2, sort_keys=True) + "\n"
    write_text_atomic(path / "config.json", text)
    return path
