"""The cache writer: a scanned `Plan` -> VAE latents and text embeddings on disk.

Two stages, one model family resident at a time: the text encoder encodes every caption not
yet cached and is freed, then the VAE (and for I2V the CLIP tower) encodes every clip not yet
cached while worker processes decode the next clips. Files are written atomically and carry
their own record, so a second run encodes nothing, an interrupted run continues where it
stopped, and a changed file, caption or setting is rebuilt. With several ranks (`accelerate
launch`), rank r takes the encoder batches r, r+world, ... and rank 0 writes the manifest at the
end.
"""
from __future__ import annotations

import contextlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from wan_model.device_memory import free_memory

from .cache_files import (CACHE_FORMAT, MANIFEST, PROBES, RESIZE_METHOD, file_identity,
                          latent_path, read_record, settings_hash, text_path)
from .config import DataConfig
from .decode import read_frames, resize_crop, to_model_range
from .plan import Item, Plan, probe_cache, text_hash

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Encoders:
    """Where the models come from. Loaders are called when a stage starts, so a model is only
    resident during its stage; `identity` fingerprints each model for the settings hash."""

    load_vae: Callable[[], Any]
    load_text: Callable[[], Any]
    load_clip: Callable[[], Any] | None = None
    identity: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")


def model_identity(paths, i2v: bool) -> dict:
    """Fingerprints of the model files a cache depends on (`paths`: wan_model.paths.ModelPaths)."""
    ident = {"vae": file_identity(paths.resolve("vae")),
             "text": file_identity(paths.resolve("text_encoder")) + "+"
             + file_identity(paths.resolve("tokenizer"))}
    if i2v:
        ident["clip"] = file_identity(paths.resolve("clip"))
    return ident


