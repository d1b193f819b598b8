"""Aspect buckets on a 16-pixel grid at target areas; no upscaling unless asked."""
import math

from wantune.data.buckets import bucket_sizes, choose_size, nearest_size

AREA = 832 * 480


def test_bucket_sizes_are_on_the_grid_and_fill_the_area():
    sizes = bucket_sizes(AREA, 16, 4.0)
    assert (832, 480) in sizes and (480, 832) in sizes
    for w, h in sizes:
        assert w % 16 == 0 and h % 16 == 0 and w * h <= AREA
        assert (w * (h + 16)) > AREA  # the largest height that fits
        assert max(w / h, h / w) <= 4.0


def test_nearest_aspect_is_chosen():
    assert nearest_size(1920, 1080, AREA) == (832, 480)  # 16:9 -> the Wan 480p bucket
    assert nearest_size(1080, 1920, AREA) == (480, 832)
    w, h = nearest_size(1000, 1000, AREA)  # no exact square fills the area: the nearest does
    assert abs(math.log(w / h)) < 0.03 and w * h <= AREA and {w, h} == {624, 640}
    assert nearest_size(640, 480, AREA) == (720, 544)  # 4:3


def test_no_upscale_uses_the_clip_own_grid_size_and_says_so():
    size, note = choose_size(64, 48, AREA, allow_upscale=False)
    assert size == (64, 48) and "smaller than bucket" in note and "allow_upscale=false" in note
    size, note = choose_size(70, 50, AREA, allow_upscale=False)
    assert size == (64, 48)  # floor to the grid inside the frame
    size, note = choose_size(64, 48, AREA, allow_upscale=True)
    assert size == (720, 544) and note == ""
    size, note = choose_size(1920, 1080, AREA)
    assert size == (832, 480) and note == ""


def test_too_small_and_too_extreme_clips():
    size, note = choose_size(12, 40, AREA)
    assert size is None and "smaller than one 16-pixel grid cell" in note
    size, note = choose_size(2000, 200, AREA, max_aspect=4.0)
    assert size == (768, 192) and "beyond data.max_aspect" in note  # own size, aspect capped


def test_small_area_for_tiny_test_clips():
    assert choose_size(64, 48, 64 * 48) == ((64, 48), "")
    assert choose_size(48, 64, 64 * 48) == ((48, 64), "")
