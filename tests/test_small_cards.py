"""Small cards on the CPU: the text encoder streamed block by block or on the host, the VAE
tiled with a bounded working set, previews decoded in tiles or on the host, the peak-memory
probe, and these settings through tools/cache.py and train.py. (GPU peaks:
tests/test_small_cards_gpu.py.)"""
import copy
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from wantune.train.config import RecipeError, load_recipe
from wantune.train.validation import decoder_placed
from wan_model.configs import T5Config, VAEConfig
from wan_model.device_memory import peak_of
from wan_model.text_encoder import TextEncoder, UMT5Encoder, load_text_encoder
from wan_model.tokenizer import load_tokenizer, write_tiny_tokenizer
from wan_model.vae import WanVAE

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.yaml")
PROMPTS = ["a red circle", "two blue squares drift apart over a long grey afternoon", ""]


# ---- the probe --------------------------------------------------------------------------------

def test_peak_of_counts_host_tensors_while_they_live():
    before = torch.zeros(1000)  # existed before the stage: not counted, even when written to

    def stage():
        a = torch.zeros(1000)  # 4,000 bytes
        view = a.view(10, 100)  # the same storage: nothing new
        b = torch.ones(2000)  # 12,000 bytes live: the peak
        before.add_(1)  # written in place: still nothing new
        del b
        c = torch.ones(500)  # 6,000 live
        return float(view.sum() + c.sum())

    p = peak_of(stage, "cpu")
    assert (p.result, p.start, p.peak) == (500.0, 0, 12_000)


# ---- text encoder placement ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    """A 4-block umT5 with large random weights (every block matters) and the tiny tokenizer."""
    torch.manual_seed(0)
    model = UMT5Encoder(T5Config(vocab=512, dim=32, dim_attn=32, dim_ffn=64, num_heads=4,
                                 num_layers=4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model, load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


@torch.no_grad()
def test_streamed_text_encoder_gives_the_same_embeddings_bit_for_bit(t5):
    model, tok = t5
    whole = TextEncoder(copy.deepcopy(model), tok, 64).place("device", "cpu")
    streamed = TextEncoder(copy.deepcopy(model), tok, 64).place("stream", "cpu")
    swap = streamed.stream
    qs = [streamed.model.blocks[i].attn.q for i in range(4)]
    host = [next(e.host for e in swap.entries[i] if e.module is qs[i]) for i in range(4)]  # at home
    seen = []  # during the forward each block computes with a copy, not with its host tensor
    hooks = [q.register_forward_pre_hook(
        lambda m, a, i=i: seen.append((i, m.weight.data_ptr() != host[i].data_ptr())))
        for i, q in enumerate(qs)]
    try:
        for prompts in (PROMPTS, PROMPTS[:1]):
            want, got = whole.encode(prompts), streamed.encode(prompts)
            assert all(torch.equal(w, g) for w, g in zip(want, got))
    finally:
        for h in hooks:
            h.remove()
    assert seen == [(i, True) for i in range(4)] * 2
    assert swap.fetches == 2 * 4  # one copy per block per batch, however many captions it holds
    # between calls no copy is held and every block has its host weights back
    assert not swap.ready and not swap.installed
    assert all(q.weight.data_ptr() == h.data_ptr() for q, h in zip(qs, host))


def test_packed_host_copies_share_a_few_buffers_of_one_size():
    """Pinned memory comes in powers of two; the streamed encoder's copies fill shared buffers
    first-fit (on the CPU unpinned, the same packing)."""
    from wan_model.block_swap import HostPool

    pool = HostPool(3 * 3000, pinned=False, packed=True)  # 9,000 bytes -> one 16 KiB buffer
    sources = [torch.randn(750) for _ in range(3)] + [torch.arange(5000, dtype=torch.int32)]
    copies = [pool.copy(t) for t in sources]
    assert all(torch.equal(c, t) for c, t in zip(copies, sources))
    assert len({c.untyped_storage().data_ptr() for c in copies[:3]}) == 1  # 3 x 3,072 B fit one
    assert [c.storage_offset() * c.element_size() % 512 for c in copies] == [0] * 4
    assert pool.bytes() == 16_384 + 32_768  # the 20,000-byte tensor needed a buffer of its own


def test_bad_settings_are_rejected_with_the_key_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match="placement 'gpu': choose one of auto, device, cpu, stream"):
        load_text_encoder(tmp_path / "t5.pth", tmp_path / "tok", placement="gpu")
    for key, value in (("data.text_encoder_device", "gpu"), ("validation.decode", "host")):
        with pytest.raises(RecipeError, match=rf"{key}='{value}': choose one of auto, device, "):
            load_recipe(DEMO, [f"{key}={value}"])
    with pytest.raises(RecipeError, match="data.low_memory"):
        load_recipe(DEMO, ["data.low_memory=sometimes"])
    assert load_recipe(DEMO).data.low_memory is None  # planned; acts as false without a planner


# ---- VAE tiling -------------------------------------------------------------------------------

@torch.no_grad()
def test_tiled_vae_encode_working_set_does_not_grow_with_the_frame():
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=8)).eval()

    def peak(side, tile):
        video = torch.zeros(1, 3, 1, side, side)  # the input exists before the stage
        return peak_of(lambda: vae.encode(video, tile=tile), "cpu").peak

    plain = {s: peak(s, None) for s in (64, 128)}
    tiled = {s: peak(s, (48, 16)) for s in (64, 128)}  # 2x2 tiles, then 4x4
    latent_growth = 16 * ((128 // 8) ** 2 - (64 // 8) ** 2) * 4  # float32 [1,16,1,h/8,w/8]
    print(f"encode peaks, 64^2 -> 128^2: plain {plain}, tiled {tiled}")
    assert plain[128] - plain[64] > 100 * latent_growth  # untiled activations grow with the area
    # tiled: the same per-tile working set; only a few latent-sized buffers (output, blend) grow
    assert tiled[128] - tiled[64] <= 4 * latent_growth
    assert tiled[128] < plain[128] / 4


@pytest.mark.parametrize("low_memory,calls", [(None, [3]), (True, [1, 1, 1])])
def test_tiled_caching_encodes_one_clip_per_vae_call(tmp_path, low_memory, calls):
    from wantune.data.cache import build_cache
    from wantune.data.config import DataConfig, SourceConfig
    from wantune.data.plan import scan
    from tests.media import fake_encoders, write_image

    (tmp_path / "clips").mkdir()
    for i in range(3):  # three stills of one bucket
        write_image(tmp_path / "clips" / f"{i}.png", index=i)
    cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path / "clips"))], areas=[[64, 48]],
                     cache_dir=str(tmp_path / "cache"), num_workers=0, vae_batch_size=3,
                     low_memory=low_memory)
    enc, seen = fake_encoders(), []
    load = enc.load_vae

    def load_vae():
        vae = load()
        encode = vae.encode
        vae.encode = lambda video: (seen.append(video.shape[0]), encode(video))[1]
        return vae

    enc.load_vae = load_vae
    assert build_cache(scan(cfg, progress=False), enc, False, progress=False).items_encoded == 3
    assert seen == calls


