"""The stages around the step planned to the card (train/stages.py): the text encoder's
placement, VAE tiling and the preview decode, each from the measured peaks; a recipe's own
setting is never changed; a planned tiling is what the cache records."""
import pytest

from wantune.train.config import Recipe
from wantune.train.memory import GIB, Budget
from wantune.train.stages import plan_stages, preview_decode, text_encoder_device, vae_tiling

AREA = 832 * 480


def budget(gib: float) -> Budget:
    return Budget(int(gib * GIB), 64 * GIB, f"train.memory_gib={gib:g}")


@pytest.mark.parametrize("gib,where", [(80, "device"), (16, "device"), (15, "stream"), (8, "stream"),
                                       (4.5, "cpu"), (2, "cpu")])
def test_text_encoder_where_its_measured_peak_fits(gib, where):
    # whole: 13.96 GiB measured, +6% margin +0.5 GiB reserve = 15.3; streamed 4.16 -> 4.9
    assert text_encoder_device(int(gib * GIB)) == where


def test_vae_tiles_when_the_untiled_peak_does_not_fit_and_grows_with_the_area():
    assert not vae_tiling(8 * GIB, AREA)
    assert vae_tiling(5 * GIB, AREA)
    assert vae_tiling(8 * GIB, 1280 * 720 * 2)  # 720p... twice over: 2.3x the area of 832x480
    assert not vae_tiling(8 * GIB, 64 * 64)  # a small frame never needs less than the measured peak's room


def test_preview_decode_device_then_tiled_then_host():
    assert preview_decode(12 * GIB, 832, 480, 33) == "device"  # 8.51 GiB measured
    assert preview_decode(8 * GIB, 832, 480, 33) == "tiled"
    assert preview_decode(20 * GIB, 832, 480, 81) == "tiled"  # 2.45x the volume: 20.9 GiB
    assert preview_decode(2 * GIB, 832, 480, 33) == "cpu"


def test_plan_stages_resolves_auto_only_and_counts_the_resident_training_state():
    r = Recipe()
    assert (r.data.text_encoder_device, r.data.low_memory, r.validation.decode) == ("auto", None, "auto")
    lines = []
    out = plan_stages(r, budget(12), AREA, resident=int(6 * GIB), log=lines.append)
    assert (out.data.text_encoder_device, out.data.low_memory, out.validation.decode) == ("stream", False, "tiled")
    assert lines == ["stages for 12.0 GiB (train.memory_gib=12): text encoder stream, VAE untiled, "
                     "previews decoded tiled"]
    assert (r.data.text_encoder_device, r.data.low_memory, r.validation.decode) == ("auto", None, "auto")
    r.data.text_encoder_device, r.data.low_memory, r.validation.decode = "cpu", True, "device"
    lines.clear()
    out = plan_stages(r, budget(80), AREA, log=lines.append)
    assert (out.data.text_encoder_device, out.data.low_memory, out.validation.decode) == ("cpu", True, "device")
    assert lines == []


def test_a_planned_tiling_is_what_the_cache_records(tiny_assets, tmp_path):
    """Training scans the corpus before the stages are planned; the cache it then builds must
    record the planned tiling, or the next run finds it stale and encodes everything again."""
    import copy
    from types import SimpleNamespace

    from tests.runs import DEMO
    from wantune.train.config import load_recipe
    from wantune.train.data_prep import prepare_cache, scan_corpus

    recipe = load_recipe(str(DEMO), [f"model.root={tiny_assets / 'model'}", f"data.cache_dir={tmp_path / 'cache'}",
                                     f"data.sources=[{{path: {tiny_assets / 'clips'}}}]", "demo.enabled=False"])
    printed = []
    acc = SimpleNamespace(print=printed.append, device=__import__("torch").device("cpu"), process_index=0,
                          num_processes=1, is_main_process=True, wait_for_everyone=lambda: None)
    scanned = scan_corpus(recipe, acc)  # scanned with low_memory null, as train() does
    planned = copy.deepcopy(recipe)
    planned.data.low_memory = True  # what plan_stages gives a small card
    for _ in range(2):
        prepare_cache(planned, acc, scanned)
    built = [p for p in printed if str(p).startswith("cache:")]
    assert len(built) == 1 and "building" in built[0], printed


def test_cache_tool_and_trainer_plan_the_corpus_through_one_function(monkeypatch):
    """`plan_corpus_stages` serves both: the trainer's recipe (its train.memory_gib caps the
    budget; memory off leaves every stage to its default) and the cache tool's model+data recipe
    (no train section: the card's free memory)."""
    from types import SimpleNamespace

    import torch

    import wantune.train.memory as memory
    from wantune.data.recipe import DataRecipe
    from wantune.train.stages import plan_corpus_stages

    asked = []

    def fake_budget(device, memory_gib=0.0):
        asked.append(memory_gib)
        return budget(memory_gib or 80)  # the "card" has 80 GiB free

    monkeypatch.setattr(memory, "device_budget", fake_budget)
    cuda = torch.device("cuda")  # a descriptor only: nothing runs on it
    scanned = SimpleNamespace(items=[SimpleNamespace(bucket=SimpleNamespace(width=832, height=480))])
    trainer = Recipe()
    trainer.train.memory_gib = 8.0
    out = plan_corpus_stages(trainer, scanned, cuda, log=lambda *a: None)
    assert (out.data.text_encoder_device, out.data.low_memory) == ("stream", False)
    cache = plan_corpus_stages(DataRecipe(), scanned, cuda, log=lambda *a: None)
    assert (cache.data.text_encoder_device, cache.data.low_memory) == ("device", False)
    assert asked == [8.0, 0.0]
    trainer.train.memory = "off"
    assert plan_corpus_stages(trainer, scanned, cuda, log=lambda *a: None).data.text_encoder_device == "auto"
