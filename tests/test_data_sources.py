"""Corpus sources: folder + captions, csv/jsonl manifests, saved HF datasets, trigger words."""
import json

import pytest

from wantune.data.config import DataConfig, SourceConfig
from wantune.data.sources import apply_trigger, detect_kind, list_source
from tests.media import write_image, write_video


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    write_video(d / "a.mp4", 9, 16)
    write_image(d / "b.png")
    (d / "a.txt").write_text("a [trigger] walking\n")
    (d / "notes.md").write_text("not media")
    sub = d / "sub"
    sub.mkdir()
    write_image(sub / "c.jpg")
    (sub / "c.txt").write_text("deep")
    return d


def test_folder_pairs_clips_with_same_name_captions(folder):
    listing = list_source(0, SourceConfig(path=str(folder), trigger_word="sks", num_repeats=3))
    assert listing.kind == "folder" and not listing.error
    by_name = {c.path.name: c for c in listing.clips}
    assert sorted(by_name) == ["a.mp4", "b.png"]  # not recursive by default
    assert by_name["a.mp4"].caption == "a [trigger] walking\n"
    assert by_name["b.png"].caption is None and "no b.txt" in by_name["b.png"].caption_origin
    assert by_name["b.png"].is_image and not by_name["a.mp4"].is_image
    assert all(c.num_repeats == 3 for c in listing.clips)
    assert any("notes.md" in i for i in listing.ignored)
    deep = list_source(0, SourceConfig(path=str(folder), recursive=True))
    assert "c.jpg" in {c.path.name for c in deep.clips}


def test_trigger_word_substituted_or_prepended():
    src = SourceConfig(trigger_word="sks")
    assert apply_trigger("a [trigger] dog ", src) == "a sks dog"
    assert apply_trigger("a dog", src) == "sks, a dog"
    assert apply_trigger("", src) == "sks"
    assert apply_trigger("a [trigger] dog", SourceConfig()) == "a  dog"


def test_csv_and_jsonl_manifests(folder, tmp_path):
    (tmp_path / "metadata.csv").write_text(
        f"file_name,caption\n{folder}/a.mp4,first\n{folder}/b.png,second\nmissing.mp4,third\n")
    listing = list_source(0, SourceConfig(path=str(tmp_path)))
    assert listing.kind == "manifest"
    assert [c.caption for c in listing.clips] == ["first", "second", "third"]
    assert listing.clips[2].path == tmp_path / "missing.mp4"
    jl = tmp_path / "clips.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in [{"video": "x.mp4", "prompt": "p1"},
                                                    {"video": "y.mp4", "prompt": "p2"}]) + "\n")
    listing = list_source(1, SourceConfig(path=str(jl)))
    assert detect_kind(SourceConfig(path=str(jl))) == "manifest"
    assert [(c.path.name, c.caption, c.source_index) for c in listing.clips] == [
        ("x.mp4", "p1", 1), ("y.mp4", "p2", 1)]


def test_manifest_without_known_columns_is_reported_not_raised(tmp_path):
    (tmp_path / "metadata.csv").write_text("clip,words\na.mp4,hi\n")
    listing = list_source(0, SourceConfig(path=str(tmp_path)))
    assert listing.clips == [] and "caption_column" not in listing.error
    assert "no file column" in listing.error and "video_column" in listing.error
    named = list_source(0, SourceConfig(path=str(tmp_path), video_column="clip", caption_column="words"))
    assert [c.caption for c in named.clips] == ["hi"]


def test_missing_source_path_names_the_key(tmp_path):
    listing = list_source(2, SourceConfig(path=str(tmp_path / "nope")))
    assert "data.sources[2].path" in listing.error and listing.clips == []


def test_hf_dataset_with_paths_and_embedded_images(folder, tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"file_name": ["a.mp4", "b.png"], "text": ["one", "two"]})
    ds.save_to_disk(str(tmp_path / "hf"))
    for f in ("a.mp4", "b.png"):
        (tmp_path / "hf" / f).write_bytes((folder / f).read_bytes())
    listing = list_source(0, SourceConfig(path=str(tmp_path / "hf")))
    assert listing.kind == "hf", listing.error
    assert [(c.path.name, c.caption) for c in listing.clips] == [("a.mp4", "one"), ("b.png", "two")]
    assert all(c.path.exists() for c in listing.clips)

    img = datasets.Dataset.from_dict({"image": [str(folder / "b.png")], "caption": ["pic"]})
    img = img.cast_column("image", datasets.Image()).map(lambda r: r)  # embeds the bytes
    img.save_to_disk(str(tmp_path / "hf_img"))
    listing = list_source(0, SourceConfig(path=str(tmp_path / "hf_img")), media_dir=tmp_path / "media")
    clip = listing.clips[0]
    assert not listing.error and clip.caption == "pic" and clip.path.exists()
    assert clip.path.parent == tmp_path / "media" and clip.path.suffix == ".png"  # bytes written out
    assert clip.path.read_bytes() == (folder / "b.png").read_bytes()


def test_config_problems_are_all_reported_at_once():
    cfg = DataConfig(sources=[SourceConfig(path="", kind="zip", num_repeats=0)],
                     frame_buckets=[1, 16, 18], frame_sampling="random", target_fps=0,
                     bucket_step=8, areas=[[832]])
    text = "\n".join(cfg.problems())
    for needle in ("sources[0].path", "kind='zip'", "num_repeats=0", "[16, 18]", "nearest allowed below: [13, 17]",
                   "frame_sampling='random'", "target_fps=0", "bucket_step=8", "areas[0]"):
        assert needle in text, needle
    assert DataConfig(sources=[SourceConfig(path="x")]).problems() == []
