"""Cache a recipe's corpus: VAE latents and text embeddings (and CLIP features + first-frame
latents for I2V), incrementally.

    python tools/cache.py RECIPE.yaml [key=value ...]
    accelerate launch tools/cache.py RECIPE.yaml      # several GPUs split the clips

Downloads the model files first when model.root is a Hugging Face repo id (only the VAE, text
encoder, tokenizer, the DiT's config.json and for I2V the CLIP tower), checks the recipe against
the files, then prints the dataset report. Re-running encodes only new or changed clips and
captions; a settings change rebuilds what it affects; an interrupted run continues where it
stopped. Exit status: 0 when the cache holds usable samples, 1 when nothing could be cached, 2
when the recipe or its files are wrong.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

from wantune.data.cache import build_cache, model_encoders, scan_with_report  # noqa: E402
from wantune.data.preflight import CACHE_COMPONENTS, data_problems, fetch_model, report  # noqa: E402
from wantune.data.recipe import add_recipe_arguments, recipe_from_args  # noqa: E402
from wan_model.atomic import WriteError  # noqa: E402
from wan_model.quiet import quiet_third_party  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser, example="data.num_workers=8")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    quiet_third_party(args.verbose)
    recipe = recipe_from_args(args)  # the model and data sections (data.recipe)
    if recipe is None:
        return 2
    cfg = recipe.data

    from accelerate.utils import gather_object

    from wantune.train.parallel import make_accelerator

    state = make_accelerator()  # the launcher's settings (ACCELERATE_USE_CPU, ranks), as train.py
    try:
        fetch_model(recipe.model, CACHE_COMPONENTS, state)
        i2v, problems = data_problems(recipe.model, cfg, CACHE_COMPONENTS)
    except ValueError as e:  # a repo id that cannot be fetched (wan_model.hub.HubError)
        problems = [str(e)]
    if problems:
        print(f"error: {args.recipe}: {report(problems)}", file=sys.stderr)
        return 2
    rank, world = state.process_index, state.num_processes
    progress = state.is_main_process and not args.no_progress  # one voice: the main process's bars
    plan = scan_with_report(cfg, state, progress=progress)
    if not plan.items:
        if state.is_main_process:
            print("nothing usable to cache (see the report above)", file=sys.stderr)
        return 1
    # data.text_encoder_device auto, data.low_memory null: planned to the card (or train.memory_gib)
    from wantune.train.stages import plan_corpus_stages

    cfg = plan_corpus_stages(recipe, plan, state.device,
                             log=print if state.is_main_process else (lambda *a: None)).data
    plan = plan.with_config(cfg)
    encoders = model_encoders(recipe.model, cfg, i2v, state.device)
    try:
        run = build_cache(plan, encoders, i2v, rank, world, progress=progress,
                          barrier=state.wait_for_everyone)
    except WriteError as e:  # a full disk or a read-only folder: every finished file is kept
        print(f"error: {e}\nrun the same command again to continue where it stopped", file=sys.stderr)
        return 1
    runs = gather_object([run]) if world > 1 else [run]  # every rank's counts, for one summary
    if state.is_main_process:
        print(summary(runs, i2v, cfg.cache_dir))
        for r, each in enumerate(runs):
            for failure in each.failures:
                print(f"FAILED{f' (rank {r})' if world > 1 else ''} {failure}", file=sys.stderr)
    state.wait_for_everyone()
    state.end_training()  # tears the process group down cleanly before exit
    return 0


def summary(runs: list, i2v: bool, cache_dir: str) -> str:
    """One line for all ranks; with several, the slowest rank's seconds and each rank's share."""
    line = (f"{sum(r.items_encoded for r in runs)} clips and {sum(r.texts_encoded for r in runs)} "
            f"captions encoded, {sum(r.items_reused for r in runs)} clips already cached, "
            f"{max(r.seconds for r in runs):.1f} s ({'i2v' if i2v else 't2v'}, cache {cache_dir})")
    if len(runs) > 1:
        line += " on {} ranks (clips encoded per rank: {})".format(
            len(runs), ", ".join(str(r.items_encoded) for r in runs))
    return line


if __name__ == "__main__":
    sys.exit(main())
