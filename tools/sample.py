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

Memory: the prompts are encoded and the text encoder released before the DiT is loaded, so the
two never share the GPU. For smaller cards: --text-encoder-device cpu|stream, --fp8 (the DiT's
block weights in float8), --block-swap N and --decode tiled|cpu (see "memory" below).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from wantune.train.validation import decoder_placed  # noqa: E402
from wan_model.device_memory import GIB  # noqa: E402
from wan_model.lora import parse_lora_spec as parse_lora  # noqa: E402
from wan_model.lora import read_lora  # noqa: E402
from wan_model.media import write_contact_sheet, write_video  # noqa: E402
from wan_model.paths import ModelPaths  # noqa: E402
from wan_model.quiet import quiet_third_party  # noqa: E402
from wan_model.sampler import (DEFAULTS, PromptSpec, WanSampler, check_frames,  # noqa: E402
                               check_size, default_negative_prompt, default_shift,
                               dit_device_bytes, load_prompts_file, parse_size)
from wan_model.schedulers import SOLVERS  # noqa: E402
from wan_model.text_encoder import PLACEMENTS  # noqa: E402

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
    g = p.add_argument_group("memory")
    g.add_argument("--text-encoder-device", choices=[x for x in PLACEMENTS if x != "auto"],
                   default="device",
                   help="where the umT5 text encoder (11 GB in bf16) encodes the prompts, before "
                        "the DiT is loaded: device (the whole encoder on the GPU), cpu (on the "
                        "host: no GPU memory, slow) or stream (its blocks copied to the GPU one "
                        "at a time: 1.2 GiB there for a prompt and its negative, the same "
                        "embeddings)")
    g.add_argument("--fp8", action="store_true",
                   help="store the DiT's block Linears in float8 e4m3 (one scale per row, upcast "
                        "on use): about half the DiT's memory (the 14B: 14.2 GiB on the GPU), "
                        "each weight rounded to 3 mantissa bits. The bf16 DiT is read into host "
                        "memory (the 14B: ~29 GB of RAM) and quantised on the GPU a weight at a "
                        "time; LoRAs are merged before quantising")
    g.add_argument("--fp8-matmul", action="store_true",
                   help="--fp8, and the matmuls run as float8 GEMMs too (they round the "
                        "activations as well; with Triton each FFN's GELU and its quantisation "
                        "run as one kernel); needs a CUDA GPU of compute capability 8.9 or "
                        "newer (Ada, Hopper) and --dtype bf16")
    g.add_argument("--block-swap", type=int, default=0, metavar="N",
                   help="keep the last N DiT blocks in pinned host memory and copy each to the "
                        "GPU just before it runs, under the previous block's compute (for a DiT "
                        "that does not fit; a slow PCIe link makes steps slower, so swap only as "
                        "many as needed)")
    g.add_argument("--decode", choices=("device", "tiled", "cpu"), default="device",
                   help="where the VAE decodes (and, for I2V, encodes the image): device; tiled "
                        "(on the GPU in 256 px spatial tiles, blended: less memory); cpu (the VAE "
                        "and CLIP never visit the GPU; slow). Between videos they wait on the host")
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


def check_memory_options(a, device: str, dtype: torch.dtype) -> None:
    """Refuse the memory options that cannot work together, before anything is loaded."""
    if a.fp8_matmul:
        if torch.device(device).type != "cuda":
            raise ValueError(f"--fp8-matmul runs float8 GEMMs on a CUDA GPU, but the device is "
                             f"{device}: drop --fp8-matmul (--fp8 alone stores the weights in "
                             "float8 and runs anywhere)")
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"--fp8-matmul needs a GPU of compute capability 8.9 or newer (Ada, "
                             f"Hopper) for float8 GEMMs; {device} has {capability[0]}.{capability[1]}: "
                             "use --fp8 instead (float8 storage, bf16 matmuls)")
        if dtype != torch.bfloat16:
            raise ValueError(f"--fp8-matmul writes its GEMMs' outputs in bf16, but --dtype is "
                             f"{a.dtype}: use --dtype bf16 (the default on CUDA), or --fp8 alone")
    if a.block_swap < 0:
        raise ValueError(f"--block-swap {a.block_swap}: give the number of blocks to keep in host "
                         "memory (0, the default, keeps all on the device)")


# What a render needs beside the weights, for the suggestions below: measured 2.2-4.7 GiB at
# 832x480x81 with tiled decoding (1.3B and 14B, tests/test_sample_gpu.py, 2026-12-01).
RENDER_GIB = 5.0


def _fits(cfg, dtype, free: int) -> list[str]:
    """The memory options whose DiT weights leave RENDER_GIB of `free`: without and with --fp8,
    each with as few swapped blocks as possible, and the weights each leaves on the device."""
    out = []
    for fp8 in (False, True):
        for n in range(cfg.num_layers + 1):
            need = dit_device_bytes(cfg, dtype, fp8, n)
            if need + RENDER_GIB * GIB <= free:
                flags = " ".join(f for f in ("--fp8" if fp8 else "", f"--block-swap {n}" if n else "") if f)
                if flags:
                    out.append(f"{flags} ({need / GIB:.1f} GiB of weights)")
                break
    return out


