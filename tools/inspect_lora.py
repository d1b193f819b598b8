"""Describe a Wan 2.1 LoRA file: format, ranks, alpha, targets, base model, training settings.

    python tools/inspect_lora.py LORA.safetensors [--json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

from wan_model.lora import LoraError, inspect, read_lora  # noqa: E402


def format_summary(path: str, info: dict) -> str:
    lines = [f"{path}",
             f"  format      {info['format']}",
             f"  base model  {info['base_model']}" + (
                 f" (shapes say {info['base_model_inferred']})"
                 if info["base_model_inferred"] and info["base_model_inferred"] != info["base_model"] else ""),
             f"  modules     {info['modules']} in {info['blocks']} blocks, {info['parameters']:,} parameters",
             f"  rank        {', '.join(map(str, info['ranks']))}",
             f"  alpha       {', '.join(map(str, info['alphas'])) or 'none (scale 1)'}"
             f" -> scale {', '.join(map(str, info['scale']))}",
             f"  dtype       {', '.join(info['dtype'])}" + ("   DoRA" if info["dora"] else ""),
             f"  targets     {', '.join(info['targets'])}"]
    if info["settings"]:
        lines.append("  settings")
        lines += [f"    {k} = {v[:200]}" for k, v in info["settings"].items()]
    if info["other_metadata"]:
        lines.append(f"  other metadata keys: {', '.join(info['other_metadata'])}")
    if info["unknown_keys"]:
        lines.append(f"  {len(info['unknown_keys'])} UNKNOWN keys (not LoRA tensors of the Wan DiT): "
                     + ", ".join(info["unknown_keys"][:10]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="LoRA file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    try:
        info = inspect(read_lora(args.file))
    except LoraError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else format_summary(args.file, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