def model_encoders(paths, cfg: DataConfig, i2v: bool, device: str | torch.device = "cpu") -> Encoders:
    """Encoders that load the recipe's model files (wan_model) onto `device`."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"

    def vae():
        from wan_model import load_vae
        model = load_vae(paths.resolve("vae"), dtype=DTYPES[cfg.vae_dtype] if on_gpu else torch.float32,
                         device=device)
        if cfg.low_memory:
            model.enable_tiling()
        if on_gpu:  # same numbers, faster convolutions: channels-last weights (cuDNN tuning is
            model.use_channels_last()  # switched on around the encode loop)
            if cfg.vae_compile:
                model.fuse_elementwise()
        return model

    def text():
        return load_text(paths, cfg, device)

    def clip():
        from wan_model import load_clip_vision
        return load_clip_vision(paths.resolve("clip"), dtype=torch.float16 if on_gpu else torch.float32,
                                device=device)

    return Encoders(vae, text, clip if i2v else None, model_identity(paths, i2v), device)


def load_text(paths, cfg: DataConfig, device: str | torch.device = "cpu"):
    """The recipe's umT5 encoder in data.text_dtype, placed as data.text_encoder_device says,
    computing on `device`: for caption caching and for the prompts of validation previews."""
    from wan_model import load_text_encoder

    return load_text_encoder(paths.resolve("text_encoder"), paths.resolve("tokenizer"),
                             dtype=DTYPES[cfg.text_dtype], device=device,
                             placement=cfg.text_encoder_device)


def cache_settings(cfg: DataConfig, identity: dict, i2v: bool) -> dict:
    """Everything besides the clip itself that decides the cached tensors. A change here
    rebuilds the cache; training refuses a cache built with other settings."""
    latent = {"format": CACHE_FORMAT, "vae": identity.get("vae"), "vae_dtype": cfg.vae_dtype,
              "latent_dtype": cfg.latent_dtype, "resize": RESIZE_METHOD,
              "tiling": bool(cfg.low_memory),  # null (not planned) hashes as false: caches stay valid
              "i2v": i2v, "clip": identity.get("clip") if i2v else None}
    # the text encoder's placement is not here: streamed or whole, it computes the same embeddings
    text = {"format": CACHE_FORMAT, "text": identity.get("text"), "text_dtype": cfg.text_dtype}
    return {"latent": latent, "latent_hash": settings_hash(latent),
            "text": text, "text_hash": settings_hash(text)}


# ---- what is still to do ---------------------------------------------------------------------

def _item_record(plan: Plan, item: Item, latent_hash: str) -> dict:
    rec = plan.records[item.record]
    return {"key": item.key, "source": str(rec.clip.path), "source_index": rec.clip.source_index,
            "content_hash": rec.content_hash, "bucket": [item.bucket.width, item.bucket.height,
                                                         item.bucket.frames],
            "start": item.start, "frames_hash": item.frames_hash, "settings_hash": latent_hash}


_MATCH = ("content_hash", "bucket", "frames_hash", "settings_hash")


def _item_done(cache_dir: Path, want: dict) -> bool:
    have = read_record(latent_path(cache_dir, want["key"]))
    return have is not None and all(have.get(k) == want[k] for k in _MATCH)


def _text_done(cache_dir: Path, caption_hash: str, text_hash_: str) -> bool:
    have = read_record(text_path(cache_dir, caption_hash))
    return have is not None and have.get("settings_hash") == text_hash_


def captions_needed(plan: Plan) -> dict[str, str]:
    """caption hash -> caption, for every usable clip plus the empty caption (caption dropout)."""
    out = {text_hash(""): ""}
    for r in plan.usable_records:
        if r.items:
            out[r.caption_hash] = r.caption
    return out


# ---- stage 1: text ---------------------------------------------------------------------------

def _encode_texts(todo: list[tuple[str, str]], encoders: Encoders, cfg: DataConfig, cache_dir: Path,
                  text_hash_: str, progress: bool, desc: str) -> None:
    from wan_model.loading import save_safetensors_atomic

    if not todo:
        return
    encoder = encoders.load_text()
    bar = _bar(len(todo), desc, "caption", progress)
    for i in range(0, len(todo), cfg.text_batch_size):
        chunk = todo[i:i + cfg.text_batch_size]
        embeds = encoder.encode([caption for _, caption in chunk])
        for (h, caption), emb in zip(chunk, embeds):
            record = {"caption_hash": h, "caption": caption, "settings_hash": text_hash_,
                      "shape": list(emb.shape)}
            save_safetensors_atomic({"context": emb.detach().to("cpu", torch.bfloat16)},
                                    text_path(cache_dir, h), {"wantune": json.dumps(record)})
        bar.update(len(chunk))
    bar.close()
    del encoder
    free_memory()


# ---- stage 2: latents ------------------------------------------------------------------------

class _DecodeJobs(torch.utils.data.Dataset):
    """Decoding in worker processes: item i -> (i, uint8 [3,F,H,W]) or (i, error message)."""

    def __init__(self, jobs: list[tuple[str, list[int], str, int, int]]):
        self.jobs = jobs  # (path, source frames, backend, width, height)

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, i):
        path, frames, backend, w, h = self.jobs[i]
        try:
            return i, resize_crop(read_frames(path, frames, backend), w, h)
        except Exception as e:  # reported per clip at the end, never a silent drop
            return i, f"decoding failed: {e}"


def _collate(batch):
    return batch


def _bucket_batches(items: list[Item], size: int) -> list[list[int]]:
    groups: dict = {}
    for i, item in enumerate(items):
        groups.setdefault(item.bucket, []).append(i)
    return [idx[j:j + size] for idx in groups.values() for j in range(0, len(idx), size)]


def first_frame_condition(vae, video: torch.Tensor) -> torch.Tensor:
    """I2V `y` (spec 5.2): mask[4] (1 at latent frame 0) + latents of the first frame followed
    by F-1 zero frames. video: [B,3,F,H,W] in [-1,1] -> [B,20,(F-1)//4+1,H/8,W/8]."""
    cond = torch.zeros_like(video)
    cond[:, :, :1] = video[:, :, :1]
    lat = vae.encode(cond).float()
    mask = torch.zeros(lat.shape[0], 4, *lat.shape[2:], dtype=lat.dtype, device=lat.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, lat], dim=1)


