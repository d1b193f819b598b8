"""The cache on disk: its layout, the settings that make it valid, and the manifest.

    cache_dir/
      manifest.json                 the index training reads (written last, atomically)
      latents/<item key>.safetensors  latents [16,F',H/8,W/8] (+ clip_fea, y for I2V)
      text/<caption hash>.safetensors context [L, dim] bf16 (the empty caption included)
      probe.json                    hash + probe of every source file, reused when unchanged
      report.txt                    the last dataset report

Every tensor file carries its own record in the safetensors metadata (key "wantune"), so an
interrupted run can tell finished files from missing ones without any other bookkeeping.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
PROBES = "probe.json"
RESIZE_METHOD = "bilinear-antialias-cover-centre-crop"


class StaleCacheError(RuntimeError):
    """The cache does not match the recipe or the corpus; the message says what and how to fix."""


def latent_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / "latents" / f"{key}.safetensors"


def text_path(cache_dir: str | Path, caption_hash: str) -> Path:
    return Path(cache_dir) / "text" / f"{caption_hash}.safetensors"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def file_identity(path: str | os.PathLike, sample: int = 1 << 20) -> str:
    """A cheap fingerprint of a model file or folder: names, sizes and the first and last MiB.

    Hashing an 11 GB text encoder on every run would be slow; a file copied elsewhere keeps
    its fingerprint, a different file of the same size does not."""
    p = Path(path).expanduser()
    if not p.exists():
        return f"missing:{p.name}"
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files[:256]:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if p.is_dir() else f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(sample))
            if size > 2 * sample:
                fh.seek(size - sample)
                h.update(fh.read(sample))
    return h.hexdigest()[:16]


def read_record(path: Path) -> dict | None:
    """The record stored in a cache file's header; None when the file is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta["wantune"])
    except Exception:  # a missing, foreign or damaged file is simply not done yet
        return None


def read_manifest(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / MANIFEST
    if not path.exists():
        raise StaleCacheError(f"{path} not found: build the cache first with "
                              "`tools/cache.py RECIPE` (data.cache_dir must point at it)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != CACHE_FORMAT:
        raise StaleCacheError(f"{path} has cache format {manifest.get('format')}, this version "
                              f"reads {CACHE_FORMAT}: rebuild it with `tools/cache.py RECIPE`")
    return manifest


def read_probes(cache_dir: str | Path | None) -> dict:
    if not cache_dir:
        return {}
    path = Path(cache_dir) / PROBES
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
