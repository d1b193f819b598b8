"""The stages around the training step, planned to the same budget: where the umT5 encoder runs
(`data.text_encoder_device: auto`), whether the VAE tiles while caching (`data.low_memory:
null`), and where previews are decoded (`validation.decode: auto`). A setting the recipe names
is never changed.

The peaks are measured, not traced: they are fixed costs of a few modules, measured on an H200
(2026-11-30, `tests/test_small_cards_gpu.py`, which prints them):
- umT5-XXL in bf16 encoding 16 captions of 512 tokens: 13.96 GiB whole on the device, 4.16 GiB
  streamed block by block;
- the VAE encoding one 832x480x81 clip in bf16: 4.02 GiB untiled (5.16 GiB reserved), 1.24 GiB
  tiled; the untiled peak grows with the frame area (causal chunks bound the frames);
- a preview decode, 832x480x33 in float32: 8.51 GiB on the device, 2.17 GiB tiled (bounded by
  the tile, growing with the frames), next to nothing decoded on the host.
"""
from __future__ import annotations

import copy

from .memory import GIB, MARGIN, RESERVE_GIB, Budget

T5_WHOLE_GIB, T5_STREAM_GIB = 13.96, 4.16
VAE_UNTILED_GIB, VAE_TILED_GIB, VAE_AREA = 5.16, 1.24, 832 * 480
DECODE_DEVICE_GIB, DECODE_TILED_GIB, DECODE_VOLUME = 8.51, 2.17, 832 * 480 * 33


def _fits(need_gib: float, have: int) -> bool:
    return need_gib * GIB * (1 + MARGIN) + RESERVE_GIB * GIB <= have


def text_encoder_device(have: int) -> str:
    if _fits(T5_WHOLE_GIB, have):
        return "device"
    return "stream" if _fits(T5_STREAM_GIB, have) else "cpu"


def vae_tiling(have: int, area: int) -> bool:
    return not _fits(VAE_UNTILED_GIB * max(1.0, area / VAE_AREA), have)


def preview_decode(have: int, width: int, height: int, frames: int) -> str:
    volume = width * height * frames
    if _fits(DECODE_DEVICE_GIB * volume / DECODE_VOLUME, have):
        return "device"
    return "tiled" if _fits(DECODE_TILED_GIB * max(1.0, frames / 33), have) else "cpu"


def plan_stages(recipe, budget: Budget, largest_area: int, resident: int = 0, log=print):
    """A copy of `recipe` with every `auto` stage setting resolved for `budget` (device bytes).
    `largest_area`: width x height of the largest frame the cache encodes; `resident`: device
    bytes the training state holds while a preview renders (weights and optimizer state)."""
    out = copy.deepcopy(recipe)
    d, v = out.data, getattr(out, "validation", None)
    chosen = []
    if d.text_encoder_device == "auto":
        d.text_encoder_device = text_encoder_device(budget.device)
        chosen.append(f"text encoder {d.text_encoder_device}")
    if d.low_memory is None:
        d.low_memory = vae_tiling(budget.device, largest_area)
        chosen.append(f"VAE {'tiled' if d.low_memory else 'untiled'}")
    if v is not None and v.decode == "auto":
        v.decode = preview_decode(budget.device - resident, v.width, v.height, v.frames)
        chosen.append(f"previews decoded {'on the host' if v.decode == 'cpu' else v.decode}")
    if chosen:
        log(f"stages for {budget.device / GIB:.1f} GiB ({budget.source}): {', '.join(chosen)}")
    return out


def plan_corpus_stages(recipe, scanned, device, estimate=None, log=print):
    """`plan_stages` for a corpus about to be cached or trained on (`scanned`: the scan plan):
    the run's budget (`train.memory_gib`, else the card's free memory), the largest frame of the
    corpus and, when training (`estimate`: the step's memory plan), the training state resident
    while previews render. The cache tool and the trainer both plan through here."""
    from .memory import device_budget

    t = getattr(recipe, "train", None)  # the cache tool reads only the model and data sections
    if (t is not None and t.memory == "off") or device.type != "cuda":
        return recipe  # auto then means device, as everywhere without a planner
    area = max(item.bucket.width * item.bucket.height for item in scanned.items)
    resident = 0 if estimate is None else estimate.parts["weights"] + estimate.parts["optimizer"]
    budget = device_budget(device, t.memory_gib if t is not None else 0.0)
    return plan_stages(recipe, budget, area, resident, log)
