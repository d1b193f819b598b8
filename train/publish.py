"""Publishing a trained LoRA: a Hugging Face folder (model card, LoRA, previews, redacted recipe),
a push with huggingface_hub, and a CivitAI-ready package.

Inputs come from a run folder (`export/*.safetensors`, `samples/step-N/*.mp4`, `recipe.yaml`) or
are given one by one. Nothing written here holds an absolute path of the training machine or a
token: paths are cut to their file name, secret-looking recipe keys are replaced.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wan_model.hub import OFFICIAL_REPOS
from wan_model.lora import FORMATS, inspect, read_lora, scrub_metadata, scrub_paths, write_lora
from wan_model.atomic import copy_file_atomic, write_text_atomic

HF_BASE_MODELS = OFFICIAL_REPOS  # key -> repo id
CIVITAI_BASE_MODELS = {"t2v-1.3B": "Wan Video 1.3B t2v", "t2v-14B": "Wan Video 14B t2v",
                       "i2v-14B-480p": "Wan Video 14B i2v 480p", "i2v-14B-720p": "Wan Video 14B i2v 720p"}
VIDEO_SUFFIXES = (".mp4", ".webm", ".gif", ".webp")
_SECRET_KEY = re.compile(r"token|secret|password|api_?key|credential", re.I)


class PublishError(ValueError):
    """Something a publish folder needs is missing or inconsistent."""


@dataclass
class PublishInputs:
    lora: Path
    base_model: str  # a key of HF_BASE_MODELS: t2v-1.3B, t2v-14B, i2v-14B-480p, i2v-14B-720p
    title: str
    trigger_words: list[str] = field(default_factory=list)
    previews: list[Path] = field(default_factory=list)
    prompts: dict[str, str] = field(default_factory=dict)  # preview file name -> its prompt
    recipe: Path | None = None
    description: str = ""


# -- gathering inputs ----------------------------------------------------------------------------
def latest_previews(samples_dir: Path) -> list[Path]:
    """The videos of the highest `step-N/` under `samples/` (the trained LoRA's own previews)."""
    steps = [(int(m.group(1)), p) for p in samples_dir.glob("step-*")
             if p.is_dir() and (m := re.fullmatch(r"step-(\d+)", p.name))]
    if not steps:
        return []
    folder = max(steps)[1]
    return sorted(p for p in folder.iterdir() if p.suffix in VIDEO_SUFFIXES)


def _load_recipe(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise PublishError(f"{path}: expected a YAML mapping (a resolved recipe)")
    return data


def _section(recipe: dict, name: str) -> dict:
    value = recipe.get(name)
    return value if isinstance(value, dict) else {}


def preview_prompts(previews: list[Path], recipe: dict) -> dict[str, str]:
    """Preview `NN-slug.mp4` -> the NN-th validation prompt of the recipe (else the slug)."""
    prompts = []
    for p in _section(recipe, "validation").get("prompts") or []:
        prompts.append(p.get("prompt", "") if isinstance(p, dict) else str(p))
    out = {}
    for path in previews:
        m = re.match(r"^(\d+)-(.*)$", path.stem)
        if m and int(m.group(1)) < len(prompts):
            out[path.name] = prompts[int(m.group(1))]
        else:
            out[path.name] = (m.group(2) if m else path.stem).replace("-", " ").replace("_", " ")
    return out


def base_model_key(flavour_or_id: str, resolution: str = "") -> str:
    """A flavour (`t2v-1.3B`), hub id or metadata value -> a key of HF_BASE_MODELS."""
    v = flavour_or_id.strip().removesuffix("-Diffusers")  # a twin is the same base model
    for key, repo in HF_BASE_MODELS.items():
        if v in (key, repo) or v.lower() == repo.lower():
            return key
    if v in ("i2v-14B", "Wan-AI/Wan2.1-I2V-14B"):
        return "i2v-14B-720p" if _is_720p(resolution) else "i2v-14B-480p"
    raise PublishError(f"base model {flavour_or_id!r} is not a published Wan 2.1 model; pass one of "
                       f"{', '.join(HF_BASE_MODELS)} (--base-model)")


def _is_720p(resolution: str) -> bool:
    nums = [int(n) for n in re.findall(r"\d+", resolution or "")]
    return len(nums) >= 2 and min(nums[:2]) >= 720


def inputs_from_run(run_dir: Path, lora: Path | None = None, base_model: str = "", title: str = "",
                    trigger_words: list[str] | None = None, description: str = "",
                    previews: list[Path] | None = None, recipe_path: Path | None = None) -> PublishInputs:
    """Collect a run's LoRA (`export/`), latest previews (`samples/`) and recipe (`recipe.yaml`);
    what is given explicitly wins."""
    run_dir = Path(run_dir)
    if lora is None:
        found = sorted((run_dir / "export").glob("*.safetensors"))
        plain = [p for p in found if not p.stem.endswith(tuple(f"_{f.replace('-', '_')}" for f in FORMATS))]
        if not found:
            raise PublishError(f"{run_dir / 'export'}: no LoRA .safetensors found; finish the run's "
                               "export or pass the LoRA file explicitly")
        lora = (plain or found)[0]
    recipe_path = Path(recipe_path) if recipe_path else run_dir / "recipe.yaml"
    recipe = _load_recipe(recipe_path)
    previews = previews or latest_previews(run_dir / "samples")
    return make_inputs(lora, previews, recipe_path if recipe_path.exists() else None, base_model,
                       title or _section(recipe, "export").get("title") or _section(recipe, "run").get("name")
                       or run_dir.name, trigger_words, description)


def make_inputs(lora: Path, previews: list[Path], recipe_path: Path | None, base_model: str = "",
                title: str = "", trigger_words: list[str] | None = None,
                description: str = "") -> PublishInputs:
    """Inputs given explicitly; what is left empty is read from the LoRA's metadata and the recipe."""
    lora = Path(lora)
    info = inspect(read_lora(lora))
    meta = info["settings"]
    recipe = _load_recipe(recipe_path)
    if trigger_words is None:
        trigger_words = list(_section(recipe, "export").get("trigger_words") or [])
        if not trigger_words and meta.get("modelspec.trigger_phrase"):
            trigger_words = [w.strip() for w in meta["modelspec.trigger_phrase"].split(",") if w.strip()]
    guess = base_model or meta.get("modelspec.base_model") or _section(recipe, "model").get("flavour") \
        or info["base_model_inferred"] or ""
    key = base_model_key(str(guess), meta.get("modelspec.resolution", ""))
    return PublishInputs(lora=lora, base_model=key, title=title or meta.get("modelspec.title") or lora.stem,
                         trigger_words=trigger_words, previews=list(previews),
                         prompts=preview_prompts(list(previews), recipe), recipe=recipe_path,
                         description=description)


# -- redaction -----------------------------------------------------------------------------------
def redact(obj):
    """A recipe structure with absolute paths cut to file names and secret-looking values removed."""
    if isinstance(obj, dict):
        return {k: ("<redacted>" if _SECRET_KEY.search(str(k)) and v not in (None, "", False)
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return scrub_paths(obj)
    return obj


# -- the Hugging Face folder ---------------------------------------------------------------------
def model_card(inp: PublishInputs, lora_name: str, preview_names: list[str], info: dict) -> str:
    """README.md: YAML front matter (base model, tags, license, trigger, widget) + usage text."""
    i2v = inp.base_model.startswith("i2v")
    front = {
        "base_model": HF_BASE_MODELS[inp.base_model],
        "base_model_relation": "adapter",
        "library_name": "diffusers",
        "license": "apache-2.0",
        "pipeline_tag": "image-to-video" if i2v else "text-to-video",
        "tags": ["lora", "wan", "wan2.1", "image-to-video" if i2v else "text-to-video",
                 "template:diffusion-lora", "wantune"],
    }
    if inp.trigger_words:
        front["instance_prompt"] = ", ".join(inp.trigger_words)
    if preview_names:
        front["widget"] = [{"text": inp.prompts.get(n, ""), "output": {"url": f"previews/{n}"}}
                           for n in preview_names]
    header = yaml.safe_dump(front, sort_keys=False, allow_unicode=True)
    trigger = (f"Use **{', '.join(inp.trigger_words)}** in the prompt." if inp.trigger_words
               else "No trigger word: the LoRA acts on every prompt.")
    settings = "\n".join(f"| {k} | {v[:120]} |" for k, v in info["settings"].items()
                         if k.startswith("ss_")) or "| (none recorded) | |"
    pipe = "WanImageToVideoPipeline" if i2v else "WanPipeline"
    repo = HF_BASE_MODELS[inp.base_model] + "-Diffusers"
    return f"""---
{header}---

# {inp.title}

{inp.description or f"A LoRA for {HF_BASE_MODELS[inp.base_model]}, trained with wantune."}

## Trigger words

{trigger}

## Use it

- **ComfyUI**: put `{lora_name}` in `models/loras/` and load it with a LoraLoaderModelOnly node.
- **diffusers**:

```python
import torch
from diffusers import {pipe}

pipe = {pipe}.from_pretrained("{repo}", torch_dtype=torch.bfloat16).to("cuda")
pipe.load_lora_weights("<this repo>", weight_name="{lora_name}")
```

- **Other trainers' formats** (kohya/musubi, diffusers, diffusion-pipe, DiffSynth):
  `python tools/convert_lora.py {lora_name} out.safetensors --to kohya`

## Details

| | |
|---|---|
| rank | {", ".join(map(str, info["ranks"]))} |
| alpha | {", ".join(map(str, info["alphas"])) or "none"} |
| targets | {", ".join(info["targets"])} |
| format | {info["format"]} (ComfyUI keys) |

| training setting | value |
|---|---|
{settings}

The resolved training recipe is in `recipe.yaml`.
"""


def build_publish_folder(inp: PublishInputs, out: Path) -> Path:
    """Write the folder that is pushed to the Hub: LoRA, README.md, previews/, recipe.yaml."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lora = read_lora(inp.lora)
    if lora.unknown:
        raise PublishError(f"{inp.lora}: {len(lora.unknown)} keys are not LoRA tensors of the Wan DiT "
                           f"({lora.unknown[:3]}); convert it with tools/convert_lora.py first")
    lora_name = inp.lora.name
    # Rewritten rather than copied, so that its header is scrubbed of paths like everything else.
    fmt = lora.format if lora.format in FORMATS else "wantune"
    write_lora(lora, out / lora_name, format=fmt, metadata=scrub_metadata(lora.metadata))
    names = []
    for p in inp.previews:
        if not p.exists():
            raise PublishError(f"preview {p} does not exist")
        copy_file_atomic(p, out / "previews" / p.name)
        names.append(p.name)
    if inp.recipe is not None:
        recipe = redact(_load_recipe(inp.recipe))
        write_text_atomic(out / "recipe.yaml", yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    info = inspect(read_lora(out / lora_name))
    write_text_atomic(out / "README.md", model_card(inp, lora_name, names, info))
    return out


def civitai_package(inp: PublishInputs, out: Path) -> Path:
    """A folder to upload to CivitAI: the file, previews and civitai.json with its fields."""
    out = Path(out)
    (out / "previews").mkdir(parents=True, exist_ok=True)
    lora = read_lora(inp.lora)
    write_lora(lora, out / inp.lora.name, format=lora.format if lora.format in FORMATS else "wantune",
               metadata=scrub_metadata(lora.metadata))
    images = []
    for p in inp.previews:
        copy_file_atomic(p, out / "previews" / p.name)
        images.append({"file": f"previews/{p.name}", "meta": {"prompt": inp.prompts.get(p.name, "")}})
    info = inspect(lora)
    fp = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(info["dtype"][0], info["dtype"][0])
    fields = {
        "name": inp.title, "type": "LORA", "baseModel": CIVITAI_BASE_MODELS[inp.base_model],
        "trainedWords": inp.trigger_words,
        "description": inp.description or f"LoRA for {HF_BASE_MODELS[inp.base_model]} "
                                          f"(rank {', '.join(map(str, info['ranks']))}), trained with wantune.",
        "tags": ["wan", "video", "lora"],
        "files": [{"name": inp.lora.name, "type": "Model",
                   "metadata": {"format": "SafeTensor", "fp": fp}}],
        "images": images,
    }
    write_text_atomic(out / "civitai.json", json.dumps(fields, indent=2, ensure_ascii=False))
    return out


# -- pushing -------------------------------------------------------------------------------------
def push_to_hub(folder: Path, repo_id: str, private: bool = False, endpoint: str | None = None) -> str:
    """Create the model repo (if needed) and upload `folder`. The token comes from the usual
    login (`hf auth login`) or HF_TOKEN; it is never written anywhere."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message="Upload LoRA with wantune", ignore_patterns=["civitai/**"])
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = (" — log in with `hf auth login` or set HF_TOKEN to a write token"
                if status in (401, 403) else "")
        raise PublishError(f"pushing {folder} to {repo_id} failed: {e}{hint}") from e
    return str(url)
