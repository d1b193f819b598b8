"""Scanning a corpus and the dataset report: every unusable file has its reason, buckets and
frame rates are listed, inspect_dataset fails only when nothing usable remains."""
import shutil

import pytest

from wantune.data.config import DataConfig, SourceConfig
from wantune.data.plan import scan
from wantune.data.report import bucket_table, format_report
from tests.media import make_corpus, write_gif, write_video
from wantune.tools import inspect_dataset


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    make_corpus(d)
    write_gif(d / "anim.gif", 9, fps=10)
    (d / "anim.txt").write_text("")  # an empty caption
    shutil.copy(d / "landscape.mp4", d / "zcopy.mp4")  # a duplicate, sorted after the original
    (d / "zcopy.txt").write_text("a copy")
    return d


def config(corpus, **kw) -> DataConfig:
    kw.setdefault("sources", [SourceConfig(path=str(corpus), trigger_word="sks", num_repeats=2)])
    return DataConfig(areas=[[64, 48]], frame_buckets=[1, 5, 17], num_workers=2, **kw)


def records_by_name(plan):
    return {r.clip.path.name: r for r in plan.records}


def test_scan_gives_a_reason_for_every_unusable_file(corpus):
    plan = scan(config(corpus), progress=False)
    recs = records_by_name(plan)
    assert "unreadable or corrupt" in recs["broken.mp4"].unusable
    assert "too short: 3 frames" in recs["short.mp4"].unusable and "smallest video frame bucket is 5" in recs["short.mp4"].unusable
    assert "duplicate of" in recs["zcopy.mp4"].unusable and "landscape.mp4" in recs["zcopy.mp4"].unusable
    usable = {n for n, r in recs.items() if not r.unusable}
    assert usable == {"landscape.mp4", "portrait.mkv", "slow.avi", "still.png", "nocaption.mp4", "anim.gif"}
    assert any("no caption" in w for w in recs["nocaption.mp4"].warnings)
    assert any("empty caption" in w for w in recs["anim.gif"].warnings)
    assert recs["nocaption.mp4"].caption == "sks" and recs["landscape.mp4"].caption == "a landscape clip of sks"
    # the bucket of every clip comes from its decoded frames
    buckets = {recs[plan.records[i.record].clip.path.name].clip.path.name: i.bucket.name for i in plan.items}
    assert buckets == {"landscape.mp4": "64x48x17", "portrait.mkv": "48x64x17", "slow.avi": "64x48x17",
                       "still.png": "64x48x1", "nocaption.mp4": "64x48x17", "anim.gif": "64x48x5"}


def test_report_lists_sources_reasons_rates_and_buckets(corpus):
    plan = scan(config(corpus), progress=False)
    text = format_report(plan)
    for needle in ("9 files found, 6 usable, num_repeats 2, trigger 'sks'", "unusable (3):",
                   "broken.mp4: unreadable or corrupt", "short.mp4: too short",
                   "zcopy.mp4: duplicate of", "nocaption.mp4: no caption",
                   "24 fps: 1 clip (resampled to 16 fps, frames dropped)",
                   "12 fps: 1 clip (resampled to 16 fps, frames repeated)", "16 fps: 1 clip (native)",
                   "48x64: 1 clip", "64x48x17", "total: 9 files, 6 usable, 3 unusable; 6 samples (12 per epoch"):
        assert needle in text, (needle, text)
    assert bucket_table(plan)[:2] == [("48x64x17", 1, 2), ("64x48x17", 3, 6)]


def test_source_timing_kept_is_reported(corpus):
    plan = scan(config(corpus, target_fps=None), progress=False)
    assert "24 fps: 1 clip (kept at source timing" in format_report(plan)
    recs = records_by_name(plan)
    item = next(plan.items[i] for i in recs["landscape.mp4"].items)
    assert item.frames == list(range(17))  # head window, no resampling


