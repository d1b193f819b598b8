"""Write failures through the real entry points: a checkpoint, cache or export write that fails
(no space, injected or on a real tiny tmpfs; permission denied) stops the run with a message
naming what, where and how much; the earlier checkpoints and the cache stay intact and usable;
the next run continues and ends exactly where an undisturbed run ends."""
import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

from wantune.data.dataset import CachedDataset
from tests.runs import train_argv, tree

SCHED = {"lora.dropout": 0.1, "export.formats": "[wantune]"}


@pytest.fixture(scope="module")
def reference(forkserver, tiny_assets, tmp_path_factory):
    """An undisturbed 6-step run (checkpoints every 2, all kept) and its cache."""
    d = tmp_path_factory.mktemp("writes")
    r = forkserver.run("train", train_argv(tiny_assets, d / "ref", d / "cache", **SCHED), d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def ckpt_bytes(out, step):
    return (out / f"step-{step}" / "trained.safetensors").read_bytes()


def test_checkpoint_without_space_stops_keeps_the_last_good_one_and_resumes(forkserver, tiny_assets, reference):
    d, out = reference, reference / "enospc"
    argv = train_argv(tiny_assets, out, d / "cache", **SCHED, **{"checkpoint.keep_last": 1})
    r = forkserver.run("train", argv, d, {"WANTUNE_FAULT": "enospc:trained.safetensors:2"})
    assert r.returncode == 1, r.stderr[-3000:]
    err = r.stderr
    assert f"could not write checkpoint step-4 (trained.safetensors) to {out / 'step-4'}: no space left" in err
    assert " needed, " in err and " free there)" in err
    assert "step-2/ is intact: free space, then continue with checkpoint.resume=latest" in err
    assert "Traceback" not in err  # the message, not a stack
    # pruning (keep_last=1) did not touch step-2 before step-4 existed
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step-", ".step"))) == ["step-2"]
    assert ckpt_bytes(out, 2) == ckpt_bytes(d / "ref", 2)
    r = forkserver.run("train", argv + ["checkpoint.resume=latest"], d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'step-2'} at step 2" in r.stdout + r.stderr
    assert sorted(p.name for p in out.glob("step-*")) == ["step-6"]
    assert ckpt_bytes(out, 6) == ckpt_bytes(d / "ref", 6)


def test_export_permission_denied_keeps_the_checkpoints_and_exports_on_the_next_run(forkserver, tiny_assets,
                                                                                   reference):
    d, out = reference, reference / "eacces"
    argv = train_argv(tiny_assets, out, d / "cache", **SCHED)
    r = forkserver.run("train", argv, d, {"WANTUNE_FAULT": "eacces:/export/:1"})
    assert r.returncode == 1
    assert f"could not write eacces.safetensors to {out / 'export' / 'eacces.safetensors'}: permission denied. " \
           f"make {out / 'export'} writable" in r.stderr
    assert ckpt_bytes(out, 6) == ckpt_bytes(d / "ref", 6) and not (out / "export" / "eacces.safetensors").exists()
    r = forkserver.run("train", argv + ["checkpoint.resume=latest"], d)
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(str(out / "export" / "eacces.safetensors"))
    want = load_file(str(d / "ref" / "export" / "ref.safetensors"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)


def test_cache_without_space_keeps_the_cache_usable_and_continues(forkserver, tiny_assets, reference, tmp_path):
    d = reference
    cache = tmp_path / "cache"
    argv = train_argv(tiny_assets, tmp_path / "unused", cache)[:1] + \
        [a for a in train_argv(tiny_assets, tmp_path / "unused", cache)[1:] if a.startswith(("model.", "data."))]
    r = forkserver.run("cache", argv + ["--no-progress"], d, {"WANTUNE_FAULT": "enospc:/latents/:3"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert "could not write" in r.stderr and "no space left on device" in r.stderr
    assert "run the same command again to continue" in r.stderr
    assert len(list((cache / "latents").glob("*.safetensors"))) == 2  # the two before it, whole
    assert not [p for p in cache.rglob("*") if ".tmp-" in p.name]
    r = forkserver.run("cache", argv + ["--no-progress"], d)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 clips and 0 captions encoded, 2 clips already cached" in r.stdout
    assert tree(cache) == tree(d / "cache")  # as if never interrupted
    # a caption changes; re-caching it runs out of space: the old cache is still whole and usable
    clips = tmp_path / "clips"
    shutil.copytree(tiny_assets / "clips", clips)
    (clips / "clip_01.txt").write_text("a changed caption")
    argv2 = [a.replace(str(tiny_assets / "clips"), str(clips)) for a in argv]
    r = forkserver.run("cache", argv2 + ["--no-progress"], d, {"WANTUNE_FAULT": "enospc:/text/:1"})
    assert r.returncode == 1 and "no space left on device" in r.stderr
    ds = CachedDataset(cache)
    assert len(ds) == 4 and all(ds[i]["latents"].isfinite().all() for i in range(len(ds)))
    r = forkserver.run("cache", argv2 + ["--no-progress"], d)
    assert r.returncode == 0 and "0 clips and 1 captions encoded" in r.stdout


def _mount_tmpfs(path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk(forkserver, tiny_assets, reference, tmp_path):
    """The same on a real 1 MiB tmpfs (where this machine lets a test mount one)."""
    d, disk = reference, tmp_path / "disk"
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected ENOSPC tests cover this")
    try:
        ckpt = sum(p.stat().st_size for p in (d / "ref" / "step-2").iterdir())
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free
        filler.write_bytes(b"\0" * (free - int(1.5 * ckpt) - 64 * 1024))  # room for one checkpoint
        out = disk / "run"
        argv = train_argv(tiny_assets, out, d / "cache", **SCHED, **{"checkpoint.keep_last": 1})
        r = forkserver.run("train", argv, d)
        assert r.returncode == 1
        assert f"could not write checkpoint step-4 (" in r.stderr and "no space left on device (" in r.stderr
        assert "step-2/ is intact" in r.stderr
        assert ckpt_bytes(out, 2) == ckpt_bytes(d / "ref", 2)
        assert not [p for p in out.iterdir() if p.name.startswith(".")]
        filler.unlink()
        r = forkserver.run("train", argv + ["checkpoint.resume=latest"], d)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ckpt_bytes(out, 6) == ckpt_bytes(d / "ref", 6)
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
