"""The recipe: a typed YAML schema composed, in this one place, of each layer's own section
(`model:` from wan_model.paths, `data:` from data.config) and the training ones defined here.

`load_recipe(path, overrides)` merges the YAML and `key=value` overrides onto the schema
(data.recipe.load_sections); unknown keys and wrong types are rejected with the key named (and a
"did you mean"), then every cross-field problem is reported at once. Relative paths are relative
to the working directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from omegaconf import OmegaConf

from wantune.data.config import DataConfig
from wantune.data.recipe import RecipeError, load_sections  # noqa: F401 (RecipeError: part of this API)
from wan_model.attention import BACKENDS as ATTENTION_BACKENDS
from wan_model.paths import ModelPaths

DEFAULT_LORA_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                        "cross_attn.k_img", "cross_attn.v_img", "ffn.0", "ffn.2"]
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "sigmoid", "shift")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "paged_adamw", "adafactor", "prodigy")
SCHEDULERS = ("constant", "cosine", "linear")
BASE_DTYPES = ("fp32", "bf16", "fp8")
LOG_LEVELS = ("quiet", "verbose")
PREVIEW_FORMATS = ("mp4", "webm", "webp", "gif")
PREVIEW_DECODES = ("auto", "device", "tiled", "cpu")


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class RunConfig:
    output_dir: str = _f("runs/wantune", "Folder of this run: checkpoints step-N/, samples/, export/, logs.")
    seed: int = _f(42, "Seed of noise, timesteps and dropout (the data order has data.seed).")
    name: str = _f("", "Run name for trackers and exported metadata (default: the output folder's name).")
    log_level: str = _f("quiet", "quiet: notices of third-party libraries that ask nothing of you are "
                                 "hidden (the list is in wan_model/quiet.py); verbose: everything they "
                                 "print (as --verbose).")


@dataclass
class DemoConfig:
    enabled: bool = _f(False, "Generate a synthetic corpus and a tiny random model before training "
                              "(the embedded demo). Existing files are kept.")
    flavour: str = _f("tiny-t2v", "Flavour of the random model to write.")
    num_clips: int = _f(6, "Synthetic clips of moving shapes to generate.")
    corpus_dir: str = _f("demo/clips", "Where the synthetic clips and captions go.")
    model_dir: str = _f("demo/model", "Where the random model goes (official layout).")


@dataclass
class TimestepConfig:
    sampling: str = _f("shift", "uniform, logit_normal, sigmoid (sigmoid of scaled normal) or shift "
                                "(sigmoid, then the flow shift).")
    shift: float = _f(3.0, "Flow shift for sampling=shift: s' = shift*s / (1 + (shift-1)*s).")
    logit_mean: float = _f(0.0, "Mean of the normal for logit_normal.")
    logit_std: float = _f(1.0, "Std of the normal for logit_normal.")
    sigmoid_scale: float = _f(1.0, "Scale of the normal for sigmoid and shift.")
    min: float = _f(0.0, "Lower bound of the noise level s in [0,1].")
    max: float = _f(1.0, "Upper bound of the noise level s in [0,1].")
    loss_weighting: str = _f("none", "none, sigma_sqrt (1/s^2, clipped) or cosmap.")


@dataclass
class OptimConfig:
    name: str = _f("adamw", "adamw (fused on CUDA), adamw8bit, paged_adamw8bit, paged_adamw "
                            "(bitsandbytes), adafactor, prodigy (needs prodigyopt).")
    lr: float = _f(1e-4, "Peak learning rate (prodigy: use 1.0).")
    weight_decay: float = _f(0.01, "Decoupled weight decay.")
    betas: list = _f([0.9, 0.999], "Adam betas.")
    eps: float = _f(1e-8, "Adam epsilon.")
    scheduler: str = _f("constant", "constant, cosine or linear (decay to min_lr_ratio*lr after warmup).")
    warmup_steps: int = _f(0, "Linear warmup steps.")
    min_lr_ratio: float = _f(0.0, "Final lr as a fraction of lr for cosine/linear.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 = off).")


@dataclass
class LoraConfig:
    rank: int = _f(32, "LoRA rank.")
    alpha: float = _f(32.0, "LoRA alpha (scale = alpha/rank).")
    dropout: float = _f(0.0, "LoRA dropout.")
    targets: list = _f(DEFAULT_LORA_TARGETS, "Module names (suffixes like 'self_attn.q') or regexes "
                       "('re:blocks\\.[0-9]\\.ffn\\.0') inside the blocks; one matching nothing is an error.")
    use_dora: bool = _f(False, "Train DoRA (weight-decomposed LoRA) instead of plain LoRA.")


@dataclass
class FullConfig:
    parts: list = _f([".*"], "Regexes of parameter names to train in full fine-tuning (default all).")
    ema: bool = _f(False, "Keep an exponential moving average of the trained weights (exported).")
    ema_decay: float = _f(0.999, "EMA decay per optimizer step.")


@dataclass
class TrainConfig:
    mode: str = _f("lora", "lora or full.")
    max_steps: int = _f(1000, "Optimizer steps to train.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    mixed_precision: str = _f("bf16", "bf16 (autocast) or no (float32; CPU tests).")
    memory: str = _f("auto", "auto: plan the memory levers left null below (checkpointing, kept "
                             "attention, offload, block swap, fp8 base) for the card's free memory "
                             "or memory_gib; off: null levers take the fast defaults (selective "
                             "checkpointing, nothing offloaded or swapped, bf16 base).")
    memory_gib: float = _f(0.0, "Plan for this many GiB of device memory instead of what the card "
                                "has free (0 = the free memory).")
    base_dtype: Optional[str] = _f(None, "dtype of the frozen base weights for LoRA: fp32, bf16 or fp8 "
                                         "(e4m3 with per-row scales, upcast on use); null = planned "
                                         "(fp8 when bf16 does not fit or fits only by recomputing more). Full "
                                         "training keeps fp32.")
    fp8_matmul: bool = _f(False, "With base_dtype fp8: run the frozen Linears' matmuls as float8 GEMMs "
                                 "(inputs and output gradients quantised to e4m3 per token; twice "
                                 "bf16's rate on Hopper and Ada tensor cores). It rounds activations "
                                 "too, so it changes the numerics beyond fp8 storage (a 200-step loss "
                                 "curve stays within 0.7% of bf16's). Measured on an H200 (BENCHMARKS.md): "
                                 "14B LoRA 8.69-8.72 s/step against 10.24 with fp8 storage alone and 11.30 "
                                 "bf16; 1.3B 1.88-1.92 against 1.96 bf16. Off by default.")
    fp8_fast_accum: bool = _f(True, "With fp8_matmul: the forward float8 GEMMs accumulate in the tensor "
                                    "cores' fast mode (torchao's float8 default; the input gradient "
                                    "always accumulates in full precision). false: full precision in "
                                    "forward too.")
    fp8_quant_kernel: bool = _f(True, "With fp8_matmul: quantise each float8 GEMM's input and output "
                                      "gradient per token in one Triton pass per row (the row read "
                                      "once) instead of the compiled block's fused two-pass reduction; "
                                      "the same bytes as eager torch's quantisation (Inductor's fused one "
                                      "gives other row scales). Needs a GPU with Triton (elsewhere "
                                      "the torch path runs). Measured on an H200 with FlashAttention 4, "
                                      "three runs at 1.3B: 0.2-1.2% faster, 0.82 GiB less at the peak "
                                      "(15.52 against 16.34 GiB); 14B: 7.80 against 7.81 s, 63.4 against "
                                      "64.7 GiB. false: Inductor's fused quantisation.")
    gradient_checkpointing: Optional[bool] = _f(None, "Recompute block activations in backward "
                                                      "(saves memory); null = planned.")
    checkpoint_mode: Optional[str] = _f(None, "full (recompute whole blocks) or selective (keep "
                                              "each block's self-attention output, recompute the "
                                              "rest); null = planned.")
    selective_blocks: Optional[int] = _f(None, "With checkpoint_mode=selective, only the first N "
                                               "blocks keep their attention output (-1 = all); "
                                               "null = planned.")
    checkpoint_offload: Optional[int] = _f(None, "The first N blocks keep their checkpointed inputs "
                                                 "in host memory (-1 = all, 0 = none); null = planned.")
    checkpoint_segments: Optional[bool] = _f(None, "Blocks that recompute everything do it again in "
                                                   "backward a segment at a time (self-attention, "
                                                   "cross-attention, FFN): a block's backward holds "
                                                   "about half the memory, for one more forward of "
                                                   "each such block; null = planned.")
    block_swap: Optional[int] = _f(None, "Blocks (from the last) whose frozen weights stay in host "
                                         "memory and are streamed to the GPU (0 = none); null = planned.")
    attention_backend: str = _f("auto", "auto (FlashAttention 4 where it is installed and runs: Hopper, "
                                         "datacenter Blackwell; else cuDNN first), fa4, cudnn, sdpa, "
                                         "flash, efficient, math or flash_attn.")
    compile: bool = _f(False, "torch.compile each transformer block.")
    sequence_parallel: int = _f(1, "GPUs that share each sample's tokens (DeepSpeed-Ulysses attention); "
                                   "the processes form data-parallel groups of this size. 1 = off. "
                                   "For 720p and long clips, see the README.")
    caption_dropout: float = _f(0.1, "Probability of training a sample with the empty prompt.")
    timestep: TimestepConfig = field(default_factory=TimestepConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log_every: int = _f(1, "Log to trackers every N steps.")


@dataclass
class CheckpointConfig:
    every: int = _f(250, "Write step-N/ every N optimizer steps (and at the end).")
    keep_last: int = _f(3, "Checkpoints kept; older ones are removed (0 = keep all).")
    resume: str = _f("", "'' (fresh), 'latest' (newest step-N/ in run.output_dir) or a step-N/ path.")


@dataclass
class ValidationConfig:
    prompts: list = _f([], "Prompts rendered at the start and every `every` steps.")
    prompts_file: str = _f("", "A text (one prompt a line) or YAML file of prompts with per-prompt "
                               "width/height/frames/seed/guidance/steps overrides.")
    every: int = _f(0, "Render previews every N steps (0 = only at start/end as set below).")
    at_start: bool = _f(True, "Render before the first step (a baseline to compare against).")
    at_end: bool = _f(True, "Render after the last step.")
    width: int = _f(832, "Preview width (multiple of 16).")
    height: int = _f(480, "Preview height (multiple of 16).")
    frames: int = _f(33, "Preview frames (4k+1).")
    steps: int = _f(30, "Sampling steps.")
    guidance: float = _f(5.0, "Classifier-free guidance scale.")
    shift: float = _f(5.0, "Sampling shift.")
    seed: int = _f(0, "Seed per prompt (fixed so steps compare).")
    negative_prompt: Optional[str] = _f(None, "Negative prompt (null = the official default).")
    fps: int = _f(16, "Frame rate of the written previews.")
    format: str = _f("mp4", "mp4, webm, webp or gif.")
    decode: str = _f("auto", "Where previews are decoded: device (the float32 VAE on the GPU for the "
                             "render), tiled (on the GPU in spatial tiles: a fraction of the memory, "
                             "seams blended), cpu (latents to the host, decoded there; the VAE, and "
                             "CLIP for I2V, never visit the GPU; slow) or auto (the memory planner's "
                             "choice; device where none runs).")


@dataclass
class ExportConfig:
    formats: list = _f(["wantune"], "LoRA formats written at the end: wantune (ComfyUI keys), "
                       "diffusers, kohya, ... ; full fine-tunes: official and/or diffusers layouts.")
    dtype: str = _f("bf16", "dtype of exported weights: fp32, bf16 or fp16.")
    title: str = _f("", "Title in the file's metadata (default: run name).")
    trigger_words: list = _f([], "Trigger words recorded in the metadata.")
    every_checkpoint: bool = _f(False, "Also export beside every step-N/ checkpoint.")


@dataclass
class TrackingConfig:
    wandb: bool = _f(False, "Log to Weights & Biases (set WANDB_MODE=offline to log without network).")
    tensorboard: bool = _f(True, "Log to TensorBoard under run.output_dir/logs.")
    project: str = _f("wantune", "Tracker project name.")
    sample_keys: bool = _f(True, "Write the cache keys of the samples trained since the previous "
                           "row (all ranks, in data order) to metrics.jsonl as data/keys.")


@dataclass
class Recipe:
    run: RunConfig = field(default_factory=RunConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    model: ModelPaths = field(default_factory=ModelPaths)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    full: FullConfig = field(default_factory=FullConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def problems(self) -> list[str]:
        out = self.model.problems()
        out += self.data.problems()
        if not self.data.cache_dir:
            out.append("data.cache_dir is empty: set the folder for cached latents")
        t = self.train
        choices = [("run.log_level", self.run.log_level, LOG_LEVELS),
                   ("train.mode", t.mode, ("lora", "full")),
                   ("train.mixed_precision", t.mixed_precision, ("bf16", "no")),
                   ("train.memory", t.memory, ("auto", "off")),
                   ("train.base_dtype", t.base_dtype, BASE_DTYPES + (None,)),
                   ("train.checkpoint_mode", t.checkpoint_mode, ("full", "selective", None)),
                   ("train.attention_backend", t.attention_backend, ATTENTION_BACKENDS),
                   ("train.timestep.sampling", t.timestep.sampling, TIMESTEP_SAMPLINGS),
                   ("train.timestep.loss_weighting", t.timestep.loss_weighting, LOSS_WEIGHTINGS),
                   ("train.optim.name", t.optim.name, OPTIMIZERS),
                   ("train.optim.scheduler", t.optim.scheduler, SCHEDULERS),
                   ("validation.decode", self.validation.decode, PREVIEW_DECODES),
                   ("export.dtype", self.export.dtype, ("fp32", "bf16", "fp16")),
                   ("validation.format", self.validation.format, PREVIEW_FORMATS)]
        for key, value, allowed in choices:
            if value not in allowed:
                out.append(f"{key}={value!r}: choose one of {', '.join(a for a in allowed if a is not None)}")
        if t.max_steps < 1:
            out.append(f"train.max_steps={t.max_steps}: must be >= 1")
        if t.grad_accum < 1:
            out.append(f"train.grad_accum={t.grad_accum}: must be >= 1")
        if not 0 <= t.timestep.min < t.timestep.max <= 1:
            out.append(f"train.timestep.min/max={t.timestep.min}/{t.timestep.max}: need 0 <= min < max <= 1")
        if not 0 <= t.caption_dropout <= 1:
            out.append(f"train.caption_dropout={t.caption_dropout}: must be in [0, 1]")
        if t.mode == "lora" and (self.lora.rank < 1 or not self.lora.targets):
            out.append("lora: rank must be >= 1 and targets non-empty")
        if t.sequence_parallel < 1:
            out.append(f"train.sequence_parallel={t.sequence_parallel}: must be >= 1 (1 = off)")
        if t.block_swap is not None and t.block_swap < 0:
            out.append(f"train.block_swap={t.block_swap}: must be >= 0")
        if t.memory_gib < 0:
            out.append(f"train.memory_gib={t.memory_gib}: must be >= 0 (0 = the card's free memory)")
        for key in ("selective_blocks", "checkpoint_offload"):
            value = getattr(t, key)
            if value is not None and value < -1:
                out.append(f"train.{key}={value}: -1 (all), 0 or a number of blocks")
        if t.checkpoint_segments and t.gradient_checkpointing is False:
            out.append("train.checkpoint_segments=true needs activation checkpointing: set "
                       "train.gradient_checkpointing=true (or null), or checkpoint_segments=false")
        if t.mode == "full" and t.base_dtype == "fp8":
            out.append("train.base_dtype=fp8 is for LoRA only: full fine-tuning trains the weights themselves")
        if t.fp8_matmul and (t.mode != "lora" or t.base_dtype != "fp8"):
            out.append(f"train.fp8_matmul=true needs LoRA with train.base_dtype=fp8 (now mode {t.mode}, "
                       f"base_dtype {t.base_dtype}): the float8 GEMMs multiply the float8 base weights; "
                       "set train.base_dtype=fp8 or train.fp8_matmul=false")
        if not t.fp8_fast_accum and not t.fp8_matmul:
            out.append("train.fp8_fast_accum=false only applies to float8 GEMMs: set train.fp8_matmul=true "
                       "too, or leave fp8_fast_accum at its default")
        if not t.fp8_quant_kernel and not t.fp8_matmul:
            out.append("train.fp8_quant_kernel=false only applies to float8 GEMMs: set train.fp8_matmul=true "
                       "too, or leave fp8_quant_kernel at its default")
        v = self.validation
        if v.width % 16 or v.height % 16:
            out.append(f"validation.width/height={v.width}x{v.height}: must be multiples of 16 "
                       f"(nearest: {round(v.width / 16) * 16}x{round(v.height / 16) * 16})")
        if (v.frames - 1) % 4:
            out.append(f"validation.frames={v.frames}: must be 4k+1 (nearest: {(v.frames - 1) // 4 * 4 + 1})")
        if self.checkpoint.every < 1:
            out.append(f"checkpoint.every={self.checkpoint.every}: must be >= 1")
        return out


def load_recipe(path: str, overrides=()) -> Recipe:
    """Read a recipe YAML plus `key=value` overrides into a validated `Recipe`."""
    return load_sections(Recipe, path, overrides)


def to_yaml(recipe: Recipe) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(recipe))
