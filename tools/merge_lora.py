"""Merge one or more LoRAs into Wan 2.1 DiT weights.

    python tools/merge_lora.py --base Wan2.1-T2V-1.3B --lora style.safetensors:0.8 \
        --lora detail.safetensors:0.5 --out merged/ [--layout official|comfyui] [--dtype bf16]

--base: the official folder (config.json + diffusion_pytorch_model*.safetensors) or its diffusers
twin, a Hugging Face repo id of either, or one safetensors file (official names, ComfyUI
`model.diffusion_model.` names or diffusers names).
--layout official writes a folder (config.json + diffusion_pytorch_model*.safetensors);
comfyui writes one file with `model.diffusion_model.` keys. Merging is done in float32.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

import torch  # noqa: E402

from wan_model.configs import FLAVOURS, DiTConfig  # noqa: E402
from wan_model.lora import LoraError, check_all_applied, merge_weight, read_lora  # noqa: E402
from wan_model.lora import parse_lora_spec as parse_lora_arg  # noqa: E402
from wan_model.lora_formats import official_dit_names  # noqa: E402
from wan_model.paths import ModelPaths  # noqa: E402
from wan_model.loading import (WeightsError, open_weights, save_safetensors_atomic,  # noqa: E402
                               save_sharded_safetensors, write_text_atomic)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def official_config(base: Path, shapes: dict[str, tuple]) -> dict:
    """The official config.json: the base's own, translated from diffusers, or read off the shapes."""
    cfg_path = (base if base.is_dir() else base.parent) / "config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if "dim" in cfg:
            return cfg
        if cfg.get("_class_name") == "WanTransformer3DModel":
            dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
            return _config_from(dim, cfg["ffn_dim"], cfg["num_layers"], cfg["in_channels"],
                                bool(cfg.get("added_kv_proj_dim")), cfg["text_dim"], cfg["num_attention_heads"])
    dim, in_dim = shapes["patch_embedding.weight"][:2]
    layers = 1 + max(int(k.split(".")[1]) for k in shapes if k.startswith("blocks."))
    i2v = "blocks.0.cross_attn.k_img.weight" in shapes
    heads = {fl.dit.dim: fl.dit.num_heads for fl in FLAVOURS.values()}.get(dim)
    if heads is None:
        raise WeightsError(f"{base}: no config.json beside the weights and width {dim} is no known "
                           "flavour; put the base model's config.json next to it")
    return _config_from(dim, shapes["blocks.0.ffn.0.weight"][0], layers, in_dim, i2v,
                        shapes["text_embedding.0.weight"][1], heads)


def _config_from(dim, ffn_dim, layers, in_dim, i2v, text_dim, heads) -> dict:
    cfg = DiTConfig(model_type="i2v" if i2v else "t2v", dim=dim, ffn_dim=ffn_dim, num_layers=layers,
                    in_dim=in_dim, text_dim=text_dim, num_heads=heads)
    return cfg.official_config_json()


def merge(base: Path, loras: list[tuple[str, float]], dtype: torch.dtype | None) -> tuple[dict, dict]:
    src = open_weights(base, "DiT")
    try:
        names = official_dit_names(src.keys())
    except KeyError as e:
        raise WeightsError(f"{base}: {e.args[0]}") from None
    pairs = [(read_lora(p), s) for p, s in loras]
    for (path, _), (lora, _) in zip(loras, pairs):
        if lora.unknown:
            raise LoraError(f"{path}: {len(lora.unknown)} keys are not LoRA tensors of the Wan DiT "
                            f"({lora.unknown[:3]}); inspect it with tools/inspect_lora.py")
    out, applied = {}, set()
    for key, name in names.items():
        t = src.get(key)
        if name.endswith(".weight"):
            module = name[: -len(".weight")]
            if any(module in lo.weights for lo, _ in pairs):
                t = merge_weight(t, module, pairs)
                applied.add(module)
        out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    check_all_applied(pairs, applied, str(base))
    return out, {n: tuple(t.shape) for n, t in out.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="base DiT: a checkpoint folder, a safetensors file "
                        "or a Hugging Face repo id (e.g. Wan-AI/Wan2.1-T2V-1.3B)")
    parser.add_argument("--lora", action="append", required=True, metavar="PATH[:STRENGTH]",
                        help="LoRA to merge (repeatable); strength defaults to 1.0")
    parser.add_argument("--out", required=True, help="output folder (official) or .safetensors file (comfyui)")
    parser.add_argument("--layout", choices=("official", "comfyui"), default="official")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the written weights (default: as the base)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    loras = [parse_lora_arg(a) for a in args.lora]
    if args.layout == "comfyui" and out.suffix != ".safetensors":
        print(f"error: --layout comfyui writes one file: give --out a .safetensors name, not {out}",
              file=sys.stderr)
        return 2
    try:
        base = Path(ModelPaths(root=args.base).resolve("transformer"))  # a repo id is downloaded
        tensors, shapes = merge(base, loras, DTYPES.get(args.dtype))
        meta = {"wantune.merged_loras": ", ".join(f"{Path(p).name}:{s:g}" for p, s in loras)}
        if args.layout == "comfyui":
            save_safetensors_atomic({f"model.diffusion_model.{k}": v for k, v in tensors.items()}, out, meta)
        else:
            config = official_config(base, shapes)
            save_sharded_safetensors(tensors, out, metadata=meta)
            write_text_atomic(out / "config.json", json.dumps(config, indent=2))
    except (LoraError, WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"merged {len(loras)} LoRA(s) into {args.base} -> {out} ({args.layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
