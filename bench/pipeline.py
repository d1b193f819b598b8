"""Whole-pipeline cases: the caching stage (decode + VAE + T5) on a written corpus, and a short
training run with validation previews. Both call the project's own code paths (data.cache,
train.loop.train), so they measure what a user runs."""
from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from wantune.bench.cases import Case
from wantune.bench.run import flavour_name, model_dir, size_of
from wantune.bench.timing import peak_memory, reset_memory, set_memory_cap

FPS = 16


# ---- a corpus of distinct clips ------------------------------------------------------------

def _write_clip(job) -> None:
    """A drifting random texture with a moving square (distinct content per seed): H.264 through
    PyAV, or MPEG-4 through OpenCV where PyAV is missing (the GPU image has OpenCV only)."""
    path, seed, (w, h), frames = job
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, size=(h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    texture = np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:h, :w]
    images = []
    for i in range(frames):
        img = np.roll(texture, shift=(i * 2, i * 3), axis=(0, 1)).copy()
        x, y = (37 * seed + 9 * i) % (w - 48), (23 * seed + 5 * i) % (h - 48)
        img[y:y + 48, x:x + 48] = 255
        images.append(img)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.mp4")
    try:
        import av
    except ImportError:
        import cv2

        out = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (w, h))
        for img in images:
            out.write(np.ascontiguousarray(img[:, :, ::-1]))  # OpenCV takes BGR
        out.release()
    else:
        with av.open(str(tmp), "w") as out:
            stream = out.add_stream("libx264", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for img in images:
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    tmp.replace(path)


def write_corpus(folder: Path, n: int, size: tuple[int, int], frames: int) -> Path:
    """n clips + captions (reused when present), written by a process pool."""
    from concurrent.futures import ProcessPoolExecutor
    import os

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(str(folder / f"clip_{i:03d}.mp4"), i, size, frames) for i in range(n)
            if not (folder / f"clip_{i:03d}.mp4").exists()]
    if jobs:
        with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1, 16)) as pool:
            list(pool.map(_write_clip, jobs))
    for i in range(n):
        (folder / f"clip_{i:03d}.txt").write_text(
            f"clip {i}: a white square crosses a drifting mosaic of coloured tiles, seen from a "
            f"fixed camera, variant {i % 7} of a study in motion and texture")
    return folder


# ---- the caching stage -----------------------------------------------------------------------

def _pipeline_dir(opts) -> Path:
    return opts.work_dir / ("pipeline-tiny" if opts.tiny else "pipeline")


def _recipe(case: Case, opts, root: Path, corpus: Path, extra: list[str]):
    """The shipped 1.3B LoRA recipe pointed at the bench model and corpus; the caching case and
    the training case share its data settings, so training reuses the cache."""
    from wantune.train.config import load_recipe

    flavour, (w, h, f) = flavour_name(case, opts), size_of(case, opts)
    gpu = opts.device.type == "cuda"
    overrides = [f"model.root={root}", f"model.flavour={flavour}",
                 f"data.sources=[{{path: '{corpus}'}}]", f"data.areas=[[{w},{h}]]",
                 f"data.frame_buckets=[{f}]", f"data.cache_dir={_pipeline_dir(opts) / f'cache-{w}x{h}x{f}'}",
                 f"data.vae_compile={gpu}", f"train.compile={gpu}"]
    if not gpu:
        overrides += ["train.mixed_precision='no'", "train.base_dtype=fp32", "train.optim.name=adamw"]
    repo = Path(__file__).resolve().parents[1]
    return load_recipe(str(repo / "recipes" / "t2v-1.3B-lora.yaml"), overrides + extra)


