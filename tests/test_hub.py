"""Models by Hugging Face repo id, against a local stand-in for the Hub (tests/hub_stub.py) that
serves a random tiny model in the official layout and as its diffusers twin."""
from pathlib import Path

import pytest
import torch

from tests.conftest import HUB_TOKEN
from tests.hub_stub import repo_from_folder
from wan_model import hub as wan_hub
from wan_model.paths import ModelPaths

OFFICIAL = "Wan-AI/Wan2.1-T2V-1.3B"
DIFFUSERS = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
# What the real repos hold besides the weights; a run needs none of it.
EXTRAS = {"README.md": b"# Wan2.1\n", "LICENSE.txt": b"Apache-2.0\n", "examples/i2v_input.JPG": b"\xff" * 4096,
          "assets/logo.png": b"\x89PNG" + b"\x00" * 2048}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from wan_model.random_weights import write_random_checkpoint

    out = tmp_path_factory.mktemp("tiny")
    return write_random_checkpoint(out, "tiny-t2v", layouts=("official", "diffusers"), log=lambda *_: None)


def serve(hub, tiny: Path) -> None:
    hub.repos[OFFICIAL] = repo_from_folder(tiny, skip=("diffusers/", "wantune_random.json"), extra=EXTRAS)
    hub.repos[DIFFUSERS] = repo_from_folder(tiny / "diffusers", extra={
        "README.md": b"# Wan2.1 diffusers\n", "scheduler/scheduler_config.json": b"{}"})


def forget() -> None:
    """A new process: nothing remembered but the Hugging Face cache on disk."""
    wan_hub._FETCHED.clear()


def test_repo_id_downloads_only_what_is_needed_once(hub, tiny, tmp_path):
    serve(hub, tiny)
    paths = ModelPaths(root=OFFICIAL)
    paths.fetch(["config", "vae", "text_encoder", "tokenizer", "clip"])  # what caching needs
    got = sorted(hub.downloads())
    tokenizer = sorted(p.relative_to(tiny).as_posix() for p in (tiny / "google").rglob("*") if p.is_file())
    assert got == sorted(["Wan2.1_VAE.pth", "config.json", "models_t5_umt5-xxl-enc-bf16.pth", *tokenizer]), got
    vae = Path(paths.resolve("vae"))
    assert vae.read_bytes() == (tiny / "Wan2.1_VAE.pth").read_bytes()
    assert str(tmp_path / "hf_home" / "hub" / "models--Wan-AI--Wan2.1-T2V-1.3B" / "snapshots") in str(vae)
    assert paths.is_i2v() is False
    # the DiT comes when it is asked for, and loads as the files it was made from
    from wan_model import load_transformer

    served = load_transformer(paths.resolve("transformer"), dtype=torch.float32).state_dict()
    local = load_transformer(tiny, dtype=torch.float32).state_dict()
    assert served.keys() == local.keys() and all(torch.equal(served[k], local[k]) for k in local)
    assert [f for f in hub.downloads() if f.startswith("diffusion_pytorch_model")]
    assert not [f for f in hub.downloads() if f in EXTRAS]
    # a second run downloads nothing: one listing of the repo, no file requests
    before = len(hub.log)
    forget()
    ModelPaths(root=OFFICIAL).fetch()
    assert [e["path"].split("?")[0] for e in hub.log[before:]] == [f"/api/models/{OFFICIAL}"]
    assert all(e["auth"] == f"Bearer {HUB_TOKEN}" for e in hub.log)  # HF_TOKEN was sent


def test_diffusers_twin_resolves_to_its_folders(hub, tiny):
    serve(hub, tiny)
    paths = ModelPaths(root=DIFFUSERS)
    paths.fetch()
    names = {w: Path(paths.resolve(w)).relative_to(paths.root_folder()).as_posix()
             for w in ("transformer", "vae", "text_encoder", "tokenizer")}
    assert names == {"transformer": "transformer", "vae": "vae", "text_encoder": "text_encoder",
                     "tokenizer": "tokenizer"}
    assert "scheduler/scheduler_config.json" not in hub.downloads()
    from wantune.tools import verify_weights

    assert verify_weights.main([DIFFUSERS]) == 0  # every component loads from the twin's layout
    import wan_model

    twin = wan_model.load_vae(paths.resolve("vae"), dtype=torch.float32).state_dict()
    official = wan_model.load_vae(tiny / "Wan2.1_VAE.pth", dtype=torch.float32).state_dict()
    assert all(torch.equal(twin[k], official[k]) for k in official)


