"""The benchmark cases: what each measures, with which settings, and a rough H100 cost for the
time budget. `--tiny` runs the same cases on the tiny flavour at tiny sizes."""
from __future__ import annotations

from dataclasses import dataclass, field

from wantune.bench.steps import StepSettings, with_changes

# Our default fast path for a LoRA step: cuDNN SDPA, self-attention kept by selective
# checkpointing (no attention recompute), compiled blocks, fused AdamW, bf16 base.
FAST = StepSettings(mode="lora", attention="cudnn", checkpointing="selective", compile=True)
FAST_EAGER = with_changes(FAST, compile=False)
# The memory tiers: the trainer's planner picks every memory lever for the case's cap.
PLANNED = with_changes(FAST, planned=True)
SIZE_81 = (832, 480, 81)
SIZE_33 = (512, 320, 33)
SIZE_720 = (1280, 720, 81)  # 75,600 tokens: the 14B and I2V-14B-720P training size
TINY_SIZE = (64, 64, 5)


@dataclass
class Case:
    name: str
    kind: str  # matmul | ours | reference | vae-ours | vae-diffusers | sample-ours | sample-diffusers
    #            | cache (the whole caching stage) | previews (training with previews)
    what: str
    flavour: str = "t2v-1.3B"
    size: tuple = SIZE_81
    settings: list = field(default_factory=list)  # StepSettings tried in order until one runs
    cap_gib: float | None = None
    ref_checkpointing: bool = True
    ref_attention: str = "sdpa"  # the reference's kernel order: torch's own, or e.g. "cudnn" first
    reference: str | None = None  # the case this one is compared with
    clips: int = 40  # cache: clips in the written corpus
    data: tuple = ()  # cache: recipe overrides of the data section ("data.key=value")
    preview: tuple = (832, 480, 33, 30)  # previews: width, height, frames, sampling steps
    fused_vae: bool = True  # vae-ours: norm+SiLU compiled (as data/cache.py runs it on a GPU)
    vae_chunk: int = 1  # vae-ours: latent frames per causal chunk (WanVAE.set_chunks)
    fp8_matmul: bool = False  # sample-ours: block Linears as float8 weights and float8 GEMMs
    attention: str = "cudnn"  # sample-ours: the attention backend (cuDNN first, as measured so far)
    cfg_batch: bool = False  # sample-ours: cond and uncond as one forward of batch 2 (`--cfg-batch`)
    fused_gelu: bool = False  # sample-ours (fp8_matmul): the FFN's GELU + quantisation in one pass
    quant_kernel: bool = False  # sample-ours (fp8_matmul): every GEMM input quantised in one pass per row
    estimate_s: float = 30.0  # rough H100 cost incl. model setup, for --time-budget
    default: bool = True
    processes: int = 1  # ours on several GPUs of the host (bench/distributed.py): DDP over them...
    sequence_parallel: int = 1  # ...in groups of this many ranks that share each sample's tokens


