"""Scan the corpus: list every source, probe every file, decide every clip's buckets and windows.

The result, a `Plan`, is what the report prints and what the cache writer encodes. Every file
that is not used carries the reason (`ClipRecord.unusable`); nothing is dropped silently.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from .buckets import Bucket, choose_size
from .config import DataConfig
from .decode import (MediaError, MediaInfo, pick_frame_bucket, probe, resampled_length,
                     source_indices, window_starts)
from .sources import Clip, SourceListing, apply_trigger, list_source


@dataclass
class Item:
    """One sample to cache and train on: a window of frames of a clip, in one bucket."""

    key: str
    record: int  # index into Plan.records
    bucket: Bucket
    start: int  # first frame on the target timeline
    frames: list[int]  # source frame indices (repeats when a slow clip is resampled up)

    @property
    def frames_hash(self) -> str:
        return hashlib.sha1(json.dumps(self.frames).encode()).hexdigest()[:16]


@dataclass
class ClipRecord:
    clip: Clip
    caption: str = ""  # final caption, trigger word applied
    info: MediaInfo | None = None
    content_hash: str = ""
    size: int = 0
    mtime: float = 0.0
    unusable: str = ""  # the reason, "" = usable
    warnings: list[str] = field(default_factory=list)
    items: list[int] = field(default_factory=list)

    @property
    def caption_hash(self) -> str:
        return text_hash(self.caption)


@dataclass
class Plan:
    config: DataConfig
    listings: list[SourceListing]
    records: list[ClipRecord]
    items: list[Item]

    @property
    def usable_records(self) -> list[ClipRecord]:
        return [r for r in self.records if not r.unusable]

    def with_config(self, config: DataConfig) -> "Plan":
        """The same corpus under the data settings the stages were planned with (tiling, text
        encoder device): the cache is built, and records the settings it used, from these."""
        return replace(self, config=config)


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:32]


def _inspect(record: ClipRecord, known: dict) -> None:
    """Hash and probe one file (threads run many at once). Reuses `known` results when the
    file's size and modification time are unchanged."""
    path = record.clip.path
    if record.clip.problems:
        record.unusable = "; ".join(record.clip.problems)
        return
    try:
        st = path.stat()
    except OSError:
        record.unusable = "file not found"
        return
    record.size, record.mtime = st.st_size, st.st_mtime
    prev = known.get(str(path))
    if prev and prev.get("size") == st.st_size and prev.get("mtime") == st.st_mtime and prev.get("info"):
        record.content_hash = prev["content_hash"]
        record.info = MediaInfo(**prev["info"])
        return
    try:
        record.content_hash = file_hash(path)
        record.info = probe(path)
    except MediaError as e:
        record.unusable = str(e)
    except OSError as e:
        record.unusable = f"cannot be read ({e.strerror or e})"


def _slug(path: Path) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", path.stem)[:40] or "clip"


def _item_key(record: ClipRecord, listing: SourceListing, bucket: Bucket, start: int) -> str:
    root = Path(listing.config.path).expanduser()
    root = root.parent if root.is_file() else root
    try:
        rel = record.clip.path.relative_to(root).as_posix()
    except ValueError:
        rel = record.clip.path.as_posix()
    ident = hashlib.sha1(f"{listing.index}:{rel}".encode()).hexdigest()[:10]
    return f"{_slug(record.clip.path)}-{ident}-{bucket.name}-{start:05d}"


def _plan_captions(record: ClipRecord, listing: SourceListing, cfg: DataConfig) -> None:
    raw = record.clip.caption
    if raw is None or not raw.strip():
        what = f"no caption ({record.clip.caption_origin})" if raw is None else \
            f"empty caption ({record.clip.caption_origin})"
        if cfg.require_captions:
            record.unusable = f"{what}; data.require_captions=true"
            return
        trained = apply_trigger("", listing.config)
        record.warnings.append(f"{what}: trains with caption {trained!r}")
    record.caption = apply_trigger(raw or "", listing.config)


