"""Before the first step: scan the corpus, print the report, and bring the cache up to date.

Training never reads a stale cache: the corpus is re-scanned (cheap, probes are remembered),
compared with the cache manifest, and whatever is new or changed is encoded first.
"""
from __future__ import annotations

from pathlib import Path

from data.cache import (build_cache, cache_settings, conditioning_is_i2v, model_encoders,
                        model_identity, verify_cache, write_probes)
from data.cache_files import read_probes
from data.plan import scan
from data.report import bucket_table, format_report


def prepare_cache(recipe, acc) -> tuple[dict, str]:
    """Returns (the cache settings training must find, a one-line dataset summary)."""
    cfg, paths = recipe.data, recipe.model
    i2v = conditioning_is_i2v(cfg, paths)
    media = Path(cfg.cache_dir) / "media"
    if acc.is_main_process:
        plan = scan(cfg, known=read_probes(cfg.cache_dir), progress=True, media_dir=media)
        report = format_report(plan)
        acc.print(report)
        Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.cache_dir) / "report.txt").write_text(report + "\n")
        write_probes(plan)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        plan = scan(cfg, known=read_probes(cfg.cache_dir), progress=False, media_dir=media)
    if not plan.items:
        raise ValueError(f"nothing usable to train on in {[s.path for s in cfg.sources]}: "
                         "see the dataset report above (tools/inspect_dataset.py RECIPE)")
    settings = cache_settings(cfg, model_identity(paths, i2v), i2v)
    try:
        stale = verify_cache(plan, settings)
    except Exception as e:  # no manifest yet
        stale = [str(e)]
    if stale:
        acc.print(f"cache: {len(stale)} item(s) to (re)build, e.g. {stale[0]}")
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
