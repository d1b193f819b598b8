"""Tiny generated media for the data tests: clips in several codecs and containers, images,
a corrupt file. Every frame carries its own index (a grey level) so tests can check which
source frames a sampler picked, and a coloured left edge so crops can be checked.
"""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np


def frame_pattern(index: int, width: int, height: int) -> np.ndarray:
    """An RGB frame whose grey level encodes `index` (4 levels apart, robust to lossy codecs)."""
    level = (16 + 4 * index) % 240
    img = np.full((height, width, 3), level, dtype=np.uint8)
    img[:, : max(1, width // 8), 0] = 250  # red strip on the left edge
    return img


def frame_index_of(frame: np.ndarray) -> int:
    """Inverse of `frame_pattern` read from the centre of a decoded (possibly resized) frame."""
    h, w = frame.shape[:2]
    centre = frame[h // 4: 3 * h // 4, w // 3: 2 * w // 3].astype(np.float64).mean()
    return int(round((centre - 16) / 4))


def write_video(path: Path, frames: int, fps: int, width: int = 64, height: int = 48,
                codec: str = "libx264", pix_fmt: str = "yuv420p") -> Path:
    """Encode `frames` pattern frames with PyAV into `path` (container from its suffix)."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast"}
        elif codec == "mjpeg":
            stream.options = {"q:v": "2"}
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_gif(path: Path, frames: int, fps: int = 10, width: int = 64, height: int = 48) -> Path:
    from PIL import Image

    images = [Image.fromarray(frame_pattern(i, width, height)) for i in range(frames)]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return Path(path)


def write_image(path: Path, width: int = 64, height: int = 48, index: int = 3) -> Path:
    from PIL import Image

    Image.fromarray(frame_pattern(index, width, height)).save(path)
    return Path(path)


def write_corrupt(path: Path) -> Path:
    Path(path).write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 4)
    return Path(path)


def make_corpus(folder: Path) -> dict[str, Path]:
    """The standard test folder: one file per case the pipeline must handle.

    - landscape.mp4: h264, 24 fps, 40 frames, 64x48, caption
    - portrait.mkv: vp9 in mkv, 30 fps, 33 frames, 48x64, caption
    - slow.avi: mjpeg, 12 fps, 20 frames, 64x48, caption
    - short.mp4: 3 frames (too short for the 17-frame bucket), caption
    - still.png: an image (one-frame clip), caption
    - nocaption.mp4: 17 frames at 16 fps, no .txt beside it
    - broken.mp4: not a video at all, caption
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "landscape": write_video(folder / "landscape.mp4", 40, 24),
        "portrait": write_video(folder / "portrait.mkv", 33, 30, 48, 64, codec="libvpx-vp9"),
        "slow": write_video(folder / "slow.avi", 20, 12, codec="mjpeg", pix_fmt="yuvj420p"),
        "short": write_video(folder / "short.mp4", 3, 16),
        "still": write_image(folder / "still.png"),
        "nocaption": write_video(folder / "nocaption.mp4", 17, 16),
        "broken": write_corrupt(folder / "broken.mp4"),
    }
    for name, path in files.items():
        if name != "nocaption":
            path.with_suffix(".txt").write_text(f"a {name} clip of [trigger]\n")
    return files


# ---- small stand-in encoders with the interfaces of wan_model's (for fast cache tests) -------

class FakeVAE:
    """encode: [B,3,T,H,W] in [-1,1] -> [B,16,(T-1)//4+1,H/8,W/8]: latent frame t holds the 8x8
    mean of pixel frame 4t, so tests can see which frames were encoded."""

    def __init__(self):
        self.frames_encoded = 0

    def encode(self, video):
        import torch.nn.functional as F

        b, _, t, h, w = video.shape
        assert (t - 1) % 4 == 0 and h % 8 == 0 and w % 8 == 0, video.shape
        self.frames_encoded += b * t
        picked = video[:, :, ::4].float()  # [B,3,T',H,W]
        pooled = F.avg_pool3d(picked, kernel_size=(1, 8, 8))
        return pooled.repeat(1, 6, 1, 1, 1)[:, :16]


class FakeText:
    dim = 8

    def __init__(self):
        self.prompts = []
        self.batches = []

    def encode(self, prompts):
        import torch

        self.prompts += list(prompts)
        self.batches.append(list(prompts))
        out = []
        for p in prompts:
            n = len(p.split()) + 1  # words + EOS, as a real tokenizer cut to length
            g = torch.Generator().manual_seed(sum(map(ord, p)) % 10007)
            out.append(torch.randn(n, self.dim, generator=g).to(torch.bfloat16))
        return out


class FakeCLIP:
    def encode(self, images):
        import torch

        assert images.ndim == 4 and images.shape[1] == 3
        return images.float().mean(dim=(2, 3))[:, None, :].expand(-1, 257, -1).repeat(1, 1, 4)


def fake_encoders(i2v: bool = False, identity: dict | None = None):
    """data.cache.Encoders around fresh fakes; `.loads` counts how often each was loaded."""
    from wantune.data.cache import Encoders

    made = {"vae": [], "text": [], "clip": []}

    def loader(kind, cls):
        def load():
            made[kind].append(cls())
            return made[kind][-1]
        return load

    enc = Encoders(loader("vae", FakeVAE), loader("text", FakeText),
                   loader("clip", FakeCLIP) if i2v else None,
                   identity or {"vae": "fake-vae-1", "text": "fake-t5-1", "clip": "fake-clip-1"})
    enc.made = made
    return enc
