"""The trainer through its real entry point, on the tiny model and a synthetic corpus."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wantune.train.config import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A corpus + tiny model + cache shared by the tests of this file."""
    d = tmp_path_factory.mktemp("train")
    from wantune.train.demo import write_corpus
    from wan_model.random_weights import write_random_checkpoint

    write_corpus(d / "clips", num_clips=4)
    write_random_checkpoint(d / "model", "tiny-t2v", log=lambda *_: None)
    return d


def overrides(d: Path, out: str, **extra) -> list[str]:
    base = {"model.root": d / "model", "data.sources": f"[{{path: {d / 'clips'}}}]",
            "data.cache_dir": d / "cache", "run.output_dir": d / out, "demo.enabled": False,
            "validation.prompts": "[]", "train.max_steps": 6, "checkpoint.every": 3,
            "tracking.tensorboard": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_train(d: Path, out: str, launcher=("python3",), **extra):
    cmd = [*launcher, str(ROOT / "train.py"), str(ROOT / "recipes" / "demo.yaml"), *overrides(d, out, **extra)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=d, capture_output=True, text=True, env=env, timeout=1800)


def losses(d: Path, out: str) -> dict[int, float]:
    lines = (d / out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["train/loss"] for r in map(json.loads, lines) if "train/loss" in r}


def test_every_shipped_recipe_validates():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert len(recipes) >= 6, [r.name for r in recipes]
    for r in recipes:
        load_recipe(str(r))


def test_recipe_errors_name_the_key(tmp_path):
    demo = str(ROOT / "recipes" / "demo.yaml")
    with pytest.raises(RecipeError, match="train.max_stepz.*max_steps"):
        load_recipe(demo, ["train.max_stepz=3"])
    with pytest.raises(RecipeError, match="train.max_steps"):
        load_recipe(demo, ["train.max_steps=many"])
    with pytest.raises(RecipeError) as e:
        load_recipe(demo, ["train.mode=half", "validation.frames=30", "train.optim.name=sgd"])
    msg = str(e.value)
    assert "3 problem(s)" in msg and "train.mode" in msg and "nearest: 29" in msg and "sgd" in msg
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(demo, ["train.max_steps"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    with pytest.raises(RecipeError, match="YAML"):
        load_recipe(str(bad))


def test_lora_run_checkpoints_resume_exactly_and_exports(workdir):
    # The schedule must not depend on max_steps, so a run stopped at 3 equals an interrupted one.
    # LoRA dropout draws from the global generators: resume must restore its masks too.
    sched = {"train.optim.scheduler": "constant", "train.optim.warmup_steps": 2, "lora.dropout": 0.1}
    full = run_train(workdir, "straight", **sched)
    assert full.returncode == 0, full.stderr[-3000:]
    half = run_train(workdir, "resumed", **{**sched, "train.max_steps": 3})
    assert half.returncode == 0, half.stderr[-3000:]
    more = run_train(workdir, "resumed", **{**sched, "checkpoint.resume": "latest"})
    assert more.returncode == 0, more.stderr[-3000:]
    assert "resumed from" in more.stdout + more.stderr
    a, b = losses(workdir, "straight"), losses(workdir, "resumed")
    assert sorted(a) == [1, 2, 3, 4, 5, 6] and sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        assert a[step] == b[step], (step, a, b)
    # the trained tensors, byte for byte (CPU float32 is deterministic)
    straight_final = (workdir / "straight" / "step-6" / "trained.safetensors").read_bytes()
    assert straight_final == (workdir / "resumed" / "step-6" / "trained.safetensors").read_bytes()
    # checkpoints: atomic folders, keep_last pruning, resolved recipe beside each
    steps = sorted(p.name for p in (workdir / "resumed").glob("step-*"))
    assert steps == ["step-3", "step-6"]
    assert not list((workdir / "resumed").glob(".step-*"))
    assert "max_steps: 6" in (workdir / "resumed" / "step-6" / "recipe.yaml").read_text()
    # export: ComfyUI keys with alpha, modelspec metadata, no absolute paths
    from safetensors import safe_open

    exported = workdir / "straight" / "export" / "straight.safetensors"
    with safe_open(str(exported), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in keys} >= {"lora_A.weight", "lora_B.weight"}
    assert any(k.endswith(".alpha") for k in keys)
    assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in keys
    assert "diffusion_model.blocks.1.ffn.2.lora_B.weight" in keys
    assert meta["modelspec.architecture"] == "wan2.1/lora" and meta["ss_network_dim"] == "8"
    assert meta["ss_steps"] == "6" and meta["modelspec.trigger_phrase"] == "shapes"
    assert not any(str(workdir) in v for v in meta.values())
    # the exported LoRA reads back and changes the model's output
    from wan_model.lora import read_lora

    lora = read_lora(exported)
    assert len(lora.weights) == 20 and not lora.unknown


def test_accelerate_launch_full_finetune_with_ema(workdir):
    r = run_train(workdir, "full", launcher=("accelerate", "launch", "--num_processes", "1",
                                             "--mixed_precision", "no", "--dynamo_backend", "no"),
                  **{"train.mode": "full", "full.ema": True, "full.parts": "['blocks\\.1\\.']",
                     "export.formats": "[official, diffusers]", "train.max_steps": 3,
                     "train.optim.lr": 1e-3, "export.dtype": "fp32", "tracking.wandb": True,
                     "tracking.tensorboard": True, "validation.prompts": "[a red circle]",
                     "validation.steps": 2, "validation.at_start": False})
    assert r.returncode == 0, r.stderr[-3000:]
    out = workdir / "full"
    assert list((out / "wandb").glob("offline-run-*")), "wandb (offline) logged nothing"
    assert list((out / "logs").glob("events.out.tfevents.*"))
    assert list((out / "samples" / "step-3").glob("*.mp4"))
    from wan_model import load_transformer

    base = load_transformer(workdir / "model", dtype=torch.float32)
    tuned = load_transformer(workdir / "full" / "export" / "official", dtype=torch.float32)
    diff = load_transformer(workdir / "full" / "export" / "transformer", dtype=torch.float32)
    sb, st, sd = base.state_dict(), tuned.state_dict(), diff.state_dict()
    assert all(torch.equal(sb[k], st[k]) for k in sb if not k.startswith("blocks.1."))
    assert any(not torch.equal(sb[k], st[k]) for k in sb if k.startswith("blocks.1."))
    assert all(torch.equal(st[k], sd[k]) for k in st)
    assert (workdir / "full" / "step-3" / "ema.safetensors").exists()


def test_nan_loss_stops_without_a_bad_checkpoint(workdir):
    r = run_train(workdir, "nan", **{"train.optim.lr": 1e30, "train.optim.max_grad_norm": 0,
                                     "train.max_steps": 20, "checkpoint.every": 1})
    assert r.returncode != 0
    assert "loss is" in r.stderr and "no checkpoint was written" in r.stderr
    from safetensors.torch import load_file

    for ckpt in (workdir / "nan").glob("step-*"):
        assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "trained.safetensors")).values())


