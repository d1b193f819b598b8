"""Sample videos from a Wan 2.1 model, optionally with LoRAs.

    python tools/sample.py --root Wan-AI/Wan2.1-T2V-1.3B --prompt "a cat surfing" --out cat.mp4
    python tools/sample.py --root Wan2.1-T2V-1.3B --lora my_lora.safetensors:0.8 \\
        --prompts-file prompts.yaml --out samples/clip.mp4
    python tools/sample.py --root Wan2.1-I2V-14B-480P --image first.png --prompt "..." --out i2v.webm

The suffix of --out picks the format: .mp4 (H.264), .webm (VP9), .webp, .gif, .png (one frame),
a folder or a pattern like frames/%04d.png. With several prompts, the outputs are numbered
(clip_000.mp4, clip_001.mp4, ...) or named by the prompts file's `name:` fields. Every prompt
uses --seed unless its prompts-file entry sets its own, so a prompt's video does not depend on
its position in the list. steps/shift default to the official values for the task and size
(T2V: 50 steps, shift 5; I2V: 40 steps, shift 3 at 832x480/480x832, else 5).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from wan_model.lora import parse_lora_spec as parse_lora  # noqa: E402
from wan_model.media import write_contact_sheet, write_video  # noqa: E402
from wan_model.paths import ModelPaths  # noqa: E402
from wan_model.quiet import quiet_third_party  # noqa: E402
from wan_model.sampler import (DEFAULTS, PromptSpec, WanSampler, check_frames,  # noqa: E402
                               check_size, default_negative_prompt, default_shift,
                               load_prompts_file, parse_size)
from wan_model.schedulers import SOLVERS  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--root", default="", help="folder or Hugging Face repo id of a Wan 2.1 checkpoint "
                   "(official or diffusers layout), e.g. Wan-AI/Wan2.1-T2V-1.3B")
    for name in ("transformer", "vae", "text-encoder", "tokenizer", "clip"):
        m.add_argument(f"--{name}", default="", help=f"{name} path (default: inside --root)")
    m.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="a LoRA file in any format wantune reads, strength 1 unless given; repeatable")
    m.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="DiT/text encoder weights dtype (default: bf16 on CUDA, fp32 on CPU)")
    m.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    q = p.add_argument_group("prompts")
    q.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    q.add_argument("--prompts-file", default=None,
                   help="text (one prompt per line) or YAML (prompt + per-prompt overrides)")
    q.add_argument("--negative-prompt", default=None, help="default: the official one")
    q.add_argument("--image", default=None, help="first frame for I2V")
    s = p.add_argument_group("sampling")
    s.add_argument("--size", default="832x480", help="WIDTHxHEIGHT, multiples of 16 (I2V: the "
                   "pixel budget; the image sets the aspect ratio)")
    s.add_argument("--frames", type=int, default=DEFAULTS["t2v"]["frames"], help="4k+1")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--shift", type=float, default=None)
    s.add_argument("--guidance", type=float, default=DEFAULTS["t2v"]["guidance"])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--solver", choices=SOLVERS, default="unipc")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT blocks and the VAE's norm+SiLU (faster on GPUs after "
                        "a warm-up step)")
    s.add_argument("--cfg-batch", action="store_true",
                   help="run cond and uncond in one batch-2 forward (faster, more memory)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default="samples/sample.mp4", help="output path; the suffix picks the format")
    o.add_argument("--fps", type=float, default=DEFAULTS["t2v"]["fps"])
    o.add_argument("--contact-sheet", action="store_true", help="also write NAME_sheet.png")
    o.add_argument("--verbose", action="store_true",
                   help="also show the notices of third-party libraries that are hidden by default")
    return p


def collect_specs(a) -> list[PromptSpec]:
    specs = [PromptSpec(prompt=p) for p in a.prompt]
    if a.prompts_file:
        specs += load_prompts_file(a.prompts_file)
    if not specs:
        raise ValueError("no prompt: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    return specs


def resolve_spec(spec: PromptSpec, a, task: str) -> dict:
    """Everything one video needs, per-prompt overrides first, then the flags, then defaults."""
    width, height = (spec.width, spec.height) if spec.width else parse_size(a.size, "--size")
    frames = spec.frames or a.frames
    check_size(width, height, "--size" if not spec.width else f"size of {spec.prompt[:30]!r}")
    check_frames(frames, "--frames" if not spec.frames else f"frames of {spec.prompt[:30]!r}")
    return {
        "width": width, "height": height, "frames": frames,
        "steps": spec.steps or a.steps or DEFAULTS[task]["steps"],
        "shift": spec.shift or a.shift or default_shift(task, width, height),
        "guidance": spec.guidance if spec.guidance is not None else a.guidance,
        "seed": spec.seed if spec.seed is not None else a.seed,
        "negative": spec.negative_prompt or a.negative_prompt or default_negative_prompt(task),
        "image": spec.image or a.image,
    }


def output_paths(out: Path, specs: list[PromptSpec]) -> list[Path]:
    if len(specs) == 1:
        return [out]
    stem, suffix = out.stem, out.suffix
    if "%" in out.name or "{" in out.name:  # a PNG pattern: one folder per prompt
        return [out.parent / (s.name or f"{i:03d}") / out.name for i, s in enumerate(specs)]
    return [out.with_name(f"{s.name or f'{stem}_{i:03d}'}{suffix}") for i, s in enumerate(specs)]


def run(a) -> list[Path]:
    specs = collect_specs(a)
    if not (a.root or (a.transformer and a.vae and a.text_encoder and a.tokenizer)):
        raise ValueError("no model: pass --root (a checkpoint folder or repo id) or all of "
                         "--transformer, --vae, --text-encoder and --tokenizer")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    # Check every prompt's settings before spending minutes on loading.
    for spec in specs:
        resolve_spec(spec, a, "t2v")
    paths = ModelPaths(root=a.root, transformer=a.transformer, vae=a.vae,
                       text_encoder=a.text_encoder, tokenizer=a.tokenizer, clip=a.clip)
    paths.fetch()  # a repo id: every file first, so a failed download costs no loading time
    sampler = WanSampler.load(paths, device=device, dtype=dtype)
    if a.compile:
        sampler.transformer.compile_blocks()
        sampler.vae.fuse_elementwise()
    task = sampler.task
    jobs = [resolve_spec(s, a, task) for s in specs]
    if task == "i2v" and any(j["image"] is None for j in jobs):
        raise ValueError("this is an I2V model: pass --image (or `image:` per prompt)")
    if task == "t2v" and any(j["image"] for j in jobs):
        raise ValueError("--image was given but the model is a T2V model; use an I2V checkpoint")
    if a.lora:
        from wan_model.lora import apply_loras

        apply_loras(sampler.transformer, [parse_lora(x) for x in a.lora], mode="merge")
    texts = [s.prompt for s in specs] + [j["negative"] for j in jobs if j["guidance"] != 1.0]
    sampler.encode_prompts(texts)
    sampler.release_text_encoder()
    written = []
    for spec, job, path in zip(specs, jobs, output_paths(Path(a.out), specs)):
        video = sampler.generate(spec.prompt, job["negative"], job["image"], frames=job["frames"],
                                 height=job["height"], width=job["width"], steps=job["steps"],
                                 shift=job["shift"], guidance=job["guidance"], solver=a.solver,
                                 seed=job["seed"], cfg_batch=a.cfg_batch)
        write_video(video[0], path, fps=a.fps)
        if a.contact_sheet:
            write_contact_sheet(video[0], path.with_name(f"{path.stem}_sheet.png"))
        print(f"wrote {path}")
        written.append(path)
    return written


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    quiet_third_party(a.verbose)
    try:
        run(a)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
