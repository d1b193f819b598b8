"""The embedded demo: a synthetic corpus of moving shapes and a tiny random-weight model.

Both are written only where missing, so re-running the demo reuses them (and its cache).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from wan_model.atomic import atomic_path, write_text_atomic

SHAPES = ("circle", "square")
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40)}
MOTIONS = ("left to right", "right to left", "top to bottom", "bottom to top")


def _frame(shape: str, colour, cx: float, cy: float, w: int, h: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (20, 20, 28)
    if shape == "circle":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    else:
        mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
    img[mask] = colour
    return img


def _path(motion: str, t: float, w: int, h: int, r: int) -> tuple[float, float]:
    lo_x, hi_x, lo_y, hi_y = r, w - 1 - r, r, h - 1 - r
    mid_x, mid_y = w / 2, h / 2
    return {"left to right": (lo_x + t * (hi_x - lo_x), mid_y),
            "right to left": (hi_x - t * (hi_x - lo_x), mid_y),
            "top to bottom": (mid_x, lo_y + t * (hi_y - lo_y)),
            "bottom to top": (mid_x, hi_y - t * (hi_y - lo_y))}[motion]


def write_clip(path: Path, shape: str, colour: str, motion: str, frames: int = 33,
               size: tuple[int, int] = (96, 64), fps: int = 16) -> None:
    import av

    w, h = size
    r = max(3, min(w, h) // 6)
    with atomic_path(path, keep_suffix=True) as tmp, av.open(str(tmp), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(frames):
            cx, cy = _path(motion, i / max(1, frames - 1), w, h, r)
            img = _frame(shape, COLOURS[colour], cx, cy, w, h, r)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def write_corpus(folder: str | Path, num_clips: int = 6, seed: int = 0) -> Path:
    """Clips `clip_NN.mp4` with same-name captions, e.g. 'a red circle moves left to right'."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(num_clips):
        clip = folder / f"clip_{i:02d}.mp4"
        caption = folder / f"clip_{i:02d}.txt"
        if clip.exists() and caption.exists():
            continue
        shape = SHAPES[i % len(SHAPES)]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        motion = MOTIONS[i % len(MOTIONS)]
        write_clip(clip, shape, colour, motion)
        write_text_atomic(caption, f"a {colour} {shape} moves {motion} on a dark background")
    return folder


def prepare_demo(cfg, log=print) -> None:
    """Write the demo corpus and model where they are missing (main process only)."""
    from wan_model.random_weights import write_random_checkpoint

    write_corpus(cfg.corpus_dir, cfg.num_clips)
    model_dir = Path(cfg.model_dir)
    if not (model_dir / "wantune_random.json").exists():
        log(f"demo: writing a random {cfg.flavour} model to {model_dir}")
        write_random_checkpoint(model_dir, cfg.flavour, log=lambda *_: None)