def all_cases() -> list[Case]:
    # 14B: inputs of 40 checkpointed blocks (float32 residual, 27 GB) + bf16 weights (29 GB) leave
    # room to keep the self-attention outputs (0.34 GB each) of only some blocks on 80 GB.
    lora14 = with_changes(FAST, selective_blocks=8)
    cases = [
        Case("matmul", "matmul", "bf16 8192^3 matmul", estimate_s=5),
        Case("lora-1.3B-81", "ours", "1.3B LoRA r32 832x480x81", settings=[
            FAST, FAST_EAGER, with_changes(FAST_EAGER, checkpointing="full")],
            reference="ref-lora-1.3B-81", estimate_s=110),
        Case("lora-1.3B-81-s24", "ours", "1.3B LoRA r32 832x480x81, attention kept in 24 of 30 blocks",
             settings=[with_changes(FAST, selective_blocks=24)], reference="ref-lora-1.3B-81",
             estimate_s=70, default=False),
        Case("ref-lora-1.3B-81", "reference", "diffusers+PEFT 1.3B LoRA r32 832x480x81 (ckpt)",
             estimate_s=30),
        Case("ref-lora-1.3B-81-cudnn", "reference", "diffusers+PEFT 1.3B LoRA r32 832x480x81 (ckpt), "
             "cuDNN attention first", ref_attention="cudnn", estimate_s=30, default=False),
        Case("lora-1.3B-33", "ours", "1.3B LoRA r32 512x320x33", size=SIZE_33, settings=[
            with_changes(FAST, checkpointing="none"), with_changes(FAST_EAGER, checkpointing="none"),
            FAST_EAGER],
            reference="ref-lora-1.3B-33", estimate_s=12),
        Case("ref-lora-1.3B-33", "reference", "diffusers+PEFT 1.3B LoRA r32 512x320x33 (no ckpt)",
             size=SIZE_33, ref_checkpointing=False, estimate_s=10),
        Case("ref-lora-14B-81", "reference", "diffusers+PEFT 14B LoRA r32 832x480x81 (ckpt)",
             flavour="t2v-14B", estimate_s=60),
        Case("ref-lora-14B-81-cudnn", "reference", "diffusers+PEFT 14B LoRA r32 832x480x81 (ckpt), "
             "cuDNN attention first", flavour="t2v-14B", ref_attention="cudnn", estimate_s=60, default=False),
        Case("lora-14B-81", "ours", "14B LoRA r32 832x480x81", flavour="t2v-14B", settings=[
            lora14, with_changes(lora14, compile=False), with_changes(FAST_EAGER, checkpointing="full")],
            reference="ref-lora-14B-81", estimate_s=170),
        *fp8_gemm_cases(),
        *tier_cases(),
        # compiled, as recipes/t2v-1.3B-full.yaml runs it (until 2026-12-01 this case ran eager)
        Case("full-1.3B-81", "ours", "1.3B full fine-tune 832x480x81", settings=[
            StepSettings(mode="full", attention="cudnn", checkpointing="selective", compile=True),
            StepSettings(mode="full", attention="cudnn", checkpointing="selective"),
            StepSettings(mode="full", attention="cudnn", checkpointing="full")],
             reference="full-1.3B-81-eager", estimate_s=70),
        Case("full-1.3B-81-eager", "ours", "1.3B full fine-tune 832x480x81, eager (what the case "
             "timed until 2026-12-01)", settings=[StepSettings(mode="full", attention="cudnn",
                                                              checkpointing="selective")],
             estimate_s=40, default=False),
        Case("vae-ours", "vae-ours", "our VAE encode bf16, one 832x480x81 clip",
             reference="vae-diffusers", estimate_s=15),
        Case("vae-ours-eager", "vae-ours", "our VAE encode bf16, eager norm+SiLU (the lever)",
             reference="vae-diffusers", fused_vae=False, estimate_s=15, default=False),
        *[Case(f"vae-ours-chunk{n}", "vae-ours", f"our VAE encode bf16, {n} latent frames per chunk",
               reference="vae-diffusers", vae_chunk=n, estimate_s=15, default=False) for n in (2, 5, 10, 20)],
        Case("cache-stage", "cache", "caching stage: 40 clips, decode + T5 + VAE, 832x480x81",
             reference="vae-diffusers", estimate_s=200),
        Case("cache-8G", "cache", "caching stage under an 8 GiB cap: T5 streamed block by block, "
             "VAE tiled, 20 clips 832x480x81", cap_gib=8.0, clips=20,
             data=("data.text_encoder_device=stream", "data.low_memory=true"),
             reference="vae-diffusers", estimate_s=200),
        Case("train-previews", "previews", "1.3B LoRA training, previews 832x480x33 30 steps CFG",
             estimate_s=200),
        Case("vae-diffusers", "vae-diffusers", "diffusers AutoencoderKLWan encode bf16, 832x480x81",
             estimate_s=15),
        Case("sample-ours", "sample-ours", "our sampler, 1.3B, 832x480x81, UniPC + CFG 5",
             reference="sample-diffusers", estimate_s=20),
        Case("sample-ours-fp8", "sample-ours", "our sampler, 1.3B, 832x480x81, UniPC + CFG 5, float8 "
             "weights and GEMMs in the blocks", reference="sample-diffusers-cudnn", fp8_matmul=True,
             estimate_s=20, default=False),
        Case("sample-diffusers-cudnn", "sample-diffusers", "diffusers WanPipeline, 1.3B, 832x480x81, "
             "UniPC + CFG 5, cuDNN attention first", ref_attention="cudnn", estimate_s=20, default=False),
        Case("sample-diffusers", "sample-diffusers", "diffusers WanPipeline, 1.3B, 832x480x81, UniPC + CFG 5",
             estimate_s=20),
    ]
    cases += lever_cases() + sequence_parallel_cases() + fa4_cases()
    return cases


