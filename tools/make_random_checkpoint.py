"""Write a random-weight Wan 2.1 model in the official layout (and optionally diffusers/ComfyUI).

    python tools/make_random_checkpoint.py --flavour tiny-t2v --out models/tiny
    python tools/make_random_checkpoint.py --flavour t2v-1.3B --out /data/rand13b --dtype bf16 --device cuda
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from wan_model.configs import FLAVOURS  # noqa: E402
from wan_model.random_weights import COMPONENTS, LAYOUTS, write_random_checkpoint  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flavour", required=True, choices=sorted(FLAVOURS))
    p.add_argument("--out", required=True, help="folder to write (created)")
    p.add_argument("--layouts", default="official", help=f"comma list of {', '.join(LAYOUTS)}")
    p.add_argument("--components", default=",".join(COMPONENTS), help="comma list of " + ", ".join(COMPONENTS))
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="dtype of the DiT/VAE/CLIP files (the official T5 file is always bf16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda is faster)")
    a = p.parse_args(argv)
    try:
        write_random_checkpoint(a.out, a.flavour, layouts=a.layouts.split(","),
                                components=a.components.split(","), dtype=DTYPES[a.dtype],
                                seed=a.seed, device=a.device)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote a random {a.flavour} model to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
