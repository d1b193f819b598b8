"""Reading media: probe a file from its decoded frames, pick frames (sampling modes and fps
resampling), resize and centre-crop to a bucket.

decord is tried first; PyAV reads what decord cannot (vp9 in mkv, gif, odd containers), PIL
reads images. Frame counts and sizes always come from decoded frames, never from container
metadata alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .sources import IMAGE_EXTS


class MediaError(Exception):
    """A file that cannot be used; the message is the reason shown in the report."""


@dataclass(frozen=True)
class MediaInfo:
    frames: int  # decodable frames
    fps: float | None  # None for images and files without a usable rate
    width: int  # of the decoded frames
    height: int
    backend: str  # "decord", "pyav" or "pil"


def probe(path: str | Path) -> MediaInfo:
    path = Path(path)
    if not path.exists():
        raise MediaError("file not found")
    if path.stat().st_size == 0:
        raise MediaError("empty file (0 bytes)")
    if path.suffix.lower() in IMAGE_EXTS:
        return _probe_image(path)
    errors = []
    for backend in (_probe_decord, _probe_pyav):
        try:
            return backend(path)
        except Exception as e:  # the next backend may read it; keep the reasons for the report
            errors.append(f"{backend.__name__[7:]}: {_short(e)}")
    raise MediaError("unreadable or corrupt (" + "; ".join(errors) + ")")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return text[:160]


def _sane_fps(fps) -> float | None:
    fps = float(fps) if fps else 0.0
    return fps if 0.5 <= fps <= 480 else None


def _probe_image(path: Path) -> MediaInfo:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
    except Exception as e:
        raise MediaError(f"unreadable image ({_short(e)})") from None
    return MediaInfo(1, None, w, h, "pil")


def _probe_decord(path: Path) -> MediaInfo:
    import decord

    vr = decord.VideoReader(str(path), num_threads=1)
    n = len(vr)
    if n < 1:
        raise MediaError("no frames")
    first = vr.get_batch([0]).asnumpy()
    vr.get_batch([n - 1]).asnumpy()  # the index can promise frames the file does not hold
    return MediaInfo(n, _sane_fps(vr.get_avg_fps()), first.shape[2], first.shape[1], "decord")


def _probe_pyav(path: Path) -> MediaInfo:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise MediaError(f"no video stream (the file holds {', '.join(kinds)})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        n, shape = 0, None
        for frame in container.decode(stream):
            if shape is None:
                shape = (frame.width, frame.height)
            n += 1
        fps = _sane_fps(stream.average_rate or stream.guessed_rate)
    if n == 0:
        raise MediaError("no decodable frames")
    return MediaInfo(n, fps, shape[0], shape[1], "pyav")


def read_frames(path: str | Path, indices: list[int], backend: str) -> np.ndarray:
    """Frames at `indices` (repeats allowed) as uint8 [T, H, W, 3]."""
    path = Path(path)
    if backend == "pil":
        from PIL import Image

        with Image.open(path) as im:
            frame = np.asarray(im.convert("RGB"))
        return np.stack([frame] * len(indices))
    if backend == "decord":
        import decord

        vr = decord.VideoReader(str(path), num_threads=1)
        return vr.get_batch(list(indices)).asnumpy()
    import av

    wanted = set(indices)
    got: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= max(wanted):
                break
    missing = wanted - set(got)
    if missing:
        raise MediaError(f"frames {sorted(missing)[:5]} could not be decoded")
    return np.stack([got[i] for i in indices])


# ---- frame selection -------------------------------------------------------------------------

def resampled_length(src_frames: int, src_fps: float | None, target_fps: float | None) -> int:
    """Frames available on the target timeline (the source's own when no resampling)."""
    if not target_fps or not src_fps or src_frames <= 1:
        return src_frames
    return int(math.floor((src_frames - 1) * target_fps / src_fps + 1e-6)) + 1


def source_indices(start: int, count: int, src_frames: int, src_fps: float | None,
                   target_fps: float | None) -> list[int]:
    """Source frame of each target frame start..start+count-1: the nearest in time."""
    if not target_fps or not src_fps:
        return list(range(start, start + count))
    ratio = src_fps / target_fps
    return [min(src_frames - 1, int(math.floor(j * ratio + 0.5))) for j in range(start, start + count)]


def window_starts(available: int, length: int, mode: str, windows: int = 0, stride: int = 1) -> list[int]:
    """Start frames of the windows a sampling mode takes from a clip of `available` frames.
    `windows`: uniform takes that many (0 = 1); chunk/slide take at most that many (0 = all)."""
    last = available - length
    if last < 0:
        return []
    if mode == "head":
        return [0]
    if mode == "uniform":
        k = max(1, windows)
        return sorted({int(round(x)) for x in np.linspace(0, last, k)}) if k > 1 else [0]
    if mode == "chunk":
        starts = list(range(0, last + 1, length))
    elif mode == "slide":
        starts = list(range(0, last + 1, stride))
    else:
        raise ValueError(f"unknown frame sampling mode {mode!r}")
    return starts[:windows] if windows > 0 else starts


def pick_frame_bucket(available: int, is_image: bool, buckets: list[int]) -> int | None:
    """The largest allowed frame count a clip can fill; images take 1; None = too short."""
    if is_image:
        return 1 if 1 in buckets else None
    video = [b for b in buckets if b > 1] or [1]
    fitting = [b for b in video if b <= available]
    return max(fitting) if fitting else None


# ---- geometry --------------------------------------------------------------------------------

def resize_crop(frames: np.ndarray, width: int, height: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> uint8 [3, T, height, width]: scale to cover, then centre-crop."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()  # T,3,H,W
    h0, w0 = x.shape[-2:]
    scale = max(width / w0, height / h0)
    new_h, new_w = max(height, round(h0 * scale)), max(width, round(w0 * scale))
    if (new_h, new_w) != (h0, w0):
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bilinear",
                                            align_corners=False, antialias=scale < 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


def to_model_range(video_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [-1, 1], as the VAE expects."""
    return video_uint8.float().div(127.5).sub(1.0)
