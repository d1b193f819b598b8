"""Corpus sources -> a list of `Clip`s (a media file plus its caption), nothing decoded yet.

Three kinds: a folder of clips/images with same-name caption files, a metadata.csv / .jsonl
manifest, and a Hugging Face dataset saved with `save_to_disk`. Problems found while listing
(missing files, missing captions) travel with the clip so the report can name them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .config import SourceConfig

VIDEO_EXTS = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".gif", ".mpg", ".mpeg", ".wmv",
              ".flv", ".ts", ".3gp"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
MEDIA_EXTS = VIDEO_EXTS | IMAGE_EXTS
MANIFEST_NAMES = ("metadata.csv", "metadata.jsonl")
PATH_COLUMNS = ("file_name", "video", "image", "path")
CAPTION_COLUMNS = ("caption", "prompt", "text")


@dataclass
class Clip:
    """One media file of a source and its caption (None = no caption found)."""

    source_index: int
    path: Path
    caption: str | None
    caption_origin: str
    num_repeats: int = 1
    problems: list[str] = field(default_factory=list)

    @property
    def is_image(self) -> bool:
        return self.path.suffix.lower() in IMAGE_EXTS


@dataclass
class SourceListing:
    """What one source yielded: its clips, and files that were looked at but not taken."""

    index: int
    config: SourceConfig
    kind: str
    clips: list[Clip]
    ignored: list[str] = field(default_factory=list)
    error: str = ""


def apply_trigger(caption: str, src: SourceConfig) -> str:
    """Substitute the trigger word; prepend it where the caption has no placeholder."""
    caption = caption.strip()
    if not src.trigger_word:
        return caption.replace(src.trigger_placeholder, "").strip() if src.trigger_placeholder else caption
    if src.trigger_placeholder and src.trigger_placeholder in caption:
        return caption.replace(src.trigger_placeholder, src.trigger_word)
    return f"{src.trigger_word}, {caption}" if caption else src.trigger_word


def detect_kind(src: SourceConfig) -> str:
    if src.kind != "auto":
        return src.kind
    p = Path(src.path).expanduser()
    if p.is_file():
        return "manifest"
    if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
        return "hf"
    if any((p / name).exists() for name in MANIFEST_NAMES):
        return "manifest"
    return "folder"


def list_source(index: int, src: SourceConfig, media_dir: str | Path | None = None) -> SourceListing:
    """List one source. A source that cannot be read at all gives `error` and no clips."""
    kind = detect_kind(src)
    root = Path(src.path).expanduser()
    listing = SourceListing(index, src, kind, [])
    if not root.exists():
        listing.error = (f"data.sources[{index}].path={src.path!r} does not exist: fix the path "
                         "(relative paths are taken from the working directory)")
        return listing
    try:
        if kind == "folder":
            _list_folder(listing, root)
        elif kind == "manifest":
            _list_manifest(listing, root)
        else:
            _list_hf(listing, root, media_dir)
    except Exception as e:  # an unreadable manifest/dataset is a report line, not a crash
        listing.error = f"data.sources[{index}] ({kind} {src.path}): cannot be read: {e}"
    return listing


def _list_folder(listing: SourceListing, root: Path) -> None:
    src = listing.config
    files = sorted(root.rglob("*") if src.recursive else root.iterdir())
    for f in files:
        if not f.is_file() or f.name.startswith("."):
            continue
        ext = f.suffix.lower()
        if ext not in MEDIA_EXTS:
            if ext != src.caption_ext.lower() and f.name not in MANIFEST_NAMES:
                listing.ignored.append(f"{f.name} (unknown suffix {ext or '(none)'})")
            continue
        cap_file = f.with_suffix(src.caption_ext)
        clip = Clip(listing.index, f, None, cap_file.name if cap_file.exists() else f"no {cap_file.name}",
                    src.num_repeats)
        if cap_file.exists():
            clip.caption, problem = read_caption(cap_file)
            if problem:
                clip.problems.append(problem)
        listing.clips.append(clip)


def read_caption(path: Path) -> tuple[str, str]:
    """A caption file's text, and the problem that makes it unusable ("" = none). A file that is
    not UTF-8 is not guessed at: replaced characters would train as garbage tokens."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig"), ""
    except UnicodeDecodeError as e:
        return "", (f"caption {path.name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                    f"{e.start}): re-save it as UTF-8")