def run_cache_stage(case: Case, opts) -> dict:
    """tools/cache.py's work in-process on a fresh cache: scan + report, T5 stage, VAE stage
    (decoding in workers). Times every part; the per-clip figure is the steady state."""
    from wantune.data.cache import build_cache, model_encoders
    from wantune.data.plan import scan
    from wan_model.paths import ModelPaths

    flavour, (w, h, f) = flavour_name(case, opts), size_of(case, opts)
    n = 6 if opts.tiny else case.clips
    root = model_dir(opts, flavour, ("vae", "t5", "tokenizer"))
    base = _pipeline_dir(opts)
    t0 = time.perf_counter()
    corpus = write_corpus(base / f"corpus-{w}x{h}x{f}", n, (w, h), f + 4)
    opts.log(f"  corpus of {n} clips ready in {time.perf_counter() - t0:.0f} s")
    # a case with its own data settings caches beside the shared cache, which training reuses
    own = [f"data.cache_dir={_pipeline_dir(opts) / f'cache-{w}x{h}x{f}-{case.name}'}"] if case.data else []
    cfg = _recipe(case, opts, root, corpus, [*case.data, *own]).data
    shutil.rmtree(cfg.cache_dir, ignore_errors=True)
    marks: dict[str, float] = {}
    item_times: list[float] = []
    stage_peaks: dict[str, float | None] = {}

    def timed(name, load):
        def wrapped():
            if name == "vae" and opts.device.type == "cuda":  # the text stage ends here
                mem = peak_memory(opts.device)
                stage_peaks.update(text_peak_allocated_gib=mem["peak_allocated_gib"],
                                   text_peak_reserved_gib=mem["peak_reserved_gib"])
                torch.cuda.reset_peak_memory_stats(opts.device)
            marks[f"{name}_load_start"] = time.perf_counter()
            model = load()
            if opts.device.type == "cuda":
                torch.cuda.synchronize()
            marks[f"{name}_loaded"] = time.perf_counter()
            return model
        return wrapped

    def on_item(k):
        if opts.device.type == "cuda":
            torch.cuda.synchronize()
        item_times.append(time.perf_counter())

    reset_memory(opts.device)
    if case.cap_gib:  # as on a card of that size (tools/bench.py lifts it after the case)
        set_memory_cap(opts.device, case.cap_gib)
    start = time.perf_counter()
    plan = scan(cfg, progress=False)
    scanned = time.perf_counter()
    enc = model_encoders(ModelPaths(root=str(root)), cfg, False, opts.device)
    enc.load_text, enc.load_vae = timed("text", enc.load_text), timed("vae", enc.load_vae)
    run = build_cache(plan, enc, False, progress=False, on_item=on_item)
    end = time.perf_counter()
    mem = peak_memory(opts.device)  # since the VAE stage began (or the whole run, without a text stage)
    if stage_peaks:
        stage_peaks.update(vae_peak_allocated_gib=mem["peak_allocated_gib"],
                           vae_peak_reserved_gib=mem["peak_reserved_gib"])
        mem = {k: max(mem[k], stage_peaks[f"text_{k}"]) for k in mem}
    if run.failures or run.items_encoded != n:
        raise RuntimeError(f"caching encoded {run.items_encoded} of {n} clips: {run.failures[:3]}")
    text_s = marks["vae_load_start"] - marks["text_loaded"]  # captions encoded + written + freed
    warm = min(3, n - 1)  # the first clips pay for cuDNN tuning and compiling each shape
    steady = (item_times[-1] - item_times[warm - 1]) / (n - warm)
    clip_s = steady + text_s / n  # per clip, the whole stage: decode + VAE + T5, at steady state
    return {"kind": "cache", "clips": n, "size": [w, h, f], "clip_s": clip_s, "clips_per_min": 60 / clip_s,
            "vae_clip_s": steady, "text_s": text_s, "text_per_clip_s": text_s / n,
            "scan_s": scanned - start, "text_load_s": marks["text_loaded"] - marks["text_load_start"],
            "vae_load_s": marks["vae_loaded"] - marks["vae_load_start"],
            "first_clips_s": item_times[warm - 1] - marks["vae_loaded"], "warm_clips": warm,
            "end_to_end_s": end - start, "end_to_end_clips_per_min": 60 * n / (end - start),
            "num_workers": cfg.num_workers, "vae_compile": cfg.vae_compile, "low_memory": cfg.low_memory,
            "text_encoder_device": cfg.text_encoder_device, **mem, **stage_peaks, **_cap(case, opts, mem)}


def _cap(case: Case, opts, mem: dict) -> dict:
    """The cap a case ran under, and plainly whether its peak stayed below it."""
    if not case.cap_gib or opts.device.type != "cuda":
        return {}
    return {"cap_gib": case.cap_gib, "cap_respected": mem["peak_reserved_gib"] <= case.cap_gib}


# ---- training with previews ------------------------------------------------------------------

def run_train_previews(case: Case, opts) -> dict:
    """`train.loop.train` on the shipped 1.3B LoRA recipe (shortened) with previews at the
    start and every `every` steps: seconds per render, and step times before and after."""
    from wantune.train.loop import train

    flavour, (w, h, f) = flavour_name(case, opts), size_of(case, opts)
    root = model_dir(opts, flavour, ("dit", "vae", "t5", "tokenizer"))
    base = _pipeline_dir(opts)
    corpus = write_corpus(base / f"corpus-{w}x{h}x{f}", 4 if opts.tiny else 8, (w, h), f + 4)
    out = base / "run-previews"
    shutil.rmtree(out, ignore_errors=True)
    every, steps = (2, 4) if opts.tiny else (4, 8)
    pw, ph, pf, ps = (64, 64, 5, 2) if opts.tiny else case.preview
    recipe = _recipe(case, opts, root, corpus, [
        f"run.output_dir={out}", f"train.max_steps={steps}", "train.log_every=1",
        "train.optim.warmup_steps=0", "checkpoint.every=1000", "tracking.tensorboard=false",
        f"validation.every={every}", f"validation.width={pw}", f"validation.height={ph}",
        f"validation.frames={pf}", f"validation.steps={ps}"])
    reset_memory(opts.device)
    t0 = time.perf_counter()
    result = train(recipe)
    wall = time.perf_counter() - t0
    renders = [s for _, s in result["preview_times"]]
    import json

    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    step_peaks = [r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r]
    render_peaks = [r["validation/peak_gib"] for r in rows if "validation/peak_gib" in r]
    times = result["step_times"]
    before = times[1:every]  # step 1 compiles; steps 2..every run before the first periodic preview
    after = times[every:2 * every]
    mem = peak_memory(opts.device)
    if step_peaks or render_peaks:  # the trainer resets the counters at every log: its own peaks
        mem = {"peak_allocated_gib": max(step_peaks + render_peaks), "peak_reserved_gib": None}
    return {"kind": "previews", "renders_s": renders, "render_s": statistics.median(renders[1:] or renders),
            "first_render_s": renders[0], "steps": steps, "every": every, "step_times_s": times,
            "step_before_preview_s": statistics.median(before), "step_after_preview_s": statistics.median(after),
            "preview": {"width": pw, "height": ph, "frames": pf, "steps": ps, "guidance": recipe.validation.guidance},
            "train_size": [w, h, f], "wall_s": wall, "losses": result["losses"],
            "step_peak_gib": step_peaks, "render_peak_gib": render_peaks,
            "videos": sorted(str(p.relative_to(out)) for p in (out / "samples").rglob("*.mp4")),
            **mem}
