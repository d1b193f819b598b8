"""The trainer on several processes through its real entry point (accelerate + gloo on CPU):
resume on another number of ranks (DDP, DeepSpeed ZeRO-2 and ZeRO-3), two machines on one
host, one voice, and a failing rank that stops the run.

The truth they compare against is one uninterrupted run of 2 processes. 1 process with
grad_accum=2 trains the same batches with the same draws per step as 2 processes with
grad_accum=1 (the draws belong to the batch's place in the data stream), so a resume that
changes the number of processes and keeps the global batch must give the same losses."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.runs import free_port
from tests.test_train import losses, overrides

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
RUN = {"train.max_steps": 4, "checkpoint.every": 2, "train.optim.scheduler": "constant",
       "train.optim.warmup_steps": 0, "lora.dropout": 0.1}  # dropout: the global generators too


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranks")
    from wantune.train.demo import write_corpus
    from wan_model.random_weights import write_random_checkpoint

    write_corpus(d / "clips", num_clips=4)
    write_random_checkpoint(d / "model", "tiny-t2v", log=lambda *_: None)
    return d


def launch(d: Path, out: str, procs: int, config: Path | None = None, machine: tuple | None = None,
           script: Path = ROOT / "train.py", wait: bool = True, check_exit: bool = True, **extra):
    """train.py under `accelerate launch` with `procs` processes in all (plain python for one);
    `machine`: (rank, port) of one of two machines on this host. With several processes each
    must have torn its process group down when the script returns (tests/clean_exit.py), unless
    `check_exit` is false."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    # a port of our own: another run on this host may hold the default one
    port = ["--main_process_port", str(free_port())]
    if config is not None:  # its use_cpu says CPU; ACCELERATE_USE_CPU would turn DeepSpeed off
        launcher = [*accelerate, "--config_file", str(config), "--num_processes", str(procs), *port]
    elif procs > 1:
        env["ACCELERATE_USE_CPU"] = "1"  # with --multi_gpu: a gloo world of CPU processes
        launcher = [*accelerate, "--multi_gpu", "--num_processes", str(procs), "--mixed_precision", "no",
                    "--dynamo_backend", "no"]
        launcher += (["--num_machines", "2", "--machine_rank", str(machine[0]), "--main_process_ip",
                      "127.0.0.1", "--main_process_port", str(machine[1])] if machine else
                     ["--num_machines", "1", *port])
    else:
        launcher = [sys.executable]
    wrap = [str(ROOT / "tests" / "clean_exit.py")] if procs > 1 and check_exit else []
    cmd = [*launcher, *wrap, str(script), str(ROOT / "recipes" / "demo.yaml"), *overrides(d, out, **{**RUN, **extra})]
    if not wait:  # its own session, so that `finish` can stop the launcher and its workers
        return subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, start_new_session=True)
    done = subprocess.run(cmd, cwd=d, capture_output=True, text=True, env=env, timeout=1800)  # a hang guard
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def finish(runs: list, timeout: int) -> list[tuple[str, str]]:
    """Outputs of started launches; any still running at the timeout is stopped (and fails)."""
    import signal

    try:
        return [r.communicate(timeout=timeout) for r in runs]
    finally:
        for r in runs:
            if r.poll() is None:
                os.killpg(r.pid, signal.SIGKILL)
                r.wait()


def keys(d: Path, out: str) -> dict[int, list[str]]:
    rows = map(json.loads, (d / out / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["data/keys"] for r in rows if "data/keys" in r}


def deepspeed_config(d: Path, stage: int) -> Path:
    cfg = d / f"zero{stage}_cpu.yaml"
    cfg.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
                   f"deepspeed_config:\n  deepspeed_config_file: {ROOT / f'recipes/accelerate/ds_zero{stage}.json'}\n"
                   "  zero3_init_flag: false\nnum_machines: 1\nnum_processes: 1\nuse_cpu: true\n")
    return cfg


@pytest.fixture(scope="module")
def straight(workdir):
    """The reference: 2 processes, 4 steps uninterrupted, checkpoints at 2 and 4."""
    done = launch(workdir, "straight", 2)
    out = done.stdout + done.stderr
    assert out.count("done: 4 steps") == 1 and out.count("exported:") == 1, out[-3000:]  # one voice
    return losses(workdir, "straight"), keys(workdir, "straight")


def test_the_stream_holds_every_sample_once_per_epoch(workdir, straight):
    _, trained = straight
    everything = sorted(trained[1])
    assert len(everything) == 4  # 4 clips in batches of 2 on 2 ranks: one epoch per step
    for step in range(1, 5):
        assert sorted(trained[step]) == everything, step
    assert trained[1] != trained[2]  # a new order per epoch