def _encode_latents(todo: list[tuple[Item, dict]], plan: Plan, encoders: Encoders, cfg: DataConfig,
                    cache_dir: Path, progress: bool, desc: str, on_item) -> list[str]:
    if not todo:
        return []
    items = [item for item, _ in todo]
    jobs = []
    for item in items:
        rec = plan.records[item.record]
        jobs.append((str(rec.clip.path), item.frames, rec.info.backend, item.bucket.width,
                     item.bucket.height))
    per_call = 1 if cfg.low_memory else cfg.vae_batch_size  # tiling bounds one clip's memory;
    loader = torch.utils.data.DataLoader(                   # a batch would multiply it again
        _DecodeJobs(jobs), batch_sampler=_bucket_batches(items, per_call),
        num_workers=cfg.num_workers, collate_fn=_collate,
        prefetch_factor=2 if cfg.num_workers else None, persistent_workers=False,
        pin_memory=encoders.device.type == "cuda")
    batches = iter(loader)  # workers start decoding (and fork) before the models are loaded
    vae = encoders.load_vae()
    clip = encoders.load_clip() if encoders.load_clip else None
    out_dtype = DTYPES[cfg.latent_dtype]
    failures = []
    writer = _Writer(cache_dir, on_item)
    bar = _bar(len(items), desc, "clip", progress)
    kernels = vae_kernels(cfg.vae_deterministic) if encoders.device.type == "cuda" else contextlib.nullcontext()
    try:
        with kernels:
            for batch in batches:
                writer.check()
                good = [(i, v) for i, v in batch if isinstance(v, torch.Tensor)]
                failures += [f"{items[i].key}: {v}" for i, v in batch if not isinstance(v, torch.Tensor)]
                if good:
                    # one clip stays in the loader's pinned memory, so its upload runs asynchronously
                    stacked = good[0][1][None] if len(good) == 1 else torch.stack([v for _, v in good])
                    video = to_model_range(stacked.to(encoders.device, non_blocking=True))
                    with torch.no_grad():
                        tensors = {"latents": vae.encode(video)}
                        if clip is not None:
                            tensors["clip_fea"] = clip.encode(video[:, :, 0])
                            tensors["y"] = first_frame_condition(vae, video)
                    for b, (i, _) in enumerate(good):
                        writer.submit(items[i].key, dict(todo[i][1]),
                                      {k: t[b].detach().to(out_dtype) for k, t in tensors.items()})
                bar.update(len(batch))
            writer.finish()
        failures += [f"{key}: the encoders gave NaN/inf {names} (an overflow in {cfg.vae_dtype}?): "
                     "not cached; try data.vae_dtype=float32" for key, names in writer.not_finite]
    finally:
        writer.close()
        bar.close()
    del vae, clip, loader, batches
    free_memory()
    return failures


@contextlib.contextmanager
def vae_kernels(deterministic: bool):
    """The kernel choices of a GPU encode. Timed (the default): cuDNN times its algorithms per
    convolution shape (a few shapes, tried once) and torch.compile's Triton kernels are
    autotuned on the device; both choices can differ between processes, and the latents with
    them in the last bf16 bit (seen on an H200: two fresh processes 0.0156 apart, one process
    repeating itself exactly). Deterministic (data.vae_deterministic): cuDNN by rule with
    deterministic kernels, and Inductor's deterministic mode (no on-device benchmarking), so
    every process picks the same kernels. Inductor's flag alone, set at run time, did not do it
    (two fresh processes on an H200 still 0.031 apart); with torch's deterministic algorithms on
    as well they are equal, as with TORCHINDUCTOR_DETERMINISTIC=1 from the start. The switches
    are restored afterwards, so that training and previews run as they would have; kernels
    compiled inside keep their choice."""
    import torch._inductor.config as inductor

    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, inductor.deterministic
    algorithms = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    inductor.deterministic = deterministic or saved[2]
    if deterministic:
        # warn_only: an op without a deterministic kernel warns instead of stopping the cache
        torch.use_deterministic_algorithms(True, warn_only=not algorithms[0] or algorithms[1])
    try:
        with warnings.catch_warnings():
            # cuBLAS asks for CUBLAS_WORKSPACE_CONFIG under deterministic algorithms; the VAE's
            # one attention is a few frames' worth and repeated encodes were equal without it
            warnings.filterwarnings("ignore", message=".*CUBLAS_WORKSPACE_CONFIG.*")
            yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, inductor.deterministic = saved
        torch.use_deterministic_algorithms(algorithms[0], warn_only=algorithms[1])


