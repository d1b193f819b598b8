"""GPU benchmark: our training step, VAE encode and sampler against diffusers + PEFT, one run.

    python tools/bench.py                      # the default cases on the GPU found (~9 min on an H100)
    python tools/bench.py --cases levers       # one lever at a time (1.3B LoRA 832x480x81)
    python tools/bench.py --cases 'lora-1.3B-*,ref-lora-1.3B-*' --time-budget 300
    python tools/bench.py --tiny               # every code path at tiny sizes (CPU or GPU)
    python tools/bench.py --list

Writes bench/results/<device>-<date>.json after every case (a later case failing loses
nothing), prints the table last and rewrites the table section of BENCHMARKS.md. Each case runs
in its own try/except: out-of-memory is reported as OOM; a case with fallback settings tries
them in order. See bench/NOTES.md for the FLOP convention, the levers and what to expect.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Where results go by default: the clone this file is in, or (installed from a wheel, where
# REPO is inside site-packages) the directory the command runs in.
HOME = REPO if (REPO / "pyproject.toml").exists() else Path.cwd()

# Fewer fragmentation OOMs near the limits (both our steps and the reference get it); must be
# set before CUDA starts. An explicit setting in the environment wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

from wantune.bench import report  # noqa: E402
from wantune.bench.cases import Case, all_cases, select  # noqa: E402
from wantune.bench.pipeline import run_cache_stage, run_train_previews  # noqa: E402
from wantune.bench.run import Options, run_matmul, run_ours, run_reference, run_sample, run_vae  # noqa: E402
from wantune.bench.timing import reset_memory, set_memory_cap  # noqa: E402
from wan_model.quiet import quiet_third_party  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="default", help="default, all, levers, or comma list of names/patterns")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    p.add_argument("--tiny", action="store_true", help="tiny flavour and sizes (tests; CPU or GPU)")
    p.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    p.add_argument("--work-dir", default=str(HOME / "bench" / "models"), help="random model files (reused)")
    p.add_argument("--results-dir", default=str(HOME / "bench" / "results"))
    p.add_argument("--benchmarks-md", default=str(HOME / "BENCHMARKS.md"), help="'' to skip")
    p.add_argument("--time-budget", type=float, default=540.0,
                   help="seconds; a case whose estimate does not fit in what is left is skipped")
    p.add_argument("--weights", choices=("checkpoint", "direct"), default="checkpoint",
                   help="checkpoint: write random models with write_random_checkpoint and load them "
                        "(cached in --work-dir); direct: draw the DiT on the device, no files")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="auto: as each case says (never on the CPU); on/off: force for our steps")
    p.add_argument("--max-steps", type=int, default=6, help="timed steps per case at most (at least 2)")
    p.add_argument("--step-seconds", type=float, default=15.0, help="timed seconds aimed at per case")
    p.add_argument("--sample-steps", type=int, default=5,
                   help="sampling steps timed (x50 extrapolation is reported and labelled)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one call of each VAE, training and sampling case (GPU): the op table beside "
                   "the results, the GPU time by kind of kernel in the JSON")
    p.add_argument("--from-json", default=None, metavar="PATH",
                   help="run nothing: rebuild the table and BENCHMARKS.md from a results file")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="keep cases of an earlier run today on this device in the same JSON")
    p.add_argument("--verbose", action="store_true",
                   help="also show the third-party notices the trainer hides (wan_model/quiet.py)")
    return p.parse_args(argv)


def run_case(case: Case, opts: Options, budget_left: float) -> dict:
    """One case; a case that asks for FlashAttention 4 or the Triton quantisation kernel fails on
    a GPU if it never ran."""
    from wan_model import attention, fp8_triton

    before = attention.fa4_calls["forward"]
    rows_before, gelu_before = fp8_triton.calls["rows"], fp8_triton.calls["gelu"]
    out = _run_case(case, opts, budget_left)
    ran = attention.fa4_calls["forward"] - before
    rows, gelu = fp8_triton.calls["rows"] - rows_before, fp8_triton.calls["gelu"] - gelu_before
    cuda = opts.device.type == "cuda"
    asked = case.attention == "fa4" or any(s.attention == "fa4" for s in case.settings)
    if asked and cuda and not ran:
        raise RuntimeError(f"{case.name}: attention fa4 asked for, but FlashAttention 4 never ran")
    if case.fused_gelu and cuda and not gelu:
        raise RuntimeError(f"{case.name}: the fused GELU kernel asked for, but it never ran")
    if (case.quant_kernel or any(s.fp8_matmul and s.fp8_quant_kernel for s in case.settings)) and cuda and rows == gelu:
        raise RuntimeError(f"{case.name}: the Triton quantisation kernel asked for, but it never ran")
    if ran:
        out["fa4_forward_calls"] = ran
    if rows:  # eager calls, or traces into the compiled blocks
        out["quant_kernel_calls"] = rows
        out["fused_gelu_calls"] = gelu
    return out


def _run_case(case: Case, opts: Options, budget_left: float) -> dict:
    if case.kind == "matmul":
        return run_matmul(case, opts)
    if case.kind == "reference":
        return run_reference(case, opts, budget_left)
    if case.kind in ("vae-ours", "vae-diffusers"):
        return run_vae(case, opts, ours=case.kind == "vae-ours")
    if case.kind in ("sample-ours", "sample-diffusers"):
        return run_sample(case, opts, ours=case.kind == "sample-ours")
    if case.kind == "cache":
        return run_cache_stage(case, opts)
    if case.kind == "previews":
        return run_train_previews(case, opts)
    attempts = []
    for i, settings in enumerate(case.settings):
        try:
            out = run_ours(case, opts, settings, budget_left)
            out["attempts"] = attempts
            return out
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the next setting tried
            attempts.append({"settings": settings.label(), "status": "OOM" if is_oom(e) else "error",
                             "error": describe(e)[:400]})
        # outside the except block the traceback (and the model it holds) is gone
        opts.log(f"  attempt {i + 1} ({settings.label()}) failed: {attempts[-1]['error']}")
        cleanup(opts)
    raise CaseFailed(attempts)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def describe(e: BaseException) -> str:
    text = [line.strip() for line in str(e).strip().splitlines()]
    return f"{type(e).__name__}: {' '.join(text[:3])}"


class CaseFailed(RuntimeError):
    def __init__(self, attempts):
        self.attempts = attempts
        statuses = {a["status"] for a in attempts}
        super().__init__("; ".join(f"{a['settings']}: {a['error']}" for a in attempts))
        self.status = "OOM" if statuses == {"OOM"} else "error"


def cleanup(opts: Options) -> None:
    from wan_model import attention

    attention.set_backend("auto")
    if torch.cuda.is_available():  # compiled cases pin the SDPA kernel through these switches
        for fn in (torch.backends.cuda.enable_cudnn_sdp, torch.backends.cuda.enable_flash_sdp,
                   torch.backends.cuda.enable_mem_efficient_sdp, torch.backends.cuda.enable_math_sdp):
            fn(True)
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    set_memory_cap(opts.device, None)
    reset_memory(opts.device)


def add_ratios(results: dict) -> None:
    cases = {c.name: c for c in all_cases()}
    for name, r in results["cases"].items():
        case = cases.get(name)
        if not case or not case.reference or r.get("status") != "ok":
            continue
        ref = results["cases"].get(case.reference, {})
        if ref.get("status") != "ok":
            continue
        key = "clip_s" if r.get("kind") in ("vae", "cache") else "step_s"
        if "sample_s" in r and "sample_s" in ref:  # one GPU, DDP and sequence parallel compare per sample
            key = "sample_s"
        r["speedup_vs_reference"] = ref[key] / r[key]
        r["reference"] = case.reference
        r["same_run_as_reference"] = ref.get("run") == r.get("run")
        if r.get("peak_allocated_gib") and ref.get("peak_allocated_gib"):
            r["memory_vs_reference"] = r["peak_allocated_gib"] / ref["peak_allocated_gib"]


def add_mfu(results: dict) -> None:
    mm = results["cases"].get("matmul", {})
    rate = mm.get("tflops") if mm.get("status") == "ok" else None
    for r in results["cases"].values():
        if rate and r.get("status") == "ok" and r.get("tflops") and r.get("kind") != "matmul":
            r["mfu"] = r["tflops"] / rate


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_third_party(args.verbose)  # the bench logs read like the trainer's
    cases = all_cases()
    if args.list:
        for c in cases:
            print(f"{c.name:22s} {'default' if c.default else '       '}  ~{c.estimate_s:4.0f} s  {c.what}")
        return 0
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        add_mfu(results)
        add_ratios(results)
        if args.benchmarks_md:
            report.update_benchmarks_md(Path(args.benchmarks_md), results)
        print(report.plain_table(results))
        return 0
    try:
        chosen = select(cases, args.cases)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    opts = Options(device=device, tiny=args.tiny, work_dir=work, weights=args.weights, compile=args.compile,
                   max_steps=max(2, args.max_steps), step_seconds=args.step_seconds,
                   sample_steps=max(2, args.sample_steps) if not args.tiny else 2,
                   log=lambda *a: print(*a, flush=True), profile=args.profile,
                   results_dir=Path(args.results_dir))
    env = report.environment(device, REPO)
    run_id = env["date"]
    stem = f"{report.slug(env['device'])}{'-tiny' if args.tiny else ''}-{_dt.date.today().isoformat()}"
    out_json = Path(args.results_dir) / f"{stem}.json"
    results = {"env": env, "options": {k: report.portable(v, REPO) for k, v in vars(args).items()}, "cases": {}}
    if args.merge and out_json.exists():
        try:
            old = json.loads(out_json.read_text())
            results["cases"] = old.get("cases", {})
            results["earlier_runs"] = old.get("earlier_runs", []) + [old.get("env", {})]
        except (OSError, json.JSONDecodeError):
            pass
    start = time.perf_counter()
    print(f"bench on {env['device']}: {len(chosen)} case(s), budget {args.time_budget:.0f} s -> {out_json}",
          flush=True)
    for case in chosen:
        elapsed = time.perf_counter() - start
        left = args.time_budget - elapsed
        estimate = 0 if args.tiny else case.estimate_s
        if case.name != "matmul" and estimate > left:
            results["cases"][case.name] = {"status": "skipped", "what": case.what, "run": run_id,
                                           "reason": f"time budget: ~{estimate:.0f} s needed, {left:.0f} s left"}
            print(f"- {case.name}: skipped (time budget)", flush=True)
            report.write_json_atomic(out_json, results)
            continue
        print(f"- {case.name}: {case.what}", flush=True)
        t0 = time.perf_counter()
        try:
            r = run_case(case, opts, max(5.0, left - estimate / 2))
            r["status"] = "ok"
        except CaseFailed as e:
            r = {"status": e.status, "error": str(e)[:2000], "attempts": e.attempts}
        except Exception as e:  # noqa: BLE001
            r = {"status": "OOM" if is_oom(e) else "error", "error": describe(e)[:2000],
                 "traceback": traceback.format_exc()[-4000:]}
        r.setdefault("what", case.what)
        if args.tiny:
            r["what"] = "[tiny] " + r["what"]
        r.update({"run": run_id, "wall_s": time.perf_counter() - t0})
        results["cases"][case.name] = r
        cleanup(opts)
        add_mfu(results)
        add_ratios(results)
        report.write_json_atomic(out_json, results)
        if args.benchmarks_md:
            report.update_benchmarks_md(Path(args.benchmarks_md), results)
        summary = r.get("step_s", r.get("clip_s", r.get("tflops")))
        print(f"  {r['status']} in {r['wall_s']:.0f} s" + (f": {summary:.3f}" if isinstance(summary, float) else "")
              + (f" ({r['error'][:200]})" if r.get("error") else ""), flush=True)
    results["total_s"] = time.perf_counter() - start
    report.write_json_atomic(out_json, results)
    if args.benchmarks_md:
        report.update_benchmarks_md(Path(args.benchmarks_md), results)
    print()
    print(report.plain_table(results))
    print(f"\nresults: {out_json}" + (f"; table: {args.benchmarks_md}" if args.benchmarks_md else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
