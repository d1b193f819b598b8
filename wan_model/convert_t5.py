"""umT5 encoder names: official (`models_t5_umt5-xxl-enc-bf16.pth`) <-> transformers `UMT5EncoderModel`.

Pure renames (no tensor changes). ComfyUI's `umt5_xxl_*.safetensors` uses the transformers names.
transformers lists the embedding twice (`shared.weight` and the tied `encoder.embed_tokens.weight`);
files keep one of them, and `shared.weight` is what `from_pretrained` expects.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .configs import T5Config
from .loading import COMPONENT_LAYOUTS, WeightsError, rename_by_rules, save_component

TIED_EMBEDDING = "encoder.embed_tokens.weight"

# official -> transformers
T5_TO_TRANSFORMERS = [
    (r"^token_embedding\.", "shared."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.block.\1.layer.0.layer_norm."),
    (r"^blocks\.(\d+)\.attn\.([qkvo])\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^blocks\.(\d+)\.pos_embedding\.embedding\.",
     r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.block.\1.layer.1.layer_norm."),
    (r"^blocks\.(\d+)\.ffn\.gate\.0\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_0."),
    (r"^blocks\.(\d+)\.ffn\.fc1\.", r"encoder.block.\1.layer.1.DenseReluDense.wi_1."),
    (r"^blocks\.(\d+)\.ffn\.fc2\.", r"encoder.block.\1.layer.1.DenseReluDense.wo."),
    (r"^norm\.", "encoder.final_layer_norm."),
]

# transformers -> official
T5_FROM_TRANSFORMERS = [
    (r"^shared\.", "token_embedding."),
    (r"^encoder\.embed_tokens\.", "token_embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.layer_norm\.", r"blocks.\1.norm1."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.",
     r"blocks.\1.pos_embedding.embedding."),
    (r"^encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.([qkvo])\.", r"blocks.\1.attn.\2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm\.", r"blocks.\1.norm2."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.", r"blocks.\1.ffn.gate.0."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.", r"blocks.\1.ffn.fc1."),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.", r"blocks.\1.ffn.fc2."),
    (r"^encoder\.final_layer_norm\.", "norm."),
]

OFFICIAL_NAME = re.compile(
    r"^(token_embedding\.weight|norm\.weight|blocks\.\d+\.(norm1|norm2|attn\.[qkvo]|"
    r"pos_embedding\.embedding|ffn\.gate\.0|ffn\.fc1|ffn\.fc2)\.weight)$")


def is_official_name(name: str) -> bool:
    return OFFICIAL_NAME.match(name) is not None


def official_name(name: str) -> str | None:
    """Official name for an official or transformers name; None when it is neither."""
    if is_official_name(name):
        return name
    new = rename_by_rules(name, T5_FROM_TRANSFORMERS)
    return new if new != name and is_official_name(new) else None


def file_to_official_names(names: list[str]) -> tuple[dict[str, str], list[str]]:
    """file name -> official name, plus the names that map to nothing.

    The tied duplicate `encoder.embed_tokens.weight` is used only when `shared.weight` is absent.
    """
    names = list(names)
    has_shared = "shared.weight" in names or "token_embedding.weight" in names
    mapping, unknown = {}, []
    for n in names:
        if n == TIED_EMBEDDING and has_shared:
            continue
        new = official_name(n)
        if new is None:
            unknown.append(n)
        else:
            mapping[n] = new
    return mapping, unknown


def t5_to_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official state dict -> transformers names (`shared.weight` only, no tied duplicate)."""
    out = {}
    for k, v in sd.items():
        if not is_official_name(k):
            raise WeightsError(f"t5_to_transformers: {k!r} is not an official umT5 encoder name")
        out[rename_by_rules(k, T5_TO_TRANSFORMERS)] = v
    return out


def t5_from_transformers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers (or ComfyUI) state dict -> official names; the tied duplicate is dropped."""
    mapping, unknown = file_to_official_names(list(sd))
    if unknown:
        raise WeightsError(f"t5_from_transformers: {len(unknown)} names are not umT5 encoder "
                           f"names, e.g. {sorted(unknown)[:5]}")
    return {new: sd[old] for old, new in mapping.items()}


def transformers_t5_config(cfg: T5Config) -> dict:
    """The transformers `UMT5Config` fields for this encoder (as in the Wan Diffusers repos)."""
    return {
        "architectures": ["UMT5EncoderModel"], "model_type": "umt5",
        "vocab_size": cfg.vocab, "d_model": cfg.dim, "d_kv": cfg.dim_attn // cfg.num_heads,
        "d_ff": cfg.dim_ffn, "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_layers,
        "num_heads": cfg.num_heads, "relative_attention_num_buckets": cfg.num_buckets,
        "relative_attention_max_distance": cfg.max_dist, "feed_forward_proj": "gated-gelu",
        "layer_norm_epsilon": 1e-6, "dropout_rate": 0.1, "initializer_factor": 1.0,
        "tie_word_embeddings": False, "is_encoder_decoder": True, "pad_token_id": 0,
        "eos_token_id": 1, "decoder_start_token_id": 0, "scalable_attention": True,
    }


def t5_config_from_transformers(d: dict, vocab: int | None = None) -> T5Config:
    """T5Config from a transformers `config.json` dict."""
    heads = d["num_heads"]
    return T5Config(vocab=vocab or d["vocab_size"], dim=d["d_model"], dim_attn=d["d_kv"] * heads,
                    dim_ffn=d["d_ff"], num_heads=heads, num_layers=d["num_layers"],
                    num_buckets=d.get("relative_attention_num_buckets", 32),
                    max_dist=d.get("relative_attention_max_distance", 128))


LAYOUTS = COMPONENT_LAYOUTS


def save_text_encoder(model, path: str | os.PathLike, layout: str = "official",
                      dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a `UMT5Encoder` (or a `TextEncoder` holding one) in one of three layouts.

    - "official": one file with the official names; `.pth` (as shipped) or `.safetensors`.
    - "transformers": a folder with config.json + model.safetensors (sharded above max_shard_bytes).
    - "comfyui": one `.safetensors` with the transformers names.
    """
    encoder = getattr(model, "model", model)
    return save_component(encoder.state_dict(), path, layout, t5_to_transformers,
                          lambda sd: transformers_t5_config(encoder.config), dtype, max_shard_bytes)
