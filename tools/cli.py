"""wantune: one command for the whole toolkit; each subcommand is the same main() that the
scripts in tools/ and train.py run, with the same arguments and exit statuses.

    wantune train recipes/demo.yaml train.max_steps=100    # several GPUs: accelerate launch train.py
    wantune cache my.yaml                                  # then: wantune <command> --help
"""
from __future__ import annotations

import difflib
import importlib
import sys

# subcommand -> (module under wantune, what it does)
COMMANDS = {
    "train": ("train.cli", "fine-tune from a recipe (several GPUs: accelerate launch train.py RECIPE)"),
    "cache": ("tools.cache", "cache a recipe's corpus: VAE latents and text embeddings"),
    "inspect": ("tools.inspect_dataset", "print the dataset report of a recipe's corpus"),
    "sample": ("tools.sample", "render videos from a model (and LoRAs)"),
    "convert": ("tools.convert_lora", "convert a LoRA between formats"),
    "merge": ("tools.merge_lora", "merge LoRAs into the base weights"),
    "extract": ("tools.extract_lora", "extract a LoRA from a full fine-tune"),
    "inspect-lora": ("tools.inspect_lora", "show what a LoRA file holds"),
    "publish": ("tools.publish", "package a run's LoRA for the Hugging Face Hub and CivitAI"),
    "verify": ("tools.verify_weights", "check a checkpoint folder or repo id: sizes, sha256, loading"),
    "bench": ("tools.bench", "run the benchmarks"),
}


def usage() -> str:
    from wantune import __version__

    width = max(map(len, COMMANDS))
    lines = [f"usage: wantune <command> [arguments]   (wantune {__version__})", "", "commands:"]
    lines += [f"  {name:{width}}  {what}" for name, (_, what) in COMMANDS.items()]
    lines += ["", "wantune <command> --help shows a command's arguments; wantune --version the version."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from wantune import __version__

        print(f"wantune {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"wantune: unknown command {name!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"wantune.{COMMANDS[name][0]}")
    sys.argv[0] = f"wantune {name}"  # argparse names the program after argv[0] in usage lines
    return module.main(argv[1:])
