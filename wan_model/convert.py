"""DiT name conversions: official Wan 2.1 <-> diffusers `WanTransformer3DModel`.

Pure functions over names and state dicts. The table maps module paths (without the
`.weight`/`.bias` suffix); `{n}` stands for a block index. Shapes never change: no transposes,
splits or reshapes are needed between the two layouts.
"""
from __future__ import annotations

import re

# official module path -> diffusers module path, in order.
DIT_TABLE: list[tuple[str, str]] = [
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("blocks.{n}.modulation", "blocks.{n}.scale_shift_table"),
    ("blocks.{n}.self_attn.q", "blocks.{n}.attn1.to_q"),
    ("blocks.{n}.self_attn.k", "blocks.{n}.attn1.to_k"),
    ("blocks.{n}.self_attn.v", "blocks.{n}.attn1.to_v"),
    ("blocks.{n}.self_attn.o", "blocks.{n}.attn1.to_out.0"),
    ("blocks.{n}.self_attn.norm_q", "blocks.{n}.attn1.norm_q"),
    ("blocks.{n}.self_attn.norm_k", "blocks.{n}.attn1.norm_k"),
    ("blocks.{n}.cross_attn.q", "blocks.{n}.attn2.to_q"),
    ("blocks.{n}.cross_attn.k", "blocks.{n}.attn2.to_k"),
    ("blocks.{n}.cross_attn.v", "blocks.{n}.attn2.to_v"),
    ("blocks.{n}.cross_attn.o", "blocks.{n}.attn2.to_out.0"),
    ("blocks.{n}.cross_attn.norm_q", "blocks.{n}.attn2.norm_q"),
    ("blocks.{n}.cross_attn.norm_k", "blocks.{n}.attn2.norm_k"),
    ("blocks.{n}.cross_attn.k_img", "blocks.{n}.attn2.add_k_proj"),
    ("blocks.{n}.cross_attn.v_img", "blocks.{n}.attn2.add_v_proj"),
    ("blocks.{n}.cross_attn.norm_k_img", "blocks.{n}.attn2.norm_added_k"),
    # The official cross-attention LayerNorm is `norm3`; diffusers calls it `norm2`.
    ("blocks.{n}.norm3", "blocks.{n}.norm2"),
    ("blocks.{n}.ffn.0", "blocks.{n}.ffn.net.0.proj"),
    ("blocks.{n}.ffn.2", "blocks.{n}.ffn.net.2"),
]

_PARAM = r"(?P<param>\.(?:weight|bias))?"


def _compile(src: str) -> re.Pattern:
    pattern = re.escape(src).replace(re.escape("{n}"), r"(?P<n>\d+)")
    return re.compile(f"^{pattern}{_PARAM}$")


_TO_DIFFUSERS = [(_compile(a), b) for a, b in DIT_TABLE]
_FROM_DIFFUSERS = [(_compile(b), a) for a, b in DIT_TABLE]


def _map(name: str, table) -> str | None:
    for pattern, target in table:
        m = pattern.match(name)
        if m:
            out = target.replace("{n}", m.group("n")) if m.groupdict().get("n") else target
            return out + (m.group("param") or "")
    return None


def dit_name_to_diffusers(name: str) -> str | None:
    """Official module or parameter name -> diffusers name (None if it has no counterpart)."""
    return _map(name, _TO_DIFFUSERS)


def dit_name_from_diffusers(name: str) -> str | None:
    """diffusers module or parameter name -> official name (None if it has no counterpart)."""
    return _map(name, _FROM_DIFFUSERS)


def _convert(sd: dict, fn, what: str) -> dict:
    out, unknown = {}, []
    for k, v in sd.items():
        new = fn(k)
        if new is None:
            unknown.append(k)
        else:
            out[new] = v
    if unknown:
        raise KeyError(f"{len(unknown)} {what} keys have no counterpart: {sorted(unknown)[:5]}")
    return out


def dit_to_diffusers(sd: dict) -> dict:
    return _convert(sd, dit_name_to_diffusers, "official DiT")


def dit_from_diffusers(sd: dict) -> dict:
    return _convert(sd, dit_name_from_diffusers, "diffusers transformer")


def is_diffusers_dit(names) -> bool:
    return any(n.startswith("condition_embedder.") or ".attn1." in n for n in names)


def diffusers_dit_config(cfg) -> dict:
    """`config.json` of a diffusers `WanTransformer3DModel` for a `DiTConfig`."""
    d = {
        "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0",
        "patch_size": list(cfg.patch_size), "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.head_dim, "in_channels": cfg.in_dim, "out_channels": cfg.out_dim,
        "text_dim": cfg.text_dim, "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps, "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
    }
    if cfg.is_i2v:
        d["image_dim"] = cfg.clip_dim
        d["added_kv_proj_dim"] = cfg.dim
    return d