def test_bad_recipe_exits_2(workdir):
    r = run_train(workdir, "bad", **{"lora.targets": "[self_attn.qq]"})  # found before any work
    assert r.returncode == 2 and "self_attn.qq" in r.stderr and "Traceback" not in r.stderr
    r = run_train(workdir, "bad", **{"train.nope": 1})
    assert r.returncode == 2 and "train.nope" in r.stderr


def test_one_batch_overfit():
    """On one fixed batch and noise, LoRA training halves the loss of the tiny model."""
    from wantune.train.adapters import add_lora
    from wantune.train.config import LoraConfig
    from wantune.train.objective import flow_loss, noisy_input
    from wan_model.configs import FLAVOURS
    from wan_model.transformer import WanModel

    torch.manual_seed(0)
    model = WanModel(FLAVOURS["tiny-t2v"].dit)
    add_lora(model, LoraConfig(rank=16, alpha=16))
    x0 = torch.randn(1, 16, 2, 8, 8)
    noise = torch.randn_like(x0)
    s = torch.tensor([0.6])
    ctx = [torch.randn(5, 32)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    first = None
    for _ in range(100):
        xs, target = noisy_input(x0, noise, s)
        loss = flow_loss(model(xs, s * 1000, ctx), target, s, "none")
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_lora_targets():
    from wantune.train.adapters import resolve_lora_targets
    from wan_model.configs import FLAVOURS
    from wan_model.transformer import WanModel

    from wantune.train.config import DEFAULT_LORA_TARGETS

    t2v = WanModel(FLAVOURS["tiny-t2v"].dit)
    i2v = WanModel(FLAVOURS["tiny-i2v"].dit)
    assert len(resolve_lora_targets(t2v, DEFAULT_LORA_TARGETS)) == 2 * 10
    assert len(resolve_lora_targets(i2v, DEFAULT_LORA_TARGETS)) == 2 * 12
    assert resolve_lora_targets(t2v, ["re:blocks\\.1\\.ffn\\.\\d"]) == ["blocks.1.ffn.0", "blocks.1.ffn.2"]
    with pytest.raises(ValueError, match="k_img"):
        resolve_lora_targets(t2v, ["cross_attn.k_img"])


def test_readme_recipe_reference_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "recipe_reference.py"), "--check",
                        str(ROOT / "README.md")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_deepspeed_zero3_checkpoint_resume_and_consolidated_export(workdir):
    """ZeRO-3 through accelerate (CPU, one process): sharded checkpoints resume exactly and the
    export gathers the full adapter, which matches a plain run's."""
    cfg = workdir / "ds_zero3_cpu.yaml"
    cfg.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ROOT / 'recipes/accelerate/ds_zero3.json'}\n"
        "  zero3_init_flag: false\nnum_machines: 1\nnum_processes: 1\nuse_cpu: true\n")
    launcher = ("accelerate", "launch", "--config_file", str(cfg))
    sched = {"train.optim.scheduler": "constant", "train.optim.warmup_steps": 0, "train.max_steps": 4,
             "checkpoint.every": 2}
    straight = run_train(workdir, "ds_straight", launcher=launcher, **sched)
    assert straight.returncode == 0, straight.stderr[-3000:]
    half = run_train(workdir, "ds_resumed", launcher=launcher, **{**sched, "train.max_steps": 2})
    assert half.returncode == 0, half.stderr[-3000:]
    more = run_train(workdir, "ds_resumed", launcher=launcher, **{**sched, "checkpoint.resume": "latest"})
    assert more.returncode == 0, more.stderr[-3000:]
    assert (workdir / "ds_resumed" / "step-2" / "deepspeed").is_dir()
    a, b = losses(workdir, "ds_straight"), losses(workdir, "ds_resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5), (step, a, b)
    plain = run_train(workdir, "ds_plain", **sched)
    assert plain.returncode == 0, plain.stderr[-3000:]
    c = losses(workdir, "ds_plain")
    assert all(c[s] == pytest.approx(a[s], rel=1e-3) for s in a), (a, c)
    from wan_model.lora import read_lora

    ds_lora = read_lora(workdir / "ds_straight" / "export" / "ds_straight.safetensors")
    plain_lora = read_lora(workdir / "ds_plain" / "export" / "ds_plain.safetensors")
    assert set(ds_lora.weights) == set(plain_lora.weights) and len(ds_lora.weights) == 20
    for name, w in ds_lora.weights.items():
        assert w.up.abs().sum() > 0, name  # trained, gathered from the shards
        torch.testing.assert_close(w.up.float(), plain_lora.weights[name].up.float(), rtol=0.05, atol=2e-3)


def test_block_swap_and_offload_run_through_the_trainer(workdir):
    """The memory levers are recipe switches: the same run with a swapped block and offloaded
    checkpoints gives the same losses as the plain one (CPU: exact)."""
    sched = {"train.optim.scheduler": "constant", "train.optim.warmup_steps": 0, "train.max_steps": 2,
             "train.gradient_checkpointing": True}
    plain = run_train(workdir, "levers_plain", **sched)
    assert plain.returncode == 0, plain.stderr[-3000:]
    swapped = run_train(workdir, "levers_swap", **{**sched, "train.block_swap": 1,
                                                   "train.checkpoint_offload": -1})
    assert swapped.returncode == 0, swapped.stderr[-3000:]
    a, b = losses(workdir, "levers_plain"), losses(workdir, "levers_swap")
    assert a == pytest.approx(b, rel=1e-6)


def test_previews_leave_the_training_state_untouched(workdir):
    """Rendering previews every step (sampling, mode switches, RNG use) changes no loss."""
    sched = {"train.optim.scheduler": "constant", "train.optim.warmup_steps": 0, "train.max_steps": 3,
             "lora.dropout": 0.1}  # dropout draws from the global generator the previews also use
    quiet = run_train(workdir, "no_previews", **sched)
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    loud = run_train(workdir, "previews", **{**sched, "validation.prompts": "[a red circle]",
                                              "validation.every": 1, "validation.steps": 2})
    assert loud.returncode == 0, loud.stderr[-3000:]
    assert len(list((workdir / "previews" / "samples").glob("step-*/*.mp4"))) == 4  # start + 3 steps
    assert losses(workdir, "no_previews") == losses(workdir, "previews")
    rows = [json.loads(x) for x in (workdir / "previews" / "metrics.jsonl").read_text().splitlines()]
    renders = [r for r in rows if "validation/seconds" in r]  # the cost of every render is logged
    assert [r["step"] for r in renders] == [0, 1, 2, 3]
    assert all(r["validation/seconds"] > 0 and r["validation/videos"] == 1 for r in renders)
