"""Print the dataset report of a recipe's corpus.

    python tools/inspect_dataset.py RECIPE.yaml [key=value ...]

Exit status: 0 when something is usable (problems are listed in the report), 1 when nothing
usable remains, 2 when the recipe itself is wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

from wantune.data.cache_files import read_probes  # noqa: E402
from wantune.data.plan import scan  # noqa: E402
from wantune.data.recipe import add_recipe_arguments, recipe_from_args  # noqa: E402
from wantune.data.report import format_report  # noqa: E402
from wan_model.quiet import quiet_third_party  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser, example="data.target_fps=24")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    quiet_third_party(args.verbose)
    recipe = recipe_from_args(args)  # the model and data sections (data.recipe)
    if recipe is None:
        return 2
    cfg = recipe.data
    plan = scan(cfg, known=read_probes(cfg.cache_dir), progress=not args.no_progress,
                media_dir=Path(cfg.cache_dir) / "media" if cfg.cache_dir else None)
    print(format_report(plan))
    return 0 if plan.items else 1


if __name__ == "__main__":
    sys.exit(main())
