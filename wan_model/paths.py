"""Where the model files are: the `model:` section of a recipe.

A user normally gives one `root`, the folder of an official checkpoint (as downloaded from the
Wan-AI repositories); every other path defaults to the official file name inside it and can be
set on its own (a diffusers folder, a ComfyUI single file, ...).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

OFFICIAL_NAMES = {
    "transformer": ".",  # config.json + diffusion_pytorch_model*.safetensors in the root
    "vae": "Wan2.1_VAE.pth",
    "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
    "tokenizer": "google/umt5-xxl",
    "clip": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
}


@dataclass
class ModelPaths:
    root: str = field(default="", metadata={
        "help": "Folder of an official Wan 2.1 checkpoint; the paths below default to the "
                "official file names inside it."})
    transformer: str = field(default="", metadata={
        "help": "DiT weights: an official folder, a diffusers transformer/ folder or one "
                ".safetensors file (ComfyUI). Default: root."})
    vae: str = field(default="", metadata={
        "help": "VAE: Wan2.1_VAE.pth, a diffusers vae/ folder or a ComfyUI .safetensors. "
                "Default: root/Wan2.1_VAE.pth."})
    text_encoder: str = field(default="", metadata={
        "help": "umT5-XXL encoder: the official .pth, a transformers text_encoder/ folder or a "
                "ComfyUI .safetensors. Default: root/models_t5_umt5-xxl-enc-bf16.pth."})
    tokenizer: str = field(default="", metadata={
        "help": "Tokenizer folder (spiece.model or tokenizer.json). Default: root/google/umt5-xxl."})
    clip: str = field(default="", metadata={
        "help": "CLIP vision tower (I2V only): the official open-clip .pth, a transformers "
                "image_encoder/ folder or a ComfyUI clip_vision .safetensors. Default: "
                "root/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth."})
    flavour: str = field(default="", metadata={
        "help": "t2v-1.3B, t2v-14B, i2v-14B or a tiny flavour; empty = detected from the weights."})

    def resolve(self, what: str) -> str:
        """The path of one component: its own setting, else the official name inside root."""
        own = getattr(self, what)
        if own:
            return os.path.expanduser(own)
        if not self.root:
            raise ValueError(f"model.{what} is not set and model.root is empty: set model.root to "
                             "the folder of an official Wan 2.1 checkpoint, or set model."
                             f"{what} to the file")
        return str(Path(os.path.expanduser(self.root)) / OFFICIAL_NAMES[what])

    def problems(self) -> list[str]:
        """Cross-field problems, all at once (empty list = fine)."""
        out = []
        if not self.root and not (self.transformer and self.vae and self.text_encoder and self.tokenizer):
            out.append("model: set model.root (an official checkpoint folder) or all of "
                       "model.transformer, model.vae, model.text_encoder and model.tokenizer")
        return out