def _plan_items(index: int, record: ClipRecord, listing: SourceListing, cfg: DataConfig,
                items: list[Item]) -> None:
    info = record.info
    src_fps = info.fps
    if info.frames > 1 and not src_fps and cfg.target_fps:
        record.warnings.append(f"frame rate unknown: taken as {cfg.target_fps:g} fps")
        src_fps = cfg.target_fps
    available = resampled_length(info.frames, src_fps, cfg.target_fps)
    is_image = info.frames == 1 and record.clip.is_image
    frames = pick_frame_bucket(available, is_image or info.frames == 1, cfg.frame_buckets)
    if frames is None:
        if is_image or info.frames == 1:
            record.unusable = (f"a single frame, but data.frame_buckets={list(cfg.frame_buckets)} "
                               "has no 1: add 1 to train on images")
        else:
            smallest = min([b for b in cfg.frame_buckets if b > 1] or [1])
            timing = (f" at {cfg.target_fps:g} fps (source {info.frames} frames at {src_fps:g} fps)"
                      if cfg.target_fps and src_fps and abs(src_fps - cfg.target_fps) > 0.01 else "")
            record.unusable = (f"too short: {available} frames{timing}, the smallest video frame "
                               f"bucket is {smallest}: add a smaller 4k+1 count to data.frame_buckets")
        return
    starts = window_starts(available, frames, cfg.frame_sampling, cfg.windows_per_clip,
                           cfg.frame_stride)
    seen, mine = set(), []
    for w, h in cfg.areas:
        size, note = choose_size(info.width, info.height, int(w) * int(h), cfg.bucket_step,
                                 cfg.max_aspect, cfg.allow_upscale)
        if size is None:
            record.unusable = note
            return
        if note and note not in record.warnings:
            record.warnings.append(note)
        bucket = Bucket(size[0], size[1], frames)
        if bucket in seen:  # two areas led to the same own-size bucket
            continue
        seen.add(bucket)
        for start in starts:
            mine.append(Item(_item_key(record, listing, bucket, start), index, bucket, start,
                             source_indices(start, frames, info.frames, src_fps, cfg.target_fps)))
    for item in mine:
        record.items.append(len(items))
        items.append(item)


def _mark_duplicates(records: list[ClipRecord], cfg: DataConfig) -> None:
    first: dict[str, ClipRecord] = {}
    for r in records:
        if r.unusable or not r.content_hash:
            continue
        if r.content_hash in first:
            orig = first[r.content_hash].clip.path
            if cfg.skip_duplicates:
                r.unusable = f"duplicate of {orig} (same content; data.skip_duplicates=true)"
            else:
                r.warnings.append(f"duplicate of {orig} (same content)")
        else:
            first[r.content_hash] = r


def scan(cfg: DataConfig, known: dict | None = None, progress: bool = True,
         media_dir: str | os.PathLike | None = None) -> Plan:
    """List, hash and probe every source; decide captions, buckets and windows of every clip."""
    listings = [list_source(i, s, media_dir) for i, s in enumerate(cfg.sources)]
    records = [ClipRecord(c) for listing in listings for c in listing.clips]
    known = known or {}
    with ThreadPoolExecutor(max_workers=max(1, cfg.num_workers)) as pool:
        jobs = pool.map(lambda r: _inspect(r, known), records)
        if progress and records:
            from tqdm import tqdm
            jobs = tqdm(jobs, total=len(records), desc="scan clips", unit="clip")
        for _ in jobs:
            pass
    _mark_duplicates(records, cfg)
    items: list[Item] = []
    for i, r in enumerate(records):
        if r.unusable:
            continue
        listing = listings[r.clip.source_index]
        _plan_captions(r, listing, cfg)
        if not r.unusable:
            _plan_items(i, r, listing, cfg, items)
    return Plan(cfg, listings, records, items)


def probe_cache(plan: Plan) -> dict:
    """What `scan(known=...)` can reuse next time: hash and probe of every readable file."""
    out = {}
    for r in plan.records:
        if r.info is not None:
            out[str(r.clip.path)] = {"size": r.size, "mtime": r.mtime, "content_hash": r.content_hash,
                                     "info": r.info.__dict__.copy()}
    return out
