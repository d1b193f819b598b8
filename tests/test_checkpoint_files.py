"""Checkpoint folders on disk: a failed write leaves the earlier checkpoints usable and says so;
keep_last pruning removes only older complete checkpoints, after the new one is in; what a
killed run left is cleaned up; an unreadable or unsafe checkpoint is refused by name."""
import json

import pytest
import torch

from tests.runs import dead_pid
from wantune.train import checkpoint
from wan_model.atomic import WriteError


def toy_state(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return {n: p.detach() for n, p in model.named_parameters()}, opt, sched


def save(out, step, keep_last=0, seed=None, **kw):
    trained, opt, sched = toy_state(step if seed is None else seed)
    return checkpoint.save_checkpoint(out, step, trained, opt, sched, {"epoch": 0, "position": step},
                                      f"max_steps: {step}\n", keep_last=keep_last, **kw)


def steps(out):
    return [s for s, _ in checkpoint.list_checkpoints(out)]


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_keep_last_prunes_older_ones_only_after_the_new_one_is_complete(tmp_path):
    for s in range(1, 8):
        save(tmp_path, s, keep_last=3)
        assert steps(tmp_path) == list(range(max(1, s - 2), s + 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-5", "step-6", "step-7"]
    back = checkpoint.load_checkpoint(tmp_path / "step-7")
    assert back["trainer"] == {"step": 7, "sampler": {"epoch": 0, "position": 7}}
    assert torch.equal(back["trained"]["weight"], toy_state(7)[0]["weight"])
    # a checkpoint rewritten at an older step (resumed from an explicit earlier path) is never
    # the one pruned (the newest keep_last by number stay too)
    save(tmp_path, 4, keep_last=3)
    assert steps(tmp_path) == [4, 5, 6, 7]
    save(tmp_path, 7, keep_last=0, seed=70)  # same step again: replaced whole, never merged
    assert torch.equal(checkpoint.load_checkpoint(tmp_path / "step-7")["trained"]["weight"],
                       toy_state(70)[0]["weight"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("which", ["trained.safetensors", "state.pt", "trainer.json", "export"])
def test_no_space_mid_checkpoint_keeps_the_last_good_one(tmp_path, fault, which):
    save(tmp_path, 2, keep_last=1)
    before = snapshot(tmp_path / "step-2")
    fault(f"enospc:{which}:1")

    def export(folder):
        from wan_model.atomic import save_safetensors_atomic
        save_safetensors_atomic({"x": torch.zeros(10)}, folder / "export" / "lora.safetensors")

    with pytest.raises(WriteError) as e:
        save(tmp_path, 4, keep_last=1, write_more=export)
    msg = str(e.value)
    assert msg.startswith(f"could not write checkpoint step-4 ({which if which != 'export' else 'lora.safetensors'}) "
                          f"to {tmp_path / 'step-4'}: no space left on device (")
    assert " needed, " in msg and "step-2/ is intact: free space, then continue with checkpoint.resume=latest" in msg
    assert steps(tmp_path) == [2] and snapshot(tmp_path / "step-2") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]  # no temporary folder left
    assert checkpoint.find_resume("latest", tmp_path) == tmp_path / "step-2"


def test_a_kill_while_pruning_or_replacing_is_cleaned_up_at_the_next_start(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 4)
    dead = dead_pid()
    # killed half-way through removing step-2 (renamed first, so resume never sees a partial one)
    (tmp_path / "step-2").rename(tmp_path / f".step-2.del-{dead}")
    (tmp_path / f".step-2.del-{dead}" / "state.pt").unlink()
    # killed between moving an older step-4 aside and moving the new one in
    (tmp_path / "step-4").rename(tmp_path / f".step-4.old-{dead}")
    (tmp_path / f".step-6.tmp-{dead}").mkdir()  # killed while writing step-6
    (tmp_path / ".step-8.tmp").mkdir()  # DeepSpeed's shared temporary folder
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / f".run.safetensors.tmp-{dead}").write_bytes(b"half")
    assert checkpoint.find_resume("latest", tmp_path) is None
    checkpoint.sweep(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "step-4"]
    assert list((tmp_path / "export").iterdir()) == []
    assert checkpoint.find_resume("latest", tmp_path) == tmp_path / "step-4"


KILLED_SAVES = """
import sys
sys.path.insert(0, sys.argv[2])
from tests.test_checkpoint_files import save
save(sys.argv[1], 2, seed=2)  # step-2 again, as a run resumed from an earlier step passes it
save(sys.argv[1], 4, keep_last=1)  # and then prunes step-2
"""


@pytest.mark.parametrize("moment,n", [("old moved aside", 1), ("out of the way", 2)])  # 1: the old step-2
def test_a_kill_while_replacing_or_pruning_loses_nothing(tmp_path, moment, n):
    """Killed between moving an older step-2 aside and moving the new one in, the next start puts
    the complete old one back; killed while pruning, the folder is already out of the way under
    a hidden name (never a partial step-N/ that looks complete), and the next start removes it."""
    import os
    import subprocess
    import sys

    from tests.runs import ROOT

    save(tmp_path, 2, seed=1)
    before = snapshot(tmp_path / "step-2")
    env = {**os.environ, "WANTUNE_FAULT": f"kill:{moment}:{n}", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", KILLED_SAVES, str(tmp_path), str(ROOT)], env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == -9, r.stderr[-2000:]
    if moment == "old moved aside":
        assert checkpoint.find_resume("latest", tmp_path) is None  # step-2 is aside, not lost
        checkpoint.sweep(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2"]
        assert snapshot(tmp_path / "step-2") == before
    else:
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["step-4"]
        checkpoint.sweep(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step-4"]


def test_unreadable_or_unsafe_checkpoints_are_refused_by_name(tmp_path):
    path = save(tmp_path, 3)
    data = (path / "trained.safetensors").read_bytes()
    (path / "trained.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match=rf"{path}: this checkpoint cannot be read .*earlier step-N/"):
        checkpoint.load_checkpoint(path)
    path = save(tmp_path, 5)

    class Payload:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').write('code ran')",))

    torch.save({"optimizer": Payload()}, path / "state.pt")
    with pytest.raises(checkpoint.CheckpointError, match="Unsupported global: GLOBAL exec.*never unpickles"):
        checkpoint.load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    (path / "state.pt").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="state.pt"):
        checkpoint.load_checkpoint(path)


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np

    path = save(tmp_path, 1)
    state = checkpoint.rng_state()
    torch.save({"rng": state}, path / "rng.pt")
    a = (random.random(), np.random.rand(), torch.rand(1))
    checkpoint.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["rng"])
    b = (random.random(), np.random.rand(), torch.rand(1))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert json.loads((path / "trainer.json").read_text())["step"] == 1
