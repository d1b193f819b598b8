"""Validation previews during training, with the training state left untouched.

Prompt embeddings are computed once at setup (the text encoder placed as for caching, by
data.text_encoder_device) and the text encoder is released; the VAE (and CLIP for I2V) wait in
host memory and, as validation.decode says, visit the GPU only while a preview is rendered
(whole or in tiles) or never (decoded on the host). Sampling runs without gradients in eval
mode, and the mode, RNG state and freed caches are restored afterwards, so the step after a
preview runs exactly like the step before it. An I2V prompt without an image starts from the
first frame of a corpus clip (named in the log).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

import torch

from wantune.data.cache import load_text
from wan_model import sequence_parallel
from wan_model.media import write_contact_sheet, write_video
from wan_model.sampler import PromptSpec, WanSampler, load_prompts_file


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def prompt_specs(v) -> list[PromptSpec]:
    """The previews of a `validation:` section: its prompts, then its prompts file's."""
    specs = [PromptSpec(prompt=p) for p in v.prompts]
    if v.prompts_file:
        specs += load_prompts_file(v.prompts_file)
    return specs


def preview_problems(v, i2v: bool) -> list[str]:
    """What is wrong with the previews of a `validation:` section, found before any work."""
    try:
        specs = prompt_specs(v)
    except (OSError, ValueError) as e:
        return [f"validation.prompts_file: {e}"]
    out = []
    for spec in specs:
        if spec.image is None:
            continue
        where = f"validation prompt {spec.prompt[:40]!r}"
        if not i2v:
            out.append(f"{where} has an image, but the model is a T2V model: remove `image:` or train "
                       "an I2V checkpoint")
        elif not Path(spec.image).is_file():
            out.append(f"{where}: its image {spec.image} does not exist")
    return out


def first_frame(clip: str | Path):
    """Frame 0 of a clip or image, as a PIL image."""
    from PIL import Image

    from wantune.data.decode import probe, read_frames

    return Image.fromarray(read_frames(clip, [0], probe(clip).backend)[0])


class Previewer:
    def __init__(self, recipe, acc, model, out_dir: Path, corpus_clip: str | None = None):
        """`corpus_clip`: a clip whose first frame starts I2V previews given no image."""
        import wan_model

        self.v = recipe.validation
        self.acc, self.model, self.out_dir = acc, model, Path(out_dir)
        self.specs = prompt_specs(self.v)
        paths = recipe.model
        dit = acc.unwrap_model(model)
        self.i2v = dit.cfg.is_i2v
        self.fallback_image = None
        if self.i2v and any(s.image is None for s in self.specs):
            self.fallback_image = first_frame(corpus_clip)
            n = sum(s.image is None for s in self.specs)
            acc.print(f"previews: {n} I2V prompt(s) without an image start from the first frame of "
                      f"{corpus_clip}")
        self.vae = wan_model.load_vae(paths.resolve("vae"), dtype=torch.float32, device="cpu")
        if recipe.train.compile and acc.device.type == "cuda" and self.v.decode != "cpu":
            self.vae.fuse_elementwise()  # decode's norm+SiLU passes as one kernel each
        self.clip = (wan_model.load_clip_vision(paths.resolve("clip"), dtype=torch.float32, device="cpu")
                     if self.i2v else None)
        text = load_text(paths, recipe.data, acc.device)  # as the captions were cached
        dtype = torch.bfloat16 if recipe.train.mixed_precision == "bf16" else None
        self.sampler = WanSampler(dit, self.vae, text, self.clip, device=acc.device, dtype=dtype)
        negatives = {self._negative(s) for s in self.specs}
        self.sampler.encode_prompts([s.prompt for s in self.specs] + sorted(negatives))
        self.sampler.release_text_encoder()

    def _negative(self, spec: PromptSpec) -> str:
        from wan_model.sampler import default_negative_prompt

        if spec.negative_prompt is not None:
            return spec.negative_prompt
        if self.v.negative_prompt is not None:
            return self.v.negative_prompt
        return default_negative_prompt("i2v" if self.i2v else "t2v")

    def render(self, step: int) -> list[Path]:
        dit = self.acc.unwrap_model(self.model)
        was_training = dit.training
        cpu_rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        folder = self.out_dir / f"step-{step}"
        written = []
        dit.eval()
        try:
            placed = decoder_placed(self.vae, self.clip, self.v.decode, self.acc.device)
            with torch.no_grad(), placed, sequence_parallel.disabled(dit):  # previews run on this rank alone
                for i, spec in enumerate(self.specs):
                    video = self.sampler.generate(
                        [spec.prompt], negative_prompt=self._negative(spec),
                        image=spec.image or self.fallback_image,
                        frames=spec.frames or self.v.frames, height=spec.height or self.v.height,
                        width=spec.width or self.v.width, steps=spec.steps or self.v.steps,
                        shift=spec.shift or self.v.shift,
                        guidance=spec.guidance if spec.guidance is not None else self.v.guidance,
                        seed=spec.seed if spec.seed is not None else self.v.seed, progress=False)
                    name = spec.name or f"{i:02d}-{_slug(spec.prompt)}"
                    path = write_video(video[0].cpu(), folder / f"{name}.{self.v.format}", fps=self.v.fps)
                    write_contact_sheet(video[0].cpu(), folder / f"{name}.png")
                    written.append(path)
        finally:
            dit.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
                torch.cuda.empty_cache()
        self.acc.print(f"previews for step {step}: {folder}")
        return written


@contextmanager
def decoder_placed(vae, clip, decode: str, device):
    """The VAE (and CLIP) placed for one render as validation.decode says, back on the host
    afterwards. device (and an unplanned auto): both on `device`; tiled: the same with the
    VAE's spatial tiling on for this render only; cpu: both stay on the host, so the sampler
    decodes there (it moves the latents to wherever the VAE is)."""
    tiling = vae.tiling
    try:
        if decode != "cpu":
            vae.to(device)
            if clip is not None:
                clip.to(device)
        if decode == "tiled":
            vae.enable_tiling()
        yield
    finally:
        vae.tiling = tiling
        vae.to("cpu")
        if clip is not None:
            clip.to("cpu")
