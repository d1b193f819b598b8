"""Running one benchmark case: model setup, timing, FLOPs, memory. Called by tools/bench.py."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from wantune.bench.cases import TINY_SIZE, Case
from wantune.bench.profiling import profile_call
from wan_model.flops import forward_flops, sampling_flops, step_flops
from wantune.bench.steps import StepSettings, build_step, make_batch, set_attention
from wantune.bench.timing import matmul_rate, peak_memory, reset_memory, set_memory_cap, sync, time_call, time_steps
from wan_model.configs import get_flavour


@dataclass
class Options:
    device: torch.device
    tiny: bool
    work_dir: Path
    weights: str  # checkpoint | direct
    compile: str  # auto | on | off
    max_steps: int
    step_seconds: float  # timed seconds aimed at per case
    sample_steps: int
    profile: bool = False  # profile one call per VAE, training and sampling case (GPU)
    results_dir: Path | None = None
    log: callable = print


def flavour_name(case: Case, opts: Options) -> str:
    return "tiny-t2v" if opts.tiny else case.flavour


def size_of(case: Case, opts: Options) -> tuple:
    return TINY_SIZE if opts.tiny else case.size


# ---- model files ----------------------------------------------------------------------------

def model_dir(opts: Options, flavour: str, components: tuple = ("dit", "vae")) -> Path:
    """A random-weight model (official layout) under the work dir, written once and reused."""
    from wan_model.random_weights import write_random_checkpoint

    out = opts.work_dir / f"random-{flavour}"
    marker = out / "wantune_random.json"
    have = json.loads(marker.read_text()).get("bench_components", []) if marker.exists() else []
    if not set(components) <= set(have):
        t0 = time.perf_counter()
        dev = "cuda" if opts.device.type == "cuda" else "cpu"
        write_random_checkpoint(out, flavour, components=[c for c in components if c not in have],
                                dtype=torch.bfloat16, device=dev, log=opts.log)
        info = json.loads(marker.read_text())
        info["bench_components"] = sorted(set(components) | set(have))
        marker.write_text(json.dumps(info, indent=2))
        opts.log(f"  wrote random {flavour} ({', '.join(components)}) in {time.perf_counter() - t0:.0f} s")
    return out


def dit_loader(opts: Options, flavour: str):
    """`load(dtype, device)` -> WanModel, from the written checkpoint or built on the device."""
    if opts.weights == "direct":
        return lambda dtype, device: build_direct(flavour, dtype, device)
    path = model_dir(opts, flavour, ("dit",) if flavour.endswith("14B") else ("dit", "vae"))

    def load(dtype, device):
        from wan_model.dit_io import load_transformer

        return load_transformer(path, dtype=dtype, device=device)
    return load


def build_direct(flavour: str, dtype, device):
    """A random WanModel of a flavour on `device` (no file), drawn on the GPU when there is one."""
    draw = "cuda" if torch.cuda.is_available() else "cpu"
    return build_random_dit(get_flavour(flavour).dit, dtype, device, draw_device=draw)


def build_random_dit(cfg, dtype, device, seed: int = 0, draw_device=None):
    """A random WanModel drawn tensor by tensor on `draw_device` (default `device`) with the
    values scheme of the checkpoint writer, each tensor then placed on `device` (so a model bound
    for the host under a device memory cap never has more than one tensor on the device); float32
    islands stay float32, as `load_transformer` leaves them."""
    from wan_model.loading import _set_tensor
    from wan_model.random_weights import init_value
    from wan_model.transformer import WanModel, keep_fp32

    draw_device = draw_device or device
    with torch.device("meta"):
        model = WanModel(cfg)
    gen = torch.Generator(device=draw_device).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, t in list(model.state_dict(keep_vars=True).items()):
        dt = torch.float32 if keep_fp32(name) else dtype
        value = init_value(name, tuple(t.shape), dt, draw_device, gen).to(device)
        _set_tensor(model, name, value, name in params)
    return model.eval().requires_grad_(False)


# ---- cases ----------------------------------------------------------------------------------

def profile(fn, case: Case, opts: Options, grad: bool = False) -> dict:
    """With --profile on a GPU: one more call of fn under torch.profiler, its op table appended to
    profiles.txt and {"profile_ms": GPU time by kind of kernel} for the results; else {}."""
    if not opts.profile:
        return {}
    kinds = profile_call(fn, opts.device, case.name, opts.results_dir, opts.log, grad=grad)
    return {"profile_ms": kinds} if kinds else {}


def run_matmul(case: Case, opts: Options) -> dict:
    if opts.device.type == "cuda":
        r = matmul_rate(opts.device, 256 if opts.tiny else 8192, torch.bfloat16)
    else:
        r = matmul_rate(opts.device, 256 if opts.tiny else 2048, torch.float32)
    return {"kind": "matmul", "what": f"{r['dtype']} {r['n']}^3 matmul", **r}


def resolve_settings(s: StepSettings, opts: Options) -> StepSettings:
    from dataclasses import replace

    if opts.compile == "off" or (opts.compile == "auto" and opts.device.type != "cuda"):
        s = replace(s, compile=False)
    elif opts.compile == "on":
        s = replace(s, compile=True)
    if opts.device.type != "cuda" and s.attention in ("cudnn", "flash", "efficient", "flash_attn", "fa4"):
        s = replace(s, attention="sdpa")  # the CUDA kernels do not exist on the CPU
    if opts.tiny and s.block_swap:
        s = replace(s, block_swap=min(s.block_swap, get_flavour("tiny-t2v").dit.num_layers))
    return s


def run_ours(case: Case, opts: Options, settings: StepSettings, budget_s: float) -> dict:
    if case.processes > 1:
        from wantune.bench.distributed import run_distributed

        return run_distributed(case, opts, settings, budget_s)
    flavour = flavour_name(case, opts)
    cfg = get_flavour(flavour).dit
    w, h, f = size_of(case, opts)
    s = resolve_settings(settings, opts)
    load = dit_loader(opts, flavour)
    t0 = time.perf_counter()
    if case.cap_gib:  # the cap covers loading too, as on a card of that size
        reset_memory(opts.device)
        set_memory_cap(opts.device, case.cap_gib)
    batch = make_batch(cfg, w, h, f, opts.device)
    step = build_step(load, s, batch, opts.device, cfg, cap_gib=case.cap_gib, log=opts.log)
    setup_s = time.perf_counter() - t0
    if not case.cap_gib:
        reset_memory(opts.device)
    timing = time_steps(step, opts.device, warmup=2 if s.compile else 1, max_steps=opts.max_steps,
                        max_seconds=min(opts.step_seconds, budget_s))
    mem = peak_memory(opts.device)
    profiled = profile(step, case, opts, grad=True)
    fwd = forward_flops(cfg, w, h, f, lora_rank=s.lora_rank if s.mode == "lora" else 0,
                        lora_targets=tuple(s.targets))
    model_f, hw_f = step_flops(fwd, s.mode, s.checkpointing)
    swap = getattr(step.model, "block_swap", None)
    out = {"kind": "train", "settings": s.to_dict(), "settings_label": s.label(), "setup_s": setup_s,
           **timing, **mem, "sample_s": timing["step_s"] / batch.latents.shape[0], "tokens": fwd.tokens,
           "model_tflop": model_f / 1e12,
           "hardware_tflop": hw_f / 1e12, "tflops": model_f / timing["step_s"] / 1e12,
           "hardware_tflops": hw_f / timing["step_s"] / 1e12,
           "trained_params": sum(p.numel() for p in step.params), **profiled}
    if case.cap_gib:
        out["cap_gib"] = case.cap_gib
    if case.cap_gib and opts.device.type == "cuda":
        # the cap is enforced by the allocator; say plainly whether the run stayed under it
        out["cap_respected"] = mem["peak_reserved_gib"] <= case.cap_gib
    if swap is not None:
        out["block_swap_host_gib"] = swap.host_bytes() / 2**30
    t = step.recipe.train
    out["plan"] = {k: getattr(t, k) for k in ("gradient_checkpointing", "checkpoint_mode", "selective_blocks",
                                               "checkpoint_offload", "checkpoint_segments", "block_swap", "base_dtype")}
    if step.estimate is not None:
        out["plan_text"] = step.estimate.plan.describe(cfg.num_layers)
        out["predicted_gib"] = step.estimate.device / 2**30
        out["predicted_host_gib"] = step.estimate.host / 2**30
        if mem["peak_allocated_gib"]:
            out["prediction_error"] = out["predicted_gib"] / mem["peak_allocated_gib"] - 1
    return out


def run_reference(case: Case, opts: Options, budget_s: float) -> dict:
    from wantune.bench.reference import ReferenceLoraStep

    flavour = flavour_name(case, opts)
    cfg = get_flavour(flavour).dit
    w, h, f = size_of(case, opts)
    set_attention(case.ref_attention)  # "sdpa": torch's own kernel order, as a diffusers user gets it
    t0 = time.perf_counter()
    batch = make_batch(cfg, w, h, f, opts.device)
    step = ReferenceLoraStep(cfg, batch.latents, batch.context, opts.device,
                             checkpointing=case.ref_checkpointing)
    setup_s = time.perf_counter() - t0
    reset_memory(opts.device)
    timing = time_steps(step, opts.device, warmup=1, max_steps=opts.max_steps,
                        max_seconds=min(opts.step_seconds, budget_s))
    mem = peak_memory(opts.device)
    profiled = profile(step, case, opts, grad=True)
    fwd = forward_flops(cfg, w, h, f, lora_rank=32)
    model_f, hw_f = step_flops(fwd, "lora", "full" if case.ref_checkpointing else "none")
    return {"kind": "train", **profiled,
            "settings_label": f"diffusers+peft lora r32 attn={case.ref_attention} "
            f"ckpt={'full' if case.ref_checkpointing else 'none'} adamw", "setup_s": setup_s,
            **timing, **mem, "tokens": fwd.tokens, "model_tflop": model_f / 1e12,
            "hardware_tflop": hw_f / 1e12, "tflops": model_f / timing["step_s"] / 1e12,
            "trained_params": sum(p.numel() for p in step.params)}


def vae_dtype(opts: Options) -> torch.dtype:
    """bf16 as measured on the GPU; float32 on the CPU, whose bf16 convolutions are very slow."""
    return torch.bfloat16 if opts.device.type == "cuda" else torch.float32


def _clip(opts: Options, w: int, h: int, f: int) -> torch.Tensor:
    g = torch.Generator(device=opts.device).manual_seed(0)
    return (torch.rand(1, 3, f, h, w, generator=g, device=opts.device) * 2 - 1).to(vae_dtype(opts))


def run_vae(case: Case, opts: Options, ours: bool) -> dict:
    flavour = flavour_name(case, opts)
    w, h, f = (32, 32, 5) if opts.tiny else case.size
    set_attention("auto" if ours else "sdpa")
    if ours:
        from wan_model.vae import load_vae

        vae = load_vae(model_dir(opts, flavour) / "Wan2.1_VAE.pth", dtype=vae_dtype(opts), device=opts.device)
        if opts.device.type == "cuda":  # as data/cache.py runs it on a GPU
            vae.use_channels_last()
            if case.fused_vae:
                vae.fuse_elementwise()
        vae.set_chunks(encode=case.vae_chunk)
        encode = lambda v: vae.encode(v)  # noqa: E731
    else:
        from wantune.bench.reference import build_vae, vae_encode

        vae = build_vae(get_flavour(flavour).vae, opts.device, vae_dtype(opts))
        encode = lambda v: vae_encode(vae, v)  # noqa: E731
    video = _clip(opts, w, h, f)
    reset_memory(opts.device)
    benchmark_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = ours and opts.device.type == "cuda"  # the reference runs as shipped
    try:
        with torch.no_grad():
            encode(video)
            sync(opts.device)
            times = [time_call(lambda: encode(video), opts.device) for _ in range(1 if opts.tiny else 3)]
    finally:
        torch.backends.cudnn.benchmark = benchmark_before
    times.sort()
    clip_s = times[len(times) // 2]
    profiled = profile(lambda: encode(video), case, opts)
    return {"kind": "vae", "chunk": case.vae_chunk if ours else 1, "clip_s": clip_s, "times_s": times, "clips_per_min": 60.0 / clip_s,
            "size": [w, h, f], **peak_memory(opts.device), **profiled}


def run_sample(case: Case, opts: Options, ours: bool) -> dict:
    flavour = flavour_name(case, opts)
    cfg = get_flavour(flavour).dit
    w, h, f = size_of(case, opts)
    steps = opts.sample_steps
    g = torch.Generator(device=opts.device).manual_seed(1)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=opts.device).to(torch.bfloat16)
    neg = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=opts.device).to(torch.bfloat16)
    if ours:
        from wan_model.sampler import place_dit, sample

        # the case's attention kernel, then placed as `wantune sample` places it (which keeps the
        # backend and resolves it for the device)
        set_attention(case.attention if opts.device.type == "cuda" else "auto")  # CUDA kernels
        model = place_dit(dit_loader(opts, flavour)(torch.bfloat16, opts.device), opts.device,
                          fp8_matmul=case.fp8_matmul, fused_gelu=case.fused_gelu,
                          quant_kernel=case.quant_kernel)
        if opts.compile == "on" or (opts.compile == "auto" and opts.device.type == "cuda"):
            model.compile_blocks()  # as tools/sample.py --compile; the warm-up run compiles

        def run(n):
            return sample(model, [ctx[0]], [neg[0]], frames=f, height=h, width=w, steps=n, shift=5.0,
                          guidance=5.0, device=opts.device, dtype=torch.bfloat16, progress=False,
                          cfg_batch=case.cfg_batch)
    else:
        from wantune.bench.reference import build_pipeline, build_transformer, pipeline_latents

        set_attention(case.ref_attention)
        pipe = build_pipeline(build_transformer(cfg, opts.device))

        def run(n):
            return pipeline_latents(pipe, ctx, neg, w, h, f, steps=n)
    batches = []  # the batch each DiT forward ran (ours): 2 where cond and uncond share one forward
    if ours:
        hook = model.register_forward_pre_hook(lambda _m, args: batches.append(args[0].shape[0]))
    reset_memory(opts.device)
    run(2)  # warm-up: kernels, cuDNN plans, allocator
    if ours:
        hook.remove()
    sync(opts.device)
    total = time_call(lambda: run(steps), opts.device)
    step_s = total / steps
    profiled = profile(lambda: run(1), case, opts)
    fwd = forward_flops(cfg, w, h, f)
    flops = sampling_flops(fwd, steps)
    seen = {"dit_batches": sorted(set(batches)), "cfg_batch": case.cfg_batch} if ours else {}
    return {"kind": "sample", **profiled, **seen, "steps": steps, "total_s": total, "step_s": step_s,
            "est_50_steps_s": 50 * step_s, "tflops": flops / total / 1e12, **peak_memory(opts.device)}
