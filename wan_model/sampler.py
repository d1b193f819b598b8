"""Flow-matching sampling for Wan 2.1: the official loop, CFG, T2V and I2V conditioning.

`sample()` runs the denoising loop for any callable DiT `model(x, t, context, clip_fea=, y=)`.
`WanSampler` wires the loaded components together (text encoder, DiT, VAE, CLIP) for
`tools/sample.py` and the validation previews of training. `load_prompts_file()` reads the
prompt lists both of them use.

Everything follows the official `generate.py` (spec §4.2, §5.2): the UniPC grid and solver of
`wan_model.schedulers`, noise drawn as float32 [16, T_lat, H/8, W/8] per sample from a generator
seeded with the sample's seed *on the sampling device* (so CPU and CUDA give different noise for
one seed, as in the official code), `uncond + g·(cond − uncond)` with the official negative prompt.
"""
from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .schedulers import make_scheduler

DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，"
    "低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，"
    "毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
I2V_NEGATIVE_PREFIX = "镜头晃动，"

# The official `generate.py` defaults (spec §4.2); `shift` for I2V depends on the size.
DEFAULTS = {
    "t2v": {"steps": 50, "shift": 5.0, "guidance": 5.0, "frames": 81, "fps": 16,
            "width": 832, "height": 480},
    "i2v": {"steps": 40, "shift": 5.0, "guidance": 5.0, "frames": 81, "fps": 16,
            "width": 832, "height": 480},
}
I2V_480P_SHIFT = 3.0
VAE_STRIDE = (4, 8, 8)
SIZE_MULTIPLE = 16  # VAE stride 8 times the DiT patch 2
Z_DIM = 16


def default_negative_prompt(task: str) -> str:
    """The official negative prompt: the shared one, with "镜头晃动，" in front for I2V."""
    return (I2V_NEGATIVE_PREFIX if task == "i2v" else "") + DEFAULT_NEGATIVE_PROMPT


def default_shift(task: str, width: int, height: int) -> float:
    """5.0, except 3.0 for I2V at the 480p sizes 832x480 and 480x832 (official `generate.py`)."""
    if task == "i2v" and (width, height) in ((832, 480), (480, 832)):
        return I2V_480P_SHIFT
    return DEFAULTS[task]["shift"]


# ---- argument checks (errors name the value and the nearest valid ones) ----

