"""CLIP ViT-H/14 vision tower names: official open-clip `visual.*` <-> transformers `CLIPVisionModel`.

Besides renames, four tensors change form (§5.1 of the architecture notes):
- `attn.to_qkv` [3D, D] is q, k, v stacked -> `self_attn.{q,k,v}_proj`;
- `cls_embedding` [1, 1, D] -> `class_embedding` [D];
- `pos_embedding` [1, N, D] -> `position_embedding.weight` [N, D];
- `head` [D, out] -> `visual_projection.weight` [out, D] (transposed).
ComfyUI's `clip_vision_h.safetensors` uses the transformers names.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .configs import CLIPConfig
from .loading import COMPONENT_LAYOUTS, WeightsError, rename_by_rules, save_component

# official -> transformers, for the tensors that only change name
CLIP_TO_TRANSFORMERS = [
    (r"^visual\.patch_embedding\.", "vision_model.embeddings.patch_embedding."),
    (r"^visual\.pre_norm\.", "vision_model.pre_layrnorm."),
    (r"^visual\.post_norm\.", "vision_model.post_layernorm."),
    (r"^visual\.transformer\.(\d+)\.norm1\.", r"vision_model.encoder.layers.\1.layer_norm1."),
    (r"^visual\.transformer\.(\d+)\.norm2\.", r"vision_model.encoder.layers.\1.layer_norm2."),
    (r"^visual\.transformer\.(\d+)\.attn\.proj\.", r"vision_model.encoder.layers.\1.self_attn.out_proj."),
    (r"^visual\.transformer\.(\d+)\.mlp\.0\.", r"vision_model.encoder.layers.\1.mlp.fc1."),
    (r"^visual\.transformer\.(\d+)\.mlp\.2\.", r"vision_model.encoder.layers.\1.mlp.fc2."),
]
CLIP_FROM_TRANSFORMERS = [
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.patch_embedding."),
    (r"^vision_model\.pre_layrnorm\.", "visual.pre_norm."),
    (r"^vision_model\.post_layernorm\.", "visual.post_norm."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm1\.", r"visual.transformer.\1.norm1."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.layer_norm2\.", r"visual.transformer.\1.norm2."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"visual.transformer.\1.attn.proj."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc1\.", r"visual.transformer.\1.mlp.0."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.mlp\.fc2\.", r"visual.transformer.\1.mlp.2."),
]
CLS, POS, HEAD = "visual.cls_embedding", "visual.pos_embedding", "visual.head"
T_CLS = "vision_model.embeddings.class_embedding"
T_POS = "vision_model.embeddings.position_embedding.weight"
T_HEAD = "visual_projection.weight"
QKV = re.compile(r"^visual\.transformer\.(\d+)\.attn\.to_qkv\.(weight|bias)$")
T_QKV = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")
# transformers buffers and open-clip extras that hold no weights of the tower
T_IGNORED = re.compile(r"^vision_model\.embeddings\.position_ids$")


def transformers_recipe(official_names: list[str]) -> dict[str, tuple[list[str], callable]]:
    """official name -> (transformers names to read, function combining them into the official tensor)."""
    recipe = {}
    for n in official_names:
        if n == CLS:
            recipe[n] = ([T_CLS], lambda t: t[0].reshape(1, 1, -1))
        elif n == POS:
            recipe[n] = ([T_POS], lambda t: t[0].unsqueeze(0))
        elif n == HEAD:
            recipe[n] = ([T_HEAD], lambda t: t[0].t())
        elif m := QKV.match(n):
            i, kind = m.groups()
            parts = [f"vision_model.encoder.layers.{i}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            recipe[n] = (parts, lambda t: torch.cat(t, dim=0))
        else:
            new = rename_by_rules(n, CLIP_TO_TRANSFORMERS)
            recipe[n] = ([new], lambda t: t[0])
    return recipe


def clip_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official `visual.*` state dict -> transformers `CLIPVisionModelWithProjection` names.

    Keys outside `visual.*` (the text tower, `log_scale`) are dropped.
    """
    out = {}
    for k, v in sd.items():
        if not k.startswith("visual."):
            continue
        if k == CLS:
            out[T_CLS] = v.reshape(-1)
        elif k == POS:
            out[T_POS] = v.squeeze(0)
        elif k == HEAD:
            out[T_HEAD] = v.t().contiguous()
        elif m := QKV.match(k):
            i, kind = m.groups()
            for part, t in zip("qkv", v.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{i}.self_attn.{part}_proj.{kind}"] = t.contiguous()
        else:
            new = rename_by_rules(k, CLIP_TO_TRANSFORMERS)
            if new == k:
                raise WeightsError(f"clip_to_transformers: {k!r} is not an official visual name")
            out[new] = v
    return out


def official_names_from_transformers(names: list[str]) -> list[str]:
    """The official names a set of transformers names provides (q/k/v count once)."""
    out = []
    for n in names:
        if n in (T_CLS, T_POS, T_HEAD):
            out.append({T_CLS: CLS, T_POS: POS, T_HEAD: HEAD}[n])
        elif m := T_QKV.match(n):
            i, part, kind = m.groups()
            if part == "q":
                out.append(f"visual.transformer.{i}.attn.to_qkv.{kind}")
        elif not T_IGNORED.match(n):
            new = rename_by_rules(n, CLIP_FROM_TRANSFORMERS)
            if new == n:
                raise WeightsError(f"{n!r} is not a transformers CLIP vision name")
            out.append(new)
    return out


def clip_from_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers (or ComfyUI) CLIP vision state dict -> official `visual.*` names."""
    recipe = transformers_recipe(official_names_from_transformers(list(sd)))
    return {n: fn([sd[s] for s in srcs]) for n, (srcs, fn) in recipe.items()}


def transformers_clip_config(cfg: CLIPConfig) -> dict:
    """The transformers `CLIPVisionConfig` fields (as in the diffusers `image_encoder/`)."""
    return {
        "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model",
        "hidden_size": cfg.dim, "intermediate_size": cfg.dim * cfg.mlp_ratio,
        "projection_dim": cfg.out_dim, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_channels": 3, "image_size": cfg.image_size,
        "patch_size": cfg.patch_size, "hidden_act": "gelu", "layer_norm_eps": cfg.eps,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
    }


def clip_config_from_transformers(d: dict) -> CLIPConfig:
    return CLIPConfig(image_size=d["image_size"], patch_size=d["patch_size"], dim=d["hidden_size"],
                      mlp_ratio=d["intermediate_size"] // d["hidden_size"],
                      out_dim=d.get("projection_dim", 1024), num_heads=d["num_attention_heads"],
                      num_layers=d["num_hidden_layers"], eps=d.get("layer_norm_eps", 1e-5))


LAYOUTS = COMPONENT_LAYOUTS


def save_clip_vision(model, path: str | os.PathLike, layout: str = "official",
                     dtype: torch.dtype | None = None) -> Path:
    """Write a `CLIPVisionTower` (or a `CLIPVision` holding one) in one of three layouts.

    - "official": one file with the `visual.*` names (vision tower only); `.pth` or `.safetensors`.
    - "transformers": a `CLIPVisionModelWithProjection` folder (config.json + model.safetensors).
    - "comfyui": one `.safetensors` with the transformers names.
    """
    tower = getattr(model, "model", model)

    def config(sd: dict) -> dict:
        c = transformers_clip_config(tower.config)
        if T_HEAD not in sd:  # a tower loaded from a CLIPVisionModel file has no projection
            c["architectures"] = ["CLIPVisionModel"]
        return c

    return save_component(tower.state_dict(), path, layout, clip_to_transformers, config, dtype)
