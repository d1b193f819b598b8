"""Hard kills (SIGKILL, as a power cut or the OOM killer) at seeded points all over caching and
training, each followed by a plain re-run: caching ends byte-identical to an undisturbed run,
training with bit-identical weights and exports, the same step count and no leftovers.

Every kill is aimed through WANTUNE_FAULT (wan_model/faults.py) at a point the run is certain
to reach, and every aimed kill must land (exit by SIGKILL), so the schedule is exact, not timed.
"""
import random

import pytest
from safetensors import safe_open

from tests.runs import train_argv, tree

pytestmark = pytest.mark.slow
SEED = 20261130
KILLS = 22


def kill(pattern: str, n: int) -> dict:
    return {"WANTUNE_FAULT": f"kill:{pattern}:{n}"}


def cache_argv(assets, cache):
    argv = train_argv(assets, assets / "unused", cache)
    return [argv[0]] + [a for a in argv[1:] if a.startswith(("model.", "data."))] + ["--no-progress"]


def test_caching_killed_anywhere_resumes_to_the_same_bytes(forkserver, tiny_assets, tmp_path):
    ref = forkserver.run("cache", cache_argv(tiny_assets, tmp_path / "ref"), tmp_path,
                         {"WANTUNE_FAULT_TRACE": str(tmp_path / "trace")})
    assert ref.returncode == 0, ref.stderr[-3000:]
    trace = (tmp_path / "trace").read_text().splitlines()
    # every run passes the report and probe writes, and the manifest and probe writes at its end
    # (two points each), so a kill at one of the first 8 points of a run always lands; the
    # points between them are the text and latent files still to do
    assert len(trace) >= 26, trace
    rng = random.Random(SEED)
    cache = tmp_path / "killed"
    where = []
    for _ in range(KILLS):
        n = rng.randint(1, 8)
        r = forkserver.run("cache", cache_argv(tiny_assets, cache), tmp_path, kill("", n))
        assert r.returncode == -9, (n, r.returncode, r.stderr[-2000:])
        where.append(n)
    r = forkserver.run("cache", cache_argv(tiny_assets, cache), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree(cache) == tree(tmp_path / "ref"), where


def latest_step(out) -> int:
    steps = [int(p.name[5:]) for p in out.glob("step-*") if (p / "trainer.json").exists()]
    return max(steps, default=0)


def test_training_killed_anywhere_resumes_to_the_same_weights(forkserver, tiny_assets, tmp_path):
    """Kills while caching (inside train.py), at startup, after optimizer steps, while writing
    checkpoints and the exports beside them, while pruning, and while writing the final export."""
    steps, every = 16, 2
    extra = {"train.max_steps": steps, "checkpoint.every": every, "checkpoint.keep_last": 2,
             "lora.dropout": 0.1, "export.every_checkpoint": True, "export.formats": "[wantune, diffusers]",
             "checkpoint.resume": "latest", "run.name": "kt"}
    ref_out = tmp_path / "ref"
    r = forkserver.run("train", train_argv(tiny_assets, ref_out, tmp_path / "ref_cache", **extra), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    out, cache = tmp_path / "killed", tmp_path / "cache"
    argv = train_argv(tiny_assets, out, cache, **extra)
    rng = random.Random(SEED)
    kinds = ["startup:", "optimizer stepped", "step-", "/export/", "pruned"]
    rng.shuffle(kinds)  # taken in turn, so every kind of moment is hit; the points within at random
    landed = []
    for i in range(KILLS):
        done = latest_step(out)
        if i < 3:  # the first runs build the cache: every run writes the report and the probes
            # (4 points), then 2 points per text or latent file still missing (9 in all)
            missing = 9 - len([p for p in cache.glob("*/*.safetensors") if not p.name.startswith(".")])
            target = ("/cache/", rng.randint(1, 4 + 2 * missing))
        elif done < steps:
            kind = kinds[(i - 3) % len(kinds)]
            n = {"startup:": rng.randint(1, 3),  # run folder, cache verified, model built/resumed
                 "optimizer stepped": rng.randint(1, every),
                 "step-": rng.randint(1, 14),  # a checkpoint's 6 files (2 points each) and 2 renames
                 "/export/": rng.randint(1, 4),  # the export written inside each checkpoint
                 "pruned": 1}[kind]  # lands too: the run goes on until a 3rd checkpoint prunes one
            target = (kind, n)
        else:  # all steps done: only the final export remains
            target = rng.choice([("startup:", rng.randint(1, 3)), ("/export/", rng.randint(1, 4))])
        r = forkserver.run("train", argv, tmp_path, kill(*target))
        assert r.returncode == -9, (i, target, done, r.returncode, r.stderr[-3000:])
        landed.append((target, done))
    r = forkserver.run("train", argv, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert {t[0] for t, _ in landed} >= {"/cache/", *kinds}, landed
    # the same checkpoints (keep_last=2), bit-identical weights, optimizer-free exports identical
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref_out.iterdir())
    assert sorted(p.name for p in out.glob("step-*")) == [f"step-{steps - every}", f"step-{steps}"]
    for step in (steps - every, steps):
        a, b = tree(out / f"step-{step}"), tree(ref_out / f"step-{step}")
        assert a.keys() == b.keys()
        assert a["trained.safetensors"] == b["trained.safetensors"], step
        assert a["trainer.json"] == b["trainer.json"] and a["state.pt"] == b["state.pt"]
        for name in a:
            if name.startswith("export/"):
                assert same_tensors(out / f"step-{step}" / name, ref_out / f"step-{step}" / name), name
    for name in ("kt.safetensors", "kt_diffusers.safetensors"):
        assert same_tensors(out / "export" / name, ref_out / "export" / name)
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]
    assert not [p for p in cache.rglob("*") if p.name.startswith(".")]


def same_tensors(a, b) -> bool:
    """Equal tensors and metadata (the export date aside, which a run past midnight changes)."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if set(fa.keys()) != set(fb.keys()):
            return False
        ma, mb = dict(fa.metadata()), dict(fb.metadata())
        for m in (ma, mb):
            m.pop("modelspec.date", None)
        return ma == mb and all(fa.get_tensor(k).equal(fb.get_tensor(k)) for k in fa.keys())