def _pick(columns, wanted: str, candidates, what: str, where: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"{where} has no column {wanted!r} (columns: {list(columns)})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise ValueError(f"{where} has no {what} column: name one of {list(candidates)} or set "
                     f"data.sources[].{'video' if what == 'file' else 'caption'}_column "
                     f"(columns: {list(columns)})")


def _read_manifest_rows(path: Path) -> list[dict]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): re-save it as "
                         "UTF-8") from None
    if path.suffix.lower() == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e})") from None
    return rows


def _list_manifest(listing: SourceListing, root: Path) -> None:
    src = listing.config
    path = root if root.is_file() else next(root / n for n in MANIFEST_NAMES if (root / n).exists())
    rows = _read_manifest_rows(path)
    if not rows:
        listing.error = f"{path} has no rows"
        return
    vcol = _pick(rows[0].keys(), src.video_column, PATH_COLUMNS, "file", str(path))
    ccol = _pick(rows[0].keys(), src.caption_column, CAPTION_COLUMNS, "caption", str(path))
    corpus = path.parent.resolve()
    for n, row in enumerate(rows, 1):
        f = path.parent / str(row.get(vcol) or "")
        caption = row.get(ccol)
        clip = Clip(listing.index, f, None if caption is None else str(caption),
                    f"{path.name} row {n}", src.num_repeats)
        if not row.get(vcol):
            clip.problems.append(f"{path.name} row {n}: empty {vcol!r}")
        elif not src.allow_outside and not f.resolve().is_relative_to(corpus):
            clip.problems.append(
                f"{path.name} row {n}: {row[vcol]!r} points outside the manifest's folder {corpus} "
                f"(to {f.resolve()}): move the file inside it, or set data.sources[{listing.index}]"
                ".allow_outside=true if the manifest is meant to reach there")
        listing.clips.append(clip)


def _list_hf(listing: SourceListing, root: Path, media_dir) -> None:
    import datasets

    src = listing.config
    ds = datasets.load_from_disk(str(root))
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    vcol = _pick(ds.column_names, src.video_column, PATH_COLUMNS, "file", str(root))
    ccol = _pick(ds.column_names, src.caption_column, CAPTION_COLUMNS, "caption", str(root))
    feature = ds.features[vcol]
    if hasattr(feature, "decode"):  # Image/Video features: read paths/bytes, do not decode here
        ds = ds.cast_column(vcol, type(feature)(decode=False))
    media = Path(media_dir) if media_dir else Path(tempfile.gettempdir()) / "wantune-media"
    for n, row in enumerate(ds):
        value = row[vcol]
        f = _hf_media_path(value, root, media)
        caption = row[ccol]
        listing.clips.append(Clip(listing.index, f, None if caption is None else str(caption),
                                  f"row {n}", src.num_repeats))


def _hf_media_path(value, root: Path, media: Path) -> Path:
    """A path string, or an Image/Video cell {'path', 'bytes'}: embedded bytes are written once,
    content-addressed, so the decoder reads every source the same way."""
    if isinstance(value, str):
        p = Path(value)
        return p if p.is_absolute() else root / p
    path, data = value.get("path"), value.get("bytes")
    if data:
        suffix = Path(path).suffix if path else ".bin"
        out = media / (hashlib.sha256(data).hexdigest()[:24] + suffix)
        if not out.exists():
            from wan_model.atomic import write_bytes_atomic

            write_bytes_atomic(out, data, what=f"embedded media of {root.name}")
        return out
    return Path(path)
