"""tools/cache.py end to end with a tiny random I2V model in the official layout: the cached
tensors equal what the real wan_model encoders give for the same frames, and a second run
encodes nothing."""
import pytest
import torch
from safetensors.torch import load_file

from wantune.data.cache import cache_settings, conditioning_is_i2v, first_frame_condition, model_identity
from wantune.data.cache_files import read_manifest
from wantune.data.dataset import CachedDataset
from wantune.data.decode import read_frames, resize_crop, to_model_range
from wantune.data.recipe import load_data_recipe
from tests.media import write_image, write_video
from wantune.tools import cache as cache_tool


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from wan_model.random_weights import write_random_checkpoint

    tmp = tmp_path_factory.mktemp("tool")
    write_random_checkpoint(tmp / "model", "tiny-i2v", log=lambda *a: None)
    clips = tmp / "clips"
    clips.mkdir()
    write_video(clips / "walk.mp4", 12, 24)  # 12 frames at 24 fps -> 8 at 16 fps -> 5-frame bucket
    write_image(clips / "still.png", 48, 64)
    (clips / "walk.txt").write_text("a person walking")
    (clips / "still.txt").write_text("a still")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(f"model: {{root: {tmp / 'model'}}}\n"
                      f"data:\n  sources: [{{path: {clips}}}]\n  areas: [[64, 48]]\n"
                      f"  frame_buckets: [1, 5]\n  num_workers: 0\n  cache_dir: {tmp / 'cache'}\n")
    return tmp, recipe


def test_cache_tool_matches_the_model_encoders_and_is_incremental(setup, capsys):
    from wan_model import load_clip_vision, load_text_encoder, load_vae

    tmp, recipe = setup
    assert cache_tool.main([str(recipe), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Dataset report" in out and "2 clips and 3 captions encoded" in out and "i2v" in out

    r = load_data_recipe(str(recipe))
    assert conditioning_is_i2v(r.data, r.model)
    settings = cache_settings(r.data, model_identity(r.model, True), True)
    ds = CachedDataset(r.data.cache_dir, settings)
    manifest = read_manifest(r.data.cache_dir)
    walk = next(e for e in manifest["items"] if e["source"].endswith("walk.mp4"))
    assert walk["bucket"] == [64, 48, 5]
    got = load_file(str(ds.cache_dir / walk["file"]))

    root = tmp / "model"
    vae = load_vae(root / "Wan2.1_VAE.pth")
    frames = [0, 2, 3, 5, 6]  # 16 fps timeline from 24 fps
    video = to_model_range(resize_crop(read_frames(tmp / "clips" / "walk.mp4", frames, "decord"), 64, 48))[None]
    want = vae.encode(video)
    assert got["latents"].shape == (16, 2, 6, 8)
    torch.testing.assert_close(got["latents"], want[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["y"], first_frame_condition(vae, video)[0], rtol=0, atol=1e-5)
    clip = load_clip_vision(root / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", dtype=torch.float32)
    torch.testing.assert_close(got["clip_fea"], clip.encode(video[:, :, 0])[0], rtol=0, atol=1e-5)
    t5 = load_text_encoder(root / "models_t5_umt5-xxl-enc-bf16.pth", root / "google" / "umt5-xxl")
    context = load_file(str(ds.cache_dir / walk["text_file"]))["context"]
    torch.testing.assert_close(context, t5.encode(["a person walking"])[0].to(torch.bfloat16))
    torch.testing.assert_close(ds.empty_context, t5.encode([""])[0].to(torch.bfloat16))

    assert cache_tool.main([str(recipe), "--no-progress"]) == 0
    assert "0 clips and 0 captions encoded, 2 clips already cached" in capsys.readouterr().out


def test_cache_tool_exit_status(setup, tmp_path, capsys):
    tmp, recipe = setup
    assert cache_tool.main([str(recipe), "data.cache_dir="]) == 2
    assert cache_tool.main([str(recipe), f"data.sources=[{{path: {tmp_path}}}]", "--no-progress"]) == 1
    assert "nothing usable" in capsys.readouterr().err


def test_cache_tool_sets_up_its_processes_as_the_trainer(setup, monkeypatch):
    """The cache tool's Accelerator comes from train.parallel.make_accelerator (the early
    imports, gloo on CPU, the 2-hour collective timeout): with torch's 10-minute NCCL default,
    ranks waiting while the main process downloads the text encoder were stopped."""
    from wantune.train import parallel

    class Made(Exception):
        pass

    def made(*args, **kwargs):
        raise Made

    monkeypatch.setattr(parallel, "make_accelerator", made)
    with pytest.raises(Made):
        cache_tool.main([str(setup[1]), "--no-progress"])


def test_several_processes_get_gloo_on_cpu_and_the_long_collective_timeout(monkeypatch):
    from datetime import timedelta

    import accelerate

    from wantune.train import parallel

    seen = {}
    monkeypatch.setattr(accelerate, "Accelerator", lambda **kw: seen.update(kw) or "made")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert parallel.make_accelerator("bf16", 3) == "made"
    (handler,) = seen["kwargs_handlers"]
    assert handler.backend == "gloo" and handler.timeout == timedelta(hours=2)
    assert seen["mixed_precision"] == "bf16" and seen["gradient_accumulation_steps"] == 3
    monkeypatch.setenv("WORLD_SIZE", "1")
    parallel.make_accelerator()
    assert seen["kwargs_handlers"] == [] and seen["mixed_precision"] == "no"


@pytest.mark.slow
def test_two_ranks_write_the_bytes_of_one_and_report_once(setup, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    tmp, recipe = setup
    tool = Path(cache_tool.__file__)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    from tests.runs import free_port

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()),  # not 29500: another session may hold it
           str(Path(__file__).with_name("clean_exit.py")), str(tool),  # and the group torn down at exit
           str(recipe), f"data.cache_dir={tmp_path / 'two'}", "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)  # a hang guard
    assert done.returncode == 0, done.stderr[-3000:]
    # one voice: one report and one summary, which counts both ranks' work
    assert done.stdout.count("Dataset report") == 1 and done.stdout.count("captions encoded") == 1
    assert "2 clips and 3 captions encoded, 0 clips already cached" in done.stdout, done.stdout
    assert "on 2 ranks (clips encoded per rank: 1, 1)" in done.stdout, done.stdout
    assert cache_tool.main([str(recipe), f"data.cache_dir={tmp_path / 'one'}", "--no-progress"]) == 0
    one, two = tmp_path / "one", tmp_path / "two"
    files = sorted(p.relative_to(one) for p in one.glob("*/*.safetensors"))
    assert len(files) == 5 and files == sorted(p.relative_to(two) for p in two.glob("*/*.safetensors"))
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert len(a["items"]) == 2 and {**a, "written": ""} == {**b, "written": ""}