class _Writer:
    """Writes finished clips from a background thread, so the GPU encodes the next clip while
    the last one is copied to the host and saved. Files are written in order, each atomically;
    after a failed write (or an `on_item` that raises, as an interrupt would) nothing more is
    written and the error is raised in the caller at its next `check`/`finish`."""

    def __init__(self, cache_dir: Path, on_item):
        from concurrent.futures import ThreadPoolExecutor

        self.cache_dir, self.on_item = cache_dir, on_item
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-writer")
        self.pending: list = []
        self.error: BaseException | None = None
        self.done = 0
        self.not_finite: list[tuple[str, list[str]]] = []  # skipped: would turn every weight NaN

    def submit(self, key: str, record: dict, tensors: dict[str, torch.Tensor]) -> None:
        event = None
        if any(t.is_cuda for t in tensors.values()):  # start the copy now, wait for it in the thread
            host = {k: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for k, t in tensors.items()}
            for k, t in tensors.items():
                host[k].copy_(t, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            tensors = host
        self.pending.append(self.pool.submit(self._write, key, record, tensors, event))
        if len(self.pending) > 4:  # bounded: never more than a few clips of host memory queued
            self.pending.pop(0).result()

    def _write(self, key: str, record: dict, tensors: dict, event) -> None:
        from wan_model.loading import save_safetensors_atomic

        if self.error is not None:
            return
        try:
            if event is not None:
                event.synchronize()
            bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
            if bad:  # checked here, on the host copy, so the encode loop never waits for it
                self.not_finite.append((key, bad))
                return
            record["shapes"] = {k: list(t.shape) for k, t in tensors.items()}
            save_safetensors_atomic(tensors, latent_path(self.cache_dir, key), {"wantune": json.dumps(record)})
            self.done += 1
            if self.on_item is not None:
                self.on_item(self.done)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            self.error = e

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        for f in self.pending:
            f.result()
        self.pending.clear()
        self.check()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def _bar(total: int, desc: str, unit: str, progress: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)


# ---- the whole run ---------------------------------------------------------------------------

@dataclass
class CacheRun:
    texts_encoded: int = 0
    items_encoded: int = 0
    items_reused: int = 0
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0


def build_cache(plan: Plan, encoders: Encoders, i2v: bool, rank: int = 0, world: int = 1,
                progress: bool = True, on_item: Callable[[int], None] | None = None,
                barrier: Callable[[], None] | None = None) -> CacheRun:
    """Encode what is missing or out of date for this rank; rank 0 then writes the manifest.

    `on_item(n)` is called after the n-th clip file of this run is written (progress hooks,
    and tests that interrupt a run). `barrier` waits for every rank (accelerate's
    `wait_for_everyone`); with one rank it is not needed."""
    cfg = plan.config
    if not cfg.cache_dir:
        raise ValueError("data.cache_dir is empty: set it to the folder the cache is written to")
    cache_dir = Path(cfg.cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    settings = cache_settings(cfg, encoders.identity, i2v)
    run, t0 = CacheRun(), time.time()
    tag = f" [rank {rank}/{world}]" if world > 1 else ""

    # Ranks take whole encoder batches of the one-rank order, so every caption and clip is encoded
    # in the same company (the same shapes and kernels) as on one GPU: the same bytes on disk.
    captions = _deal(_chunks(sorted(captions_needed(plan).items()), cfg.text_batch_size), rank, world)
    todo_text = [(h, c) for h, c in captions if not _text_done(cache_dir, h, settings["text_hash"])]
    _encode_texts(todo_text, encoders, cfg, cache_dir, settings["text_hash"], progress, "text" + tag)
    run.texts_encoded = len(todo_text)

    items = sorted(plan.items, key=lambda it: it.key)
    mine = [items[i] for i in _deal(_bucket_batches(items, cfg.vae_batch_size), rank, world)]
    wanted = [(item, _item_record(plan, item, settings["latent_hash"])) for item in mine]
    todo = [(item, rec) for item, rec in wanted if not _item_done(cache_dir, rec)]
    run.items_reused = len(wanted) - len(todo)
    run.failures = _encode_latents(todo, plan, encoders, cfg, cache_dir, progress, "latents" + tag, on_item)
    run.items_encoded = len(todo) - len(run.failures)

    if barrier is not None:
        barrier()
    if rank == 0:
        write_manifest(plan, cache_dir, settings)
    run.seconds = time.time() - t0
    return run


def _chunks(seq: list, size: int) -> list[list]:
    return [seq[i:i + size] for i in range(0, len(seq), size)]


def _deal(batches: list[list], rank: int, world: int) -> list:
    """Rank r's share: batches r, r+world, ... of the one-rank order, flattened."""
    return [x for batch in batches[rank::world] for x in batch]


def write_manifest(plan: Plan, cache_dir: Path, settings: dict, prune: bool = True) -> dict:
    """Index every finished item of the plan (read back from the files' own records); items
    whose file is missing (failed to decode) are listed under `missing`."""
    from wan_model.loading import write_text_atomic

    items, missing, used_text = [], [], {text_hash("")}
    for item in sorted(plan.items, key=lambda it: it.key):
        rec = plan.records[item.record]
        want = _item_record(plan, item, settings["latent_hash"])
        have = read_record(latent_path(cache_dir, item.key))
        text_ok = _text_done(cache_dir, rec.caption_hash, settings["text_hash"])
        if have is None or not all(have.get(k) == want[k] for k in _MATCH) or not text_ok:
            missing.append(item.key)
            continue
        used_text.add(rec.caption_hash)
        items.append({**want, "shapes": have["shapes"], "caption": rec.caption,
                      "caption_hash": rec.caption_hash, "num_repeats": rec.clip.num_repeats,
                      "size": rec.size, "mtime": rec.mtime,
                      "file": f"latents/{item.key}.safetensors",
                      "text_file": f"text/{rec.caption_hash}.safetensors"})
    manifest = {"format": CACHE_FORMAT, "settings": settings, "i2v": settings["latent"]["i2v"],
                "empty_text_file": f"text/{text_hash('')}.safetensors", "items": items,
                "missing": missing}  # no timestamp: an interrupted, resumed run ends byte-identical
    write_text_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=1))
    write_probes(plan)
    if prune:
        _prune(cache_dir, {i["key"] for i in items} | set(missing), used_text)
    return manifest


