"""The cache writer with stand-in encoders: files and manifest, incremental re-runs, settings
changes, interrupted runs, I2V conditioning, several ranks, and the checks training relies on."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from wantune.data.cache import build_cache, cache_settings, first_frame_condition, verify_cache
from wantune.data.cache_files import StaleCacheError, read_manifest
from wantune.data.config import DataConfig, SourceConfig
from wantune.data.dataset import CachedDataset
from wantune.data.plan import scan
from tests.media import FakeVAE, fake_encoders, frame_index_of, write_image, write_video


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    write_video(d / "a.mp4", 40, 24)  # 27 frames at 16 fps -> 17-frame bucket
    write_video(d / "b.mp4", 21, 16, 48, 64)  # portrait
    write_image(d / "c.png")
    (d / "a.txt").write_text("clip a")
    (d / "b.txt").write_text("clip b")
    (d / "c.txt").write_text("still c")
    return d


def make_cfg(corpus, tmp_path, **kw):
    return DataConfig(sources=[SourceConfig(path=str(corpus))], areas=[[64, 48]],
                      frame_buckets=[1, 5, 17], cache_dir=str(tmp_path / "cache"),
                      num_workers=kw.pop("num_workers", 0), **kw)


def run(cfg, i2v=False, encoders=None, **kw):
    encoders = encoders or fake_encoders(i2v)
    result = build_cache(scan(cfg, progress=False), encoders, i2v, progress=False, **kw)
    return result, encoders


def test_cache_files_manifest_and_dataset(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path, num_workers=2)
    result, enc = run(cfg)
    assert (result.items_encoded, result.texts_encoded, result.failures) == (3, 4, [])  # 3 captions + ""
    manifest = read_manifest(cfg.cache_dir)
    assert sorted(tuple(i["bucket"]) for i in manifest["items"]) == [(48, 64, 17), (64, 48, 1), (64, 48, 17)]
    a = next(i for i in manifest["items"] if i["source"].endswith("a.mp4"))
    assert a["shapes"] == {"latents": [16, 5, 6, 8]} and a["caption"] == "clip a"
    assert len(a["content_hash"]) == 32 and a["settings_hash"] == manifest["settings"]["latent_hash"]
    lat = load_file(os.path.join(cfg.cache_dir, a["file"]))["latents"]
    # latent frame t (green channel) holds pixel frame 4t of the 16 fps timeline = source frame round(4t * 1.5)
    grey = [(lat[1, t].mean().item() + 1) * 127.5 for t in range(5)]
    assert [frame_index_of(torch.full((4, 4, 3), g).numpy()) for g in grey] == [0, 6, 12, 18, 24]
    text = load_file(os.path.join(cfg.cache_dir, a["text_file"]))["context"]
    assert text.dtype == torch.bfloat16 and text.shape == (3, 8)  # cut to real length
    ds = CachedDataset(cfg.cache_dir, cache_settings(cfg, enc.identity, False))
    assert len(ds) == 3 and ds.empty_context.shape == (1, 8)
    sample = ds[ds.index.index(manifest["items"].index(a))]
    assert sample["latents"].shape == (16, 5, 6, 8) and sample["caption"] == "clip a"
    assert not any(f.name.startswith(".") for f in (tmp_path / "cache" / "latents").iterdir())


def test_second_run_encodes_nothing_and_loads_no_model(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    run(cfg)
    result, enc = run(cfg)
    assert (result.items_encoded, result.texts_encoded, result.items_reused) == (0, 0, 3)
    assert enc.made == {"vae": [], "text": [], "clip": []}


def test_changed_clip_and_caption_are_re_encoded_alone(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    run(cfg)
    (corpus / "a.txt").write_text("clip a, edited")
    write_video(corpus / "b.mp4", 21, 16, 48, 64, codec="mjpeg", pix_fmt="yuvj420p")  # new content
    write_video(corpus / "d.mp4", 17, 16)  # a new clip without caption
    plan = scan(cfg, progress=False)
    stale = verify_cache(plan, cache_settings(cfg, fake_encoders().identity, False))
    assert any("a.mp4" in p and "caption changed" in p for p in stale)
    assert any("b.mp4" in p and "file changed" in p for p in stale)
    assert any("d.mp4" in p and "not cached" in p for p in stale)
    result, enc = run(cfg)
    assert result.items_encoded == 2 and result.items_reused == 2  # b and d; a and c kept
    assert sorted(enc.made["text"][0].prompts) == ["clip a, edited"]  # d's "" is cached already
    assert verify_cache(scan(cfg, progress=False), cache_settings(cfg, enc.identity, False)) == []
    assert len(list((tmp_path / "cache" / "text").iterdir())) == 4  # the old caption is pruned


def test_settings_change_is_detected_and_rebuilt(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    _, enc = run(cfg)
    old = cache_settings(cfg, enc.identity, False)
    new_identity = {"vae": "another-vae", "text": "fake-t5-1"}
    with pytest.raises(StaleCacheError, match="latent.vae: cache 'fake-vae-1', recipe 'another-vae'"):
        CachedDataset(cfg.cache_dir, cache_settings(cfg, new_identity, False))
    result, enc2 = run(cfg, encoders=fake_encoders(identity=new_identity))
    assert (result.items_encoded, result.texts_encoded) == (3, 0)  # text settings unchanged
    with pytest.raises(StaleCacheError, match="other settings"):
        CachedDataset(cfg.cache_dir, old)
    CachedDataset(cfg.cache_dir, cache_settings(cfg, new_identity, False))
    cfg.latent_dtype = "bfloat16"
    result, _ = run(cfg, encoders=fake_encoders(identity=new_identity))
    assert result.items_encoded == 3
    ds = CachedDataset(cfg.cache_dir, cache_settings(cfg, new_identity, False))
    assert load_file(str(ds.cache_dir / ds.entries[0]["file"]))["latents"].dtype == torch.bfloat16
    cfg.areas = [[32, 32]]  # new geometry: new items, old files pruned
    run(cfg, encoders=fake_encoders(identity=new_identity))
    names = sorted(p.name for p in (tmp_path / "cache" / "latents").iterdir())
    assert len(names) == 3 and all("32x32" in n for n in names)


class Interrupt(Exception):
    pass


def test_interrupted_run_resumes_and_files_are_whole(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)

    def stop_after_two(n):
        if n == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(cfg, on_item=stop_after_two)
    cache = tmp_path / "cache"
    assert not (cache / "manifest.json").exists()
    done = sorted(p.name for p in (cache / "latents").iterdir())
    assert len(done) == 2 and not any(n.startswith(".") for n in done)
    (cache / "latents" / ".x.safetensors.tmp-999").write_bytes(b"half")  # a crash mid-write elsewhere
    result, enc = run(cfg)
    assert (result.items_encoded, result.items_reused, result.texts_encoded) == (1, 2, 0)
    assert sorted(p.name for p in (cache / "latents").iterdir()) == sorted(
        i["key"] + ".safetensors" for i in read_manifest(cache)["items"])
    ds = CachedDataset(cache, cache_settings(cfg, enc.identity, False))
    assert all(ds[i]["latents"].shape[0] == 16 for i in range(len(ds)))


def test_i2v_conditioning_shapes(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    result, enc = run(cfg, i2v=True)
    ds = CachedDataset(cfg.cache_dir, cache_settings(cfg, enc.identity, True))
    assert ds.i2v
    for i in range(len(ds)):
        s = ds[i]
        c, t, h, w = s["latents"].shape
        assert s["y"].shape == (20, t, h, w) and s["clip_fea"].shape == (257, 12)
        assert torch.all(s["y"][:4, 0] == 1) and torch.all(s["y"][:4, 1:] == 0)
        assert torch.allclose(s["y"][4:, 0], s["latents"][:, 0])  # same first frame
    with pytest.raises(StaleCacheError, match="i2v"):
        CachedDataset(cfg.cache_dir, cache_settings(cfg, enc.identity, False))


def test_first_frame_condition_encodes_image_then_zero_frames():
    video = torch.rand(2, 3, 9, 16, 16) * 2 - 1
    y = first_frame_condition(FakeVAE(), video)
    assert y.shape == (2, 20, 3, 2, 2)
    assert torch.allclose(y[:, 4:, 1:], torch.zeros(1))  # later latent frames: the zero frames
    assert torch.all(y[:, :4, 0] == 1) and torch.all(y[:, :4, 1:] == 0)


def test_two_ranks_split_the_work(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path, text_batch_size=2)
    plan = scan(cfg, progress=False)
    r1 = build_cache(plan, e1 := fake_encoders(), False, rank=1, world=2, progress=False)
    assert not (tmp_path / "cache" / "manifest.json").exists()  # only rank 0 writes it
    r0 = build_cache(plan, e0 := fake_encoders(), False, rank=0, world=2, progress=False)
    assert (r0.items_encoded, r1.items_encoded) == (2, 1)
    assert (r0.texts_encoded, r1.texts_encoded) == (2, 2)
    assert not set(e0.made["text"][0].prompts) & set(e1.made["text"][0].prompts)
    assert len(read_manifest(cfg.cache_dir)["items"]) == 3


def test_decode_failure_is_reported_not_fatal(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    plan = scan(cfg, progress=False)
    (corpus / "b.mp4").write_bytes(b"garbage after the scan")
    result = build_cache(plan, fake_encoders(), False, progress=False)
    assert len(result.failures) == 1 and "b-" in result.failures[0] and "decoding failed" in result.failures[0]
    manifest = read_manifest(cfg.cache_dir)
    assert len(manifest["items"]) == 2 and len(manifest["missing"]) == 1


def test_dataset_refuses_a_file_rewritten_after_the_manifest(corpus, tmp_path):
    cfg = make_cfg(corpus, tmp_path)
    _, enc = run(cfg)
    ds = CachedDataset(cfg.cache_dir)
    entry = ds.entries[0]
    path = ds.cache_dir / entry["file"]
    meta = json.loads(__import__("safetensors").safe_open(str(path), "pt").metadata()["wantune"])
    meta["settings_hash"] = "0" * 16
    from wan_model.loading import save_safetensors_atomic
    save_safetensors_atomic(load_file(str(path)), path, {"wantune": json.dumps(meta)})
    with pytest.raises(StaleCacheError, match="rewritten"):
        ds[ds.index.index(0)]
    shutil.rmtree(cfg.cache_dir)
    with pytest.raises(StaleCacheError, match="tools/cache.py"):
        CachedDataset(cfg.cache_dir)


def test_ranks_encode_whole_batches_of_the_one_rank_order(tmp_path):
    """Each rank takes whole encoder batches of what one rank would encode, so a clip or caption
    is encoded in the same company (same shapes, same kernels) whatever the number of GPUs."""
    d = tmp_path / "clips"
    d.mkdir()
    for i in range(4):
        write_image(d / f"s{i}.png", index=i)
        (d / f"s{i}.txt").write_text(f"still number {i}")
    cfg = make_cfg(d, tmp_path, text_batch_size=3, vae_batch_size=2)
    plan = scan(cfg, progress=False)
    keys = sorted(item.key for item in plan.items)
    one = fake_encoders()
    build_cache(plan, one, False, progress=False)
    one_batches = one.made["text"][0].batches
    assert [len(b) for b in one_batches] == [3, 2]  # 4 captions + the empty one
    cfg.cache_dir = str(tmp_path / "rank1")
    ranks = [fake_encoders(), fake_encoders()]
    build_cache(plan, ranks[1], False, rank=1, world=2, progress=False)
    written = sorted(p.stem for p in (tmp_path / "rank1" / "latents").glob("*.safetensors"))
    assert written == keys[2:]  # the second VAE batch of two, not every other clip
    build_cache(plan, ranks[0], False, rank=0, world=2, progress=False)
    assert ranks[0].made["text"][0].batches + ranks[1].made["text"][0].batches == one_batches


def test_deterministic_vae_kernels_switch_cudnn_and_inductor_and_restore_them():
    """data.vae_deterministic: cuDNN by rule, Inductor without on-device autotuning and torch's
    deterministic algorithms (two fresh processes on an H200 gave latents 0.0156 apart with
    cuDNN alone set, 0.031 with Inductor's flag too); the switches are restored for training
    and previews."""
    import torch._inductor.config as inductor

    from wantune.data.cache import vae_kernels

    def state():
        return (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, inductor.deterministic,
                torch.are_deterministic_algorithms_enabled())

    saved = state()
    try:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, inductor.deterministic = True, False, False
        torch.use_deterministic_algorithms(False)
        with vae_kernels(True):
            assert state() == (False, True, True, True)
            assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one warns
        assert state() == (True, False, False, False)
        with vae_kernels(False):
            assert state() == (True, False, False, False)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, inductor.deterministic = saved[:3]
        torch.use_deterministic_algorithms(saved[3])


_ENCODE_IN_A_FRESH_PROCESS = """
import sys, torch
from wantune.data.cache import vae_kernels
from wan_model.configs import FLAVOURS
from wan_model.random_weights import _build, random_fill
video = (torch.rand(1, 3, 33, 480, 832, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(torch.bfloat16)
vae = random_fill(_build("vae", FLAVOURS["t2v-1.3B"]), 1, torch.bfloat16, "cuda", keep_on_device=True).eval()
vae.use_channels_last().fuse_elementwise()
with vae_kernels(True), torch.no_grad():
    torch.save(vae.encode(video.cuda()).to(torch.bfloat16).cpu(), sys.argv[1])
"""


@pytest.mark.gpu
def test_deterministic_vae_kernels_give_the_same_latents_in_every_process(tmp_path):
    """What a 2-GPU cache relies on to equal a 1-GPU one: two fresh processes (each its own
    Inductor cache, so each compiles and would autotune) encode bit for bit alike."""
    import subprocess
    import sys

    outs = []
    for n in range(2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{n}")}
        subprocess.run([sys.executable, "-c", _ENCODE_IN_A_FRESH_PROCESS, str(tmp_path / f"{n}.pt")],
                       check=True, env=env)
        outs.append(torch.load(tmp_path / f"{n}.pt"))
    assert torch.equal(outs[0], outs[1]), (outs[0].float() - outs[1].float()).abs().max()
