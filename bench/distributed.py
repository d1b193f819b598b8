"""Training-step cases over several GPUs of one host: sequence parallel groups or plain DDP.

`run_distributed(case, ...)` (in the tools/bench.py process) starts `case.processes` ranks with
torchrun, each running `python -m bench.distributed` (this file's `main`). Every rank builds the
same random model on its own device (weights drawn there, no files: two ranks must not write one
checkpoint), the step of bench/steps.py (the model from the trainer's builder) with the case's
settings, the trainer's layout (train.parallel: groups of `case.sequence_parallel` ranks share a
sample, with the same batch and noise) and DDP for the gradient all-reduce, as accelerate wraps it in the trainer. Rank 0
writes the result: the step time, seconds per *sample* (a step trains one sample per group), and
the peak memory of every rank. NCCL on GPUs, gloo on the CPU (`--tiny` tests the path).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def run_distributed(case, opts, settings, budget_s: float) -> dict:
    """Run the case's ranks and return rank 0's result (raises with their output on failure)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={case.processes}", "-m", "bench.distributed", "--case", case.name,
               "--settings", json.dumps(settings.to_dict()), "--out", str(out),
               "--max-steps", str(opts.max_steps), "--step-seconds", str(min(opts.step_seconds, budget_s)),
               "--compile", opts.compile] + (["--tiny"] if opts.tiny else [])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH"), str(REPO)) if p)}
        if opts.device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a GPU host
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(120.0, 3 * budget_s))
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-12:]
            raise RuntimeError(f"{case.processes} ranks exited {proc.returncode}: " + " | ".join(tail))
        return json.loads(out.read_text())


def main(argv=None) -> int:
    import torch.distributed as dist

    from wantune.bench.cases import all_cases
    from wantune.bench.run import Options, build_direct, flavour_name, resolve_settings, size_of
    from wantune.bench.steps import StepSettings, build_step, make_batch
    from wantune.bench.timing import peak_memory, reset_memory, time_steps
    from wantune.train.parallel import before_process_group, enable, make_layout
    from wan_model.configs import get_flavour
    from wan_model.flops import forward_flops, step_flops

    p = argparse.ArgumentParser(description="one rank of a distributed bench case (see run_distributed)")
    p.add_argument("--case", required=True)
    p.add_argument("--settings", required=True, help="StepSettings as JSON")
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, default=6)
    p.add_argument("--step-seconds", type=float, default=15.0)
    p.add_argument("--compile", default="auto")
    p.add_argument("--tiny", action="store_true")
    args = p.parse_args(argv)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    before_process_group()  # so that the group is torn down at the end (see there)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    try:
        case = next(c for c in all_cases() if c.name == args.case)
        opts = Options(device=device, tiny=args.tiny, work_dir=REPO, weights="direct", compile=args.compile,
                       max_steps=args.max_steps, step_seconds=args.step_seconds, sample_steps=2)
        s = resolve_settings(StepSettings(**json.loads(args.settings)), opts)
        cfg = get_flavour(flavour_name(case, opts)).dit
        w, h, f = size_of(case, opts)
        layout = make_layout(rank, world, case.sequence_parallel)
        batch = make_batch(cfg, w, h, f, device, seed=layout.dp_rank)  # one sample per group
        torch.manual_seed(0)  # the same LoRA init on every rank
        step = build_step(lambda dtype, where: build_direct(flavour_name(case, opts), dtype, where),
                          s, batch, device, cfg, seed=layout.dp_rank, log=lambda *a: None)
        params = step.params
        enable(step.model, layout)
        step.model = torch.nn.parallel.DistributedDataParallel(  # the trainer's gradient all-reduce
            step.model, device_ids=None if device.index is None else [device.index])
        reset_memory(device)
        timing = time_steps(step, device, warmup=2 if s.compile else 1, max_steps=args.max_steps,
                            max_seconds=args.step_seconds)
        peaks = [None] * world
        dist.all_gather_object(peaks, peak_memory(device))
        if rank == 0:
            fwd = forward_flops(cfg, w, h, f, lora_rank=s.lora_rank if s.mode == "lora" else 0,
                                lora_targets=tuple(s.targets))
            model_f, hw_f = step_flops(fwd, s.mode, s.checkpointing)
            samples = layout.dp_size * batch.latents.shape[0]
            alloc = [m["peak_allocated_gib"] for m in peaks]
            reserved = [m["peak_reserved_gib"] for m in peaks]
            result = {
                "kind": "train", "settings": s.to_dict(), **timing, "processes": world,
                "sequence_parallel": layout.sp, "data_parallel": layout.dp_size,
                "settings_label": f"{s.label()}; {world} GPUs: "
                                  + (f"sequence parallel {layout.sp}" if layout.sp > 1 else "DDP")
                                  + (f" x {layout.dp_size} groups" if layout.sp > 1 and layout.dp_size > 1 else ""),
                "samples_per_step": samples, "sample_s": timing["step_s"] / samples,
                "tokens": fwd.tokens, "tokens_per_gpu": -(-fwd.tokens // layout.sp),
                "model_tflop": model_f / 1e12, "hardware_tflop": hw_f / 1e12,
                "tflops": model_f * samples / timing["step_s"] / world / 1e12,  # per GPU
                "peak_allocated_gib": None if None in alloc else max(alloc),
                "peak_reserved_gib": None if None in reserved else max(reserved),
                "peak_allocated_gib_per_rank": alloc, "peak_reserved_gib_per_rank": reserved,
                "trained_params": sum(p.numel() for p in params)}
            Path(args.out).write_text(json.dumps(result, indent=2))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
