"""Loading and saving the DiT in the official, diffusers and ComfyUI layouts."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .configs import FLAVOURS, DiTConfig, flavour_of
from .convert import diffusers_dit_config, dit_name_from_diffusers, dit_to_diffusers, is_diffusers_dit
from .loading import (WeightsError, WeightsSource, assign_weights, check_keys, expected_shapes,
                      find_weight_files, save_safetensors_atomic, save_sharded_safetensors,
                      strip_prefix, write_text_atomic)
from .transformer import WanModel, keep_fp32

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
COMFY_PREFIX = "model.diffusion_model."

# First key names that give away another component, for "wrong file" errors.
_OTHER_COMPONENTS = [
    ("encoder.conv1.weight", "the Wan VAE (Wan2.1_VAE.pth)"),
    ("encoder.conv_in.weight", "a diffusers VAE"),
    ("token_embedding.weight", "the umT5 text encoder"),
    ("shared.weight", "a transformers umT5 text encoder"),
    ("encoder.block.0.layer.0.SelfAttention.q.weight", "a transformers umT5 text encoder"),
    ("visual.patch_embedding.weight", "the CLIP vision tower"),
    ("vision_model.embeddings.patch_embedding.weight", "a CLIP vision tower"),
]


def _identify_other(names: set[str]) -> str | None:
    for key, what in _OTHER_COMPONENTS:
        if key in names:
            return what
    return None


def _read_config_json(path: Path) -> dict:
    folder = path if path.is_dir() else path.parent
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        return {}
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{cfg_file}: not valid JSON ({e})") from e


def config_from_shapes(shapes: dict[str, tuple], config_json: dict, where: str) -> DiTConfig:
    """Rebuild a DiTConfig from official-name tensor shapes (+ config.json where present)."""
    try:
        dim, in_dim = shapes["patch_embedding.weight"][:2]
        ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
        text_dim = shapes["text_embedding.0.weight"][1]
        freq_dim = shapes["time_embedding.0.weight"][1]
        out_dim = shapes["head.head.weight"][0] // 4
    except KeyError as e:
        raise WeightsError(f"{where}: no tensor {e.args[0]!r}; this is not a Wan 2.1 DiT checkpoint") from None
    num_layers = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    i2v = "img_emb.proj.1.weight" in shapes
    clip_dim = shapes["img_emb.proj.1.weight"][1] if i2v else 1280
    probe = DiTConfig(model_type="i2v" if i2v else "t2v", dim=dim, ffn_dim=ffn_dim, num_layers=num_layers,
                      in_dim=in_dim, out_dim=out_dim, text_dim=text_dim, freq_dim=freq_dim,
                      clip_dim=clip_dim)
    heads = config_json.get("num_heads") or config_json.get("num_attention_heads")
    if not heads:
        known = flavour_of(probe)
        heads = FLAVOURS[known].dit.num_heads if known else max(1, dim // 128)
    text_len = config_json.get("text_len", 512)
    return DiTConfig(**{**probe.__dict__, "num_heads": int(heads), "text_len": int(text_len)})


def describe_config(cfg: DiTConfig) -> str:
    name = flavour_of(cfg)
    return name or f"a {cfg.model_type} DiT with dim {cfg.dim} and {cfg.num_layers} blocks"


def _open_transformer(path: Path) -> tuple[WeightsSource, dict, DiTConfig]:
    """(source, file name -> official name, config) of a DiT file or folder; reads headers only."""
    files = find_weight_files(path, "DiT")
    source = WeightsSource(files, describe=str(path))
    stripped = strip_prefix(source.keys(), PREFIXES)
    other = _identify_other(set(stripped.values()))
    if other:
        raise WeightsError(f"{path}: this file holds {other}, not the Wan DiT (transformer); "
                           "point model.transformer at the DiT weights")
    if is_diffusers_dit(stripped.values()):
        names = {}
        for file_name, name in stripped.items():
            official = dit_name_from_diffusers(name)
            if official is None:
                raise WeightsError(f"{path}: diffusers tensor {file_name!r} has no counterpart in "
                                   "the Wan 2.1 DiT; is this a Wan 2.1 transformer?")
            names[file_name] = official
    else:
        names = stripped
    shapes = {names[k]: v for k, v in source.shapes().items()}
    return source, names, config_from_shapes(shapes, _read_config_json(path), str(path))


def read_transformer_config(path: str | os.PathLike, flavour: str | None = None) -> DiTConfig:
    """The DiT's configuration from its files' headers, without reading any weights."""
    path = Path(path)
    source, _, cfg = _open_transformer(path)
    source.close()
    _check_flavour(cfg, flavour, path)
    return cfg


def _check_flavour(cfg: DiTConfig, flavour: str | None, path: Path) -> None:
    if flavour is not None and flavour_of(cfg) != flavour:
        raise WeightsError(f"{path}: asked for flavour {flavour!r} but the weights are "
                           f"{describe_config(cfg)}; fix model.flavour or the path")


def load_transformer(path: str | os.PathLike, dtype: torch.dtype | None = torch.bfloat16,
                     device: torch.device | str = "cpu", flavour: str | None = None) -> WanModel:
    """Load the DiT from an official folder, a diffusers `transformer/` folder or one .safetensors.

    `dtype` is the dtype of the Linear/conv weights (None = as stored); the float32 islands
    (modulation, norms, time embedding, head) stay float32. The model comes back in eval mode with
    gradients off (the trainer turns on what it trains). `flavour`, if given, must match the file.
    """
    path = Path(path)
    source, names, cfg = _open_transformer(path)
    _check_flavour(cfg, flavour, path)
    shapes = {names[k]: v for k, v in source.shapes().items()}
    with torch.device("meta"):
        model = WanModel(cfg)
    check_keys(expected_shapes(model), shapes, str(path), "Wan DiT",
               hint=f"The file's shapes look like {describe_config(cfg)}.")
    assign_weights(model, source, names, dtype, device, keep_fp32=keep_fp32)
    model.eval().requires_grad_(False)
    return model


def save_transformer(model_or_sd, folder: str | os.PathLike, cfg: DiTConfig | None = None,
                     layout: str = "official", dtype: torch.dtype | None = None,
                     max_shard_bytes: int = 10 * 2**30) -> list[Path]:
    """Write the DiT: `official` (config.json + diffusion_pytorch_model*.safetensors),
    `diffusers` (a transformer/ folder) or `comfyui` (one file `folder`, prefixed keys)."""
    if isinstance(model_or_sd, WanModel):
        cfg = cfg or model_or_sd.cfg
        sd = model_or_sd.state_dict()
    else:
        sd = dict(model_or_sd)
    if cfg is None:
        raise ValueError("save_transformer needs cfg when given a state dict")
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
          for k, v in sd.items()}
    folder = Path(folder)
    if layout == "comfyui":
        out = folder if folder.suffix == ".safetensors" else folder / "model.safetensors"
        save_safetensors_atomic({COMFY_PREFIX + k: v for k, v in sd.items()}, out)
        return [out]
    if layout == "diffusers":
        files = save_sharded_safetensors(dit_to_diffusers(sd), folder, max_shard_bytes=max_shard_bytes)
        write_text_atomic(folder / "config.json", json.dumps(diffusers_dit_config(cfg), indent=2))
        return files
    if layout != "official":
        raise ValueError(f"unknown layout {layout!r}: official, diffusers or comfyui")
    files = save_sharded_safetensors(sd, folder, max_shard_bytes=max_shard_bytes)
    write_text_atomic(folder / "config.json",
                      json.dumps(cfg.official_config_json(), indent=2, sort_keys=True) + "\n")
    return files
