"""tools/sample.py end to end on tiny random checkpoints, LoRA strengths, and argument errors."""
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from wantune.tools import sample as tool
from wan_model.sampler import default_shift

SMALL = ["--size", "48x32", "--frames", "5", "--steps", "2", "--dtype", "fp32", "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny_t2v(tmp_path_factory):
    from wan_model.random_weights import write_random_checkpoint

    out = tmp_path_factory.mktemp("tiny-t2v")
    write_random_checkpoint(out, "tiny-t2v", log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def tiny_i2v(tmp_path_factory):
    from wan_model.random_weights import write_random_checkpoint

    out = tmp_path_factory.mktemp("tiny-i2v")
    write_random_checkpoint(out, "tiny-i2v", log=lambda *a: None)
    return out


def _png_frames(folder):
    return np.stack([np.asarray(Image.open(folder / n)) for n in sorted(os.listdir(folder))])


def test_t2v_mp4_and_contact_sheet(tiny_t2v, tmp_path):
    import av

    out = tmp_path / "cat.mp4"
    assert tool.main(["--root", str(tiny_t2v), "--prompt", "a cat", "--out", str(out),
                      "--contact-sheet", *SMALL]) == 0
    with av.open(str(out)) as c:
        s = c.streams.video[0]
        frames = list(c.decode(video=0))
        assert (len(frames), s.width, s.height, s.average_rate) == (5, 48, 32, Fraction(16))
    assert Image.open(tmp_path / "cat_sheet.png").size == (4 * 48, 32)


def test_lora_strength_zero_is_the_base_model(tiny_t2v, tmp_path):
    from wan_model.lora import Lora, LoraWeights, write_lora

    g = torch.Generator().manual_seed(0)
    weights = {f"blocks.{i}.self_attn.{p}": LoraWeights(torch.randn(4, 64, generator=g),
                                                        torch.randn(64, 4, generator=g), 4.0)
               for i in range(2) for p in ("q", "v")}
    lora_path = write_lora(Lora(weights), tmp_path / "l.safetensors")
    runs = {"base": [], "zero": ["--lora", f"{lora_path}:0"], "one": ["--lora", str(lora_path)]}
    frames = {}
    for name, extra in runs.items():
        folder = tmp_path / name
        assert tool.main(["--root", str(tiny_t2v), "--prompt", "a cat", "--out", str(folder),
                          "--guidance", "1", *SMALL, *extra]) == 0
        frames[name] = _png_frames(folder)
    assert frames["base"].shape == (5, 32, 48, 3)
    assert np.array_equal(frames["base"], frames["zero"])
    assert not np.array_equal(frames["base"], frames["one"])


def test_prompts_file_overrides_and_naming(tiny_t2v, tmp_path):
    prompts = tmp_path / "p.yaml"
    prompts.write_text("- prompt: a cat\n  name: cat\n"
                       "- prompt: a dog\n  size: 32x48\n  frames: 1\n  seed: 3\n", encoding="utf-8")
    assert tool.main(["--root", str(tiny_t2v), "--prompts-file", str(prompts),
                      "--out", str(tmp_path / "v.webp"), *SMALL]) == 0
    with Image.open(tmp_path / "cat.webp") as a, Image.open(tmp_path / "v_001.webp") as b:
        assert (a.n_frames, a.size) == (5, (48, 32))
        assert (b.n_frames, b.size) == (1, (32, 48))


def test_i2v_end_to_end(tiny_i2v, tmp_path):
    image = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)).save(image)
    out = tmp_path / "i2v.gif"
    assert tool.main(["--root", str(tiny_i2v), "--image", str(image), "--prompt", "a cat",
                      "--out", str(out), *SMALL]) == 0
    with Image.open(out) as im:
        # The 48x32 budget at the image's 3:2 aspect ratio gives 48x32 again.
        assert (im.n_frames, im.size) == (5, (48, 32))
    assert default_shift("i2v", 832, 480) == 3.0


def test_t2v_model_rejects_an_image(tiny_t2v, tmp_path, capsys):
    assert tool.main(["--root", str(tiny_t2v), "--prompt", "x", "--image", "a.png",
                      "--out", str(tmp_path / "x.mp4"), *SMALL]) == 2
    assert "T2V model" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--size", "500x480"], "width 500 is not a multiple of 16 (nearest: 496 or 512)"),
    (["--prompt", "x", "--size", "832x470"], "height 470 is not a multiple of 16 (nearest: 464 or 480)"),
    (["--prompt", "x", "--frames", "80"], "--frames 80 is not of the form 4k+1 (nearest: 77 or 81)"),
    (["--prompt", "x", "--size", "big"], "--size 'big' is not WIDTHxHEIGHT"),
    ([], "no prompt"),
])
def test_argument_errors(tmp_path, capsys, args, message):
    # No model is loaded: these fail before loading (the root does not even exist).
    assert tool.main(["--root", str(tmp_path / "none"), *args]) == 2
    assert message in capsys.readouterr().err


def test_no_model_given(capsys):
    assert tool.main(["--prompt", "x"]) == 2
    assert "pass --root" in capsys.readouterr().err


def test_parse_lora():
    assert tool.parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert tool.parse_lora("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert tool.parse_lora("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
