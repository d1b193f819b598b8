"""The bad-input matrix of docs/errors.md, one test per row (the row ids are in the names).

Files a corpus holds that cannot be trained are reported with the reason and skipped; a wrong
recipe, model, checkpoint, cache or LoRA stops with a non-zero exit naming the file or key and
the fix. The table in docs/errors.md is checked against these tests (every row has one).
"""
import re
import shutil
from pathlib import Path

import pytest
import torch

from wantune.data.config import DataConfig, SourceConfig
from wantune.data.plan import scan
from wantune.data.report import format_report
from tests.media import write_corrupt, write_image, write_video
from tests.runs import ROOT, train_argv
from wan_model.lora import LoraError, LoraWeights, Lora, apply_loras, merge_into_state_dict, read_lora

FRAMES = [1, 5, 17]


def plan_of(folder, **kw):
    src = kw.pop("source", {})
    kw = {"frame_buckets": FRAMES, "num_workers": 1, **kw}
    cfg = DataConfig(sources=[SourceConfig(path=str(folder), **src)], areas=[[64, 48]], **kw)
    return scan(cfg, progress=False)


def record(plan, name):
    return next(r for r in plan.records if r.clip.path.name == name)


def captioned(path: Path, caption: str = "a clip") -> Path:
    path.with_suffix(".txt").write_text(caption)
    return path


# ---- the corpus: reported and skipped -----------------------------------------------------------

def test_d01_zero_length_file(tmp_path):
    captioned(tmp_path / "empty.mp4").write_bytes(b"")
    captioned(write_video(tmp_path / "good.mp4", 17, 16))
    plan = plan_of(tmp_path)
    assert record(plan, "empty.mp4").unusable == "empty file (0 bytes)"
    assert "empty.mp4: empty file (0 bytes)" in format_report(plan) and len(plan.items) == 1