# ---- previews -----------------------------------------------------------------------------------

class _Placed:
    """Stands in for the VAE / CLIP wrapper: records where it is moved (no GPU needed)."""

    def __init__(self):
        self.where, self.visits, self.tiling = "cpu", [], None

    def to(self, device):
        self.where = torch.device(device).type
        self.visits.append(self.where)
        return self

    def enable_tiling(self):
        self.tiling = "tiles"


@pytest.mark.parametrize("decode,during,tiling", [
    ("device", "cuda", None), ("auto", "cuda", None), ("tiled", "cuda", "tiles"), ("cpu", "cpu", None)])
def test_preview_decoder_placement(decode, during, tiling):
    vae, clip = _Placed(), _Placed()
    with pytest.raises(KeyError):  # a failing render still puts everything back
        with decoder_placed(vae, clip, decode, torch.device("cuda")):
            assert (vae.where, clip.where, vae.tiling) == (during, during, tiling)
            raise KeyError("render failed")
    assert (vae.where, clip.where, vae.tiling) == ("cpu", "cpu", None)
    if decode == "cpu":  # the VAE and CLIP never visit the GPU
        assert "cuda" not in vae.visits + clip.visits


# ---- end to end ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("smallcards")
    from wantune.train.demo import write_corpus
    from wan_model.random_weights import write_random_checkpoint

    write_corpus(d / "clips", num_clips=2)
    write_random_checkpoint(d / "model", "tiny-t2v", log=lambda *_: None)
    return d


def demo_overrides(d: Path, cache: str, **extra) -> list[str]:
    base = {"model.root": d / "model", "data.sources": f"[{{path: {d / 'clips'}}}]",
            "data.cache_dir": d / cache, "demo.enabled": False}
    return [f"{k}={v}" for k, v in {**base, **extra}.items()]


