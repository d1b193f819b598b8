"""Validation previews during training, with the training state left untouched.

Prompt embeddings are computed once at setup and the text encoder is released; the VAE (and
CLIP for I2V) wait in host memory and visit the GPU only while a preview is decoded. Sampling
runs without gradients in eval mode, and the mode, RNG state and freed caches are restored
afterwards, so the step after a preview runs exactly like the step before it.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from wan_model import sequence_parallel
from wan_model.media import write_contact_sheet, write_video
from wan_model.sampler import PromptSpec, WanSampler, load_prompts_file


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


class Previewer:
    def __init__(self, recipe, acc, model, out_dir: Path):
        import wan_model

        self.v = recipe.validation
        self.acc, self.model, self.out_dir = acc, model, Path(out_dir)
        specs = [PromptSpec(prompt=p) for p in self.v.prompts]
        if self.v.prompts_file:
            specs += load_prompts_file(self.v.prompts_file)
        self.specs = specs
        paths = recipe.model
        dit = acc.unwrap_model(model)
        self.i2v = dit.cfg.is_i2v
        if self.i2v and any(s.image is None for s in specs):
            raise ValueError("validation: this is an I2V model; give every validation prompt an "
                             "image (a prompts_file entry with `image: path`)")
        self.vae = wan_model.load_vae(paths.resolve("vae"), dtype=torch.float32, device="cpu")
        if recipe.train.compile and acc.device.type == "cuda":
            self.vae.fuse_elementwise()  # decode's norm+SiLU passes as one kernel each
        self.clip = (wan_model.load_clip_vision(paths.resolve("clip"), dtype=torch.float32, device="cpu")
                     if self.i2v else None)
        text = wan_model.load_text_encoder(paths.resolve("text_encoder"), paths.resolve("tokenizer"),
                                           dtype=torch.bfloat16 if acc.device.type == "cuda" else torch.float32,
                                           device=acc.device)
        dtype = torch.bfloat16 if recipe.train.mixed_precision == "bf16" else None
        self.sampler = WanSampler(dit, self.vae, text, self.clip, device=acc.device, dtype=dtype)
        negatives = {self._negative(s) for s in specs}
        self.sampler.encode_prompts([s.prompt for s in specs] + sorted(negatives))
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
        self.vae.to(self.acc.device)
        if self.clip is not None:
            self.clip.to(self.acc.device)
        try:
            with torch.no_grad(), sequence_parallel.disabled(dit):  # previews run on this rank alone
                for i, spec in enumerate(self.specs):
                    video = self.sampler.generate(
                        [spec.prompt], negative_prompt=self._negative(spec), image=spec.image,
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
            self.vae.to("cpu")
            if self.clip is not None:
                self.clip.to("cpu")
            dit.train(was_training)
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state_all(cuda_rng)
                torch.cuda.empty_cache()
        self.acc.print(f"previews for step {step}: {folder}")
        return written
