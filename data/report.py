"""The dataset report: what was found, what is used, and why anything is not.

Printed by `tools/inspect_dataset.py` and at the start of caching.
"""
from __future__ import annotations

from collections import Counter, defaultdict

from .plan import Plan


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fps_lines(plan: Plan) -> list[str]:
    target = plan.config.target_fps
    rates = Counter()
    for r in plan.usable_records:
        if r.info and r.info.frames > 1:
            rates[r.info.fps] += 1
    lines = []
    for fps, n in sorted(rates.items(), key=lambda kv: (kv[0] is None, kv[0] or 0)):
        if fps is None:
            what = f"taken as {target:g} fps" if target else "kept as decoded"
            lines.append(f"  unknown fps: {_plural(n, 'clip')} ({what})")
        elif not target:
            lines.append(f"  {fps:g} fps: {_plural(n, 'clip')} (kept at source timing: data.target_fps is null)")
        elif abs(fps - target) <= 0.01:
            lines.append(f"  {fps:g} fps: {_plural(n, 'clip')} (native)")
        else:
            how = "frames dropped" if fps > target else "frames repeated"
            lines.append(f"  {fps:g} fps: {_plural(n, 'clip')} (resampled to {target:g} fps, {how})")
    return lines


def _size_lines(plan: Plan) -> list[str]:
    sizes = Counter()
    frames = []
    for r in plan.usable_records:
        sizes[(r.info.width, r.info.height)] += 1
        if r.info.frames > 1:
            frames.append(r.info.frames)
    lines = [f"  {w}x{h}: {_plural(n, 'clip')}" for (w, h), n in sorted(sizes.items(), key=lambda kv: -kv[1])]
    if frames:
        lines.append(f"  video length: {min(frames)}..{max(frames)} source frames")
    return lines


def bucket_table(plan: Plan) -> list[tuple[str, int, int]]:
    """(bucket name, samples, samples per epoch with repeats), largest first."""
    samples, per_epoch = Counter(), Counter()
    for item in plan.items:
        rec = plan.records[item.record]
        samples[item.bucket] += 1
        per_epoch[item.bucket] += rec.clip.num_repeats
    order = sorted(samples, key=lambda b: (-b.width * b.height * b.frames, b))
    return [(b.name, samples[b], per_epoch[b]) for b in order]


def format_report(plan: Plan) -> str:
    cfg = plan.config
    out = ["Dataset report", "=============="]
    by_source = defaultdict(list)
    for r in plan.records:
        by_source[r.clip.source_index].append(r)
    for listing in plan.listings:
        recs = by_source[listing.index]
        usable = [r for r in recs if not r.unusable]
        out.append(f"source {listing.index}: {listing.kind} {listing.config.path}: "
                   f"{_plural(len(recs), 'file')} found, {len(usable)} usable, "
                   f"num_repeats {listing.config.num_repeats}"
                   + (f", trigger {listing.config.trigger_word!r}" if listing.config.trigger_word else ""))
        if listing.error:
            out.append(f"  ERROR {listing.error}")
        bad = [r for r in recs if r.unusable]
        if bad:
            out.append(f"  unusable ({len(bad)}):")
            out += [f"    {r.clip.path.name}: {r.unusable}" for r in bad]
        warned = [r for r in recs if r.warnings and not r.unusable]
        if warned:
            out.append(f"  notes ({len(warned)}):")
            out += [f"    {r.clip.path.name}: {w}" for r in warned for w in r.warnings]
        if listing.ignored:
            out.append(f"  ignored files ({len(listing.ignored)}): " + ", ".join(listing.ignored[:10])
                       + (" ..." if len(listing.ignored) > 10 else ""))
    fps = _fps_lines(plan)
    if fps:
        out += ["frame rates:"] + fps
    sizes = _size_lines(plan)
    if sizes:
        out += ["decoded sizes:"] + sizes
    table = bucket_table(plan)
    out.append(f"buckets (areas {', '.join(f'{w}x{h}' for w, h in cfg.areas)}, "
               f"frame sampling {cfg.frame_sampling}):")
    if table:
        out.append(f"  {'bucket (WxHxF)':<18}{'samples':>8}{'per epoch':>11}")
        out += [f"  {name:<18}{n:>8}{e:>11}" for name, n, e in table]
    else:
        out.append("  (none)")
    n_bad = sum(1 for r in plan.records if r.unusable)
    out.append(f"total: {_plural(len(plan.records), 'file')}, {len(plan.usable_records)} usable, "
               f"{n_bad} unusable; {_plural(len(plan.items), 'sample')} "
               f"({sum(e for _, _, e in table)} per epoch with repeats)")
    if not plan.items:
        out.append("NOTHING USABLE: fix the problems above (paths, frame_buckets, captions).")
    return "\n".join(out)