def test_cache_placement_keeps_the_cache_and_tiling_rebuilds_the_latents(workdir, capsys):
    from safetensors.torch import load_file

    from wantune.tools import cache as cache_tool

    def cache(name, **extra):
        code = cache_tool.main([DEMO, *demo_overrides(workdir, name, **extra), "--no-progress"])
        assert code == 0
        return capsys.readouterr().out

    assert "2 clips and 3 captions encoded" in cache("c1", **{"data.text_encoder_device": "cpu"})
    # the placement is not part of the cache: a streamed or whole encoder computes the same
    assert "0 clips and 0 captions encoded" in cache("c1", **{"data.text_encoder_device": "stream"})
    assert "0 clips and 0 captions encoded" in cache("c1", **{"data.low_memory": "false"})  # null = false
    assert "2 clips and 0 captions encoded" in cache("c1", **{"data.low_memory": "true"})
    # and streamed through the cache tool, the stored embeddings are those of the whole encoder
    cache("c2", **{"data.text_encoder_device": "stream"})
    files = sorted(p.name for p in (workdir / "c2" / "text").glob("*.safetensors"))
    assert len(files) == 3
    for name in files:
        a = load_file(str(workdir / "c2" / "text" / name))["context"]
        assert torch.equal(a, load_file(str(workdir / "c1" / "text" / name))["context"])
    assert cache_tool.main([DEMO, *demo_overrides(workdir, "c4", **{"data.text_encoder_device": "gpu"})]) == 2
    assert "data.text_encoder_device='gpu'" in capsys.readouterr().err


def test_streamed_text_encoder_is_freed_before_the_vae_loads(workdir):
    """One model family resident at a time: the streamed encoder (whose controller and model
    refer to each other, so only the collector frees them) is gone when the VAE is loaded."""
    import weakref

    from wantune.data.cache import build_cache, model_encoders
    from wantune.data.plan import scan

    recipe = load_recipe(DEMO, demo_overrides(workdir, "c-freed", **{"data.text_encoder_device": "stream"}))
    enc, alive = model_encoders(recipe.model, recipe.data, False), []
    load_text, load_vae = enc.load_text, enc.load_vae

    def text():
        t = load_text()
        alive.append(weakref.ref(t.model))
        return t

    def vae():
        alive.append(alive[0]() is not None)
        return load_vae()

    enc.load_text, enc.load_vae = text, vae
    assert build_cache(scan(recipe.data, progress=False), enc, False, progress=False).items_encoded == 2
    assert alive[1] is False


def test_train_py_with_host_and_streamed_text_and_host_and_tiled_previews(workdir):
    """Two runs through train.py: prompts encoded on the host with previews decoded there, then
    the encoder streamed with previews decoded in tiles (320 px wide: two 256 px tiles). The
    second run reuses the first one's cache and trains the same; its previews differ (tiles)."""
    def run(out, text, decode):
        extra = {"run.output_dir": workdir / out, "data.text_encoder_device": text,
                 "validation.decode": decode, "train.max_steps": 1, "validation.at_start": False,
                 "validation.width": 320, "validation.height": 48, "validation.frames": 5,
                 "validation.steps": 2, "tracking.tensorboard": False, "export.formats": "[wantune]"}
        cmd = ["python3", str(ROOT / "train.py"), DEMO, *demo_overrides(workdir, "cache-train", **extra)]
        done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=1800,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert done.returncode == 0, done.stderr[-3000:]
        sheets = list((workdir / out / "samples" / "step-1").glob("*.png"))
        assert len(sheets) == 1 and len(list(sheets[0].parent.glob("*.mp4"))) == 1
        rows = [json.loads(x) for x in (workdir / out / "metrics.jsonl").read_text().splitlines()]
        return done.stdout, [r["train/loss"] for r in rows if "train/loss" in r], sheets[0]

    import numpy as np
    from PIL import Image

    out_a, loss_a, sheet_a = run("host", "cpu", "cpu")
    out_b, loss_b, sheet_b = run("streamed", "stream", "tiled")
    assert "cache:" in out_a and "cache:" not in out_b  # the placement rebuilt nothing
    assert loss_a == loss_b
    a, b = (np.asarray(Image.open(s)).astype(int) for s in (sheet_a, sheet_b))
    assert a.shape == b.shape and (a != b).any()  # same video size, tile seams: tiling was on