def scan_with_report(cfg: DataConfig, state, progress: bool = True) -> Plan:
    """Scan the corpus on the main process (printing the dataset report, saving it as
    report.txt and the file probes), then on the other ranks from those probes, so each file is
    decoded for probing once. `state`: an accelerate Accelerator/PartialState."""
    from .cache_files import read_probes
    from .plan import scan
    from .report import format_report

    from wan_model.atomic import sweep_stale_temps, write_text_atomic

    media = Path(cfg.cache_dir) / "media"
    if state.is_main_process:
        for folder in ("", "latents", "text", "media"):  # what killed runs left behind
            sweep_stale_temps(Path(cfg.cache_dir).expanduser() / folder)
        plan = scan(cfg, known=read_probes(cfg.cache_dir), progress=progress, media_dir=media)
        report = format_report(plan)
        print(report, flush=True)
        write_text_atomic(Path(cfg.cache_dir) / "report.txt", report + "\n")
        write_probes(plan)
    state.wait_for_everyone()
    if not state.is_main_process:
        plan = scan(cfg, known=read_probes(cfg.cache_dir), progress=False, media_dir=media)
    return plan


def write_probes(plan: Plan) -> None:
    """Save every file's hash and probe so the next scan (or another rank) skips decoding."""
    from wan_model.loading import write_text_atomic

    write_text_atomic(Path(plan.config.cache_dir).expanduser() / PROBES, json.dumps(probe_cache(plan)))


def _prune(cache_dir: Path, keys: set[str], captions: set[str]) -> None:
    """Remove files no plan item refers to (old geometry, changed clips) and temp leftovers."""
    for sub, keep in (("latents", keys), ("text", captions)):
        for f in (cache_dir / sub).glob("*"):
            stale = f.name.startswith(".") and ".tmp-" in f.name
            stale |= f.suffix == ".safetensors" and f.stem not in keep
            if stale:
                f.unlink(missing_ok=True)


# ---- checks for training ---------------------------------------------------------------------

def conditioning_is_i2v(cfg: DataConfig, paths) -> bool:
    """data.conditioning, or (auto) what the model is (model.flavour, the DiT's config or keys)."""
    if cfg.conditioning != "auto":
        return cfg.conditioning == "i2v"
    i2v = paths.is_i2v()
    if i2v is None:
        raise ValueError(f"cannot tell whether {paths.resolve('transformer')} is a t2v or an i2v model "
                         "(no config.json): set data.conditioning=t2v or data.conditioning=i2v, or "
                         "model.flavour")
    return i2v


def verify_cache(plan: Plan, settings: dict) -> list[str]:
    """Differences between the corpus as scanned now and the cache (empty = fresh). Training
    calls this so a stale cache is rebuilt instead of trained on."""
    from .cache_files import read_manifest
    from .dataset import check_settings

    cache_dir = Path(plan.config.cache_dir).expanduser()
    manifest = read_manifest(cache_dir)
    try:
        check_settings(manifest["settings"], settings, cache_dir)
    except Exception as e:
        return [str(e)]
    have = {e["key"]: e for e in manifest["items"]}
    problems = []
    for item in plan.items:
        rec = plan.records[item.record]
        e = have.pop(item.key, None)
        name = f"{rec.clip.path.name} ({item.bucket.name} from frame {item.start})"
        if e is None:
            problems.append(f"{name}: not cached")
        elif e["content_hash"] != rec.content_hash or e["frames_hash"] != item.frames_hash:
            problems.append(f"{name}: the file changed since it was cached")
        elif e["caption_hash"] != rec.caption_hash:
            problems.append(f"{name}: the caption changed since it was cached")
        elif e["num_repeats"] != rec.clip.num_repeats:
            problems.append(f"{name}: num_repeats changed")
    problems += [f"{k}: cached, but no longer part of the corpus" for k in sorted(have)]
    return problems