def sequence_parallel_cases() -> list[Case]:
    """Sequence parallel against one GPU (14B at 720p) and against DDP (1.3B at 480p), compared
    per sample; eager, so each fits the 9-minute `gpu_run.sh seqpar` run on 2 GPUs."""
    # One GPU at 75,600 tokens: 40 float32 block inputs (58 GiB) + bf16 weights (27 GiB) leave
    # room to keep the attention output (0.72 GiB each) of only some blocks.
    one = [with_changes(FAST_EAGER, selective_blocks=n) for n in (24, 8)]
    one.append(with_changes(FAST_EAGER, checkpointing="full"))
    return [
        Case("lora-14B-720p", "ours", "14B LoRA r32 1280x720x81, 1 GPU", flavour="t2v-14B",
             size=SIZE_720, settings=one, estimate_s=200, default=False),
        Case("sp2-lora-14B-720p", "ours", "14B LoRA r32 1280x720x81, sequence parallel over 2 GPUs",
             flavour="t2v-14B", size=SIZE_720, processes=2, sequence_parallel=2,
             settings=[FAST_EAGER, with_changes(FAST_EAGER, selective_blocks=20)],
             reference="lora-14B-720p", estimate_s=150, default=False),
        Case("ddp2-lora-1.3B-81", "ours", "1.3B LoRA r32 832x480x81, DDP over 2 GPUs (2 samples/step)",
             processes=2, settings=[FAST_EAGER], estimate_s=60, default=False),
        Case("sp2-lora-1.3B-81", "ours", "1.3B LoRA r32 832x480x81, sequence parallel over 2 GPUs",
             processes=2, sequence_parallel=2, settings=[FAST_EAGER], reference="ddp2-lora-1.3B-81",
             estimate_s=60, default=False),
    ]


def fp8_gemm_cases() -> list[Case]:
    """The float8 GEMM lever (train.fp8_matmul) on the fast path, against the cuDNN references.
    fp8 storage frees half the 14B weights (14 GB), so more blocks keep their attention output:
    the 14B cases try every block, then 24, then 8 (the first that fits)."""
    fp8 = with_changes(FAST, base_dtype="fp8")
    gemm = with_changes(fp8, fp8_matmul=True)
    exact = with_changes(gemm, fp8_fast_accum=False)  # the forward GEMMs without fast accumulation
    kept = (-1, 24, 8)
    return [
        Case("lora-1.3B-81-fp8-gemm-exact", "ours", "1.3B LoRA r32 832x480x81, float8 GEMMs, exact "
             "accumulation", settings=[exact], reference="lora-1.3B-81-fp8-gemm", estimate_s=110, default=False),
        Case("lora-14B-81-fp8-gemm-exact", "ours", "14B LoRA r32 832x480x81, float8 GEMMs, exact accumulation",
             flavour="t2v-14B", settings=[with_changes(exact, selective_blocks=n) for n in kept],
             reference="lora-14B-81-fp8-gemm", estimate_s=170, default=False),
        Case("lora-1.3B-81-fp8-gemm", "ours", "1.3B LoRA r32 832x480x81, float8 GEMMs",
             settings=[gemm, with_changes(gemm, compile=False)], reference="ref-lora-1.3B-81-cudnn",
             estimate_s=110, default=False),
        Case("lora-14B-81-fp8", "ours", "14B LoRA r32 832x480x81, fp8 base (bf16 GEMMs)", flavour="t2v-14B",
             settings=[with_changes(fp8, selective_blocks=n) for n in kept], reference="ref-lora-14B-81-cudnn",
             estimate_s=170, default=False),
        Case("lora-14B-81-fp8-gemm", "ours", "14B LoRA r32 832x480x81, float8 GEMMs", flavour="t2v-14B",
             settings=[with_changes(gemm, selective_blocks=n) for n in kept], reference="ref-lora-14B-81-cudnn",
             estimate_s=170, default=False),
    ]


