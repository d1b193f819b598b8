"""Fail before the work: every problem the recipe and the files can tell is reported at once,
before caching or loading starts, as one message without a traceback (exit 2). I2V previews
given no image start from the first frame of a corpus clip."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from wantune.data.recipe import RecipeError
from wantune.train.config import load_recipe
from wantune.train.preflight import preflight

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.yaml")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from wantune.train.demo import write_corpus
    from wan_model.random_weights import write_random_checkpoint

    d = tmp_path_factory.mktemp("preflight")
    write_corpus(d / "clips", num_clips=2)
    write_random_checkpoint(d / "t2v", "tiny-t2v", log=lambda *_: None)
    write_random_checkpoint(d / "i2v", "tiny-i2v", log=lambda *_: None)
    return d


class OneProcess:
    """The accelerator as preflight and the previewer use it: the main and only process, CPU."""
    is_main_process = True
    device = torch.device("cpu")

    def wait_for_everyone(self):
        pass

    def unwrap_model(self, model):
        return model

    def print(self, *args):
        print(*args)


def args(d: Path, tmp: Path, **extra) -> list[str]:
    base = {"model.root": d / "t2v", "data.sources": f"[{{path: {d / 'clips'}}}]", "data.cache_dir": tmp / "cache",
            "run.output_dir": tmp / "run", "demo.enabled": False, "validation.prompts": "[a red circle]",
            "train.max_steps": 1, "tracking.tensorboard": False}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_every_problem_is_reported_at_once(files, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("- {prompt: a cat walks, image: cat.png}\n")
    recipe = load_recipe(DEMO, args(files, tmp_path, **{
        "model.vae": tmp_path / "nope.pth", "run.output_dir": tmp_path / "afile" / "run",
        "validation.prompts_file": prompts, "checkpoint.resume": tmp_path / "step-9",
        "lora.targets": "[self_attn.qq]", "data.conditioning": "i2v"}))
    with pytest.raises(RecipeError) as e:
        preflight(recipe, OneProcess())
    msg = str(e.value)
    assert msg.startswith("7 problem(s), found before any work"), msg
    for part in ["data.conditioning=i2v, but", "is a T2V model", "model.vae", "nope.pth", "model.clip",
                 "cat.png does not exist", "self_attn.qq", "run.output_dir", "afile is a file",
                 "checkpoint.resume"]:
        assert part in msg, (part, msg)
    assert not (tmp_path / "cache").exists()
    # a T2V model with an image prompt, and a readable I2V model without a CLIP file
    with pytest.raises(RecipeError, match="has an image, but the model is a T2V model"):
        preflight(load_recipe(DEMO, args(files, tmp_path, **{"validation.prompts_file": prompts})), OneProcess())
    with pytest.raises(RecipeError, match="model.clip"):
        preflight(load_recipe(DEMO, args(files, tmp_path, **{
            "model.root": files / "i2v", "model.clip": tmp_path / "clip.pth"})), OneProcess())
    preflight(load_recipe(DEMO, args(files, tmp_path)), OneProcess())  # a good recipe passes


def test_train_stops_before_caching_with_one_message(files, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), DEMO,
                        *args(files, tmp_path, **{"data.conditioning": "i2v"})],
                       capture_output=True, text=True, cwd=tmp_path, timeout=1800,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "data.conditioning=i2v, but" in r.stderr
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_cache_tool_checks_before_caching(files, tmp_path, capsys):
    from wantune.tools import cache as cache_tool

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{root: {files / 't2v'}}}\ndata:\n  sources: [{{path: {files / 'clips'}}}]\n"
                      f"  conditioning: i2v\n  cache_dir: {tmp_path / 'cache'}\n")
    assert cache_tool.main([str(recipe), "--no-progress"]) == 2
    assert "is a T2V model" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()


def test_i2v_previews_without_an_image_start_from_a_corpus_frame(files, tmp_path, capsys):
    import av

    from wantune.train.validation import Previewer
    from wan_model import load_transformer

    clip = files / "clips" / "clip_00.mp4"
    recipe = load_recipe(DEMO, args(files, tmp_path, **{"model.root": files / "i2v", "validation.steps": 2,
                                                        "validation.guidance": 1.0}))
    model = load_transformer(files / "i2v", dtype=torch.float32)
    previews = Previewer(recipe, OneProcess(), model, tmp_path / "samples", str(clip))
    assert f"the first frame of {clip}" in capsys.readouterr().out
    with av.open(str(clip)) as f:  # frame 0, decoded here without wantune's readers
        want = next(f.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(np.asarray(previews.fallback_image), want)
    written = previews.render(0)
    assert [p.name for p in written] == ["00-a-red-circle.mp4"] and written[0].stat().st_size > 0
