"""Where the model files are: the `model:` section of a recipe.

A user normally gives one `root`: the folder of an official checkpoint or of its diffusers twin
(detected by `model_index.json`), or a Hugging Face repo id such as `Wan-AI/Wan2.1-T2V-1.3B`,
whose needed files are downloaded once into the standard Hugging Face cache (wan_model.hub).
Every other path defaults to the component's name inside root and can be set on its own (a
diffusers folder, a ComfyUI single file, ...).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "clip")
# Each component's name inside a checkpoint folder, per layout. "." is the folder itself.
LAYOUT_NAMES = {
    "official": {
        "transformer": ".",  # config.json + diffusion_pytorch_model*.safetensors in the root
        "vae": "Wan2.1_VAE.pth",
        "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
        "tokenizer": "google/umt5-xxl",
        "clip": "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
    },
    "diffusers": {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder",
                  "tokenizer": "tokenizer", "clip": "image_encoder"},
}
OFFICIAL_NAMES = LAYOUT_NAMES["official"]


def folder_layout(folder: str | os.PathLike) -> str:
    """official, or diffusers when the folder holds a diffusers pipeline (model_index.json)."""
    return "diffusers" if (Path(folder) / "model_index.json").is_file() else "official"


@dataclass
class ModelPaths:
    root: str = field(default="", metadata={
        "help": "Folder of an official Wan 2.1 checkpoint or its diffusers twin, or a Hugging Face "
                "repo id (e.g. Wan-AI/Wan2.1-T2V-1.3B or Wan-AI/Wan2.1-T2V-1.3B-Diffusers): only the "
                "files a run needs are downloaded, once, into the Hugging Face cache. The paths "
                "below default to the component's name inside it."})
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

    def on_hub(self) -> bool:
        from .hub import is_repo_id

        return is_repo_id(self.root)

    def fetch(self, components=COMPONENTS, local_only: bool = False) -> None:
        """Download what `components` need from the Hub when root is a repo id (a no-op for a
        folder, and for components given their own path). "config" is the DiT's config.json
        alone; "clip" is skipped for a repo without one (a T2V model)."""
        if not self.on_hub():
            return
        from .hub import fetch

        fetch(self.root, [c for c in components if c == "config" or not getattr(self, c)],
              local_only=local_only)

    def root_folder(self, component: str = "config") -> Path:
        """The local folder of root; a repo id is fetched (`component`'s files) first."""
        if self.on_hub():
            from .hub import fetch

            return fetch(self.root, [component])
        return Path(os.path.expanduser(self.root))

    def resolve(self, what: str) -> str:
        """The path of one component: its own setting, else its name inside root (downloaded
        first when root is a Hub repo id)."""
        own = getattr(self, what)
        if own:
            return os.path.expanduser(own)
        if not self.root:
            raise ValueError(f"model.{what} is not set and model.root is empty: set model.root to "
                             "the folder or Hugging Face repo id of a Wan 2.1 checkpoint, or set "
                             f"model.{what} to the file")
        root = self.root_folder(what)
        return str(root / LAYOUT_NAMES[folder_layout(root)][what])

    def transformer_config(self) -> dict | None:
        """The DiT's config.json (official or diffusers keys), without its weights; None when
        the DiT is a single file without one beside it."""
        where = Path(os.path.expanduser(self.transformer)) if self.transformer else None
        if where is None:
            root = self.root_folder("config") if self.root else None
            if root is None:
                return None
            where = root / LAYOUT_NAMES[folder_layout(root)]["transformer"]
        config = where / "config.json" if where.is_dir() else None
        return json.loads(config.read_text()) if config is not None and config.is_file() else None

    def is_i2v(self) -> bool | None:
        """Whether the model is image-to-video: from model.flavour, else the DiT's config or
        tensor names; None when nothing tells."""
        if self.flavour:
            from .configs import get_flavour

            return get_flavour(self.flavour).dit.is_i2v
        config = self.transformer_config()
        if config is not None:
            return (config.get("model_type") == "i2v" or config.get("in_dim") == 36
                    or config.get("in_channels") == 36)
        where = Path(os.path.expanduser(self.transformer)) if self.transformer else None
        if where is not None and where.exists():
            from .dit_io import read_transformer_config

            # from the tensors' names and shapes (headers only); a file holding another
            # component or no Wan DiT at all raises a WeightsError that says so
            return read_transformer_config(where).is_i2v
        return None

    def missing_files(self, components=COMPONENTS) -> list[str]:
        """One line per component whose file or folder is absent (after fetching)."""
        out = []
        for what in components:
            path = Path(self.resolve(what))
            if not path.exists():
                fix = "fix the path" if getattr(self, what) else f"fix model.root or set model.{what}"
                out.append(f"model.{what}: {path} does not exist; {fix}")
            elif what == "transformer" and path.is_dir() and not (
                    list(path.glob("*.safetensors")) or list(path.glob("*.pth"))):
                out.append(f"model.transformer: {path} holds no .safetensors weights")
        return out

    def problems(self) -> list[str]:
        """Cross-field problems, all at once (empty list = fine)."""
        out = []
        if not self.root and not (self.transformer and self.vae and self.text_encoder and self.tokenizer):
            out.append("model: set model.root (a checkpoint folder or Hugging Face repo id) or all "
                       "of model.transformer, model.vae, model.text_encoder and model.tokenizer")
        return out