def fa4_cases() -> list[Case]:
    """FlashAttention 4 (attention backend "fa4") as the one lever changed from a case above,
    against the same references: the fast path, float8 GEMMs, the 14B (as shipped and with the
    fp8 base), the full fine-tune and the sampler. Needs `flash-attn-4` on a Hopper GPU."""
    fa4 = with_changes(FAST, attention="fa4")
    gemm = with_changes(fa4, base_dtype="fp8", fp8_matmul=True)
    full = StepSettings(mode="full", attention="fa4", checkpointing="selective", compile=True)
    return [
        Case("lora-1.3B-81-fa4", "ours", "1.3B LoRA r32 832x480x81, FlashAttention 4", settings=[fa4],
             reference="ref-lora-1.3B-81-cudnn", estimate_s=110, default=False),
        Case("lora-1.3B-81-fp8-gemm-fa4", "ours", "1.3B LoRA r32 832x480x81, float8 GEMMs, FlashAttention 4",
             settings=[gemm], reference="ref-lora-1.3B-81-cudnn", estimate_s=110, default=False),
        Case("lora-1.3B-81-fp8-gemm-fa4-inductor", "ours", "1.3B LoRA r32 832x480x81, float8 GEMMs, FlashAttention "
             "4, their inputs and gradients quantised by Inductor (what the -fa4 cases timed until 2026-12-02)",
             settings=[with_changes(gemm, fp8_quant_kernel=False)], reference="lora-1.3B-81-fp8-gemm-fa4",
             estimate_s=110, default=False),
        Case("lora-14B-81-fa4", "ours", "14B LoRA r32 832x480x81, FlashAttention 4", flavour="t2v-14B",
             settings=[with_changes(fa4, selective_blocks=8)], reference="ref-lora-14B-81-cudnn",
             estimate_s=170, default=False),
        Case("lora-14B-81-fp8-gemm-fa4", "ours", "14B LoRA r32 832x480x81, float8 GEMMs, FlashAttention 4",
             flavour="t2v-14B", settings=[with_changes(gemm, selective_blocks=n) for n in (-1, 24, 8)],
             reference="ref-lora-14B-81-cudnn", estimate_s=170, default=False),
        Case("lora-14B-81-fp8-gemm-fa4-inductor", "ours", "14B LoRA r32 832x480x81, float8 GEMMs, FlashAttention 4, "
             "their inputs and gradients quantised by Inductor (what the -fa4 case timed until 2026-12-02)",
             flavour="t2v-14B", reference="lora-14B-81-fp8-gemm-fa4",
             settings=[with_changes(gemm, selective_blocks=n, fp8_quant_kernel=False) for n in (-1, 24, 8)],
             estimate_s=170, default=False),
        Case("full-1.3B-81-fa4", "ours", "1.3B full fine-tune 832x480x81, FlashAttention 4",
             settings=[full], reference="full-1.3B-81", estimate_s=70, default=False),
        Case("sample-ours-fa4", "sample-ours", "our sampler, 1.3B, 832x480x81, UniPC + CFG 5, "
             "FlashAttention 4", reference="sample-diffusers-cudnn", attention="fa4", estimate_s=20,
             default=False),
        Case("sample-ours-fp8-fa4", "sample-ours", "our sampler, 1.3B, 832x480x81, UniPC + CFG 5, float8 "
             "weights and GEMMs in the blocks, FlashAttention 4", reference="sample-diffusers-cudnn",
             fp8_matmul=True, attention="fa4", estimate_s=20, default=False),
        Case("sample-ours-fp8-fa4-cfg2", "sample-ours", "our sampler, 1.3B, 832x480x81, UniPC + CFG 5, float8 "
             "weights and GEMMs in the blocks, FlashAttention 4, cond + uncond in one batch-2 forward",
             reference="sample-diffusers-cudnn", fp8_matmul=True, attention="fa4", cfg_batch=True,
             estimate_s=20, default=False),
        Case("sample-ours-fp8-fa4-cfg2-gelu", "sample-ours", "our sampler, 1.3B, 832x480x81, UniPC + CFG 5, "
             "float8 weights and GEMMs in the blocks, FlashAttention 4, cond + uncond in one batch-2 forward, "
             "the FFN's GELU + quantisation in one Triton pass", reference="sample-diffusers-cudnn",
             fp8_matmul=True, attention="fa4", cfg_batch=True, fused_gelu=True, estimate_s=20, default=False),
        Case("sample-ours-fp8-fa4-cfg2-rows", "sample-ours", "our sampler, 1.3B, 832x480x81, UniPC + CFG 5, "
             "float8 weights and GEMMs in the blocks, FlashAttention 4, cond + uncond in one batch-2 forward, "
             "every GEMM input quantised (the FFN's with its GELU) in one Triton pass per row",
             reference="sample-diffusers-cudnn", fp8_matmul=True, attention="fa4", cfg_batch=True,
             fused_gelu=True, quant_kernel=True, estimate_s=20, default=False),
    ]