def test_sampling_modes_make_windows(corpus):
    plan = scan(config(corpus, frame_sampling="chunk"), progress=False)
    recs = records_by_name(plan)
    starts = [plan.items[i].start for i in recs["slow.avi"].items]  # 26 frames at 16 fps
    assert starts == [0]
    plan = scan(config(corpus, frame_sampling="slide", frame_stride=4), progress=False)
    landscape = [plan.items[i] for i in records_by_name(plan)["landscape.mp4"].items]  # 27 frames
    assert [i.start for i in landscape] == [0, 4, 8]
    assert landscape[1].frames[:3] == [6, 8, 9]  # target frames 4,5,6 at 24 -> 16 fps
    assert len({i.key for i in plan.items}) == len(plan.items)
    plan = scan(config(corpus, frame_sampling="uniform", windows_per_clip=2), progress=False)
    assert [plan.items[i].start for i in records_by_name(plan)["landscape.mp4"].items] == [0, 10]


def test_require_captions_and_multiple_areas(corpus):
    plan = scan(config(corpus, require_captions=True), progress=False)
    assert "data.require_captions=true" in records_by_name(plan)["nocaption.mp4"].unusable
    cfg = config(corpus)
    cfg.areas = [[64, 48], [32, 32]]
    plan = scan(cfg, progress=False)
    names = sorted(plan.items[i].bucket.name for i in records_by_name(plan)["landscape.mp4"].items)
    assert names == ["32x32x17", "64x48x17"]  # one sample per target area


def test_broken_manifest_is_reported(tmp_path, corpus):
    (tmp_path / "metadata.jsonl").write_text("{not json\n")
    cfg = config(corpus, sources=[SourceConfig(path=str(tmp_path)), SourceConfig(path=str(corpus))])
    plan = scan(cfg, progress=False)
    text = format_report(plan)
    assert "ERROR data.sources[0]" in text and "line 1 is not JSON" in text and plan.items


def write_recipe(path, source, cache):
    path.write_text(f"model: {{root: {path.parent}}}\n"
                    f"data:\n  sources: [{{path: {source}}}]\n  areas: [[64, 48]]\n"
                    f"  frame_buckets: [1, 5, 17]\n  cache_dir: {cache}\n")
    return path


def test_inspect_dataset_exit_status(corpus, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "r.yaml", corpus, tmp_path / "cache")
    assert inspect_dataset.main([str(recipe), "--no-progress"]) == 0
    assert "Dataset report" in capsys.readouterr().out
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(corpus / "broken.mp4", bad / "broken.mp4")
    write_video(bad / "tiny.mp4", 3, 16)
    recipe = write_recipe(tmp_path / "bad.yaml", bad, tmp_path / "cache")
    assert inspect_dataset.main([str(recipe), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "NOTHING USABLE" in out and "tiny.mp4: too short" in out
    assert inspect_dataset.main([str(recipe), "data.frame_buckets=[1,6]"]) == 2
    assert "4k+1" in capsys.readouterr().err


def test_fallback_recipe_loader_reads_model_and_data_only(corpus, tmp_path):
    from wantune.data.recipe import RecipeError, load_data_recipe

    recipe = write_recipe(tmp_path / "r.yaml", corpus, tmp_path / "cache")
    recipe.write_text(recipe.read_text() + "train: {whatever: 1}\n")
    r = load_data_recipe(str(recipe), ["data.target_fps=null", "train.lr=3"])
    assert r.data.target_fps is None and r.data.areas == [[64, 48]] and r.model.root == str(tmp_path)
    with pytest.raises(RecipeError, match="frame_bucket.*Did you mean"):
        load_data_recipe(str(recipe), ["data.frame_bucket=[1]"])
    with pytest.raises(RecipeError, match=r"2 problem\(s\)"):
        load_data_recipe(str(recipe), ["data.frame_buckets=[2]", "data.frame_sampling=x"])