def _nearest_multiples(value: int, k: int) -> list[int]:
    lower = max(k, value // k * k)
    return sorted({lower, lower + k})


def check_size(width: int, height: int, where: str = "size") -> None:
    """Width and height must be positive multiples of 16 (VAE stride 8 x patch 2)."""
    problems = []
    for name, v in (("width", width), ("height", height)):
        if v <= 0 or v % SIZE_MULTIPLE:
            near = " or ".join(str(n) for n in _nearest_multiples(max(v, 1), SIZE_MULTIPLE))
            problems.append(f"{name} {v} is not a multiple of {SIZE_MULTIPLE} (nearest: {near})")
    if problems:
        raise ValueError(f"{where} {width}x{height}: " + "; ".join(problems))


def check_frames(frames: int, where: str = "frames") -> None:
    """Frame counts must be 4k+1 (the VAE keeps frame 0 and compresses time by 4)."""
    if frames >= 1 and (frames - 1) % 4 == 0:
        return
    lower = max(1, (frames - 1) // 4 * 4 + 1)
    near = " or ".join(str(n) for n in sorted({lower, lower + 4}))
    raise ValueError(f"{where} {frames} is not of the form 4k+1 (nearest: {near})")


def parse_size(text: str, where: str = "size") -> tuple[int, int]:
    """'832x480' (or '832*480', the official spelling) -> (width, height)."""
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{where} {text!r} is not WIDTHxHEIGHT, e.g. 832x480") from None
    return width, height


# ---- prompts files ----

@dataclass
class PromptSpec:
    """One prompt with optional per-prompt overrides (None = the caller's default)."""

    prompt: str
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seed: int | None = None
    guidance: float | None = None
    steps: int | None = None
    shift: float | None = None
    image: str | None = None
    name: str | None = None


_SPEC_KEYS = [f.name for f in fields(PromptSpec)] + ["size"]


def _spec_from_dict(entry: dict, where: str) -> PromptSpec:
    unknown = [k for k in entry if k not in _SPEC_KEYS]
    if unknown:
        hints = []
        for k in unknown:
            close = difflib.get_close_matches(str(k), _SPEC_KEYS, n=1)
            hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"{where}: unknown key(s) {', '.join(hints)}; allowed: {_SPEC_KEYS}")
    if not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
        raise ValueError(f"{where}: needs a non-empty 'prompt' string")
    entry = dict(entry)
    if "size" in entry:
        entry["width"], entry["height"] = parse_size(entry.pop("size"), f"{where} size")
    casts = {"width": int, "height": int, "frames": int, "seed": int, "steps": int,
             "guidance": float, "shift": float}
    for key, cast in casts.items():
        if entry.get(key) is not None:
            try:
                entry[key] = cast(entry[key])
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {key} {entry[key]!r} is not a {cast.__name__}") from None
    spec = PromptSpec(**entry)
    if (spec.width is None) != (spec.height is None):
        raise ValueError(f"{where}: give both width and height (or size: WxH)")
    if spec.width is not None:
        check_size(spec.width, spec.height, f"{where} size")
    if spec.frames is not None:
        check_frames(spec.frames, f"{where} frames")
    return spec


def load_prompts_file(path: str | Path) -> list[PromptSpec]:
    """Read prompts: a text file (one prompt per line; blank lines and '#' comments skipped) or
    YAML (.yaml/.yml): a list whose items are prompt strings or mappings with `prompt` and
    optional overrides `negative_prompt, size (WxH) or width+height, frames, seed, guidance,
    steps, shift, image (relative to the file's folder), name`. A mapping with a `prompts:`
    list is accepted too."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    if path.suffix.lower() not in (".yaml", ".yml"):
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        specs = [PromptSpec(prompt=ln) for ln in lines if ln and not ln.startswith("#")]
    else:
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "prompts" in data:
            data = data["prompts"]
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a list of prompts (strings or mappings with "
                             f"'prompt'), got {type(data).__name__}")
        specs = []
        for i, item in enumerate(data):
            where = f"{path} entry {i}"
            if isinstance(item, str):
                item = {"prompt": item}
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected a string or a mapping, got {item!r}")
            spec = _spec_from_dict(item, where)
            if spec.image and not Path(spec.image).is_absolute():
                spec.image = str(path.parent / spec.image)  # relative to the prompts file
            specs.append(spec)
    if not specs:
        raise ValueError(f"prompts file {path} holds no prompts")
    return specs


# ---- I2V conditioning (spec §5.2) ----

def i2v_size(image_w: int, image_h: int, max_area: int) -> tuple[int, int]:
    """(h, w) of an I2V video: the image's aspect ratio at about max_area pixels, with latent
    sides rounded down to even numbers (official `WanI2V.generate`)."""
    aspect = image_h / image_w
    lat_h = round(math.sqrt(max_area * aspect) // VAE_STRIDE[1] // 2 * 2)
    lat_w = round(math.sqrt(max_area / aspect) // VAE_STRIDE[2] // 2 * 2)
    return lat_h * VAE_STRIDE[1], lat_w * VAE_STRIDE[2]


def i2v_mask(frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """[4, T_lat, lat_h, lat_w]: ones at latent frame 0, zeros elsewhere. Channel k of latent
    frame t stands for pixel frame 4t + k - 3 (frame 0 repeated four times)."""
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, 0:1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w)
    return msk.transpose(1, 2)[0]


def image_to_tensor(image) -> torch.Tensor:
    """A PIL image, a path or a [3,H,W] tensor in [-1,1] -> float32 [3,H,W] in [-1,1]."""
    if isinstance(image, torch.Tensor):
        return image.float()
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            image = im.convert("RGB")
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5


@torch.no_grad()
def i2v_condition(vae, clip, image, frames: int, height: int, width: int):
    """(clip_fea [1,257,clip_dim], y [1,20,T_lat,h/8,w/8]) for one image, as the official I2V:
    CLIP sees the original image; the VAE sees it bicubic-resized to (h, w) followed by F-1 zero
    (mid-gray) frames; y = concat(mask(4), latent(16))."""
    img = image_to_tensor(image)
    device = _module_device(vae)
    clip_fea = clip.encode(img[None].to(_module_device(clip)))
    first = F.interpolate(img[None].cpu(), size=(height, width), mode="bicubic")  # [1,3,h,w]
    video = torch.cat([first.transpose(0, 1), torch.zeros(3, frames - 1, height, width)], dim=1)
    latent = vae.encode(video[None].to(device))  # [1,16,T_lat,h/8,w/8]
    mask = i2v_mask(frames, height // VAE_STRIDE[1], width // VAE_STRIDE[2])
    y = torch.cat([mask[None].to(latent.device, latent.dtype), latent], dim=1)
    return clip_fea, y


def _module_device(module) -> torch.device:
    """The device of an nn.Module or of a wrapper with a `.device` (TextEncoder, CLIPVision)."""
    if isinstance(getattr(module, "device", None), torch.device):
        return module.device
    try:
        return next(module.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


# ---- the denoising loop ----

def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int, int]:
    return (Z_DIM, (frames - 1) // VAE_STRIDE[0] + 1, height // VAE_STRIDE[1],
            width // VAE_STRIDE[2])


def make_noise(seeds: Sequence[int], frames: int, height: int, width: int,
               device: torch.device | str) -> torch.Tensor:
    """[B,16,T_lat,H/8,W/8] float32: sample i from its own generator seeded with seeds[i] on
    `device`, so a prompt's video does not depend on what else is in the batch."""
    out = []
    for seed in seeds:
        g = torch.Generator(device=device).manual_seed(int(seed))
        out.append(torch.randn(latent_shape(frames, height, width), dtype=torch.float32,
                               generator=g, device=device))
    return torch.stack(out)


@torch.no_grad()
def sample(model: Callable, context: list[torch.Tensor],
           negative_context: list[torch.Tensor] | None = None, *,
           frames: int = 81, height: int = 480, width: int = 832, steps: int = 50,
           shift: float = 5.0, guidance: float = 5.0, solver: str = "unipc",
           seed: int | Sequence[int] = 0, clip_fea: torch.Tensor | None = None,
           y: torch.Tensor | None = None, noise: torch.Tensor | None = None,
           device: torch.device | str | None = None, dtype: torch.dtype | None = None,
           cfg_batch: bool = False, progress: bool = True) -> torch.Tensor:
    """Denoise B = len(context) samples; returns latents [B,16,T_lat,H/8,W/8] float32.

    model: `model(x [B,16,T,h,w], t [B] float (0..1000), context list of [L,dim], clip_fea=, y=)`
        returning the velocity. `dtype` (e.g. torch.bfloat16) runs it under autocast, which is
        what the official code does around its float32 weights.
    negative_context: one [L,dim] per sample (or one shared); needed unless guidance == 1,
        where the unconditional pass is skipped.
    seed: one int (sample i gets seed + i) or one per sample; ignored when `noise` is given.
    cfg_batch: run cond and uncond as one forward of batch 2B (faster, more memory).
    """
    check_size(width, height)
    check_frames(frames)
    batch = len(context)
    device = torch.device(device) if device is not None else _module_device(model)
    use_cfg = guidance != 1.0
    if use_cfg:
        if negative_context is None:
            raise ValueError("guidance != 1 needs negative_context (the negative prompt's "
                             "embedding); pass guidance=1.0 to sample without CFG")
        if len(negative_context) == 1 and batch > 1:
            negative_context = list(negative_context) * batch
    if noise is None:
        seeds = [seed + i for i in range(batch)] if isinstance(seed, int) else list(seed)
        noise = make_noise(seeds, frames, height, width, device)
    latents = noise.to(device, torch.float32)
    context = [c.to(device) for c in context]
    negative_context = [c.to(device) for c in negative_context] if use_cfg else None
    extra = {k: v.to(device) for k, v in (("clip_fea", clip_fea), ("y", y)) if v is not None}
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                else torch.autocast(device.type, enabled=False))
    sched = make_scheduler(solver, steps, shift)
    timesteps = sched.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps, desc="sampling", leave=False)
    for i, t in enumerate(timesteps):
        t_batch = torch.full((batch,), float(t), device=device)
        with autocast:
            v = _guided_velocity(model, latents, t_batch, context, negative_context, extra,
                                 guidance, cfg_batch)
        latents = sched.step(v.float(), i, latents)
    return latents