def tier_cases() -> list[Case]:
    """What each card size runs, as the planner sets it up: 832x480x81, rank 32, under a cap."""
    tiers = [("lora-1.3B-81-8G", "t2v-1.3B", 8, 50), ("lora-1.3B-81-12G", "t2v-1.3B", 12, 45),
             ("lora-1.3B-81-16G", "t2v-1.3B", 16, 45), ("lora-14B-81-24G", "t2v-14B", 24, 90),
             ("lora-14B-81-16G", "t2v-14B", 16, 90), ("i2v-14B-81-24G", "i2v-14B", 24, 90)]
    return [Case(name, "ours", f"{flavour.split('-', 1)[1]} {'I2V ' if 'i2v' in flavour else ''}LoRA r32 "
                 f"832x480x81 within {cap} GiB (planned)", flavour=flavour, cap_gib=float(cap),
                 settings=[PLANNED],
                 estimate_s=est) for name, flavour, cap, est in tiers]


def lever_cases() -> list[Case]:
    """One lever changed at a time from the eager fast path (1.3B LoRA 832x480x81)."""
    base = FAST_EAGER
    variants = {
        "base": base,
        "compile": with_changes(base, compile=True),
        "attn-flash": with_changes(base, attention="flash"),
        "attn-efficient": with_changes(base, attention="efficient"),
        "attn-flash_attn": with_changes(base, attention="flash_attn"),
        "attn-sdpa-default": with_changes(base, attention="sdpa"),
        "attn-fa4": with_changes(base, attention="fa4"),
        "ckpt-full": with_changes(base, checkpointing="full"),
        "ckpt-offload": with_changes(base, checkpointing="offload"),
        "ckpt-none": with_changes(base, checkpointing="none"),
        "fp8": with_changes(base, base_dtype="fp8"),
        "fp8-gemm": with_changes(base, base_dtype="fp8", fp8_matmul=True),
        "swap-10": with_changes(base, block_swap=10),
        "adamw-foreach": with_changes(base, fused_adamw=False),
    }
    return [Case(f"lever-{k}", "ours", f"lever: {k} (1.3B LoRA 832x480x81)", settings=[v],
                 reference="ref-lora-1.3B-81", estimate_s=60 if v.compile else 20, default=False)
            for k, v in variants.items()]


def select(cases: list[Case], spec: str) -> list[Case]:
    """`default`, `all`, `levers`, or a comma list of names / fnmatch patterns."""
    import fnmatch

    chosen = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == "default":
            hits = [c for c in cases if c.default]
        elif part == "all":
            hits = cases
        elif part == "levers":
            hits = [c for c in cases if c.name.startswith("lever-")]
        else:
            hits = [c for c in cases if fnmatch.fnmatch(c.name, part)]
            if not hits:
                raise ValueError(f"--cases: {part!r} matches no case; known: "
                                 + ", ".join(c.name for c in cases))
        chosen += [h for h in hits if h not in chosen]
    order = {c.name: i for i, c in enumerate(cases)}
    if not any(c.name == "matmul" for c in chosen):
        chosen.append(next(c for c in cases if c.name == "matmul"))
    return sorted(chosen, key=lambda c: order[c.name])
