"""The training command:  accelerate launch train.py RECIPE.yaml [key=value ...]  (or `wantune train`).

Exit status: 0 done, 1 training failed, 2 the recipe or its files are wrong (reported before any
caching or loading), 130 interrupted.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from wantune.data.recipe import RecipeError, add_recipe_arguments, recipe_from_args
from wan_model.quiet import quiet_third_party


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Fine-tune Wan 2.1 (LoRA or full) from a recipe.")
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    from .config import load_recipe

    recipe = recipe_from_args(args, load_recipe)
    if recipe is None:
        return 2
    quiet_third_party(verbose=args.verbose or recipe.run.log_level == "verbose")
    from .loop import train
    from .memory import NoPlanFits, OutOfDeviceMemory

    try:
        result = train(recipe)
    except (RecipeError, NoPlanFits) as e:  # found before any work (preflight, memory plan)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OutOfDeviceMemory as e:  # the message says what to change
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # every rank gets the signal; the first says it once
        if os.environ.get("RANK", "0") == "0":
            print("interrupted: the last complete step-N/ checkpoint is intact; resume with "
                  "checkpoint.resume=latest", file=sys.stderr)
        return 130
    except Exception as e:  # a crash must never look like success; any rank's error is shown
        from wan_model.atomic import WriteError

        if not isinstance(e, WriteError):  # a full disk needs the message, not a traceback
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
