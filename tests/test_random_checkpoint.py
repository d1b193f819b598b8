"""Random checkpoints in every layout load through the public loaders; loading memory is bounded;
tools/verify_weights.py checks sizes and hashes."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import wan_model
from wan_model.random_weights import write_random_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    out = tmp_path_factory.mktemp("rand") / "tiny-i2v"
    write_random_checkpoint(out, "tiny-i2v", layouts=["official", "diffusers", "comfyui"], log=lambda *_: None)
    return out


def test_every_layout_loads_the_same_weights(i2v):
    dits = [wan_model.load_transformer(p, dtype=torch.float32) for p in
            (i2v, i2v / "diffusers" / "transformer", i2v / "comfyui" / "diffusion_models" / "wan2.1_tiny-i2v.safetensors")]
    ref = dits[0].state_dict()
    for d in dits[1:]:
        assert all(torch.equal(ref[k], v) for k, v in d.state_dict().items())
    vaes = [wan_model.load_vae(p) for p in
            (i2v / "Wan2.1_VAE.pth", i2v / "diffusers" / "vae", i2v / "comfyui" / "vae" / "wan_2.1_vae.safetensors")]
    ref = vaes[0].state_dict()
    for v in vaes[1:]:
        assert all(torch.equal(ref[k], t) for k, t in v.state_dict().items())
    texts = [wan_model.load_text_encoder(p, tok, dtype=torch.float32) for p, tok in (
        (i2v / "models_t5_umt5-xxl-enc-bf16.pth", i2v / "google" / "umt5-xxl"),
        (i2v / "diffusers" / "text_encoder", i2v / "diffusers" / "tokenizer"),
        (i2v / "comfyui" / "text_encoders" / "umt5_xxl.safetensors", i2v / "comfyui" / "tokenizer"))]
    outs = [t.encode(["a red circle moves left to right"])[0] for t in texts]
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    clips = [wan_model.load_clip_vision(p, dtype=torch.float32) for p in (
        i2v / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth", i2v / "diffusers" / "image_encoder",
        i2v / "comfyui" / "clip_vision" / "clip_vision_h.safetensors")]
    img = torch.rand(1, 3, 64, 48) * 2 - 1
    feats = [c.encode(img) for c in clips]
    assert feats[0].shape == (1, 257, 32)
    assert all(torch.allclose(feats[0], f, atol=1e-6) for f in feats[1:])


def test_random_model_runs_end_to_end(i2v):
    """The random weights are sane: a forward pass of every component is finite."""
    dit = wan_model.load_transformer(i2v, dtype=torch.float32)
    vae = wan_model.load_vae(i2v / "Wan2.1_VAE.pth")
    z = vae.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1)
    assert z.shape == (1, 16, 2, 4, 4) and torch.isfinite(z).all()
    out = dit(z, torch.tensor([500.0]), [torch.randn(4, 32)], clip_fea=torch.randn(1, 257, 32),
              y=torch.randn(1, 20, 2, 4, 4))
    assert torch.isfinite(out).all() and out.abs().mean() > 0


MEMORY_SCRIPT = textwrap.dedent("""
    import gc, json, sys, torch
    from wan_model.configs import DiTConfig
    from wan_model.dit_io import load_transformer, save_transformer
    from wan_model.transformer import WanModel
    cfg = DiTConfig(dim=512, ffn_dim=2048, num_heads=4, num_layers=8, text_dim=64)
    folder, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    save_transformer(WanModel(cfg).state_dict(), folder, cfg)
    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    # The same load once first: lazy imports, thread pools and their allocator arenas appear
    # then, not in the measured load (they made the old bound fail at random on some machines).
    model = load_transformer(folder, dtype=dtype)
    del model
    gc.collect()
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak
    before = rss("VmRSS:")
    model = load_transformer(folder, dtype=dtype)
    peak = rss("VmHWM:") - before
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"peak": peak, "weights": weights}))
""")
# Every buffer of 64 KiB or more is its own mapping, returned to the system when freed: resident
# memory then counts what is alive, not what glibc keeps cached from earlier allocations.
EXACT_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_peak_memory_near_one_copy(tmp_path, dtype):
    """Measured at ~1.0x on 1, 2 and 8 threads; a second full copy (2x-3x) fails by far."""
    import json
    import os

    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path), dtype], capture_output=True,
                       text=True, cwd=ROOT, timeout=1800, env={**os.environ, **EXACT_MALLOC})
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"{dtype}: peak RSS growth {m['peak'] / 2**20:.1f} MiB for {m['weights'] / 2**20:.1f} MiB of weights")
    assert 0.8 * m["weights"] <= m["peak"] <= 1.3 * m["weights"], m


def test_verify_weights(tmp_path, monkeypatch):
    out = tmp_path / "m"
    write_random_checkpoint(out, "tiny-t2v", log=lambda *_: None)
    from wantune.tools import verify_weights

    assert verify_weights.main([str(out), "--no-hash"]) == 1  # random files are not the official ones
    vae = out / "Wan2.1_VAE.pth"
    t5 = out / "models_t5_umt5-xxl-enc-bf16.pth"
    known = {vae.name: (vae.stat().st_size, verify_weights.sha256(vae), "VAE"),
             t5.name: (t5.stat().st_size, verify_weights.sha256(t5), "umT5")}
    monkeypatch.setattr(verify_weights, "KNOWN_FILES", known)
    assert verify_weights.main([str(out)]) == 0
    known[vae.name] = (vae.stat().st_size, "0" * 64, "VAE")
    assert verify_weights.main([str(out)]) == 1
    (out / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 16)
    assert verify_weights.main([str(out), "--no-load"]) == 1