def test_lora_resumes_on_one_process_and_on_two(workdir, straight):
    ref_loss, ref_keys = straight
    # 2 -> 1: the step-2 checkpoint of the 2-process run continues in 1 process
    (workdir / "to_one").mkdir()
    shutil.copytree(workdir / "straight" / "step-2", workdir / "to_one" / "step-2")
    done = launch(workdir, "to_one", 1, **{"checkpoint.resume": "latest", "train.grad_accum": 2})
    assert "written by 2 rank(s), continued by 1" in done.stdout
    # 1 -> 2: a 1-process run stopped at step 2 continues on 2 processes
    launch(workdir, "to_two", 1, **{"train.grad_accum": 2, "train.max_steps": 2})
    done = launch(workdir, "to_two", 2, **{"checkpoint.resume": "latest"})
    assert "written by 1 rank(s), continued by 2" in done.stdout
    for out, steps in (("to_one", [3, 4]), ("to_two", [1, 2, 3, 4])):
        got = losses(workdir, out)
        assert sorted(got) == steps and (workdir / out / "step-4" / "trained.safetensors").exists()
        assert all(got[s] == pytest.approx(ref_loss[s], rel=1e-5) for s in steps), (out, got, ref_loss)
        assert keys(workdir, out) == {s: ref_keys[s] for s in steps}  # nothing skipped or repeated
    from safetensors.torch import load_file

    ref = load_file(str(workdir / "straight" / "step-4" / "trained.safetensors"))
    for out in ("to_one", "to_two"):
        got = load_file(str(workdir / out / "step-4" / "trained.safetensors"))
        assert set(got) == set(ref)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage,before,after", [(2, 2, 1), (3, 1, 2)])
