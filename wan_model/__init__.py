"""Wan 2.1 models: DiT, VAE, umT5 text encoder and CLIP vision tower, loaded from official files.

Public API (see README "Model API"):
    load_transformer(path, dtype=..., device=...)
    load_vae(path, dtype=..., device=...)
    load_text_encoder(path, tokenizer_path, dtype=..., device=...)
    load_clip_vision(path, dtype=..., device=...)
"""
from importlib import import_module

from .configs import FLAVOURS, CLIPConfig, DiTConfig, Flavour, T5Config, VAEConfig, get_flavour
from .loading import WeightsError

_LAZY = {
    "load_transformer": "wan_model.dit_io",
    "save_transformer": "wan_model.dit_io",
    "WanModel": "wan_model.transformer",
    "load_vae": "wan_model.vae",
    "WanVAE": "wan_model.vae",
    "load_text_encoder": "wan_model.text_encoder",
    "TextEncoder": "wan_model.text_encoder",
    "load_clip_vision": "wan_model.clip",
    "CLIPVision": "wan_model.clip",
}

__all__ = ["FLAVOURS", "CLIPConfig", "DiTConfig", "Flavour", "T5Config", "VAEConfig",
           "WeightsError", "get_flavour", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'wan_model' has no attribute {name!r}")
