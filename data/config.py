"""The `data:` section of a recipe: where the clips are and how they become training tensors.

Every field has a default and a help text; `DataConfig.problems()` reports every cross-field
problem at once so a user fixes a recipe in one go.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

SOURCE_KINDS = ("auto", "folder", "manifest", "hf")
SAMPLING_MODES = ("head", "uniform", "chunk", "slide")
CONDITIONINGS = ("auto", "t2v", "i2v")
DTYPES = ("float32", "bfloat16", "float16")
TEXT_ENCODER_DEVICES = ("auto", "device", "cpu", "stream")  # wan_model.text_encoder.PLACEMENTS


@dataclass
class SourceConfig:
    path: str = field(default="", metadata={
        "help": "A folder of clips/images with same-name caption files, a metadata.csv / .jsonl "
                "manifest (or a folder holding one), or a Hugging Face dataset saved with "
                "save_to_disk."})
    kind: str = field(default="auto", metadata={
        "help": "auto, folder, manifest or hf. auto: a .csv/.jsonl file or a folder with "
                "metadata.csv/metadata.jsonl is a manifest, a folder with dataset_info.json is hf, "
                "any other folder is a folder of clips."})
    num_repeats: int = field(default=1, metadata={
        "help": "How many times each clip of this source appears per epoch (>= 1)."})
    trigger_word: str = field(default="", metadata={
        "help": "Replaces the placeholder (data.sources[].trigger_placeholder) in captions; "
                "prepended as 'word, caption' where a caption has no placeholder."})
    trigger_placeholder: str = field(default="[trigger]", metadata={
        "help": "The text in captions that the trigger word replaces."})
    caption_ext: str = field(default=".txt", metadata={
        "help": "Suffix of the caption file beside each clip (folder sources)."})
    video_column: str = field(default="", metadata={
        "help": "Manifest/hf column holding the clip path; empty = the first of file_name, video, "
                "image, path."})
    caption_column: str = field(default="", metadata={
        "help": "Manifest/hf column holding the caption; empty = the first of caption, prompt, text."})
    recursive: bool = field(default=False, metadata={
        "help": "Folder sources: also look in sub-folders."})
    allow_outside: bool = field(default=False, metadata={
        "help": "Manifest sources: follow rows whose path leaves the manifest's folder (absolute "
                "or '..' paths). Off: such rows are reported and skipped."})


@dataclass
class DataConfig:
    sources: list[SourceConfig] = field(default_factory=list, metadata={
        "help": "One or more corpus sources (see SourceConfig)."})
    areas: list[list[int]] = field(default_factory=lambda: [[832, 480]], metadata={
        "help": "Target pixel areas, each given as a width,height pair (e.g. [832,480] means "
                "832*480 pixels); every clip gets an aspect-ratio bucket at every area."})
    bucket_step: int = field(default=16, metadata={
        "help": "Bucket sides are multiples of this (16 = VAE stride 8 x DiT patch 2)."})
    max_aspect: float = field(default=4.0, metadata={
        "help": "Most extreme aspect ratio a bucket may have (long side / short side)."})
    allow_upscale: bool = field(default=False, metadata={
        "help": "Allow enlarging clips smaller than their bucket. When false such a clip is "
                "trained at the largest grid size inside its own frame (reported)."})
    frame_buckets: list[int] = field(default_factory=lambda: [1, 17, 33, 81], metadata={
        "help": "Allowed frame counts, each of the form 4k+1; 1 is for images. A video takes the "
                "largest bucket it can fill."})
    frame_sampling: str = field(default="head", metadata={
        "help": "head: the first window; uniform: `windows_per_clip` windows evenly spread; "
                "chunk: consecutive non-overlapping windows; slide: a window every `frame_stride` "
                "frames."})
    windows_per_clip: int = field(default=0, metadata={
        "help": "uniform: windows taken per clip (0 = 1). chunk/slide: at most this many windows "
                "per clip (0 = all that fit)."})
    frame_stride: int = field(default=8, metadata={
        "help": "slide mode: frames between window starts (after fps resampling)."})
    target_fps: Optional[float] = field(default=16.0, metadata={
        "help": "Resample every clip to this frame rate (Wan is trained at 16). null keeps the "
                "source timing; the report then lists the frame rates that are trained as-is."})
    skip_duplicates: bool = field(default=True, metadata={
        "help": "Skip a file whose content equals an earlier one (reported with the original)."})
    require_captions: bool = field(default=False, metadata={
        "help": "When false a clip without caption trains with the empty (or trigger-only) "
                "caption and is reported; when true it is unusable."})
    conditioning: str = field(default="auto", metadata={
        "help": "t2v, i2v or auto (from model.flavour or the transformer's config.json). i2v also "
                "caches the CLIP features of the first frame and the first-frame latent `y`."})
    cache_dir: str = field(default="", metadata={
        "help": "Folder of the cached latents and embeddings (required for caching/training)."})
    latent_dtype: str = field(default="float32", metadata={
        "help": "dtype of the cached latents: float32, bfloat16 or float16."})
    vae_dtype: str = field(default="bfloat16", metadata={
        "help": "dtype the VAE encodes in (on CPU float32 is used)."})
    text_dtype: str = field(default="bfloat16", metadata={
        "help": "dtype the text encoder runs in; embeddings are stored in bfloat16."})
    text_encoder_device: str = field(default="auto", metadata={
        "help": "Where the umT5 text encoder (11 GB in bf16) runs for caching and preview prompts: "
                "device (whole on the GPU), cpu (on the host, in data.text_dtype: float32 is slow, "
                "bfloat16 faster where the CPU supports it), stream (weights in pinned host memory, "
                "each block copied to the GPU in turn: ~1 GB of GPU memory plus activations, the "
                "same embeddings as device) or auto (the memory planner's choice; device where "
                "none runs). Changing it does not rebuild the cache."})
    low_memory: Optional[bool] = field(default=None, metadata={
        "help": "VAE tiling while caching, for small cards: bounded memory, one clip per VAE call, "
                "slightly different latents (changing it rebuilds the cache). null: the memory "
                "planner's choice (off where none runs). The text encoder is always freed before "
                "the VAE is loaded."})
    vae_compile: bool = field(default=True, metadata={
        "help": "On GPUs, run the VAE's bias+norm+SiLU passes as fused kernels (Triton and "
                "torch.compile): the same latents to bf16 rounding, ~1.8x faster encode on an "
                "H100; the first clip of each shape compiles."})
    vae_deterministic: bool = field(default=False, metadata={
        "help": "On GPUs, choose kernels by rule instead of timing them (cuDNN: benchmark off, "
                "deterministic algorithms; torch.compile: Inductor's deterministic mode): the same "
                "latents bit for bit on every run and any number of GPUs. Off, timed choices can "
                "differ from process to process, and the latents in the last bf16 bit."})
    vae_batch_size: int = field(default=1, metadata={
        "help": "Clips of the same bucket encoded together by the VAE."})
    text_batch_size: int = field(default=16, metadata={
        "help": "Captions encoded together by the text encoder."})
    num_workers: int = field(default=4, metadata={
        "help": "Processes that decode clips while the models encode (0 = in the main process)."})
    batch_size: int = field(default=1, metadata={
        "help": "Training batch size (every batch comes from one bucket)."})
    seed: int = field(default=42, metadata={
        "help": "Seed of the training order (shuffled per epoch, restored on resume)."})

    def problems(self) -> list[str]:
        """Every cross-field problem of this section (empty list = fine)."""
        out: list[str] = []
        if not self.sources:
            out.append("data.sources is empty: add at least one source, e.g. "
                       "data.sources=[{path: my_clips/}]")
        for i, src in enumerate(self.sources):
            where = f"data.sources[{i}]"
            if not src.path:
                out.append(f"{where}.path is empty: set it to a folder, manifest or saved dataset")
            if src.kind not in SOURCE_KINDS:
                out.append(f"{where}.kind={src.kind!r}: choose one of {', '.join(SOURCE_KINDS)}")
            if src.num_repeats < 1:
                out.append(f"{where}.num_repeats={src.num_repeats}: must be >= 1")
        if not self.areas:
            out.append("data.areas is empty: give at least one width,height pair, e.g. [[832,480]]")
        for i, a in enumerate(self.areas):
            if len(a) != 2 or min(a) < self.bucket_step:
                out.append(f"data.areas[{i}]={list(a)}: give a width,height pair, each side >= "
                           f"data.bucket_step ({self.bucket_step})")
        if self.bucket_step <= 0 or self.bucket_step % 16:
            out.append(f"data.bucket_step={self.bucket_step}: must be a positive multiple of 16 "
                       "(VAE stride 8 times DiT patch 2)")
        if self.max_aspect < 1:
            out.append(f"data.max_aspect={self.max_aspect}: must be >= 1")
        if not self.frame_buckets:
            out.append("data.frame_buckets is empty: give frame counts of the form 4k+1, e.g. [1, 17, 33, 81]")
        bad = [f for f in self.frame_buckets if f < 1 or (f - 1) % 4]
        if bad:
            fixed = sorted({max(1, (f - 1) // 4 * 4 + 1) for f in bad})
            out.append(f"data.frame_buckets has {bad}: every count must be 4k+1 (the VAE's "
                       f"time stride is 4); nearest allowed below: {fixed}")
        if self.frame_sampling not in SAMPLING_MODES:
            out.append(f"data.frame_sampling={self.frame_sampling!r}: choose one of "
                       f"{', '.join(SAMPLING_MODES)}")
        if self.windows_per_clip < 0:
            out.append(f"data.windows_per_clip={self.windows_per_clip}: must be >= 0")
        if self.frame_stride < 1:
            out.append(f"data.frame_stride={self.frame_stride}: must be >= 1")
        if self.target_fps is not None and self.target_fps <= 0:
            out.append(f"data.target_fps={self.target_fps}: must be > 0, or null to keep source timing")
        if self.conditioning not in CONDITIONINGS:
            out.append(f"data.conditioning={self.conditioning!r}: choose one of {', '.join(CONDITIONINGS)}")
        if self.text_encoder_device not in TEXT_ENCODER_DEVICES:
            out.append(f"data.text_encoder_device={self.text_encoder_device!r}: choose one of "
                       f"{', '.join(TEXT_ENCODER_DEVICES)} (stream or cpu for cards under 16 GB)")
        for name in ("latent_dtype", "vae_dtype", "text_dtype"):
            if getattr(self, name) not in DTYPES:
                out.append(f"data.{name}={getattr(self, name)!r}: choose one of {', '.join(DTYPES)}")
        for name in ("vae_batch_size", "text_batch_size", "batch_size"):
            if getattr(self, name) < 1:
                out.append(f"data.{name}={getattr(self, name)}: must be >= 1")
        if self.num_workers < 0:
            out.append(f"data.num_workers={self.num_workers}: must be >= 0")
        return out

    @property
    def pixel_areas(self) -> list[int]:
        return [int(w) * int(h) for w, h in self.areas]
