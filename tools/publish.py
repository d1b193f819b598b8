"""Build a publish folder from a training run, and optionally push it to the Hugging Face Hub.

    python tools/publish.py runs/my-style --out publish/my-style
    python tools/publish.py runs/my-style --out publish/my-style --repo-id me/wan-my-style --push
    python tools/publish.py --lora style.safetensors --preview a.mp4 --recipe recipe.yaml \
        --base-model t2v-1.3B --out publish/style --civitai

The folder holds the LoRA, README.md (model card with YAML front matter), previews/ and the
recipe with private paths removed; --civitai adds civitai/ (file, previews, civitai.json).
The Hub token comes from `hf auth login` or HF_TOKEN and is never written anywhere.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

from wantune.train.publish import (HF_BASE_MODELS, PublishError, build_publish_folder,  # noqa: E402
                           civitai_package, inputs_from_run, make_inputs, push_to_hub)
from wan_model.lora import LoraError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?", help="training run folder (export/, samples/, recipe.yaml)")
    parser.add_argument("--out", required=True, help="publish folder to write")
    parser.add_argument("--lora", help="LoRA file (default: the run's export/*.safetensors)")
    parser.add_argument("--preview", action="append", default=[], help="preview video (repeatable; "
                        "default: the run's latest samples/step-N/)")
    parser.add_argument("--recipe", help="resolved recipe YAML (default: the run's recipe.yaml)")
    parser.add_argument("--base-model", default="", choices=[""] + sorted(HF_BASE_MODELS) + ["i2v-14B"],
                        help="base model (default: from the LoRA metadata / recipe / shapes)")
    parser.add_argument("--title", default="")
    parser.add_argument("--trigger", action="append", help="trigger word (repeatable; default: the recipe's)")
    parser.add_argument("--description", default="")
    parser.add_argument("--civitai", action="store_true", help="also write a CivitAI package in OUT/civitai")
    parser.add_argument("--repo-id", help="Hub repo, e.g. you/wan-style-lora")
    parser.add_argument("--push", action="store_true", help="push the folder to --repo-id")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    args = parser.parse_args(argv)
    if args.push and not args.repo_id:
        print("error: --push needs --repo-id (e.g. --repo-id you/wan-style-lora)", file=sys.stderr)
        return 2
    try:
        if args.run_dir:
            inp = inputs_from_run(Path(args.run_dir), Path(args.lora) if args.lora else None,
                                  args.base_model, args.title, args.trigger, args.description,
                                  [Path(p) for p in args.preview], args.recipe)
        elif args.lora:
            inp = make_inputs(Path(args.lora), [Path(p) for p in args.preview],
                              Path(args.recipe) if args.recipe else None, args.base_model, args.title,
                              args.trigger, args.description)
        else:
            print("error: give a run folder or --lora", file=sys.stderr)
            return 2
        out = build_publish_folder(inp, Path(args.out))
        print(f"publish folder: {out} ({len(inp.previews)} previews, base {HF_BASE_MODELS[inp.base_model]})")
        if args.civitai:
            print(f"CivitAI package: {civitai_package(inp, out / 'civitai')}")
        if args.push:
            print(f"pushed to {push_to_hub(out, args.repo_id, private=args.private)}")
    except (PublishError, LoraError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
