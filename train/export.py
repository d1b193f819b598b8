"""Exports a user shares: LoRA safetensors (ComfyUI keys + metadata) or full weights."""
from __future__ import annotations

from pathlib import Path

import torch

from wan_model.configs import flavour_of
from wan_model.hub import OFFICIAL_REPOS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SUFFIX = {"wantune": "", "comfyui": "_comfyui", "diffusers": "_diffusers", "kohya": "_kohya",
          "diffusion-pipe": "_diffusion_pipe", "diffsynth": "_diffsynth"}


def training_metadata(recipe, dit_cfg, step: int, dataset_summary: str) -> dict[str, str]:
    t = recipe.train
    return {
        "ss_steps": str(step), "ss_learning_rate": str(t.optim.lr), "ss_optimizer": t.optim.name,
        "ss_lr_scheduler": t.optim.scheduler, "ss_timestep_sampling": t.timestep.sampling,
        "ss_discrete_flow_shift": str(t.timestep.shift), "ss_caption_dropout": str(t.caption_dropout),
        "ss_dataset": dataset_summary, "ss_seed": str(recipe.run.seed),
        "wantune.targets": ",".join(recipe.lora.targets), "wantune.dora": str(recipe.lora.use_dora),
        "wantune.model_type": dit_cfg.model_type,
    }


def base_model_id(root: str, flavour: str) -> str:
    """The published repo a LoRA was trained on: model.root when it names one (its diffusers twin
    counts as the same base), else the flavour's repo (I2V: the 480P one), else the flavour."""
    official = root.removesuffix("-Diffusers")
    if official in OFFICIAL_REPOS.values():
        return official
    return OFFICIAL_REPOS.get("i2v-14B-480p" if flavour == "i2v-14B" else flavour, flavour)


def export_lora(recipe, dit_cfg, out_dir: Path, step: int, dataset_summary: str,
                lora_tensors: dict[str, torch.Tensor]) -> list[Path]:
    from wan_model.lora import lora_from_peft, lora_metadata, write_lora

    name = recipe.run.name or Path(recipe.run.output_dir).name
    flavour = flavour_of(dit_cfg) or f"wan2.1-{dit_cfg.model_type}"
    dtype = DTYPES[recipe.export.dtype]
    tensors = {k: v.detach().to("cpu", dtype) for k, v in lora_tensors.items()}
    lora = lora_from_peft(tensors, alpha=recipe.lora.alpha, rank=recipe.lora.rank)
    meta = lora_metadata(base_model_id(recipe.model.root, flavour), recipe.lora.rank, recipe.lora.alpha,
                         title=recipe.export.title or name, trigger_words=list(recipe.export.trigger_words),
                         resolution=f"{recipe.validation.width}x{recipe.validation.height}",
                         training=training_metadata(recipe, dit_cfg, step, dataset_summary))
    if dit_cfg.is_i2v:
        meta["modelspec.architecture"] = "wan2.1-i2v/lora"
    out = []
    for fmt in recipe.export.formats:
        if fmt not in SUFFIX:
            raise ValueError(f"export.formats has {fmt!r}: choose from {', '.join(SUFFIX)}")
        path = out_dir / f"{name}{SUFFIX[fmt]}.safetensors"
        out.append(write_lora(lora, path, format="wantune" if fmt == "comfyui" else fmt, metadata=meta))
    return out


def export_full(recipe, state_dict: dict[str, torch.Tensor], dit_cfg, out_dir: Path) -> list[Path]:
    from wan_model.dit_io import save_transformer

    dtype = DTYPES[recipe.export.dtype]
    out = []
    for fmt in recipe.export.formats:
        layout = {"wantune": "official", "official": "official", "diffusers": "diffusers",
                  "comfyui": "comfyui"}.get(fmt)
        if layout is None:
            raise ValueError(f"export.formats has {fmt!r}: full fine-tunes export official, "
                             "diffusers or comfyui")
        target = out_dir / {"official": "official", "diffusers": "transformer",
                            "comfyui": "model_comfyui.safetensors"}[layout]
        out += save_transformer(state_dict, target, dit_cfg, layout=layout, dtype=dtype)
    return out
