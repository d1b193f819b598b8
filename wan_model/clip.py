"""The CLIP ViT-H/14 vision tower used by Wan I2V, module names as in the official open-clip `.pth`.

Wan feeds the DiT the tokens after the first 31 of the 32 blocks (`use_31_block`), without the
post-norm: [B, 257, 1280]. `visual.post_norm` and `visual.head` are kept only so files round-trip.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention
from .configs import FLAVOURS, CLIPConfig
from .convert_clip import (HEAD, T_IGNORED, clip_config_from_transformers,
                           official_names_from_transformers, transformers_recipe)
from .loading import WeightsError, assign_weights, check_keys, expected_shapes, open_weights, strip_prefix

COMPONENT = "CLIP vision tower"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


class LayerNorm(nn.LayerNorm):
    """LayerNorm in float32, output in the input dtype (as official, and as fp16 autocast does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(),
                            self.bias.float(), self.eps).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.to_qkv(x).view(b, s, 3, self.num_heads, c // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v).reshape(b, s, c))


class AttentionBlock(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        hidden = cfg.dim * cfg.mlp_ratio
        self.norm1 = LayerNorm(cfg.dim, eps=cfg.eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = LayerNorm(cfg.dim, eps=cfg.eps)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig, with_head: bool = True):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.dim, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = LayerNorm(cfg.dim, eps=cfg.eps)
        self.transformer = nn.Sequential(*[AttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.post_norm = LayerNorm(cfg.dim, eps=cfg.eps)
        # A transformers CLIPVisionModel file has no projection; it is unused here anyway.
        self.head = nn.Parameter(torch.zeros(cfg.dim, cfg.out_dim)) if with_head else None

    def forward(self, pixels: torch.Tensor, num_blocks: int) -> torch.Tensor:
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pre_norm(x + self.pos_embedding.to(x.dtype))
        for block in self.transformer[:num_blocks]:
            x = block(x)
        return x


class CLIPVisionTower(nn.Module):
    """Normalised pixels [B, 3, 224, 224] -> penultimate-block tokens [B, 257, dim] (no post-norm)."""

    def __init__(self, cfg: CLIPConfig, with_head: bool = True):
        super().__init__()
        self.config = cfg
        self.visual = VisionTransformer(cfg, with_head)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        dtype = self.visual.patch_embedding.weight.dtype
        return self.visual(pixels.to(dtype), self.config.num_layers - 1)


def _to_minus1_1(images) -> list[torch.Tensor]:
    """A [B,3,H,W] tensor, or a list of [3,H,W] tensors or PIL images -> list of [3,H,W] in [-1,1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        return list(images)
    out = []
    for im in images:
        if not isinstance(im, torch.Tensor):  # PIL: as official, to_tensor then (x - 0.5) / 0.5
            import numpy as np

            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            im = torch.from_numpy(arr).permute(2, 0, 1).sub(0.5).div(0.5)
        out.append(im)
    return out


class CLIPVision:
    """Images -> the 257 CLIP tokens per image that condition Wan I2V, as float32."""

    def __init__(self, model: CLIPVisionTower):
        self.model = model.eval().requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.model.visual.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.patch_embedding.weight.dtype

    def to(self, *args, **kwargs) -> "CLIPVision":
        self.model.to(*args, **kwargs)
        return self

    def preprocess(self, images) -> torch.Tensor:
        """Official: bicubic resize of the whole image to 224x224 (no crop), [0,1], mean/std."""
        size = (self.model.config.image_size,) * 2
        resized = [F.interpolate(im[None].float().to(self.device), size=size, mode="bicubic",
                                 align_corners=False) for im in _to_minus1_1(images)]
        x = torch.cat(resized).mul(0.5).add(0.5)
        mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images) -> torch.Tensor:
        return self.model(self.preprocess(images)).float()

    __call__ = encode


# ---------------------------------------------------------------------------------------------
# Loading

_PREFIXES = ("clip_vision.", "image_encoder.", "model.")
_KNOWN_HEADS = {1280: 16, 1024: 16, 768: 12}  # ViT-H/14, ViT-L/14, ViT-B


def heads_for_dim(dim: int) -> int:
    """Files without a config do not say the head count: known widths, else head_dim 64."""
    for fl in FLAVOURS.values():
        if fl.clip is not None and fl.clip.dim == dim:
            return fl.clip.num_heads
    return _KNOWN_HEADS.get(dim, max(1, dim // 64))


def _config_from_shapes(shapes: dict[str, tuple], where: str) -> CLIPConfig:
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"^visual\.transformer\.(\d+)\.", k))}
    try:
        dim, _, patch, _ = shapes["visual.patch_embedding.weight"]
        tokens = shapes["visual.pos_embedding"][1]
        hidden = shapes["visual.transformer.0.mlp.0.weight"][0]
    except KeyError as e:
        raise WeightsError(f"{where}: missing tensor {e.args[0]!r} (official name), so this is not "
                           f"a complete {COMPONENT}") from None
    out_dim = shapes[HEAD][1] if HEAD in shapes else 1024
    image_size = round((tokens - 1) ** 0.5) * patch
    return CLIPConfig(image_size=image_size, patch_size=patch, dim=dim, mlp_ratio=hidden // dim,
                      out_dim=out_dim, num_heads=heads_for_dim(dim), num_layers=len(layers))


class _RecipeSource:
    """Presents a transformers-named source under official names, building each tensor on demand."""

    def __init__(self, source, recipe: dict, describe: str):
        self.source, self.recipe, self.describe = source, recipe, describe

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        srcs, fn = self.recipe[name]
        out = fn([self.source.get(s) for s in srcs])
        return out.to(dtype) if dtype is not None else out

    def dtypes(self) -> dict:
        stored = self.source.dtypes()
        return {name: stored[srcs[0]] for name, (srcs, _) in self.recipe.items()}


def _official_plan(source, names: dict[str, str], path: Path):
    """file names (prefix stripped) -> (official shapes, recipe reading from the file)."""
    shapes = source.shapes()
    official = [n for n in names.values() if n.startswith("visual.")]
    if official:
        back = {v: k for k, v in names.items()}
        recipe = {n: ([back[n]], lambda t: t[0]) for n in official}
        return {n: shapes[back[n]] for n in official}, recipe
    transformers_names = [n for n in names.values() if n.startswith(("vision_model.", "visual_projection."))]
    if not transformers_names:
        raise WeightsError(f"{path}: holds no {COMPONENT} tensors (found e.g. {sorted(names)[:4]}); is "
                           "this another component (DiT, VAE, T5)? Pass models_clip_open-clip-xlm-"
                           "roberta-large-vit-huge-14.pth, an image_encoder/ folder or clip_vision_h.safetensors")
    stray = [n for n in names.values() if not n.startswith(("vision_model.", "visual_projection.",
                                                            "text_model.", "text_projection.", "logit_scale"))]
    if stray:
        raise WeightsError(f"{path}: {len(stray)} tensors are not {COMPONENT} tensors, e.g. {sorted(stray)[:5]}")
    try:
        recipe = transformers_recipe(official_names_from_transformers(transformers_names))
    except WeightsError as e:
        raise WeightsError(f"{path}: {e}") from None
    back = {v: k for k, v in names.items()}
    recipe = {n: ([back[s] for s in srcs], fn) for n, (srcs, fn) in recipe.items()}
    with torch.device("meta"):  # shapes after the reshapes, without reading any data
        meta = {n: fn([torch.empty(shapes[s]) for s in srcs]) for n, (srcs, fn) in recipe.items()}
    return {n: tuple(t.shape) for n, t in meta.items()}, recipe


def load_clip_vision(path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                     device: str | torch.device = "cpu", config: CLIPConfig | None = None) -> CLIPVision:
    """The official open-clip `.pth` (text tower ignored), a transformers `image_encoder/` folder,
    or ComfyUI's `clip_vision_h.safetensors`. The config is read from shapes (heads: config.json,
    else the known width) unless given."""
    path = Path(path)
    source = open_weights(path, COMPONENT, stems=("model",))
    # The open-clip file also holds the text tower and `log_scale`: only `visual.*` is wanted.
    keys = [k for k in source.keys() if not T_IGNORED.match(k)]
    visual = [k for k in keys if k.startswith("visual.")]
    names = {k: k for k in visual} if visual else strip_prefix(keys, _PREFIXES)
    official_shapes, recipe = _official_plan(source, names, path)
    folder_cfg = path / "config.json" if path.is_dir() else None
    if config is None and folder_cfg is not None and folder_cfg.exists():
        config = clip_config_from_transformers(json.loads(folder_cfg.read_text()))
    if config is None:
        config = _config_from_shapes(official_shapes, str(path))
    with torch.device("meta"):
        model = CLIPVisionTower(config, with_head=HEAD in official_shapes)
    check_keys(expected_shapes(model), official_shapes, str(path), COMPONENT)
    assign_weights(model, _RecipeSource(source, recipe, str(path)), {n: n for n in recipe},
                   dtype=dtype, device=device)
    source.close()
    return CLIPVision(model)