def test_offline_uses_the_cache_and_names_what_it_lacks(hub, tiny, monkeypatch):
    from huggingface_hub import constants

    serve(hub, tiny)
    ModelPaths(root=OFFICIAL).fetch(["vae", "text_encoder", "tokenizer"])
    forget()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    before = len(hub.log)
    paths = ModelPaths(root=OFFICIAL)
    assert Path(paths.resolve("vae")).read_bytes() == (tiny / "Wan2.1_VAE.pth").read_bytes()
    assert len(hub.log) == before  # not one request
    with pytest.raises(wan_hub.HubError, match="HF_HUB_OFFLINE.*transformer"):
        paths.fetch(["transformer"])


def test_interrupted_download_continues_and_bad_files_are_removed(hub, tiny):
    serve(hub, tiny)
    hub.fail_once.add("Wan2.1_VAE.pth")
    with pytest.raises(wan_hub.HubError, match="run again"):
        ModelPaths(root=OFFICIAL).fetch(["vae", "text_encoder"])
    first = hub.downloads()
    assert "models_t5_umt5-xxl-enc-bf16.pth" in first and "Wan2.1_VAE.pth" not in first
    forget()
    ModelPaths(root=OFFICIAL).fetch(["vae", "text_encoder"])
    assert hub.downloads()[len(first):] == ["Wan2.1_VAE.pth"]  # the finished file was kept
    # bytes that differ from the Hub's sha256 (same size) are refused and removed from the cache
    name = "models_t5_umt5-xxl-enc-bf16.pth"
    real = hub.repos[OFFICIAL].files[name]
    hub.tamper[name] = bytes(b ^ 1 for b in real)
    cached = Path(ModelPaths(root=OFFICIAL).resolve("text_encoder"))
    cached.resolve().unlink()  # as if never downloaded (blob and link): fetched and hashed again
    cached.unlink()
    forget()
    with pytest.raises(wan_hub.HubError, match="sha256"):
        ModelPaths(root=OFFICIAL).fetch(["text_encoder"])
    assert not cached.exists() and not list(cached.parents[2].glob("blobs/*.incomplete"))
    del hub.tamper[name]
    forget()
    assert Path(ModelPaths(root=OFFICIAL).resolve("text_encoder")).read_bytes() == real


def test_wrong_repos_are_explained(hub, tiny):
    serve(hub, tiny)
    with pytest.raises(wan_hub.HubError, match="neither a local folder nor a model repository"):
        ModelPaths(root="nobody/nothing").fetch()
    from tests.hub_stub import Repo

    hub.repos["someone/notes"] = Repo({"README.md": b"hello"})
    with pytest.raises(wan_hub.HubError, match="has no vae"):
        ModelPaths(root="someone/notes").fetch(["vae"])
    assert wan_hub.is_repo_id(OFFICIAL) and not wan_hub.is_repo_id(str(tiny))
    assert not wan_hub.is_repo_id("a/b/c") and not wan_hub.is_repo_id("./x")


def test_cache_tool_takes_a_repo_id_without_the_dit_weights(hub, tiny, tmp_path):
    from wantune.tools import cache as cache_tool
    from wantune.train.demo import write_corpus

    serve(hub, tiny)
    write_corpus(tmp_path / "clips", num_clips=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{root: {DIFFUSERS}}}\ndata:\n  sources: [{{path: {tmp_path / 'clips'}}}]\n"
                      f"  areas: [[64, 48]]\n  frame_buckets: [17]\n  num_workers: 0\n"
                      f"  cache_dir: {tmp_path / 'cache'}\n")
    assert cache_tool.main([str(recipe), "--no-progress"]) == 0
    got = hub.downloads()
    assert "transformer/config.json" in got and "vae/diffusion_pytorch_model.safetensors" in got
    assert not [f for f in got if f.startswith("transformer/diffusion_pytorch_model")], got
    assert (tmp_path / "cache" / "manifest.json").is_file()
