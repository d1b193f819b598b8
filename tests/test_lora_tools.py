"""The LoRA command-line tools: convert, inspect, merge, extract, run through their `main`."""
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.test_lora_formats import random_lora
from wantune.tools import convert_lora, extract_lora, inspect_lora, merge_lora
from wan_model.configs import get_flavour
from wan_model.convert import dit_to_diffusers
from wan_model.lora import lora_state_dict, merge_into_state_dict, read_lora, write_lora
from wan_model.loading import save_safetensors_atomic, save_sharded_safetensors, write_text_atomic


@pytest.fixture(scope="module")
def base_sd():
    from wan_model.transformer import WanModel

    torch.manual_seed(0)
    model = WanModel(get_flavour("tiny-t2v").dit)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def base_dir(tmp_path, base_sd):
    folder = tmp_path / "base"
    save_sharded_safetensors(base_sd, folder)
    cfg = get_flavour("tiny-t2v").dit.official_config_json()
    write_text_atomic(folder / "config.json", json.dumps(cfg))
    return folder


def test_convert_cli_round_trip_and_unknown_keys(tmp_path, capsys):
    lora = random_lora(rank=4, alpha=2.0)
    src = write_lora(lora, tmp_path / "k.safetensors", format="kohya")
    assert convert_lora.main([str(src), str(tmp_path / "c.safetensors"), "--to", "comfyui"]) == 0
    assert "kohya format, 20 modules" in capsys.readouterr().out
    back = read_lora(tmp_path / "c.safetensors")
    assert back.format == "comfyui"
    for m, w in lora.weights.items():
        assert torch.equal(back.weights[m].up, w.up) and back.weights[m].alpha == 2.0

    sd = lora_state_dict(lora, "wantune")
    sd["diffusion_model.blocks.0.norm3.diff_b"] = torch.zeros(64)
    save_safetensors_atomic(sd, tmp_path / "odd.safetensors")
    assert convert_lora.main([str(tmp_path / "odd.safetensors"), str(tmp_path / "o.safetensors"),
                              "--to", "diffusers"]) == 1
    assert "norm3.diff_b" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()
    assert convert_lora.main([str(tmp_path / "odd.safetensors"), str(tmp_path / "o.safetensors"),
                              "--to", "diffusers", "--allow-unknown"]) == 0
    assert read_lora(tmp_path / "o.safetensors").format == "diffusers"
    assert convert_lora.main([str(tmp_path / "missing.safetensors"), str(tmp_path / "x.safetensors"),
                              "--to", "kohya"]) == 2


def test_inspect_cli(tmp_path, capsys):
    path = write_lora(random_lora("tiny-i2v", rank=8, alpha=4.0), tmp_path / "l.safetensors",
                      metadata={"ss_learning_rate": "0.0001", "modelspec.base_model": "tiny-i2v"})
    assert inspect_lora.main([str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ranks"] == [8] and info["alphas"] == [4.0] and info["format"] == "wantune"
    assert info["settings"]["ss_learning_rate"] == "0.0001" and info["base_model"] == "tiny-i2v"
    assert inspect_lora.main([str(path)]) == 0
    text = capsys.readouterr().out
    assert "cross_attn.k_img" in text and "scale 0.5" in text


def test_merge_cli_official_and_comfyui_layouts(tmp_path, base_dir, base_sd, capsys):
    a, b = random_lora(rank=4, alpha=4.0, seed=1), random_lora(rank=2, seed=2)
    pa = write_lora(a, tmp_path / "a.safetensors", format="kohya")
    pb = write_lora(b, tmp_path / "b.safetensors", format="diffusers")
    want = merge_into_state_dict(base_sd, [(a, 0.75), (b, 1.0)])
    out = tmp_path / "merged"
    assert merge_lora.main(["--base", str(base_dir), "--lora", f"{pa}:0.75", "--lora", str(pb),
                            "--out", str(out)]) == 0
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert json.loads((out / "config.json").read_text())["dim"] == 64

    single = tmp_path / "comfy.safetensors"
    assert merge_lora.main(["--base", str(base_dir), "--lora", f"{pa}:0.75", "--lora", str(pb),
                            "--out", str(single), "--layout", "comfyui", "--dtype", "bf16"]) == 0
    got = load_file(str(single))
    assert set(got) == {f"model.diffusion_model.{k}" for k in want}
    k = "blocks.1.ffn.2.weight"
    assert torch.equal(got[f"model.diffusion_model.{k}"], want[k].to(torch.bfloat16))


def test_merge_cli_reads_diffusers_named_base_and_infers_config(tmp_path, base_sd):
    file = tmp_path / "diffusers_dit.safetensors"
    save_safetensors_atomic(dit_to_diffusers(base_sd), file)
    lora = random_lora(rank=2)
    pl = write_lora(lora, tmp_path / "l.safetensors")
    out = tmp_path / "m"
    assert merge_lora.main(["--base", str(file), "--lora", f"{pl}:-1", "--out", str(out)]) == 0
    got = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    want = merge_into_state_dict(base_sd, [(lora, -1.0)])
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert json.loads((out / "config.json").read_text())["num_heads"] == 2


def test_merge_cli_refuses_lora_of_another_model(tmp_path, base_dir, capsys):
    pl = write_lora(random_lora("tiny-i2v", rank=2), tmp_path / "i2v.safetensors")
    assert merge_lora.main(["--base", str(base_dir), "--lora", str(pl), "--out", str(tmp_path / "x")]) == 2
    assert "k_img" in capsys.readouterr().err
    assert merge_lora.parse_lora_arg("C:/loras/a.safetensors") == ("C:/loras/a.safetensors", 1.0)
    assert merge_lora.parse_lora_arg("a.safetensors:0.5") == ("a.safetensors", 0.5)


def test_extract_cli(tmp_path, base_dir, base_sd, capsys):
    lora = random_lora(rank=3, alpha=3.0, seed=5)
    tuned = merge_into_state_dict(base_sd, [(lora, 1.0)])
    tuned["blocks.0.norm3.weight"] = tuned["blocks.0.norm3.weight"] + 1.0  # not LoRA-shaped
    save_sharded_safetensors(tuned, tmp_path / "tuned")
    out = tmp_path / "x.safetensors"
    assert extract_lora.main(["--base", str(base_dir), "--tuned", str(tmp_path / "tuned"),
                              "--rank", "3", "--out", str(out), "--dtype", "fp32"]) == 0
    text = capsys.readouterr().out
    assert "blocks.0.self_attn.q" in text and "1 changed tensors are not Linear" in text
    got = read_lora(out)
    assert set(got.weights) == set(lora.weights)
    for m, w in lora.weights.items():
        # the merge rounded to float32 weights, so the difference is the delta up to that rounding
        assert (got.weights[m].delta() - w.delta()).abs().max() < 1e-5
