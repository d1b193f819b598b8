"""Extract a LoRA from a full fine-tune: truncated SVD of (tuned - base) for each Linear.

    python tools/extract_lora.py --base Wan-AI/Wan2.1-T2V-1.3B --tuned runs/full/export \
        --rank 64 --out extracted.safetensors [--format wantune]

Prints the energy captured per layer (kept squared singular values / total): near 1.0 means the
LoRA reproduces that layer's change. Changes outside the Linears (norms, biases, modulation)
cannot be carried by a LoRA; their count is reported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

import torch  # noqa: E402

from wan_model.lora import FORMATS, LoraError, extract_lora, write_lora  # noqa: E402
from wan_model.lora_formats import official_dit_names  # noqa: E402
from wan_model.loading import WeightsError, open_weights  # noqa: E402
from wan_model.paths import ModelPaths  # noqa: E402


class OfficialView:
    """A `WeightsSource` seen through official names."""

    def __init__(self, path: Path):
        self.src = open_weights(path, "DiT")
        try:
            self.names = {v: k for k, v in official_dit_names(self.src.keys()).items()}
        except KeyError as e:
            raise WeightsError(f"{path}: {e.args[0]}") from None

    def keys(self):
        return self.names.keys()

    def get(self, name: str) -> torch.Tensor:
        return self.src.get(self.names[name])


def uncaptured(base: OfficialView, tuned: OfficialView, extracted: set[str]) -> list[str]:
    """Tensors that changed but are not Linear weights the LoRA holds."""
    out = []
    for name in sorted(set(base.keys()) & set(tuned.keys())):
        if name.endswith(".weight") and name[: -len(".weight")] in extracted:
            continue
        if not torch.equal(base.get(name), tuned.get(name)):
            out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base DiT folder or file, or a Hugging Face repo id "
                        "(e.g. Wan-AI/Wan2.1-T2V-1.3B)")
    parser.add_argument("--tuned", required=True, help="fine-tuned DiT folder or file")
    parser.add_argument("--rank", type=int, required=True, help="LoRA rank")
    parser.add_argument("--out", required=True, help="output .safetensors")
    parser.add_argument("--format", choices=FORMATS, default="wantune")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16")
    parser.add_argument("--min-change", type=float, default=0.0,
                        help="skip layers whose largest change is at most this")
    args = parser.parse_args(argv)
    try:
        base_dit = Path(ModelPaths(root=args.base).resolve("transformer"))  # a repo id is downloaded
        base, tuned = OfficialView(base_dit), OfficialView(Path(args.tuned))
        missing = sorted(set(base.keys()) ^ set(tuned.keys()))
        if missing:
            raise WeightsError(f"--base and --tuned hold different tensors ({missing[:5]}); "
                               "they must be the same model flavour")
        lora, energy = extract_lora(base, tuned, args.rank, min_change=args.min_change)
    except (LoraError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not energy:
        print("error: no Linear weight differs between --base and --tuned", file=sys.stderr)
        return 1
    print(f"{'layer':40s} energy")
    for name, e in energy.items():
        print(f"{name:40s} {e:.4f}")
    values = list(energy.values())
    print(f"{len(values)} layers: mean energy {sum(values) / len(values):.4f}, min {min(values):.4f}")
    other = uncaptured(base, tuned, set(energy))
    if other:
        print(f"note: {len(other)} changed tensors are not Linear weights and are not in the LoRA "
              f"(e.g. {', '.join(other[:4])})")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for w in lora.weights.values():
        w.down, w.up = w.down.to(dtype), w.up.to(dtype)
    lora.metadata["ss_network_dim"] = str(args.rank)
    write_lora(lora, args.out, format=args.format)
    print(f"wrote {args.out} ({args.format}, rank {args.rank})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
