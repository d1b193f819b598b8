"""Written files open with the right frame count, size and fps (read back with PyAV / Pillow)."""
import os
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image

from wan_model.media import (frame_durations_ms, to_uint8_frames, write_contact_sheet,
                             write_video)


def _frames(t=9, h=32, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Smooth content (a ramp plus a little noise) so lossy codecs keep it recognisable.
    ramp = torch.linspace(-1, 1, w).view(1, 1, 1, w).expand(3, t, h, w)
    return (ramp + 0.05 * torch.randn(3, t, h, w, generator=g)).clamp(-1, 1)


def _read_av(path):
    import av

    with av.open(str(path)) as c:
        s = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        return frames, s.average_rate, s.codec_context.name, s.codec_context.pix_fmt


@pytest.mark.parametrize("suffix,codec", [(".mp4", "h264"), (".webm", "vp9")])
def test_video_containers(tmp_path, suffix, codec):
    video = _frames()
    path = write_video(video, tmp_path / f"out{suffix}", fps=16)
    frames, rate, name, pix_fmt = _read_av(path)
    assert (len(frames), frames[0].shape, rate, name, pix_fmt) == (
        9, (32, 48, 3), Fraction(16), codec, "yuv420p")
    want = to_uint8_frames(video).astype(float)
    assert np.abs(np.stack(frames).astype(float) - want).mean() < 8  # lossy but faithful
    assert os.listdir(tmp_path) == [f"out{suffix}"]  # no temp file left behind


def test_mp4_fractional_fps_and_odd_size(tmp_path):
    with pytest.warns(UserWarning, match="odd side.*padded to 50x34"):
        path = write_video(_frames(5, 33, 49), tmp_path / "odd.mp4", fps=23.976)
    frames, rate, _, _ = _read_av(path)
    assert len(frames) == 5 and frames[0].shape == (34, 50, 3)
    assert abs(float(rate) - 23.976) < 1e-3


@pytest.mark.parametrize("suffix,unit", [(".webp", 1), (".gif", 10)])
def test_animations(tmp_path, suffix, unit):
    path = write_video(_frames(9), tmp_path / f"anim{suffix}", fps=16)
    with Image.open(path) as im:
        assert im.n_frames == 9 and im.size == (48, 32)
        durations = []
        for k in range(im.n_frames):
            im.seek(k)
            im.load()
            durations.append(im.info["duration"])
    assert durations == frame_durations_ms(9, 16, unit)
    assert all(d % unit == 0 for d in durations)
    assert abs(sum(durations) - 9 * 62.5) <= unit / 2  # 16 fps on average


def test_frame_durations_do_not_drift():
    assert frame_durations_ms(4, 16, 10) == [60, 60, 70, 60]
    assert frame_durations_ms(3, 10, 10) == [100, 100, 100]
    assert sum(frame_durations_ms(81, 16, 1)) == round(81 * 62.5)


def test_png_sequence_folder_and_pattern(tmp_path):
    video = _frames(5)
    write_video(video, tmp_path / "seq")
    names = sorted(os.listdir(tmp_path / "seq"))
    assert names == [f"{i:05d}.png" for i in range(5)]
    exact = to_uint8_frames(video)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "seq" / "00003.png")), exact[3])
    write_video(video[:, :2], tmp_path / "seq")  # a rerun replaces the folder whole
    assert sorted(os.listdir(tmp_path / "seq")) == ["00000.png", "00001.png"]
    write_video(video, tmp_path / "pat" / "f_%03d.png")
    assert sorted(os.listdir(tmp_path / "pat")) == [f"f_{i:03d}.png" for i in range(5)]
    assert sorted(os.listdir(tmp_path)) == ["pat", "seq"]


def test_single_png_and_errors(tmp_path):
    write_video(_frames(1), tmp_path / "still.png")
    assert Image.open(tmp_path / "still.png").size == (48, 32)
    with pytest.raises(ValueError, match="holds one frame but there are 5"):
        write_video(_frames(5), tmp_path / "many.png")
    with pytest.raises(ValueError, match="unknown output format '.avi'"):
        write_video(_frames(5), tmp_path / "x.avi")
    with pytest.raises(ValueError, match=r"must be \[3,T,H,W\]"):
        write_video(torch.zeros(5, 3, 8, 8), tmp_path / "x.mp4")


def test_uint8_input_and_value_mapping():
    arr = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    assert np.array_equal(to_uint8_frames(arr), arr)
    assert np.array_equal(to_uint8_frames(torch.from_numpy(arr)), arr)
    x = torch.tensor([-1.5, -1.0, 0.0, 1.0]).view(1, 1, 1, 4).expand(3, 1, 1, 4)
    assert to_uint8_frames(x)[0, 0, :, 0].tolist() == [0, 0, 128, 255]


def test_contact_sheet(tmp_path):
    video = _frames(9)
    write_contact_sheet(video, tmp_path / "sheet.png", n=4)
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape == (32, 4 * 48, 3)
    exact = to_uint8_frames(video)
    # Frames 0, 3, 5, 8: evenly spaced, first and last included.
    for k, idx in enumerate([0, 3, 5, 8]):
        assert np.array_equal(sheet[:, k * 48:(k + 1) * 48], exact[idx])
