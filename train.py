"""wantune's launcher:  accelerate launch train.py RECIPE.yaml [key=value ...]"""
from __future__ import annotations

import argparse
import os
import sys
import traceback


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune Wan 2.1 (LoRA or full) from a recipe.")
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)

    from train.config import RecipeError, load_recipe

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from train.loop import train

    try:
        result = train(recipe)
    except KeyboardInterrupt:  # every rank gets the signal; the first says it once
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: the last complete step-N/ checkpoint is intact; resume with "
                  "checkpoint.resume=latest", file=sys.stderr)
        return 130
    except Exception as e:  # a crash must never look like success; any rank's error is shown
        traceback.print_exc()
        print(f"error: training failed{_on_rank()}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not result["main_process"]:  # one voice: the main process reports for every rank
        return 0
    if result["exported"]:
        print("exported:\n  " + "\n  ".join(result["exported"]))
    print(f"done: {result['step']} steps in {result['seconds']:.1f} s")
    return 0


def _on_rank() -> str:
    """' on rank R of N' under a launcher of several processes (which rank failed matters)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return f" on rank {os.environ.get('RANK', '?')} of {world}" if world > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
