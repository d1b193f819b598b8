"""Convert a Wan 2.1 LoRA between formats (the input format is detected).

    python tools/convert_lora.py IN.safetensors OUT.safetensors --to comfyui

Formats: wantune (ComfyUI keys with lora_A/lora_B + alpha; what the trainer exports), comfyui
(lora_down/lora_up + alpha), kohya (musubi-tuner), diffusers, diffusion-pipe, diffsynth.
Formats without alpha get alpha/rank multiplied into the up weights, so the LoRA acts the same.
Exit status: 0 done, 1 the input holds keys no format explains (see --allow-unknown), 2 bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

from wan_model.lora import FORMATS, LoraError, read_lora, write_lora  # noqa: E402

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="LoRA file (.safetensors or .pt)")
    parser.add_argument("output", help="output .safetensors file")
    parser.add_argument("--to", required=True, choices=FORMATS, help="output format")
    parser.add_argument("--allow-unknown", action="store_true",
                        help="write the LoRA even if the input holds keys no format explains (they are left out)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the LoRA tensors (default: keep)")
    args = parser.parse_args(argv)
    try:
        lora = read_lora(args.input)
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.input}: {lora.format} format, {len(lora)} modules")
    if lora.unknown:
        listing = "\n  ".join(lora.unknown[:20]) + ("\n  ..." if len(lora.unknown) > 20 else "")
        print(f"{len(lora.unknown)} keys are not LoRA tensors of the Wan DiT:\n  {listing}", file=sys.stderr)
        if not args.allow_unknown:
            print("error: refusing to drop them silently; pass --allow-unknown to convert without them",
                  file=sys.stderr)
            return 1
    if not len(lora):
        print(f"error: {args.input} holds no LoRA tensors of the Wan DiT", file=sys.stderr)
        return 2
    if args.dtype:
        import torch

        dtype = getattr(torch, DTYPES[args.dtype])
        for w in lora.weights.values():
            w.down, w.up = w.down.to(dtype), w.up.to(dtype)
    write_lora(lora, args.output, format=args.to)
    print(f"wrote {args.output} ({args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