def test_d02_truncated_video(tmp_path):
    data = write_video(tmp_path / "full.mp4", 40, 16).read_bytes()
    captioned(tmp_path / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    assert record(plan_of(tmp_path), "cut.mp4").unusable.startswith("unreadable or corrupt (decord: ")


def test_d03_corrupt_file(tmp_path):
    captioned(write_corrupt(tmp_path / "noise.mp4"))
    assert "unreadable or corrupt" in record(plan_of(tmp_path), "noise.mp4").unusable


def test_d04_no_video_stream_or_unknown_type(tmp_path):
    import av

    with av.open(str(tmp_path / "sound.mp4"), "w") as out:  # audio only, under a video suffix
        stream = out.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(torch.zeros(1, 1024).numpy(), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in list(stream.encode(frame)) + list(stream.encode()):
            out.mux(packet)
    captioned(tmp_path / "sound.mp4")
    (tmp_path / "notes.xyz").write_text("not media")
    plan = plan_of(tmp_path)
    assert "no video stream (the file holds audio)" in record(plan, "sound.mp4").unusable
    assert "ignored files (1): notes.xyz (unknown suffix .xyz)" in format_report(plan)


def test_d05_one_frame_clip(tmp_path):
    captioned(write_video(tmp_path / "one.mp4", 1, 16))
    assert "a single frame, but data.frame_buckets=[5, 17] has no 1: add 1" in \
        record(plan_of(tmp_path, frame_buckets=[5, 17]), "one.mp4").unusable
    plan = plan_of(tmp_path)  # with 1 in frame_buckets it trains as an image
    assert [i.bucket.name for i in plan.items] == ["64x48x1"]


def test_d06_too_short_clip(tmp_path):
    captioned(write_video(tmp_path / "short.mp4", 3, 16))
    assert "too short: 3 frames" in record(plan_of(tmp_path), "short.mp4").unusable


def test_d07_very_long_clip(tmp_path):
    captioned(write_video(tmp_path / "long.mp4", 300, 16, 32, 32))
    plan = plan_of(tmp_path)
    assert [(i.start, len(i.frames)) for i in plan.items] == [(0, 17)]  # head: the first window
    assert "video length: 300..300 source frames" in format_report(plan)
    plan = plan_of(tmp_path, frame_sampling="chunk", windows_per_clip=5)
    assert [i.start for i in plan.items] == [0, 17, 34, 51, 68]


def test_d08_huge_resolution(tmp_path):
    captioned(write_image(tmp_path / "big.png", 4096, 2304))
    plan = plan_of(tmp_path)
    (item,) = plan.items
    assert item.bucket.width * item.bucket.height <= 64 * 48 and item.bucket.width > item.bucket.height
    assert "4096x2304: 1 clip" in format_report(plan)


def test_d09_portrait_odd_tiny_and_extreme_sizes(tmp_path):
    captioned(write_image(tmp_path / "portrait.png", 47, 83))
    captioned(write_image(tmp_path / "tiny.png", 10, 10))
    captioned(write_image(tmp_path / "strip.png", 192, 32))
    plan = plan_of(tmp_path)
    portrait = record(plan, "portrait.png")
    bucket = plan.items[portrait.items[0]].bucket
    assert bucket.height > bucket.width and bucket.width % 16 == 0 and bucket.height % 16 == 0
    assert "smaller than one 16-pixel grid cell; set data.allow_upscale=true" in record(plan, "tiny.png").unusable
    assert any("aspect 6.00 beyond data.max_aspect=4.0, centre-cropped" in w
               for w in record(plan, "strip.png").warnings)


def test_d10_caption_not_utf8(tmp_path):
    write_video(tmp_path / "latin.mp4", 17, 16)
    (tmp_path / "latin.txt").write_bytes("un caf\u00e9 noir".encode("latin-1"))
    captioned(write_video(tmp_path / "bom.mp4", 21, 16))
    (tmp_path / "bom.txt").write_bytes("\ufeffa clip with a BOM".encode("utf-8"))
    plan = plan_of(tmp_path)
    assert record(plan, "latin.mp4").unusable == ("caption latin.txt is not UTF-8 text (byte 0xe9 at "
                                                  "offset 6): re-save it as UTF-8")
    assert record(plan, "bom.mp4").caption == "a clip with a BOM"


def test_d11_empty_or_missing_caption(tmp_path):
    write_video(tmp_path / "none.mp4", 17, 16)
    captioned(write_video(tmp_path / "blank.mp4", 21, 16), "   \n")  # other content: not a duplicate
    plan = plan_of(tmp_path, source={"trigger_word": "sks"})
    assert any("no caption (no none.txt): trains with caption 'sks'" in w for w in record(plan, "none.mp4").warnings)
    assert any("empty caption (blank.txt)" in w for w in record(plan, "blank.mp4").warnings)
    plan = plan_of(tmp_path, require_captions=True)
    assert "data.require_captions=true" in record(plan, "none.mp4").unusable


def manifest(folder: Path, rows: list[tuple[str, str]]) -> Path:
    lines = ["file_name,caption"] + [f"{f},{c}" for f, c in rows]
    (folder / "metadata.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_d12_manifest_rows_for_missing_or_empty_paths(tmp_path):
    write_video(tmp_path / "here.mp4", 17, 16)
    plan = plan_of(manifest(tmp_path, [("here.mp4", "fine"), ("gone.mp4", "lost"), ("", "no path")]))
    assert record(plan, "gone.mp4").unusable == "file not found"
    assert any(r.unusable == "metadata.csv row 3: empty 'file_name'" for r in plan.records)
    assert len(plan.items) == 1


def test_d13_manifest_paths_outside_the_corpus(tmp_path):
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    write_video(elsewhere / "far.mp4", 17, 16)
    write_video(corpus / "sub" / "near.mp4", 17, 16)
    rows = [("../elsewhere/far.mp4", "climbs out"), (str(elsewhere / "far.mp4"), "absolute"),
            ("sub/near.mp4", "inside"), (str(corpus / "sub" / "near.mp4"), "absolute inside")]
    plan = plan_of(manifest(corpus, rows), skip_duplicates=False)
    reasons = [r.unusable for r in plan.records]
    assert "points outside the manifest's folder" in reasons[0] and "allow_outside=true" in reasons[0]
    assert f"(to {elsewhere / 'far.mp4'})" in reasons[0] and "points outside" in reasons[1]
    assert reasons[2:] == ["", ""]
    plan = plan_of(corpus, skip_duplicates=False, source={"allow_outside": True})
    assert [r.unusable for r in plan.records] == ["", "", "", ""]


def test_d14_duplicate_content_and_duplicate_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    captioned(write_video(a / "clip.mp4", 17, 16))
    captioned(write_video(a / "clip.mov", 21, 16))  # same stem, another file: shares clip.txt
    shutil.copy(a / "clip.mp4", a / "copy.mp4")
    captioned(a / "copy.mp4")
    captioned(write_video(b / "clip.mp4", 25, 16))  # same name in another source
    cfg = DataConfig(sources=[SourceConfig(path=str(a)), SourceConfig(path=str(b))], areas=[[64, 48]],
                     frame_buckets=FRAMES, num_workers=1)
    plan = scan(cfg, progress=False)
    assert record(plan, "copy.mp4").unusable.startswith(f"duplicate of {a / 'clip.mp4'} (same content")
    assert len(plan.items) == 3 and len({i.key for i in plan.items}) == 3


def test_d15_unreadable_manifest_or_missing_source(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.csv").write_bytes("file_name,caption\nx.mp4,caf\u00e9\n".encode("latin-1"))
    plan = plan_of(bad)
    assert "is not UTF-8 text (invalid continuation byte at byte 27): re-save it as UTF-8" in format_report(plan)
    plan = plan_of(tmp_path / "nowhere")
    assert "data.sources[0].path=" in format_report(plan) and "does not exist: fix the path" in format_report(plan)
    assert "NOTHING USABLE" in format_report(plan)


# ---- fatal: a non-zero exit naming the key or file and the fix ----------------------------------

def run_train(forkserver, tiny_assets, tmp_path, env=None, **extra):
    return forkserver.run("train", train_argv(tiny_assets, tmp_path / "run", tmp_path / "cache", **extra),
                          tmp_path, env)


@pytest.mark.parametrize("override,rc,needles", [
    ({"train.max_stepz": 3}, 2, ["unknown key 'train.max_stepz'", "Did you mean"]),
    ({"train.max_steps": "many"}, 2, ["wrong type for 'train.max_steps'"]),
    ({"train.max_steps": 0, "validation.frames": 30}, 2, ["2 problem(s)", "train.max_steps=0: must be >= 1",
                                                         "validation.frames=30: must be 4k+1 (nearest: 29)"]),
    ({"data.frame_buckets": "[1,6]"}, 2, ["data.frame_buckets has [6]: every count must be 4k+1"]),
    ({"lora.targets": "[self_attn.qq]"}, 2, ["found before any work", "['self_attn.qq'] match no Linear",
                                             "valid names are"]),
])
def test_r01_recipe_typos_types_and_ranges(forkserver, tiny_assets, tmp_path, override, rc, needles):
    r = run_train(forkserver, tiny_assets, tmp_path, **override)
    assert r.returncode == rc, r.stderr[-2000:]
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr[-2000:])


def test_r02_recipe_file_missing_or_not_yaml(forkserver, tmp_path):
    r = forkserver.run("train", [str(tmp_path / "nope.yaml")], tmp_path)
    assert r.returncode == 2 and "nope.yaml: no such recipe file" in r.stderr
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    r = forkserver.run("train", [str(tmp_path / "bad.yaml")], tmp_path)
    assert r.returncode == 2 and "bad.yaml: not valid YAML" in r.stderr


@pytest.mark.parametrize("transformer,flavour,needle", [
    ("Wan2.1_VAE.pth", "", "this file holds the Wan VAE (Wan2.1_VAE.pth), not the Wan DiT (transformer); "
                           "point model.transformer at the DiT weights"),
    ("", "t2v-1.3B", "asked for flavour 't2v-1.3B' but the weights are tiny-t2v; fix model.flavour or the path"),
    ("missing_folder", "", "missing_folder does not exist; fix the path"),
])
def test_w01_wrong_component_flavour_or_path(forkserver, tiny_assets, tmp_path, transformer, flavour, needle):
    extra = {"model.flavour": flavour} if flavour else {}
    if transformer:
        extra["model.transformer"] = tiny_assets / "model" / transformer
    r = run_train(forkserver, tiny_assets, tmp_path, **extra)
    assert r.returncode == 2 and "found before any work" in r.stderr and needle in r.stderr, r.stderr[-3000:]


def test_w02_truncated_weights(tmp_path):
    import wan_model
    from wan_model.loading import WeightsError
    from wan_model.random_weights import write_random_checkpoint

    model = tmp_path / "model"
    write_random_checkpoint(model, "tiny-t2v", log=lambda *_: None)
    for name in ("diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth"):
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=r"diffusion_pytorch_model.safetensors: not a readable safetensors file "
                                           r"\(.*\); it is probably truncated or corrupt .*: download it again"):
        wan_model.load_transformer(model)
    with pytest.raises(WeightsError, match=r"Wan2.1_VAE.pth: cannot be loaded as a weights-only PyTorch file.*truncated or corrupt"):
        wan_model.load_vae(model / "Wan2.1_VAE.pth")


class Payload:
    """Unpickling this runs code (it would write a file): a hostile .pth/.pt."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('code ran')",))


def test_w03_pth_holding_pickled_code_is_refused(tmp_path):
    import wan_model
    from wan_model.loading import WeightsError

    ran = tmp_path / "ran"
    torch.save({"encoder.conv1.weight": torch.zeros(1), "x": Payload(ran)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="Unsupported global: GLOBAL exec.*refuses to unpickle"):
        wan_model.load_vae(tmp_path / "evil.pth")
    torch.save({"diffusion_model.blocks.0.ffn.0.lora_A.weight": Payload(ran)}, tmp_path / "evil_lora.pt")
    with pytest.raises(LoraError, match="evil_lora.pt: cannot be loaded.*GLOBAL exec.*refuses to unpickle"):
        read_lora(tmp_path / "evil_lora.pt")
    assert not ran.exists()


@pytest.fixture(scope="module")
def trained(forkserver, tiny_assets, tmp_path_factory):
    """A finished 2-step run (rank 8) whose checkpoint the checkpoint rows damage in copies."""
    d = tmp_path_factory.mktemp("bad_ckpt")
    r = forkserver.run("train", train_argv(tiny_assets, d / "run", d / "cache", **{"train.max_steps": 2}), d)
    assert r.returncode == 0, r.stderr[-3000:]
    return d


def resume_copy(trained, tmp_path, damage) -> Path:
    shutil.copytree(trained / "run", tmp_path / "run")
    damage(tmp_path / "run" / "step-2")
    return tmp_path / "run" / "step-2"


def test_c01_truncated_checkpoint(forkserver, tiny_assets, trained, tmp_path):
    def cut(step):
        data = (step / "state.pt").read_bytes()
        (step / "state.pt").write_bytes(data[: len(data) // 3])

    step = resume_copy(trained, tmp_path, cut)
    r = forkserver.run("train", train_argv(tiny_assets, tmp_path / "run", trained / "cache",
                                           **{"checkpoint.resume": "latest", "train.max_steps": 4}), tmp_path)
    assert r.returncode == 1
    assert f"{step}: this checkpoint cannot be read (" in r.stderr and "Resume from an earlier step-N/" in r.stderr


def test_c02_checkpoint_holding_pickled_code(forkserver, tiny_assets, trained, tmp_path):
    ran = tmp_path / "ran"
    resume_copy(trained, tmp_path, lambda step: torch.save({"optimizer": Payload(ran)}, step / "state.pt"))
    r = forkserver.run("train", train_argv(tiny_assets, tmp_path / "run", trained / "cache",
                                           **{"checkpoint.resume": "latest", "train.max_steps": 4}), tmp_path)
    assert r.returncode == 1 and "Unsupported global: GLOBAL exec" in r.stderr
    assert not ran.exists()


def test_c03_checkpoint_of_other_settings(forkserver, tiny_assets, trained, tmp_path):
    step = resume_copy(trained, tmp_path, lambda step: None)
    r = forkserver.run("train", train_argv(tiny_assets, tmp_path / "run", trained / "cache",
                                           **{"checkpoint.resume": "latest", "train.max_steps": 4,
                                              "lora.rank": 16}), tmp_path)
    assert r.returncode == 1
    assert re.search(rf"{step}: 40 trained tensors have other shapes than this recipe makes \(e\.g\. "
                     r".*checkpoint \(8, 64\), recipe \(16, 64\); a LoRA rank change", r.stderr), r.stderr[-2000:]
    r = forkserver.run("train", train_argv(tiny_assets, tmp_path / "run", trained / "cache",
                                           **{"checkpoint.resume": "latest", "train.max_steps": 4,
                                              "data.batch_size": 1}), tmp_path)
    assert r.returncode == 1 and "the saved data position belongs to another dataset, batch size" in r.stderr
    r = forkserver.run("train", train_argv(tiny_assets, tmp_path / "run", trained / "cache",
                                           **{"checkpoint.resume": str(tmp_path)}), tmp_path)
    assert r.returncode == 2 and "is not a complete step-N/ checkpoint (no trainer.json)" in r.stderr


def test_k01_nan_or_inf_in_a_cache_file(forkserver, tiny_assets, trained, tmp_path):
    from safetensors import safe_open

    from wan_model.atomic import save_safetensors_atomic

    cache = tmp_path / "cache"
    shutil.copytree(trained / "cache", cache)
    victim = sorted((cache / "latents").glob("*.safetensors"))[0]
    with safe_open(str(victim), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors["latents"].view(-1)[7] = float("nan")
    save_safetensors_atomic(tensors, victim, meta)
    r = run_train(forkserver, tiny_assets, tmp_path, **{"data.cache_dir": cache})
    assert r.returncode == 1
    assert f"{victim}: the cached latents hold NaN or inf values" in r.stderr
    assert "delete the file and re-run tools/cache.py" in r.stderr


def test_k02_encoder_output_nan_is_reported_and_skipped(tmp_path):
    from wantune.data.cache import build_cache
    from tests.media import FakeVAE, fake_encoders

    for i in range(3):  # three lengths: three different files
        captioned(write_video(tmp_path / "clips" / f"c{i}.mp4", 17 + 4 * i, 16), f"clip {i}")
    plan = plan_of(tmp_path / "clips", cache_dir=str(tmp_path / "cache"), num_workers=0)
    enc = fake_encoders()
    real = FakeVAE.encode

    def overflow(self, video):
        out = real(self, video)
        return out * float("inf") if self.frames_encoded == 17 else out  # the first clip overflows

    FakeVAE.encode = overflow
    try:
        run = build_cache(plan, enc, False, progress=False)
    finally:
        FakeVAE.encode = real
    assert len(run.failures) == 1 and "the encoders gave NaN/inf ['latents']" in run.failures[0]
    assert "try data.vae_dtype=float32" in run.failures[0] and run.items_encoded == 2
    assert len(list((tmp_path / "cache" / "latents").glob("*.safetensors"))) == 2


def tiny_lora(rank=4, width=64, modules=("blocks.0.self_attn.q",)) -> Lora:
    return Lora({m: LoraWeights(torch.ones(rank, width), torch.ones(width, rank), float(rank)) for m in modules})


def test_l01_lora_for_another_base_model():
    from wan_model.configs import FLAVOURS
    from wan_model.transformer import WanModel

    model = WanModel(FLAVOURS["tiny-t2v"].dit)
    sd = model.state_dict()
    big = tiny_lora(width=1536)  # made for the 1.3B model
    with pytest.raises(LoraError, match=r"makes a \(1536, 1536\) change but the weight is \(64, 64\): "
                                        "the LoRA was trained for another model size"):
        merge_into_state_dict(sd, [(big, 1.0)])
    with pytest.raises(LoraError, match="trained for another model size"):
        apply_loras(model, [(big, 1.0)], mode="runtime")
    i2v = tiny_lora(modules=("blocks.0.cross_attn.k_img",))
    with pytest.raises(LoraError, match="have no weight in .*an I2V LoRA on a T2V model"):
        merge_into_state_dict(sd, [(i2v, 1.0)])


def test_l02_lora_with_a_rank_mismatch():
    sd = {"diffusion_model.blocks.0.ffn.0.lora_A.weight": torch.zeros(4, 64),
          "diffusion_model.blocks.0.ffn.0.lora_B.weight": torch.zeros(128, 8)}
    with pytest.raises(LoraError, match=r"'blocks.0.ffn.0': down \(4, 64\) and up \(128, 8\) do not form a LoRA"):
        read_lora(sd)


def test_docs_errors_lists_every_row_and_every_row_has_a_test():
    text = (ROOT / "docs" / "errors.md").read_text()
    rows = re.findall(r"^\| \*\*([a-z]\d\d)\*\* \|", text, flags=re.M)
    tests = {name.split("_")[1] for name in globals() if re.match(r"test_[a-z]\d\d_", name)}
    assert len(rows) == len(set(rows)) and set(rows) == tests, (sorted(rows), sorted(tests))