def check_weights_fit(a, cfg, device: str, dtype: torch.dtype) -> None:
    """On a GPU, before anything is loaded: refuse when the DiT's weights alone cannot fit the
    free memory with the options given, and name the options that make room (the text encoder
    is freed before the DiT loads, so it does not count here)."""
    if torch.device(device).type != "cuda":
        return
    free = torch.cuda.mem_get_info(torch.device(device))[0]
    need = dit_device_bytes(cfg, dtype, a.fp8 or a.fp8_matmul, a.block_swap)
    if need <= free:
        return
    options = _fits(cfg, dtype, free)
    fix = ("use " + " or ".join(options) if options else
           "even float8 weights with every block swapped leave no room: use a GPU with more memory")
    raise ValueError(f"the DiT's weights need {need / GIB:.1f} GiB on {device} with these options "
                     f"and {free / GIB:.1f} GiB are free (a render needs a few GiB more): {fix}")


def out_of_memory_advice(a, error: Exception) -> str:
    """What to change after the GPU ran out of memory, from the options not used yet."""
    first = str(error).splitlines()[0][:200] if str(error) else "out of memory"
    steps = []
    if a.text_encoder_device == "device":
        steps.append("--text-encoder-device stream (the text encoder a block at a time)")
    if a.decode == "device":
        steps.append("--decode tiled (the VAE decodes in spatial tiles)")
    if not (a.fp8 or a.fp8_matmul):
        steps.append("--fp8 (the DiT's block weights in float8: about half)")
    steps.append("--block-swap N (the last N DiT blocks streamed from host memory)"
                 + (f"; now {a.block_swap}: swap more" if a.block_swap else ""))
    steps.append("fewer frames or a smaller size (--frames, --size)")
    return ("out of GPU memory (" + first + "); try, in this order:\n"
            + "\n".join(f"  - {s}" for s in steps))


def run(a) -> list[Path]:
    specs = collect_specs(a)
    if not (a.root or (a.transformer and a.vae and a.text_encoder and a.tokenizer)):
        raise ValueError("no model: pass --root (a checkpoint folder or repo id) or all of "
                         "--transformer, --vae, --text-encoder and --tokenizer")
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    check_memory_options(a, device, dtype)
    # Check every prompt's settings before spending minutes on loading.
    for spec in specs:
        resolve_spec(spec, a, "t2v")
    loras = [(read_lora(p), s) for p, s in map(parse_lora, a.lora)]  # a bad file fails here
    paths = ModelPaths(root=a.root, transformer=a.transformer, vae=a.vae,
                       text_encoder=a.text_encoder, tokenizer=a.tokenizer, clip=a.clip)
    paths.fetch()  # a repo id: every file first, so a failed download costs no loading time
    from wan_model.dit_io import read_transformer_config

    cfg = read_transformer_config(paths.resolve("transformer"))  # headers only: no weights yet
    if a.block_swap > cfg.num_layers:
        raise ValueError(f"--block-swap {a.block_swap}: the DiT has {cfg.num_layers} blocks; "
                         f"choose 1..{cfg.num_layers}, or 0 to keep all on the device")
    check_weights_fit(a, cfg, device, dtype)
    task = "i2v" if cfg.is_i2v else "t2v"
    jobs = [resolve_spec(s, a, task) for s in specs]
    if task == "i2v" and any(j["image"] is None for j in jobs):
        raise ValueError("this is an I2V model: pass --image (or `image:` per prompt)")
    if task == "t2v" and any(j["image"] for j in jobs):
        raise ValueError("--image was given but the model is a T2V model; use an I2V checkpoint")
    texts = [s.prompt for s in specs] + [j["negative"] for j in jobs if j["guidance"] != 1.0]
    # The prompts are encoded and the text encoder released before the DiT is loaded.
    sampler = WanSampler.load_staged(
        paths, texts, device=device, dtype=dtype, text_encoder_device=a.text_encoder_device,
        loras=loras, fp8=a.fp8 or a.fp8_matmul,
        fp8_matmul=a.fp8_matmul, block_swap=a.block_swap,
        clip_dtype=torch.float32 if a.decode == "cpu" else None)
    if a.compile:
        sampler.transformer.compile_blocks()
        if a.decode != "cpu":
            sampler.vae.fuse_elementwise()
    written = []
    for spec, job, path in zip(specs, jobs, output_paths(Path(a.out), specs)):
        with decoder_placed(sampler.vae, sampler.clip, a.decode, device):
            video = sampler.generate(spec.prompt, job["negative"], job["image"],
                                     frames=job["frames"], height=job["height"],
                                     width=job["width"], steps=job["steps"], shift=job["shift"],
                                     guidance=job["guidance"], solver=a.solver, seed=job["seed"],
                                     cfg_batch=a.cfg_batch)
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
    except torch.OutOfMemoryError as e:
        print(f"error: {out_of_memory_advice(a, e)}", file=sys.stderr)
        return 2
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
