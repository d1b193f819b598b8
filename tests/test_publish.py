"""Publishing: the folder is complete, the card parses, private paths are gone, and the push runs
against a local stand-in for the Hub (HF_ENDPOINT, tests/hub_stub.py) that records what was uploaded."""
import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import HUB_TOKEN
from tests.test_lora_formats import random_lora
from wantune.tools import publish as publish_cli
from wantune.train.publish import (PublishError, base_model_key, build_publish_folder, inputs_from_run,
                           push_to_hub, redact)
from wan_model.lora import lora_metadata, read_lora, write_lora

SECRET = HUB_TOKEN  # what the `hub` fixture puts in HF_TOKEN


def make_run(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "my-style"
    meta = lora_metadata("Wan-AI/Wan2.1-T2V-1.3B", 4, 4.0, title="My style", trigger_words=["mystyle"],
                         resolution="832x480",
                         training={"ss_steps": "500", "ss_dataset": f"{tmp_path}/private/clips (12 clips)"})
    write_lora(random_lora(rank=4, alpha=4.0), run / "export" / "my-style.safetensors", metadata=meta)
    write_lora(random_lora(rank=4, alpha=4.0), run / "export" / "my-style_kohya.safetensors", format="kohya")
    for step in (0, 250, 500):
        folder = run / "samples" / f"step-{step}"
        folder.mkdir(parents=True)
        for i, slug in enumerate(["a-cat-in-mystyle", "a-city-at-night"]):
            (folder / f"{i:02d}-{slug}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes([step % 256]) * 64)
            (folder / f"{i:02d}-{slug}.png").write_bytes(b"\x89PNG")
    recipe = {
        "run": {"output_dir": str(run), "name": "my-style", "seed": 42},
        "model": {"flavour": "t2v-1.3B", "dit": f"{tmp_path}/weights/Wan2.1-T2V-1.3B",
                  "vae": "~/models/Wan2.1_VAE.pth"},
        "data": {"datasets": [{"path": f"{tmp_path}/private/clips", "num_repeats": 2}],
                 "cache_dir": "cache/relative"},
        "validation": {"prompts": ["a cat, mystyle", "a city at night, mystyle"]},
        "export": {"trigger_words": ["mystyle"], "title": "My style"},
        "tracking": {"wandb_api_key": "abc123", "hub_token": None,
                     "notes": f"trained from {tmp_path}/weights on one GPU"},
    }
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return run


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def all_text(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_publish_folder_from_a_run(tmp_path):
    run = make_run(tmp_path)
    inp = inputs_from_run(run)
    assert inp.lora.name == "my-style.safetensors" and inp.base_model == "t2v-1.3B"
    assert [p.parent.name for p in inp.previews] == ["step-500", "step-500"]
    out = build_publish_folder(inp, tmp_path / "publish")
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert names == {"README.md", "my-style.safetensors", "recipe.yaml",
                     "previews/00-a-cat-in-mystyle.mp4", "previews/01-a-city-at-night.mp4"}
    card = front_matter((out / "README.md").read_text())
    assert card["base_model"] == "Wan-AI/Wan2.1-T2V-1.3B" and card["license"] == "apache-2.0"
    assert card["instance_prompt"] == "mystyle" and "lora" in card["tags"]
    assert card["widget"][0] == {"text": "a cat, mystyle", "output": {"url": "previews/00-a-cat-in-mystyle.mp4"}}
    for w in card["widget"]:
        assert (out / w["output"]["url"]).exists()
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["model"]["dit"] == "Wan2.1-T2V-1.3B" and recipe["model"]["vae"] == "Wan2.1_VAE.pth"
    assert recipe["data"]["datasets"][0]["path"] == "clips" and recipe["data"]["cache_dir"] == "cache/relative"
    assert recipe["tracking"]["wandb_api_key"] == "<redacted>" and recipe["tracking"]["hub_token"] is None
    assert str(tmp_path) not in all_text(out)  # no private path anywhere, LoRA header included
    lora = read_lora(out / "my-style.safetensors")
    assert lora.metadata["ss_dataset"] == "clips (12 clips)"
    assert lora.metadata["ss_steps"] == "500"


def test_civitai_package_and_cli(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "pub"
    assert publish_cli.main([str(run), "--out", str(out), "--civitai"]) == 0
    fields = json.loads((out / "civitai" / "civitai.json").read_text())
    assert fields["type"] == "LORA" and fields["baseModel"] == "Wan Video 1.3B t2v"
    assert fields["trainedWords"] == ["mystyle"] and fields["files"][0]["name"] == "my-style.safetensors"
    assert [i["file"] for i in fields["images"]] == ["previews/00-a-cat-in-mystyle.mp4",
                                                     "previews/01-a-city-at-night.mp4"]
    for i in fields["images"]:
        assert (out / "civitai" / i["file"]).exists()
    assert (out / "civitai" / "my-style.safetensors").exists()
    assert publish_cli.main(["--out", str(out), "--push"]) == 2
    assert "--repo-id" in capsys.readouterr().err


def test_explicit_inputs_and_base_models(tmp_path):
    lora = write_lora(random_lora("tiny-i2v", rank=2), tmp_path / "x.safetensors")
    out = tmp_path / "o"
    # a tiny random model is not a published base: the user is told to name one
    assert publish_cli.main(["--lora", str(lora), "--out", str(out)]) == 2
    assert publish_cli.main(["--lora", str(lora), "--out", str(out), "--base-model", "i2v-14B-720p",
                             "--trigger", "zzz", "--civitai"]) == 0
    card = front_matter((out / "README.md").read_text())
    assert card["base_model"] == "Wan-AI/Wan2.1-I2V-14B-720P" and card["pipeline_tag"] == "image-to-video"
    assert "widget" not in card and card["instance_prompt"] == "zzz"
    assert json.loads((out / "civitai" / "civitai.json").read_text())["baseModel"] == "Wan Video 14B i2v 720p"
    assert base_model_key("i2v-14B", "1280x720") == "i2v-14B-720p"
    assert base_model_key("Wan-AI/Wan2.1-T2V-14B") == "t2v-14B"
    with pytest.raises(PublishError, match="--base-model"):
        base_model_key("tiny-t2v")
    assert redact({"a": ["/x/y/z.mp4", "rel/p"], "api_key": "k"}) == {"a": ["z.mp4", "rel/p"],
                                                                      "api_key": "<redacted>"}


def test_push_uploads_card_and_lora_without_writing_the_token(tmp_path, hub):
    run = make_run(tmp_path)
    out = tmp_path / "pub"
    assert publish_cli.main([str(run), "--out", str(out), "--civitai", "--repo-id", "me/wan-my-style",
                             "--push"]) == 0
    paths = [e["path"] for e in hub.log]
    assert paths[0] == "/api/repos/create" and "/api/validate-yaml" in paths
    assert any("/api/models/me/wan-my-style/preupload/main" in p for p in paths)
    commits = [e for e in hub.log if "/commit/" in e["path"]]
    uploaded = {name: data for e in commits for name, data in e["files"].items()}
    assert {"README.md", "my-style.safetensors", "recipe.yaml", "previews/00-a-cat-in-mystyle.mp4"} <= set(uploaded)
    assert not any(n.startswith("civitai/") for n in uploaded)  # the CivitAI package stays local
    assert uploaded["README.md"] == (out / "README.md").read_bytes()
    assert all(e["auth"] == f"Bearer {SECRET}" for e in hub.log)  # the token came from the env
    assert SECRET not in all_text(out)
    assert not any(SECRET.encode() in data for data in uploaded.values())
    assert all(e["code"] == 200 for e in hub.log), hub.log  # no call the stand-in did not expect


def test_push_failure_is_reported_with_the_fix(tmp_path, hub):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "README.md").write_text("x")
    with pytest.raises(PublishError, match="hf auth login"):
        push_to_hub(folder, "me/denied")
    assert hub.log[0]["path"] == "/api/repos/create"
    assert not any("/preupload/" in e["path"] or "/commit/" in e["path"] for e in hub.log)