def test_deepspeed_state_moves_to_another_number_of_processes(workdir, straight, stage, before, after):
    """ZeRO partitions written by `before` processes load on `after` through DeepSpeed's
    universal checkpoint; the run continues as the uninterrupted one."""
    cfg, out = deepspeed_config(workdir, stage), f"zero{stage}"
    launch(workdir, out, before, cfg, **{"train.max_steps": 2, "train.grad_accum": 2 // before})
    written = sorted(p.relative_to(workdir / out) for p in (workdir / out / "step-2").rglob("*"))
    assert (workdir / out / "step-2" / "deepspeed" / "pytorch_model").is_dir()  # ZeRO partitions
    done = launch(workdir, out, after, cfg,
                  **{"checkpoint.resume": "latest", "train.grad_accum": 2 // after})
    assert f"written by {before} rank(s), continued by {after}" in done.stdout
    got, (ref_loss, ref_keys) = losses(workdir, out), straight
    assert sorted(got) == [1, 2, 3, 4] and keys(workdir, out) == ref_keys
    assert all(got[s] == pytest.approx(ref_loss[s], rel=1e-5) for s in got), (got, ref_loss)
    # the conversion is gone, the user's checkpoint untouched
    assert not list((workdir / out).glob(".universal-*"))
    assert sorted(p.relative_to(workdir / out) for p in (workdir / out / "step-2").rglob("*")) == written


def test_deepspeed_resume_keeps_the_ema(workdir):
    """ZeRO-2 checkpoints carry the EMA of a full fine-tune: a resumed run ends with the EMA of
    an uninterrupted one (before, it restarted from the base weights)."""
    cfg = deepspeed_config(workdir, 2)
    full = {"train.mode": "full", "full.parts": "['blocks\\.1\\.']", "full.ema": True, "full.ema_decay": 0.5,
            "train.optim.lr": 1e-3, "export.formats": "[official]", "export.dtype": "fp32"}
    launch(workdir, "ema_straight", 1, cfg, **full)
    launch(workdir, "ema_resumed", 1, cfg, **{**full, "train.max_steps": 2})
    assert (workdir / "ema_resumed" / "step-2" / "deepspeed").is_dir()
    launch(workdir, "ema_resumed", 1, cfg, **{**full, "checkpoint.resume": "latest"})
    from safetensors.torch import load_file

    a, b = (load_file(str(workdir / out / "step-4" / "ema.safetensors")) for out in ("ema_straight", "ema_resumed"))
    base = load_file(str(workdir / "ema_resumed" / "step-2" / "ema.safetensors"))
    assert set(a) == set(b) and a and any(not torch.equal(a[k], base[k]) for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7)


def test_two_machines_on_one_host_train_like_two_processes(workdir, straight):
    port = free_port()
    machines = [launch(workdir, "machines", 2, machine=(m, port), wait=False) for m in (0, 1)]
    outputs = finish(machines, timeout=1800)
    assert [m.returncode for m in machines] == [0, 0], [e[-3000:] for _, e in outputs]
    assert sum(o.count("done: 4 steps") for o, _ in outputs) == 1  # the main process of machine 0
    ref_loss, ref_keys = straight
    assert losses(workdir, "machines") == ref_loss and keys(workdir, "machines") == ref_keys


FAIL_ON_RANK_1 = """
import os, runpy, sys
sys.path.insert(0, {root!r})
import wantune.train.loop as loop
real, calls = loop.compute_loss, []
def failing(*args, **kwargs):  # rank 1 fails in its second step while rank 0 waits for it
    calls.append(1)
    if os.environ.get("RANK") == "1" and len(calls) == 2:
        raise RuntimeError("injected failure on rank 1")
    return real(*args, **kwargs)
loop.compute_loss = failing
runpy.run_path({train!r}, run_name="__main__")
"""


def test_a_failing_rank_stops_every_rank_and_shows_its_error(workdir, tmp_path):
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(FAIL_ON_RANK_1.format(root=str(ROOT), train=str(ROOT / "train.py")))
    run = launch(workdir, "failing", 2, script=script, wait=False)
    [(out, err)] = finish([run], timeout=900)  # a rank left blocked in a collective would hang here
    assert run.returncode != 0
    assert "error: training failed on rank 1 of 2: RuntimeError: injected failure on rank 1" in err
    assert "done:" not in out


def test_sequence_parallel_deepspeed_state_is_read_as_written(tmp_path, monkeypatch):
    """With sequence parallel 2 on 2 processes the data position has 1 rank, but DeepSpeed wrote
    its state from 2: resuming on the same 2 processes reads it as written (a universal
    conversion, as large as the checkpoint, only when the number of processes changes)."""
    import json
    from types import SimpleNamespace

    from wantune.train import reshard

    step = tmp_path / "step-4"
    (step / "deepspeed").mkdir(parents=True)
    (step / "trainer.json").write_text(json.dumps({"step": 4, "sampler": {"world": 1}, "processes": 2}))
    converted = []
    monkeypatch.setattr(reshard, "_convert_to_universal", lambda src, dst: converted.append(dst))
    acc = SimpleNamespace(num_processes=2, is_main_process=True, wait_for_everyone=lambda: None)
    assert reshard.deepspeed_state_dir(acc, step, tmp_path) == step / "deepspeed" and not converted
    # an older checkpoint (no "processes"): the data position's ranks are the processes
    (step / "trainer.json").write_text(json.dumps({"step": 4, "sampler": {"world": 2}}))
    assert reshard.deepspeed_state_dir(acc, step, tmp_path) == step / "deepspeed" and not converted


def test_universal_load_step_counters_go_where_torch_puts_them():
    """DeepSpeed's universal load sets each AdamW `step` as saved, a CPU tensor; a fused AdamW on
    the GPU then stops at its first step (seen on 2 H200s resuming a 2-GPU ZeRO-2 checkpoint on 1).
    The counters must end where torch's own load_state_dict puts them (on the parameter's device,
    float32, for fused or capturable groups; unchanged otherwise). `meta` stands in for the GPU."""
    from types import SimpleNamespace

    from wantune.train import reshard

    def optimizer(**kw):
        p = torch.nn.Parameter(torch.zeros(4, device="meta"))
        opt = torch.optim.AdamW([p], **kw)
        opt.state[p] = {"step": torch.tensor(6, dtype=torch.int64), "exp_avg": torch.zeros(4, device="meta")}
        return opt, p

    for kw in ({"fused": True}, {"capturable": True}, {}):
        truth, _ = optimizer(**kw)
        loaded, _ = optimizer(**kw)
        loaded.load_state_dict(truth.state_dict())  # torch's policy
        want = loaded.state[loaded.param_groups[0]["params"][0]]["step"]
        ours, p = optimizer(**kw)
        wrapped = SimpleNamespace(optimizer=SimpleNamespace(optimizer=ours))  # accelerate's, DeepSpeed's
        moved = reshard.place_optimizer_steps(wrapped)
        got = ours.state[p]["step"]
        assert (got.device, got.dtype) == (want.device, want.dtype), kw
        assert moved == (1 if kw else 0), kw
        # ZeRO-3: the state is keyed by a flat partition that DeepSpeed puts in the group only
        # for its own step (seen on 2 H200s resuming a ZeRO-3 checkpoint on 1)
        stage3, p = optimizer(**kw)
        stage3.param_groups[0]["params"] = []
        assert reshard.place_optimizer_steps(stage3) == (1 if kw else 0), kw
        got = stage3.state[p]["step"]
        assert (got.device, got.dtype) == (want.device, want.dtype), kw
