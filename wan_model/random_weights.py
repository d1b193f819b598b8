"""Random-weight checkpoints in the official file layouts (plus diffusers and ComfyUI).

Tests, the embedded demo and the GPU benchmarks all run on checkpoints written here, and they
are read back by the same loaders that read real downloads. Every tensor is drawn on its own,
in the target dtype, on the chosen device, so a real-size 14B model never needs a float32 copy.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import nn

from .configs import Flavour, get_flavour
from .loading import _set_tensor, write_text_atomic
from .paths import OFFICIAL_NAMES

COMPONENTS = ("dit", "vae", "t5", "tokenizer", "clip")
LAYOUTS = ("official", "diffusers", "comfyui")


def init_value(name: str, shape: tuple, dtype, device, gen: torch.Generator) -> torch.Tensor:
    """A sensible random value for a tensor, chosen from its name and shape."""
    leaf = name.rsplit(".", 1)[-1]
    if len(shape) <= 1 and (leaf == "gamma" or (leaf == "weight" and "norm" in name)):
        return torch.ones(shape, dtype=dtype, device=device)
    if leaf == "bias" or len(shape) <= 1:
        return (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
    if "modulation" in name:
        return (torch.randn(shape, generator=gen, device=device) / math.sqrt(shape[-1])).to(dtype)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if "pos_embedding" in name or "cls_embedding" in name or "token_embedding" in name:
        fan_in = shape[-1]
    std = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.randn(shape, generator=gen, device=device) * std).to(dtype)


def random_fill(model: nn.Module, seed: int, dtype: torch.dtype = torch.float32,
                device: str = "cpu", keep_on_device: bool = False) -> nn.Module:
    """Replace every parameter/buffer of a (meta-device) module by a random tensor drawn on
    `device`, then moved to the host unless `keep_on_device` (a real-size model for a GPU test)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, t in list(model.state_dict(keep_vars=True).items()):
        value = init_value(name, tuple(t.shape), dtype, device, gen)
        _set_tensor(model, name, value if keep_on_device else value.cpu(), is_param=name in params)
    return model


def _build(component: str, flavour: Flavour) -> nn.Module:
    with torch.device("meta"):
        if component == "dit":
            from .transformer import WanModel
            return WanModel(flavour.dit)
        if component == "vae":
            from .vae import WanVAE
            return WanVAE(flavour.vae)
        if component == "t5":
            from .text_encoder import UMT5Encoder
            return UMT5Encoder(flavour.t5)
        if component == "clip":
            from .clip import CLIPVisionTower
            return CLIPVisionTower(flavour.clip)
    raise ValueError(component)


def _save(component: str, model, flavour: Flavour, out: Path, layout: str, dtype) -> None:
    if component == "dit":
        from .dit_io import save_transformer
        target = {"official": out, "diffusers": out / "transformer",
                  "comfyui": out / "diffusion_models" / f"wan2.1_{flavour.name}.safetensors"}[layout]
        save_transformer(model, target, flavour.dit, layout=layout, dtype=dtype)
    elif component == "vae":
        from .convert_vae import save_vae
        target = {"official": out / OFFICIAL_NAMES["vae"], "diffusers": out / "vae",
                  "comfyui": out / "vae" / "wan_2.1_vae.safetensors"}[layout]
        save_vae(model, target, layout=layout)
    elif component == "t5":
        from .convert_t5 import save_text_encoder
        target = {"official": out / OFFICIAL_NAMES["text_encoder"], "diffusers": out / "text_encoder",
                  "comfyui": out / "text_encoders" / "umt5_xxl.safetensors"}
        save_text_encoder(model, target[layout], layout="transformers" if layout == "diffusers" else layout)
    elif component == "clip":
        from .convert_clip import save_clip_vision
        target = {"official": out / OFFICIAL_NAMES["clip"], "diffusers": out / "image_encoder",
                  "comfyui": out / "clip_vision" / "clip_vision_h.safetensors"}
        save_clip_vision(model, target[layout], layout="transformers" if layout == "diffusers" else layout)


def _tokenizer_dir(out: Path, layout: str) -> Path:
    return {"official": out / OFFICIAL_NAMES["tokenizer"], "diffusers": out / "tokenizer",
            "comfyui": out / "tokenizer"}[layout]


def write_random_checkpoint(out: str | os.PathLike, flavour: str, layouts=("official",),
                            components=None, dtype: torch.dtype = torch.float32, seed: int = 0,
                            device: str = "cpu", log=print) -> Path:
    """Write a complete random-weight model of `flavour` under `out`.

    official: `out/` itself holds config.json + diffusion_pytorch_model*.safetensors,
    Wan2.1_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ and, for I2V, the CLIP .pth.
    diffusers: `out/diffusers/{transformer,vae,text_encoder,tokenizer,image_encoder}`.
    comfyui: `out/comfyui/{diffusion_models,vae,text_encoders,clip_vision}/...`.
    """
    from .tokenizer import write_tiny_tokenizer

    fl = get_flavour(flavour)
    out = Path(out)
    components = list(components or COMPONENTS)
    if fl.clip is None and "clip" in components:
        components.remove("clip")
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}: choose from {LAYOUTS}")
    for i, component in enumerate(components):
        if component == "tokenizer":
            # A small real sentencepiece model; its ids are valid for any umT5 vocabulary size.
            for layout in layouts:
                base = out if layout == "official" else out / layout
                write_tiny_tokenizer(_tokenizer_dir(base, layout), vocab_size=min(fl.t5.vocab, 512))
            continue
        model = _build(component, fl)
        # The official T5 file is bf16; every other official file is float32.
        cdtype = torch.bfloat16 if component == "t5" and dtype == torch.float32 and fl.t5.dim >= 1024 else dtype
        random_fill(model, seed + i, cdtype, device)
        for layout in layouts:
            base = out if layout == "official" else out / layout
            log(f"writing {component} ({layout}) under {base}")
            _save(component, model, fl, base, layout, dtype if component == "dit" else None)
        del model
    if "diffusers" in layouts:
        index = {"_class_name": "WanImageToVideoPipeline" if fl.dit.is_i2v else "WanPipeline",
                 "_diffusers_version": "0.33.0"}
        write_text_atomic(out / "diffusers" / "model_index.json", json.dumps(index, indent=2))
    write_text_atomic(out / "wantune_random.json", json.dumps(
        {"flavour": flavour, "seed": seed, "dtype": str(dtype), "note": "random weights"}, indent=2))
    return out
