"""Writing sampled videos: mp4 (H.264), webm (VP9), animated webp/gif, PNG sequences, stills
and contact sheets. Every write goes through a temporary name and a rename, so a crash never
leaves a half-written file under the final name.

Frames are either a float tensor [3,T,H,W] in [-1,1] (what the sampler returns per video) or
uint8 [T,H,W,3] (tensor or numpy array). Floats map to bytes as round((x+1)/2·255) after
clamping.
"""
from __future__ import annotations

import os
import shutil
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path, replace_dir, temp_path

VIDEO_SUFFIXES = {".mp4": ("libx264", "yuv420p"), ".webm": ("libvpx-vp9", "yuv420p")}
ANIMATION_SUFFIXES = (".webp", ".gif")
STILL_SUFFIXES = (".png", ".jpg", ".jpeg")
SUPPORTED = "mp4, webm, webp, gif, png (one frame), a folder or a pattern like frames/%04d.png"


def to_uint8_frames(frames) -> np.ndarray:
    """[3,T,H,W] float in [-1,1] or uint8 [T,H,W,3] -> uint8 numpy [T,H,W,3]."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype == torch.uint8:
            frames = frames.cpu().numpy()
        else:
            if frames.dim() != 4 or frames.shape[0] != 3:
                raise ValueError(f"float frames must be [3,T,H,W] in [-1,1], got shape "
                                 f"{tuple(frames.shape)}")
            x = (frames.detach().float().clamp(-1, 1) + 1) * 127.5
            return x.round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    arr = np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"uint8 frames must be [T,H,W,3], got {arr.dtype} {arr.shape}")
    return np.ascontiguousarray(arr)


def _pad_to_even(arr: np.ndarray, path: Path) -> np.ndarray:
    """yuv420p halves the chroma resolution, so H.264/VP9 need even sides: repeat the last
    row/column once and say so."""
    pad_h, pad_w = arr.shape[1] % 2, arr.shape[2] % 2
    if not (pad_h or pad_w):
        return arr
    warnings.warn(f"{path}: {arr.shape[2]}x{arr.shape[1]} has an odd side; yuv420p needs even "
                  f"sides, so the video is padded to {arr.shape[2] + pad_w}x{arr.shape[1] + pad_h} "
                  "by repeating the last column/row")
    return np.pad(arr, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")


def _atomic(path: Path, write) -> None:
    # Keep the suffix on the temporary: encoders pick the container from it.
    with atomic_path(path, keep_suffix=True) as tmp:
        write(tmp)


def _write_av(arr: np.ndarray, tmp: Path, codec: str, pix_fmt: str, fps, crf: int) -> None:
    import av

    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = arr.shape[2], arr.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = {"crf": str(crf)} if codec == "libx264" else {"crf": str(crf), "b": "0"}
        for frame in arr:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_animation(arr: np.ndarray, tmp: Path, fps, fmt: str) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in arr]
    kwargs = {"quality": 90} if fmt == "WEBP" else {"optimize": False}
    images[0].save(tmp, format=fmt, save_all=True, append_images=images[1:], loop=0,
                   duration=frame_durations_ms(len(images), fps, 10 if fmt == "GIF" else 1),
                   **kwargs)


def frame_durations_ms(n: int, fps, unit: int) -> list[int]:
    """Per-frame delays in multiples of `unit` ms (GIF stores 10 ms units) whose running sum
    stays within unit/2 of the exact i·1000/fps, so 16 fps plays at 16 fps on average
    (62.5 ms becomes 60, 70, 60, 60, ... for GIF) instead of drifting."""
    ends = [round((i + 1) * 1000 / float(fps) / unit) * unit for i in range(n)]
    return [max(unit, e - s) for s, e in zip([0] + ends[:-1], ends)]


def _is_sequence_target(path: Path) -> bool:
    return path.suffix == "" or "%" in path.name or "{" in path.name


def _write_png_sequence(arr: np.ndarray, path: Path) -> None:
    """A folder gets 00000.png, 00001.png, ...; a pattern ('%04d' or '{:04d}') names each file."""
    from PIL import Image

    if path.suffix == "":
        folder, pattern = path, "{:05d}.png"
    else:
        folder, pattern = path.parent, path.name
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build every frame in a sibling temp folder (made with the user's umask), then move them
    # in; a folder target is swapped in whole, so it never holds a mix of two runs.
    tmp = temp_path(folder)
    try:
        tmp.mkdir()
        names = [(pattern % i if "%" in pattern else pattern.format(i)) for i in range(len(arr))]
        for name, frame in zip(names, arr):
            Image.fromarray(frame).save(tmp / name, format="PNG")
        if path.suffix == "":
            replace_dir(tmp, folder)
        else:
            folder.mkdir(parents=True, exist_ok=True)
            for name in names:
                os.replace(tmp / name, folder / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_video(frames, path: str | os.PathLike, fps: float = 16, crf: int = 18) -> Path:
    """Write frames; the suffix of `path` picks the format (see SUPPORTED). Returns the path."""
    path = Path(path)
    arr = to_uint8_frames(frames)
    suffix = path.suffix.lower()
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if suffix in VIDEO_SUFFIXES:
        codec, pix_fmt = VIDEO_SUFFIXES[suffix]
        arr = _pad_to_even(arr, path)
        _atomic(path, lambda tmp: _write_av(arr, tmp, codec, pix_fmt, fps, crf))
    elif suffix in ANIMATION_SUFFIXES:
        fmt = "WEBP" if suffix == ".webp" else "GIF"
        _atomic(path, lambda tmp: _write_animation(arr, tmp, fps, fmt))
    elif suffix in STILL_SUFFIXES and not _is_sequence_target(path):
        if len(arr) != 1:
            raise ValueError(f"{path}: a {suffix} file holds one frame but there are {len(arr)}; "
                             f"use a folder or a pattern like {path.with_suffix('')}/%04d.png")
        write_image(arr[0], path)
    elif _is_sequence_target(path):
        _write_png_sequence(arr, path)
    else:
        raise ValueError(f"{path}: unknown output format {suffix!r}; use one of: {SUPPORTED}")
    return path


def write_image(frame: np.ndarray, path: str | os.PathLike) -> Path:
    """One uint8 [H,W,3] frame as PNG/JPEG (the suffix decides)."""
    from PIL import Image

    path = Path(path)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    _atomic(path, lambda tmp: Image.fromarray(frame).save(tmp, format=fmt))
    return path


def write_contact_sheet(frames, path: str | os.PathLike, n: int = 4) -> Path:
    """A PNG of n evenly spaced frames (first and last included) side by side."""
    arr = to_uint8_frames(frames)
    idx = np.unique(np.linspace(0, len(arr) - 1, num=max(1, min(n, len(arr)))).round().astype(int))
    return write_image(np.concatenate(list(arr[idx]), axis=1), path)
