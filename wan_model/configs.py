"""Model flavours as data.

Every number here comes from the official Wan 2.1 configs (see the architecture notes in the
README). The `tiny` flavours keep every module and key name of the real ones and shrink only
the widths, so tests on CPU exercise the same code and the same checkpoint layouts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

# Latent statistics of the Wan 2.1 VAE (16 channels), identical in the official code and diffusers.
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]


@dataclass(frozen=True)
class DiTConfig:
    """The DiT (`WanModel`). Fields named as in the official `config.json`."""

    model_type: str = "t2v"  # "t2v" or "i2v"
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    text_dim: int = 4096
    text_len: int = 512
    clip_dim: int = 1280  # width of the CLIP image tokens fed to `img_emb` (I2V only)
    clip_tokens: int = 257
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def is_i2v(self) -> bool:
        return self.model_type == "i2v"

    def official_config_json(self) -> dict:
        """The fields the official `config.json` holds (patch size etc. are code defaults there)."""
        d = {
            "_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": self.dim,
            "eps": self.eps, "ffn_dim": self.ffn_dim, "freq_dim": self.freq_dim,
            "in_dim": self.in_dim, "model_type": self.model_type, "num_heads": self.num_heads,
            "num_layers": self.num_layers, "out_dim": self.out_dim, "text_len": self.text_len,
        }
        # Non-default widths (tiny flavours only) are written so the file describes itself.
        if self.text_dim != 4096:
            d["text_dim"] = self.text_dim
        if self.clip_dim != 1280:
            d["clip_dim"] = self.clip_dim
        return d


@dataclass(frozen=True)
class VAEConfig:
    """The 3-D causal VAE (`WanVAE_`)."""

    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple = (False, True, True)
    latents_mean: tuple = tuple(LATENTS_MEAN)
    latents_std: tuple = tuple(LATENTS_STD)


@dataclass(frozen=True)
class T5Config:
    """The umT5-XXL encoder (encoder only)."""

    vocab: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    text_len: int = 512


@dataclass(frozen=True)
class CLIPConfig:
    """The ViT-H/14 vision tower of open-clip xlm-roberta-large-ViT-H-14."""

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: int = 4
    out_dim: int = 1024
    num_heads: int = 16
    num_layers: int = 32
    eps: float = 1e-5

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclass(frozen=True)
class Flavour:
    name: str
    dit: DiTConfig
    vae: VAEConfig = field(default_factory=VAEConfig)
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPConfig | None = None

    def to_dict(self) -> dict:
        return asdict(self)


_T2V_13B = DiTConfig(model_type="t2v", dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16)
_T2V_14B = DiTConfig(model_type="t2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16)
_I2V_14B = replace(_T2V_14B, model_type="i2v", in_dim=36)

# Tiny widths: every module of the real model, a few thousand times smaller.
_TINY_T5 = T5Config(vocab=512, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2)
_TINY_VAE = VAEConfig(dim=8)
_TINY_CLIP = CLIPConfig(dim=32, out_dim=16, num_heads=2, num_layers=3)
_TINY_DIT = DiTConfig(model_type="t2v", dim=64, ffn_dim=128, num_heads=2, num_layers=2,
                      in_dim=16, text_dim=_TINY_T5.dim, clip_dim=_TINY_CLIP.dim)

FLAVOURS: dict[str, Flavour] = {
    "t2v-1.3B": Flavour("t2v-1.3B", _T2V_13B),
    "t2v-14B": Flavour("t2v-14B", _T2V_14B),
    "i2v-14B": Flavour("i2v-14B", _I2V_14B, clip=CLIPConfig()),
    "tiny-t2v": Flavour("tiny-t2v", _TINY_DIT, vae=_TINY_VAE, t5=_TINY_T5),
    "tiny-i2v": Flavour("tiny-i2v", replace(_TINY_DIT, model_type="i2v", in_dim=36),
                        vae=_TINY_VAE, t5=_TINY_T5, clip=_TINY_CLIP),
}


def get_flavour(name: str) -> Flavour:
    try:
        return FLAVOURS[name]
    except KeyError:
        raise ValueError(f"unknown flavour {name!r}; choose one of {sorted(FLAVOURS)}") from None


def flavour_of(dit: DiTConfig) -> str | None:
    """The name of the flavour whose DiT has these shapes, or None."""
    for name, fl in FLAVOURS.items():
        d = fl.dit
        if (d.dim, d.ffn_dim, d.num_layers, d.in_dim, d.model_type, d.text_dim) == (
            dit.dim, dit.ffn_dim, dit.num_layers, dit.in_dim, dit.model_type, dit.text_dim
        ):
            return name
    return None
