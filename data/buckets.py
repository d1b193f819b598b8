"""Aspect-ratio buckets on a 16-pixel grid at target pixel areas.

A clip takes the bucket whose aspect ratio is nearest its own (decoded) frame, at each target
area. Without `allow_upscale`, a clip smaller than that bucket is trained at the largest grid
size inside its own frame instead; the note says so, and the report prints it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int
    frames: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@lru_cache(maxsize=64)
def bucket_sizes(area: int, step: int = 16, max_aspect: float = 4.0) -> tuple[tuple[int, int], ...]:
    """Every (width, height) on the grid, as large as possible without exceeding `area`."""
    sizes = []
    w = step
    while w * step <= area:
        h = (area // w) // step * step
        if h >= step and max(w / h, h / w) <= max_aspect + 1e-9:
            sizes.append((w, h))
        w += step
    return tuple(sizes)


def nearest_size(width: int, height: int, area: int, step: int = 16,
                 max_aspect: float = 4.0) -> tuple[int, int]:
    """The grid size at `area` whose aspect ratio is nearest width/height (larger area on ties)."""
    sizes = bucket_sizes(area, step, max_aspect)
    if not sizes:
        raise ValueError(f"no {step}-pixel grid size fits an area of {area} pixels with aspect "
                         f"<= {max_aspect}: raise data.areas or data.max_aspect")
    target = math.log(width / height)
    return min(sizes, key=lambda s: (round(abs(math.log(s[0] / s[1]) - target), 9), -s[0] * s[1]))


def choose_size(width: int, height: int, area: int, step: int = 16, max_aspect: float = 4.0,
                allow_upscale: bool = False) -> tuple[tuple[int, int] | None, str]:
    """(bucket width, height) for a clip of decoded size width x height, plus a note for the
    report ("" when the configured bucket is used as is). None = too small to train at all."""
    w, h = nearest_size(width, height, area, step, max_aspect)
    notes = []
    aspect = max(width / height, height / width)
    if aspect > max_aspect + 1e-9:
        notes.append(f"aspect {aspect:.2f} beyond data.max_aspect={max_aspect}, centre-cropped")
    if allow_upscale or (w <= width and h <= height):
        return (w, h), "; ".join(notes)
    # Too small for the configured bucket: fit the grid inside the clip's own frame.
    s = min(1.0, math.sqrt(area / (width * height)))
    fw, fh = int(width * s) // step * step, int(height * s) // step * step
    if fw >= step and fh >= step:  # keep within max_aspect: shorten the long side (cropped)
        fw = min(fw, int(max_aspect * fh) // step * step)
        fh = min(fh, int(max_aspect * fw) // step * step)
    if fw < step or fh < step:
        return None, (f"{width}x{height} is smaller than one {step}-pixel grid cell; set "
                      "data.allow_upscale=true to enlarge it")
    notes.append(f"{width}x{height} is smaller than bucket {w}x{h}: trained at {fw}x{fh} "
                 "(data.allow_upscale=false)")
    return (fw, fh), "; ".join(notes)