def _guided_velocity(model, x, t, context, negative_context, extra, guidance, cfg_batch):
    """cond, or uncond + g·(cond − uncond) (the official order of operations)."""
    if negative_context is None:
        return model(x, t, context, **extra).float()
    if cfg_batch:
        both = {k: torch.cat([v, v]) for k, v in extra.items()}
        out = model(torch.cat([x, x]), torch.cat([t, t]), context + negative_context, **both)
        cond, uncond = out.float().chunk(2)
    else:
        cond = model(x, t, context, **extra).float()
        uncond = model(x, t, negative_context, **extra).float()
    return uncond + guidance * (cond - uncond)


# ---- the components together ----

class WanSampler:
    """Text encoder + DiT + VAE (+ CLIP for I2V) -> videos.

    Prompt embeddings are computed once and cached, so the text encoder can be released
    (`release_text_encoder()`) after `encode_prompts()` and repeated previews cost no encoding.
    """

    def __init__(self, transformer, vae, text_encoder=None, clip=None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        self.transformer, self.vae, self.text_encoder, self.clip = transformer, vae, text_encoder, clip
        self.device = torch.device(device) if device is not None else _module_device(transformer)
        self.dtype = dtype  # autocast dtype of the DiT forward (None: run in the weights' dtype)
        self._embeddings: dict[str, torch.Tensor] = {}

    @property
    def task(self) -> str:
        config = getattr(self.transformer, "cfg", None) or getattr(self.transformer, "config", None)
        model_type = getattr(config, "model_type", None)
        return model_type if model_type in ("t2v", "i2v") else ("i2v" if self.clip else "t2v")

    @classmethod
    def load(cls, paths, *, device="cpu", dtype=torch.bfloat16, clip: bool | None = None):
        """Load every component from a `wan_model.paths.ModelPaths`. The DiT and text encoder
        weights are loaded in `dtype` (the DiT computes in its weights' dtype, with its float32
        islands); the VAE stays float32 as in the official code; CLIP (float16 on a GPU) is
        loaded when `clip` is True or, with None, when the DiT is an I2V one."""
        import wan_model

        transformer = wan_model.load_transformer(paths.resolve("transformer"), dtype=dtype,
                                                 device=device)
        transformer.eval().requires_grad_(False)
        vae = wan_model.load_vae(paths.resolve("vae"), dtype=torch.float32, device=device)
        text_encoder = wan_model.load_text_encoder(
            paths.resolve("text_encoder"), paths.resolve("tokenizer"), dtype=dtype, device=device)
        sampler = cls(transformer, vae, text_encoder, None, device=device)
        if clip or (clip is None and sampler.task == "i2v"):
            clip_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
            sampler.clip = wan_model.load_clip_vision(paths.resolve("clip"), dtype=clip_dtype,
                                                      device=device)
        return sampler

    @classmethod
    def load_staged(cls, paths, prompts: Sequence[str], *, device="cpu", dtype=torch.bfloat16,
                    text_encoder_device: str = "device", loras=(), fp8: bool = False,
                    fp8_matmul: bool = False, block_swap: int = 0, clip: bool | None = None,
                    clip_dtype: torch.dtype | None = None):
        """Load for the least device memory, one component at a time (`load` puts all of them
        on the device at once). The text encoder, placed as `text_encoder_device` says (device,
        cpu or stream: see `TextEncoder.place`), encodes `prompts` (every prompt and negative
        prompt to be sampled) and is released before the DiT is loaded, so the two never share
        the device. The DiT is loaded in `dtype` and made ready by `place_dit` (LoRAs merged,
        float8 block Linears, with `fp8_matmul` float8 GEMMs and the fused GELU kernel, block
        swap); with fp8 or block swap it is loaded to the host, so its bf16 weights never sit
        whole on the device. The VAE (float32) and CLIP (`clip_dtype`, default float16 on a GPU)
        wait in host memory: the caller places them for each render,
        as the training previews do (`train.validation.decoder_placed`)."""
        import wan_model

        # the sampler holds the only reference to the text encoder, so releasing it frees it
        sampler = cls(None, None, wan_model.load_text_encoder(
            paths.resolve("text_encoder"), paths.resolve("tokenizer"), dtype=dtype, device=device,
            placement=text_encoder_device), None, device=device)
        sampler.encode_prompts(prompts)
        sampler.release_text_encoder()
        on_host = fp8 or fp8_matmul or block_swap  # then only what stays resident reaches the device
        model = wan_model.load_transformer(paths.resolve("transformer"), dtype=dtype,
                                           device="cpu" if on_host else device)
        sampler.transformer = place_dit(model, device, loras=loras, fp8=fp8,
                                        fp8_matmul=fp8_matmul, block_swap=block_swap)
        sampler.vae = wan_model.load_vae(paths.resolve("vae"), dtype=torch.float32, device="cpu")
        if clip or (clip is None and sampler.task == "i2v"):
            if clip_dtype is None:
                clip_dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
            sampler.clip = wan_model.load_clip_vision(paths.resolve("clip"), dtype=clip_dtype,
                                                      device="cpu")
        return sampler

    def encode_prompts(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """[L_i, dim] embeddings, from the cache or encoded now (all missing ones at once)."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self._embeddings))
        if missing:
            if self.text_encoder is None:
                raise RuntimeError(f"prompt {missing[0]!r} was not encoded before "
                                   "release_text_encoder(); call encode_prompts() with every "
                                   "prompt (and negative prompt) first")
            with torch.no_grad():
                for text, emb in zip(missing, self.text_encoder.encode(missing)):
                    self._embeddings[text] = emb.detach().clone()  # not a view of the padded batch
        return [self._embeddings[p] for p in prompts]

    def release_text_encoder(self) -> None:
        """Drop the text encoder (the cached embeddings stay) and free its memory."""
        from .device_memory import free_memory

        self.text_encoder = None
        free_memory()

    @torch.no_grad()
    def generate(self, prompts: str | Sequence[str], negative_prompt: str | None = None,
                 image=None, *, frames: int = 81, height: int = 480, width: int = 832,
                 steps: int | None = None, shift: float | None = None, guidance: float = 5.0,
                 solver: str = "unipc", seed: int | Sequence[int] = 0, cfg_batch: bool = False,
                 progress: bool = True, return_latents: bool = False) -> torch.Tensor:
        """Videos [B,3,T,H,W] in [-1,1] (latents [B,16,T_lat,H/8,W/8] if return_latents).

        Prompts run one at a time (prompt i with seed s_i gives the same video whatever else
        is asked). steps/shift default to the official values for the task and size. For I2V,
        `image` (one for all prompts, or one per prompt) sets the aspect ratio and
        height*width is the pixel budget, as the official size flag.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        task = self.task
        if task == "i2v" and image is None:
            raise ValueError("this is an I2V model: pass image= (a path, PIL image or tensor)")
        steps = steps if steps is not None else DEFAULTS[task]["steps"]
        shift = shift if shift is not None else default_shift(task, width, height)
        if negative_prompt is None:
            negative_prompt = default_negative_prompt(task)
        seeds = [seed + i for i in range(len(prompts))] if isinstance(seed, int) else list(seed)
        images = image if isinstance(image, (list, tuple)) else [image] * len(prompts)
        if len(seeds) != len(prompts) or len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds and "
                             f"{len(images)} images; give one each (or a single one)")
        self.encode_prompts(prompts + ([negative_prompt] if guidance != 1.0 else []))
        outputs = []
        for prompt, s, img in zip(prompts, seeds, images):
            out = self._generate_one(prompt, negative_prompt, img, frames, height, width, steps,
                                     shift, guidance, solver, s, cfg_batch, progress,
                                     return_latents)
            outputs.append(out)
        shapes = {tuple(o.shape) for o in outputs}
        if len(shapes) > 1:
            raise ValueError(f"the images give videos of different sizes {sorted(shapes)}; "
                             "call generate() once per image")
        return torch.cat(outputs)

    def _generate_one(self, prompt, negative_prompt, image, frames, height, width, steps,
                      shift, guidance, solver, seed, cfg_batch, progress, return_latents):
        clip_fea = y = None
        if image is not None:
            if self.clip is None:
                raise ValueError("an image was given but no CLIP vision tower is loaded; "
                                 "I2V needs an I2V checkpoint with its CLIP file")
            img = image_to_tensor(image)
            height, width = i2v_size(img.shape[-1], img.shape[-2], height * width)
            clip_fea, y = i2v_condition(self.vae, self.clip, img, frames, height, width)
        context = self.encode_prompts([prompt])
        negative = self.encode_prompts([negative_prompt]) if guidance != 1.0 else None
        latents = sample(self.transformer, context, negative, frames=frames, height=height,
                         width=width, steps=steps, shift=shift, guidance=guidance,
                         solver=solver, seed=[seed], clip_fea=clip_fea, y=y,
                         device=self.device, dtype=self.dtype, cfg_batch=cfg_batch,
                         progress=progress)
        if return_latents:
            return latents
        return decode_latents(self.vae, latents)


def place_dit(model, device, *, loras=(), fp8: bool = False, fp8_matmul: bool = False,
              block_swap: int = 0, fused_gelu: bool | None = None, quant_kernel: bool = False):
    """A loaded DiT made ready to sample on `device`, in this order: the LoRAs [(path or Lora,
    strength)] merged into its weights (before quantising: a merge into float8 weights would
    add the change to the scaled codes); with `fp8` its block Linears stored in float8 e4m3
    (`wan_model.fp8`; `fp8_matmul`: float8 GEMMs too), quantised on `device` a weight at a time
    for a model held on the host, as the trainer does; then placed: whole on `device`, or with
    its last `block_swap` blocks in host memory, streamed in as they run (`wan_model.block_swap`);
    the attention kernel chosen for `device` (`attention.set_backend`). Load it to the host when
    fp8 or block swap is asked for: only what stays resident then reaches the device.
    With `fp8_matmul` on a GPU with Triton: `fused_gelu` runs each FFN's GELU with the
    quantisation of its output as one Triton pass (default: with `fp8_matmul`; measured on an
    H200, 0.890 s a sampling step against 0.912 s without, BENCHMARKS.md), and `quant_kernel`
    quantises every other float8 GEMM input in one pass per row too (measured 6 ms a step slower:
    off) (`wan_model.fp8_triton`, `wan_model.fp8.feed_forward`)."""
    from .device_memory import free_memory

    if loras:
        from .lora import apply_loras

        apply_loras(model, list(loras), mode="merge")
    if fp8 or fp8_matmul:
        from .fp8 import quantize_linears_

        quantize_linears_(model, work_device=device, fp8_matmul=fp8_matmul, quant_kernel=quant_kernel)
        for name, module in model.named_modules():
            if name.endswith(".ffn.2") and hasattr(module, "fused_gelu"):
                module.fused_gelu = fp8_matmul if fused_gelu is None else fused_gelu
        free_memory()  # the quantising's work buffers, cached on the device
    if block_swap:
        from .block_swap import enable_block_swap

        enable_block_swap(model, block_swap, device)
    else:
        model.to(device)
    from . import attention

    attention.set_backend(attention.get_backend(), device)  # "auto": FlashAttention 4 where it runs
    return model


def dit_device_bytes(cfg, dtype: torch.dtype = torch.bfloat16, fp8: bool = False,
                     block_swap: int = 0) -> int:
    """The bytes of weights `place_dit` leaves on the device for a DiT of `cfg` loaded in `dtype`
    (its float32 islands kept): the block Linears in float8 (with their row scales) with `fp8`;
    with `block_swap` the last N blocks on the host, two of them on the device at a time (the
    one running and the one being copied in). Counted on a meta model: no weights are read."""
    total, blocks = _weight_bytes(cfg, dtype, fp8)
    swapped = blocks[len(blocks) - min(block_swap, len(blocks)):]
    return total - sum(swapped) + sum(sorted(swapped)[-2:])


@functools.lru_cache(maxsize=8)
def _weight_bytes(cfg, dtype: torch.dtype, fp8: bool) -> tuple[int, tuple[int, ...]]:
    """(all the DiT's weight bytes, each block's) as `place_dit` stores them."""
    from .fp8 import quantize_linears_
    from .transformer import meta_model

    model = meta_model(cfg, dtype)
    if fp8:
        quantize_linears_(model)

    def nbytes(module):
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
    return nbytes(model), tuple(nbytes(b) for b in model.blocks)


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Video [B,3,T,H,W] in [-1,1], decoded wherever the VAE is (the latents follow it: previews
    decoded on the host never put the VAE on the GPU)."""
    return vae.decode(latents.to(_module_device(vae))).float().clamp(-1, 1)
