"""A long run of the tiny model with checkpoints, pruning and previews: host memory stays flat
after warm-up and the disk holds no more than checkpoint.keep_last checkpoints.

CI runs a short version; `WANTUNE_SOAK_STEPS=5000 python3 -m pytest -q tests/test_soak.py -s`
runs the long one and prints the figures."""
import json
import os

import pytest

from tests.runs import train_argv

STEPS = int(os.environ.get("WANTUNE_SOAK_STEPS", "240"))
EVERY = 100 if STEPS >= 1000 else 20  # checkpoint interval
PREVIEW = 500 if STEPS >= 1000 else 80
KEEP = 2


@pytest.mark.slow
def test_long_run_memory_flat_and_disk_bounded(forkserver, tiny_assets, tmp_path):
    out = tmp_path / "soak"
    argv = train_argv(tiny_assets, out, tmp_path / "cache", **{
        "train.max_steps": STEPS, "checkpoint.every": EVERY, "checkpoint.keep_last": KEEP,
        "validation.prompts": "[a red circle]", "validation.every": PREVIEW, "validation.steps": 2,
        "validation.width": 32, "validation.height": 32, "validation.frames": 5,
        "validation.at_start": False, "data.batch_size": 1, "train.optim.lr": 1e-3,
        "lora.dropout": 0.1, "tracking.tensorboard": True})
    r = forkserver.run("train", argv, tmp_path, timeout=36000)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rss = {r["step"]: r["memory/host_rss_mib"] for r in rows if "memory/host_rss_mib" in r}
    ckpts = [r for r in rows if "checkpoint/kept_mib" in r]
    # warm-up: the first preview, the first prune and the allocator settling on its working set
    warm = max(2 * PREVIEW, (KEEP + 1) * EVERY, STEPS // 5)
    after = [rss[s] for s in sorted(rss) if s > warm]
    first, last = after[: len(after) // 5], after[-len(after) // 5:]
    growth = sum(last) / len(last) - sum(first) / len(first)
    spread = max(after) - min(after)
    one = ckpts[0]["checkpoint/kept_mib"]  # the first checkpoint, alone on disk
    kept = [c["checkpoint/kept_mib"] for c in ckpts]
    extra = [c["checkpoint/run_dir_mib"] - c["checkpoint/kept_mib"] for c in ckpts]
    print(f"\nsoak: {STEPS} steps, checkpoint every {EVERY}, preview every {PREVIEW}, keep_last {KEEP}; "
          f"RSS after step {warm}: {min(after):.1f}..{max(after):.1f} MiB (spread {spread:.1f}, mean growth "
          f"first->last fifth {growth:+.1f} MiB); peak RSS {max(rss.values()):.1f} MiB; checkpoints on disk "
          f"{max(kept):.3f} MiB max (one: {one:.3f}); previews+logs {extra[0]:.3f}..{extra[-1]:.3f} MiB")
    assert len(rss) == STEPS and len(ckpts) == STEPS // EVERY
    assert abs(growth) < 24 and spread < 96, (growth, spread)
    assert max(kept) <= KEEP * one * 1.05 + 0.01, kept
    previews = STEPS // PREVIEW + (STEPS % PREVIEW != 0)
    assert extra[-1] < 1.0 + 0.002 * STEPS + 0.2 * previews, extra  # logs grow by the line, previews by the file
    assert sorted(p.name for p in out.glob("step-*")) == [f"step-{STEPS - EVERY}", f"step-{STEPS}"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
