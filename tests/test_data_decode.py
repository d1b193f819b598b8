"""Decoding: probing from decoded frames (decord, PyAV fallback, PIL), frame sampling modes,
fps resampling, resize + centre crop."""
import numpy as np
import pytest

from wantune.data.decode import (MediaError, pick_frame_bucket, probe, read_frames, resampled_length,
                         resize_crop, source_indices, window_starts)
from tests.media import frame_index_of, make_corpus, write_gif


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("decode")
    files = make_corpus(d)
    files["gif"] = write_gif(d / "anim.gif", 9, fps=10)
    return files


@pytest.mark.parametrize("name,frames,fps,size,backend", [
    ("landscape", 40, 24, (64, 48), "decord"),
    ("portrait", 33, 30, (48, 64), "pyav"),  # vp9 in mkv: decord fails, PyAV reads it
    ("slow", 20, 12, (64, 48), "decord"),  # mjpeg avi
    ("short", 3, 16, (64, 48), "decord"),
    ("gif", 9, 10, (64, 48), "pyav"),
    ("still", 1, None, (64, 48), "pil"),
])
def test_probe_reads_decoded_frames(corpus, name, frames, fps, size, backend):
    info = probe(corpus[name])
    assert (info.frames, info.fps, (info.width, info.height), info.backend) == (frames, fps, size, backend)


def test_probe_corrupt_and_missing_give_reasons(corpus, tmp_path):
    with pytest.raises(MediaError, match="unreadable or corrupt.*decord.*pyav"):
        probe(corpus["broken"])
    with pytest.raises(MediaError, match="file not found"):
        probe(tmp_path / "gone.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(MediaError, match="empty file"):
        probe(tmp_path / "empty.mp4")


@pytest.mark.parametrize("name", ["landscape", "portrait", "slow", "gif"])
def test_read_frames_returns_the_requested_frames(corpus, name):
    info = probe(corpus[name])
    wanted = [0, 2, 2, 5, info.frames - 1]
    frames = read_frames(corpus[name], wanted, info.backend)
    assert frames.shape == (5, info.height, info.width, 3) and frames.dtype == np.uint8
    assert [frame_index_of(f) for f in frames] == wanted


def test_window_starts_for_every_mode():
    assert window_starts(40, 17, "head") == [0]
    assert window_starts(40, 17, "uniform", windows=3) == [0, 12, 23]
    assert window_starts(40, 17, "uniform", windows=1) == [0]
    assert window_starts(40, 17, "chunk") == [0, 17]
    assert window_starts(40, 17, "chunk", windows=1) == [0]
    assert window_starts(40, 17, "slide", stride=8) == [0, 8, 16]
    assert window_starts(40, 17, "slide", windows=2, stride=5) == [0, 5]
    assert window_starts(16, 17, "head") == []  # too short for the window


def test_fps_resampling_is_nearest_in_time():
    # 24 fps -> 16: every 1.5 source frames; 40 source frames span 39/24 s -> 27 target frames.
    assert resampled_length(40, 24, 16) == 27
    assert source_indices(0, 5, 40, 24, 16) == [0, 2, 3, 5, 6]
    # 12 fps -> 16: frames repeat; 20 frames span 19/12 s -> 26 target frames.
    assert resampled_length(20, 12, 16) == 26
    assert source_indices(0, 6, 20, 12, 16) == [0, 1, 2, 2, 3, 4]
    assert source_indices(3, 4, 40, 24, None) == [3, 4, 5, 6]  # target_fps null: source timing
    assert resampled_length(40, 24, None) == 40
    assert max(source_indices(0, 27, 40, 24, 16)) <= 39


def test_frame_bucket_choice():
    buckets = [1, 17, 33, 81]
    assert pick_frame_bucket(40, False, buckets) == 33
    assert pick_frame_bucket(81, False, buckets) == 81
    assert pick_frame_bucket(16, False, buckets) is None  # too short: 1 is for images only
    assert pick_frame_bucket(1, True, buckets) == 1
    assert pick_frame_bucket(1, True, [17, 33]) is None
    assert pick_frame_bucket(40, False, [1]) == 1  # image-only training takes one frame


def test_resize_crop_covers_then_crops_the_centre():
    frames = np.zeros((2, 64, 48, 3), np.uint8)  # portrait 48x64
    frames[:, :, :24] = 200  # left half bright
    out = resize_crop(frames, 32, 32)
    assert out.shape == (3, 2, 32, 32) and out.dtype.is_floating_point is False
    # Width scaled 48 -> 32 (cover), height 64 -> 43 then centre-cropped: left half still bright.
    assert out[:, :, :, :15].float().mean() > 190 and out[:, :, :, 17:].float().mean() < 10
    wide = np.zeros((1, 48, 64, 3), np.uint8)
    wide[:, :, :8] = 255  # a strip on the far left is cut off by a square centre crop
    assert resize_crop(wide, 48, 48)[:, :, :, :2].float().mean() < 5
    same = resize_crop(wide, 64, 48)
    assert np.array_equal(same.permute(1, 2, 3, 0).numpy(), wide)  # exact size: untouched
