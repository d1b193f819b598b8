"""Before the first step: scan the corpus, print the report, and bring the cache up to date.

Training never reads a stale cache: the corpus is re-scanned (cheap, probes are remembered),
compared with the cache manifest, and whatever is new or changed is encoded first.
"""
from __future__ import annotations

from pathlib import Path

from wantune.data.cache import (build_cache, cache_settings, conditioning_is_i2v, model_encoders,
                        model_identity, scan_with_report, verify_cache)
from wantune.data.cache_files import MANIFEST
from wantune.data.report import bucket_table


def scan_corpus(recipe, acc):
    """The corpus scan and its report; an error when nothing is usable."""
    plan = scan_with_report(recipe.data, acc)
    if not plan.items:
        raise ValueError(f"nothing usable to train on in {[s.path for s in recipe.data.sources]}: "
                         "see the dataset report above (tools/inspect_dataset.py RECIPE)")
    return plan


def prepare_cache(recipe, acc, plan=None) -> tuple[dict, str]:
    """Returns (the cache settings training must find, a one-line dataset summary)."""
    cfg, paths = recipe.data, recipe.model
    i2v = conditioning_is_i2v(cfg, paths)
    plan = plan if plan is not None else scan_corpus(recipe, acc)
    plan = plan.with_config(cfg)
    settings = cache_settings(cfg, model_identity(paths, i2v), i2v)
    try:
        stale = verify_cache(plan, settings)
    except Exception as e:  # no manifest yet
        stale = [str(e)]
    if stale:
        first = not (Path(cfg.cache_dir).expanduser() / MANIFEST).exists()
        acc.print(f"cache: building {cfg.cache_dir}" if first else
                  f"cache: {len(stale)} item(s) to (re)build, e.g. {stale[0]}")
        encoders = model_encoders(paths, cfg, i2v, acc.device)
        run = build_cache(plan, encoders, i2v, acc.process_index, acc.num_processes,
                          progress=acc.is_main_process, barrier=acc.wait_for_everyone)
        for failure in run.failures:
            acc.print(f"cache FAILED {failure}")
        del encoders
    acc.wait_for_everyone()
    table = bucket_table(plan)
    summary = f"{len(plan.usable_records)} clips; " + ", ".join(f"{n}: {c}" for n, c, _ in table)
    return settings, summary
