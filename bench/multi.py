"""Scale-out on the GPUs of one machine, measured through the real entry points
(`accelerate launch train.py ...`, `accelerate launch tools/cache.py ...`), one part at a time:

    bash bench/gpu_run.sh multi                          # cache, ddp, zero2, zero2-reshard (~9 min, 2 H200s)
    bash bench/gpu_run.sh multi zero3                    # the 14B full fine-tune: s/step, memory (~6 min)
    bash bench/gpu_run.sh multi zero3-save zero3-reshard # its save, export and resume on 1 GPU (~9 min)
    bash bench/gpu_run.sh multi lora14                   # 14B LoRA on 1 GPU vs all (~7 min)
    python3 -m bench.multi --tiny cache ddp zero2    # every code path at tiny sizes, on the CPU

Parts (random weights at real size, 832x480x81 clips):
- cache: the corpus cached by 1 GPU, then by all: clips/min end to end and steady (from the
  files' write times), and whether the two caches are byte-identical.
- ddp: the 1.3B LoRA recipe on 1 GPU, then on all with ddp.yaml: s/step, memory per GPU, scaling.
- zero2: the 1.3B full recipe under zero2.yaml on all GPUs: s/step, memory, checkpoint size, a
  resume on the same GPUs. zero2-reshard: that checkpoint resumed on 1 GPU (universal checkpoint).
- zero3: the 14B full recipe under zero3.yaml, else zero3_offload.yaml, on all GPUs: s/step and
  memory (stopped after a few steps: its checkpoint would be ~170 GB), or why neither fits.
  zero3-save: 4 trained blocks with a save
  and the consolidated export loaded by `load_transformer`. zero3-reshard: that checkpoint
  resumed on 1 GPU.
- lora14: the 14B LoRA recipe on 1 GPU, then on all.

Each part's results go to `<results-dir>/<device>-<date>-multi.json` as soon as it ends, and the
section between the `bench:multi` markers of BENCHMARKS.md is rewritten. A part whose estimate
does not fit the time left (--budget) is skipped and says so.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# As tools/bench.py: fewer fragmentation OOMs near the limits (inherited by every launch).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from wantune.bench import launch, report  # noqa: E402
from wantune.bench.multi_report import update_benchmarks_md  # noqa: E402

PARTS = {"cache": 210, "ddp": 200, "zero2": 200, "zero2-reshard": 150, "zero3": 360,
         "zero3-save": 330, "zero3-reshard": 200, "lora14": 420}  # estimated seconds on 2 H200s
DEFAULT_PARTS = ["cache", "ddp", "zero2", "zero2-reshard"]
ACC = REPO / "recipes" / "accelerate"


class Bench:
    def __init__(self, a):
        import torch

        self.tiny, self.work = a.tiny, Path(a.work_dir).resolve()
        self.cpu = a.tiny and not torch.cuda.is_available()
        self.gpus = a.gpus or (2 if self.cpu else torch.cuda.device_count())
        self.size = (64, 64, 17) if a.tiny else (832, 480, 81)
        self.clips = a.clips or (6 if a.tiny else 40)
        self.deadline = time.perf_counter() + a.budget
        device = torch.device("cpu" if self.cpu else "cuda")
        self.env = report.environment(device, REPO)
        date = _dt.date.today().isoformat()
        self.json_path = Path(a.results_dir) / f"{report.slug(self.env['device'])}-{date}-multi.json"
        self.md_path = Path(a.benchmarks_md) if a.benchmarks_md else None
        self.results = {"env": self.env, "gpus": self.gpus, "size": list(self.size), "parts": {}}
        if self.json_path.exists():  # a second call of the same day adds its parts
            self.results["parts"] = json.loads(self.json_path.read_text()).get("parts", {})
        self.logs = Path(a.results_dir).parent / "multi-logs"
        self.opts = SimpleNamespace(work_dir=self.work, device=device, log=self.log)

    def log(self, *msg) -> None:
        print("[multi]", *msg, flush=True)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def save(self, name: str, result: dict) -> None:
        self.results["parts"][name] = result
        report.write_json_atomic(self.json_path, self.results)
        if self.md_path is not None:
            update_benchmarks_md(self.md_path, self.results)

    # ---- inputs ------------------------------------------------------------------------------
    def flavour(self, big: str) -> str:
        return "tiny-t2v" if self.tiny else big

    def model(self, big: str, components: tuple) -> Path:
        from wantune.bench.run import model_dir

        return model_dir(self.opts, self.flavour(big), components)

    def corpus(self) -> Path:
        from wantune.bench.pipeline import write_corpus

        w, h, f = self.size
        return write_corpus(self.work / f"corpus-{w}x{h}x{f}", self.clips, (w, h), f)

    def data_args(self, cache: str) -> list[str]:
        w, h, f = self.size
        small = self.model("t2v-1.3B", ("dit", "vae", "t5", "tokenizer"))
        return [f"data.sources=[{{path: '{self.corpus()}'}}]", f"data.areas=[[{w},{h}]]",
                f"data.frame_buckets=[{f}]", f"data.cache_dir={self.work / cache}",
                # the VAE and text encoder of every flavour are the same files: one cache for all
                f"model.vae={small / 'Wan2.1_VAE.pth'}",
                f"model.text_encoder={small / 'models_t5_umt5-xxl-enc-bf16.pth'}",
                f"model.tokenizer={small / 'google' / 'umt5-xxl'}"] + (
            ["data.vae_compile=false", "data.num_workers=0"] if self.cpu else [])

    def train_args(self, big: str, out: str, cache: str = "cache-all", **extra) -> list[str]:
        root = self.model(big, ("dit",))
        args = {"model.root": root, "model.flavour": self.flavour(big), "run.output_dir": self.work / "runs" / out,
                "validation.prompts": "[]", "validation.prompts_file": "''", "tracking.tensorboard": "false",
                "train.log_every": 1, "checkpoint.every": 1000, "export.formats": "[official]"}
        if self.cpu:
            args.update({"train.mixed_precision": "'no'", "train.base_dtype": "fp32", "train.compile": "false",
                         "train.optim.name": "adamw", "train.attention_backend": "sdpa"})
        args.update(extra)
        return self.data_args(cache) + [f"{k}={v}" for k, v in args.items()]

    def config(self, name: str) -> Path:
        """A shipped accelerate config; on the CPU a copy that says so."""
        path = ACC / name
        if not self.cpu:
            return path
        text = path.read_text().replace("recipes/accelerate/", f"{ACC}/") + "use_cpu: true\n"
        text = text.replace("deepspeed_config:\n", "deepspeed_config:\n  zero3_init_flag: false\n")
        copy = self.work / f"cpu-{name}"
        copy.write_text(text)
        return copy

    def launch(self, name: str, procs: int, script: str, args: list[str], config: Path | None = None,
               stop_after_steps: int = 0, out: str | None = None) -> launch.Launched:
        cmd = launch.accelerate_cmd(procs, script, args, config, cpu=self.cpu)
        # on the CPU: gloo for --multi_gpu; a DeepSpeed config says use_cpu itself (the variable
        # would turn DeepSpeed off)
        env = {"OMP_NUM_THREADS": "1", **({"ACCELERATE_USE_CPU": "1"} if config is None else {})} if self.cpu else {}
        metrics = self.work / "runs" / out / "metrics.jsonl" if out else None
        self.log(f"{name}: {procs} process(es), {self.left():.0f} s left")
        run = launch.run(cmd, self.logs / f"{name}.log", max(self.left(), 60), stop_after_steps, metrics, env)
        self.log(f"{name}: exit {run.returncode} after {run.seconds:.0f} s"
                 + (" (stopped as planned)" if run.stopped_early else ""))
        if run.returncode != 0 and not run.stopped_early:
            tail = run.tail()
            said = error_line(tail)  # the entry point's own one-line error first, then the log
            raise RuntimeError(f"{name} failed (exit {run.returncode})" + (f": {said}" if said else "")
                               + f"; end of its log:\n{tail}")
        return run

    def train(self, name: str, procs: int, recipe: str, big: str, out: str, config: Path | None = None,
              stop_after_steps: int = 0, **extra) -> dict:
        if not extra.get("checkpoint.resume"):
            shutil.rmtree(self.work / "runs" / out, ignore_errors=True)
        args = [str(REPO / "recipes" / recipe)] + self.train_args(big, out, **extra)
        earlier = len(launch.step_rows(self.work / "runs" / out / "metrics.jsonl"))  # a resume appends
        stop = stop_after_steps + earlier if stop_after_steps else 0
        run = self.launch(name, procs, "train.py", args, config, stop, out)
        return summarize(run, launch.step_rows(self.work / "runs" / out / "metrics.jsonl")[earlier:], procs)


def summarize(run: launch.Launched, rows: list[dict], procs: int) -> dict:
    """s/step (median after the first two steps, which compile), losses, memory."""
    timed = [r["train/s_per_step"] for r in rows if r["step"] - rows[0]["step"] >= 2] if rows else []
    peaks = [r["memory/peak_gib"] for r in rows if "memory/peak_gib" in r]
    return {"procs": procs, "steps": [r["step"] for r in rows],
            "losses": [round(r["train/loss"], 5) for r in rows],
            "step_s": round(statistics.median(timed), 3) if timed else None,
            "times_s": [round(r["train/s_per_step"], 3) for r in rows],
            "rank0_peak_allocated_gib": round(max(peaks), 2) if peaks else None,
            "gpu_used_peak_gib": {str(k): round(v, 1) for k, v in sorted(run.gpu_peak_gib.items())},
            "host_used_peak_gib": run.host_peak_gib, "launch_s": round(run.seconds, 1),
            "stopped_early": run.stopped_early}


def folder_gb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9, 2)


# ---- parts ------------------------------------------------------------------------------------

def part_cache(b: Bench) -> dict:
    """1 GPU and all GPUs with deterministic cuDNN choices (data.vae_deterministic), whose caches
    must be byte-identical, then 1 GPU as shipped (cuDNN times its algorithms) for the speed."""
    out = {}
    for name, procs, deterministic in ((1, 1, True), (b.gpus, b.gpus, True), ("1-timed", 1, False)):
        cache = b.work / f"cache-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        args = [str(REPO / "recipes" / "t2v-1.3B-lora.yaml"), *b.data_args(f"cache-{name}"),
                f"model.root={b.model('t2v-1.3B', ('dit', 'vae', 't5', 'tokenizer'))}",
                f"model.flavour={b.flavour('t2v-1.3B')}", f"data.vae_deterministic={str(deterministic).lower()}",
                "--no-progress"]
        run = b.launch(f"cache-{name}", procs, "tools/cache.py", args)
        files = sorted((cache / "latents").glob("*.safetensors"))
        times = sorted(p.stat().st_mtime for p in files)
        skip = min(3 * procs, len(times) - 2)  # the first clips of every rank compile the VAE kernels
        out[str(name)] = {"clips": len(times), "launch_s": round(run.seconds, 1), "deterministic": deterministic,
                          "end_to_end_clips_per_min": round(len(times) / run.seconds * 60, 1),
                          "steady_clips_per_min": _rate(times, skip),
                          "gpu_used_peak_gib": {str(k): round(v, 1) for k, v in run.gpu_peak_gib.items()}}
        if procs > 1:  # each rank's own steady rate: with one bucket and one clip per VAE call,
            # rank r encoded the clips r, r + procs, ... of the sorted keys (data.cache._deal)
            ranks = [_rate(sorted(f.stat().st_mtime for f in files[r::procs]), 3) for r in range(procs)]
            out[str(name)]["rank_steady_clips_per_min"] = ranks
            if all(ranks):
                out[str(name)]["sum_of_rank_rates"] = round(sum(ranks), 1)
    shutil.rmtree(b.work / "cache-1-timed", ignore_errors=True)
    one, many = b.work / "cache-1", b.work / f"cache-{b.gpus}"
    out["identical"], out["differences"] = compare_caches(one, many)
    if b.gpus > 1:
        for key in ("end_to_end_clips_per_min", "steady_clips_per_min"):
            x, y = out["1"][key], out[str(b.gpus)][key]
            out[f"speedup_{key}"] = round(y / x, 2) if x and y else None
    shutil.rmtree(b.work / "cache-all", ignore_errors=True)
    shutil.copytree(many, b.work / "cache-all")  # training reads this one
    return out


def _rate(times: list[float], skip: int) -> float | None:
    """Files per minute between the skip-th and the last write time."""
    if len(times) <= skip + 1 or times[-1] <= times[skip]:
        return None
    return round((len(times) - 1 - skip) / (times[-1] - times[skip]) * 60, 1)


def compare_caches(a: Path, b: Path) -> tuple[bool, list[str]]:
    files = sorted(p.relative_to(a) for p in a.glob("*/*.safetensors"))
    other = sorted(p.relative_to(b) for p in b.glob("*/*.safetensors"))
    diffs = [f"only in one cache: {sorted(set(map(str, files)) ^ set(map(str, other)))[:5]}"] if files != other else []
    diffs += [str(f) for f in files if f in other and (a / f).read_bytes() != (b / f).read_bytes()]
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    if {**ma, "written": ""} != {**mb, "written": ""}:
        diffs.append("manifest.json")
    if not diffs:
        return True, []
    differing = [f for f in files if f in other and str(f) in diffs]
    # how many and how far apart the tensors are first, then the first names
    head = [f"{len(differing)} of {len(files)} tensor files differ"] + _tensor_gaps(a, b, differing[:3])
    return False, head + diffs[:10]


def _tensor_gaps(a: Path, b: Path, files) -> list[str]:
    from safetensors.torch import load_file

    out = []
    for f in files:
        x, y = load_file(str(a / f)), load_file(str(b / f))
        gap = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
        out.append(f"{f}: max abs difference {gap:.3g}")
    return out


def part_ddp(b: Bench) -> dict:
    steps = 6 if b.tiny else 10
    out = {}
    for procs in (1, b.gpus):
        out[str(procs)] = b.train(f"ddp-{procs}", procs, "t2v-1.3B-lora.yaml", "t2v-1.3B", f"ddp-{procs}",
                                  ACC / "ddp.yaml" if procs > 1 and not b.cpu else None,
                                  **{"train.max_steps": steps, "export.formats": "[wantune]"})
    _scaling(out, b.gpus)
    return out


def part_lora14(b: Bench) -> dict:
    out = {}
    for procs in (1, b.gpus):
        out[str(procs)] = b.train(f"lora14-{procs}", procs, "t2v-14B-lora.yaml", "t2v-14B", f"lora14-{procs}",
                                  ACC / "ddp.yaml" if procs > 1 and not b.cpu else None,
                                  **{"train.max_steps": 5, "export.formats": "[wantune]"})
    _scaling(out, b.gpus)
    return out


def _scaling(out: dict, gpus: int) -> None:
    one, many = out["1"]["step_s"], out[str(gpus)]["step_s"]
    if one and many and gpus > 1:  # each GPU trains its own sample per step
        out["scaling_efficiency"] = round(one / many, 3)
        out["samples_per_s"] = {"1": round(1 / one, 3), str(gpus): round(gpus / many, 3)}


def part_zero2(b: Bench) -> dict:
    cfg = b.config("zero2.yaml")
    first = b.train("zero2", b.gpus, "t2v-1.3B-full.yaml", "t2v-1.3B", "zero2", cfg,
                    **{"train.max_steps": 6, "checkpoint.every": 3, "checkpoint.keep_last": 2})
    run = b.work / "runs" / "zero2"
    first["checkpoint_gb"] = folder_gb(run / "step-6")
    again = b.train("zero2-resume", b.gpus, "t2v-1.3B-full.yaml", "t2v-1.3B", "zero2", cfg,
                    **{"train.max_steps": 8, "checkpoint.every": 3, "checkpoint.keep_last": 2,
                       "checkpoint.resume": "latest"})
    again["resumed_from_step"] = 6
    again["resumed"] = "resumed from" in log_text(b, "zero2-resume")
    return {"run": first, "resume": again}


def part_zero2_reshard(b: Bench) -> dict:
    """The 2-GPU ZeRO-2 checkpoint of step 6 resumed on 1 GPU with grad_accum = the GPU count:
    the same batches and draws per step, so steps 7-8 should repeat the 2-GPU resume's losses."""
    source = b.work / "runs" / "zero2" / "step-6"
    if not source.is_dir():
        raise RuntimeError(f"{source} is missing: run the zero2 part first (same machine session)")
    one = b.train("zero2-reshard", 1, "t2v-1.3B-full.yaml", "t2v-1.3B", "zero2-one", b.config("zero2.yaml"),
                  **{"train.max_steps": 8, "checkpoint.every": 1000, "checkpoint.resume": source,
                     "train.grad_accum": b.gpus})
    one["log_line"] = next((x for x in log_text(b, "zero2-reshard").splitlines() if "written by" in x), "")
    both = b.results["parts"].get("zero2", {}).get("resume", {})
    if both.get("losses") and one["losses"]:
        one["losses_on_all_gpus"] = both["losses"]
        one["max_rel_loss_gap"] = round(max(abs(x - y) / abs(y) for x, y in zip(one["losses"], both["losses"])), 4)
    shutil.rmtree(b.work / "runs" / "zero2-one", ignore_errors=True)
    return one


def log_text(b: Bench, name: str) -> str:
    path = b.logs / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


# How the 14B full fine-tune is tried on few GPUs, in order (the next only if one fails); the
# planner stops an attempt before loading when DeepSpeed's own estimate does not fit. On 2 H200s
# with 256 GiB of host RAM neither fits (2026-11-30): the optimizer on the GPUs needs ~162 GiB per
# GPU, offloaded ~314 GiB of host RAM; 3 or more H200s fit the first.
ZERO3_ATTEMPTS = [
    ("zero3.yaml", {"train.checkpoint_mode": "full", "train.checkpoint_offload": -1},
     "optimizer states on the GPUs; checkpointed block inputs in host memory"),
    ("zero3_offload.yaml", {}, "the shipped recipe with AdamW in host memory (zero3_offload.yaml)"),
]


def part_zero3(b: Bench) -> dict:
    """The shipped 14B recipe (every block trained), stopped after 4 steps: its checkpoint
    (~12 bytes per trained parameter, ~170 GB) would not fit the disk. The attempts are tried in
    order; the later parts use the one that worked."""
    shutil.rmtree(b.work / "runs" / "zero2", ignore_errors=True)  # disk: ~40 GB of 1.3B checkpoints
    b.model("t2v-14B", ("dit",))
    attempts = []
    for config, extra, what in ZERO3_ATTEMPTS:
        try:
            out = b.train("zero3", b.gpus, "t2v-14B-full.yaml", "t2v-14B", "zero3-all", b.config(config),
                          stop_after_steps=4, **{"train.max_steps": 100, **extra})
        except RuntimeError as e:
            attempts.append({"config": config, "overrides": extra, "what": what,
                             "error": why_stopped(log_text(b, "zero3")) or str(e)[-1500:]})
            continue
        finally:
            shutil.rmtree(b.work / "runs" / "zero3-all", ignore_errors=True)
        return {**out, "config": config, "overrides": extra, "what": what, "failed_attempts": attempts}
    raise RuntimeError("every attempt failed: " + " | ".join(f"{a['config']}: {a['error']}" for a in attempts)[-2500:])


def error_line(log: str) -> str:
    """The last `error: ...` line that train.py and the tools print before exiting non-zero."""
    said = [line[len("error: "):].strip() for line in log.splitlines() if line.startswith("error: ")]
    return said[-1] if said else ""


def why_stopped(log: str) -> str:
    """The planner's refusal (its whole advice), or a rank killed by the host (SIGKILL: out of
    host memory as a rule), from a run's log; '' when neither."""
    lines = log.splitlines()
    for i, line in enumerate(lines):
        if "no memory plan fits" in line:
            advice = [line[line.index("no memory plan fits"):]]
            advice += [x.strip() for x in lines[i + 1:i + 8] if x.startswith("  - ")]
            return " ".join(advice)
    if "Signal 9 (SIGKILL)" in log:
        return "a rank was killed with SIGKILL (the host's out-of-memory killer, as a rule)"
    return ""


FOUR_BLOCKS = "['^blocks\\.[0-3]\\.']"


def part_zero3_save(b: Bench) -> dict:
    """Blocks 0-3 of the 14B trained under ZeRO-3 with a checkpoint and the consolidated export
    (official layout), which `load_transformer` must load."""
    shutil.rmtree(b.work / "runs" / "zero2", ignore_errors=True)
    config, extra, _ = _zero3_setting(b)
    out = b.train("zero3-save", b.gpus, "t2v-14B-full.yaml", "t2v-14B", "zero3", b.config(config),
                  **{"train.max_steps": 3, "checkpoint.every": 2, "checkpoint.keep_last": 2,
                     "full.parts": FOUR_BLOCKS, **extra})
    out["config"], out["overrides"] = config, extra
    run = b.work / "runs" / "zero3"
    out["checkpoint_gb"] = folder_gb(run / "step-2")
    out["export"] = check_export(b, run / "export" / "official")
    shutil.rmtree(run / "export", ignore_errors=True)  # disk: 28 GB
    shutil.rmtree(run / "step-3", ignore_errors=True)  # the reshard part resumes step-2
    return out


def _zero3_setting(b: Bench) -> tuple:
    """The setting the zero3 part found working (the first attempt when it did not run)."""
    done = b.results["parts"].get("zero3", {})
    for attempt in ZERO3_ATTEMPTS:
        if done.get("config") == attempt[0]:
            return attempt
    return ZERO3_ATTEMPTS[0]


def check_export(b: Bench, folder: Path) -> dict:
    """The consolidated export loads with load_transformer; untrained weights equal the base's,
    the trained blocks moved."""
    import torch

    from wan_model.dit_io import load_transformer

    t0 = time.perf_counter()
    device = "cpu" if b.cpu else "cuda:0"
    tuned = load_transformer(folder, dtype=torch.bfloat16, device=device)
    base = load_transformer(b.model("t2v-14B", ("dit",)), dtype=torch.bfloat16, device=device)
    tb, bb = tuned.state_dict(), base.state_dict()
    moved = [k for k in tb if k.startswith("blocks.0.") and not torch.equal(tb[k], bb[k])]
    untouched = all(torch.equal(tb[k], bb[k]) for k in tb if not k.startswith(("blocks.0.", "blocks.1.", "blocks.2.", "blocks.3.")))
    result = {"loaded": True, "load_s": round(time.perf_counter() - t0, 1), "gb": folder_gb(folder),
              "trained_tensors_changed": len(moved), "untrained_equal_base": untouched}
    del tuned, base, tb, bb
    if device != "cpu":
        torch.cuda.empty_cache()
    return result


def part_zero3_reshard(b: Bench) -> dict:
    source = b.work / "runs" / "zero3" / "step-2"
    if not source.is_dir():
        raise RuntimeError(f"{source} is missing: run the zero3 part first (same machine session)")
    config, extra, _ = _zero3_setting(b)
    one = b.train("zero3-reshard", 1, "t2v-14B-full.yaml", "t2v-14B", "zero3-one", b.config(config),
                  **{"train.max_steps": 3, "checkpoint.every": 1000, "checkpoint.resume": source,
                     "full.parts": FOUR_BLOCKS, "train.grad_accum": b.gpus, "export.formats": "[]", **extra})
    one["log_line"] = next((x for x in log_text(b, "zero3-reshard").splitlines() if "written by" in x), "")
    saved = b.results["parts"].get("zero3-save", {})
    if saved.get("losses") and one["losses"]:
        one["loss_step3_all_gpus"] = saved["losses"][-1]
    shutil.rmtree(b.work / "runs" / "zero3-one", ignore_errors=True)
    return one


RUNNERS = {"cache": part_cache, "ddp": part_ddp, "zero2": part_zero2, "zero2-reshard": part_zero2_reshard,
           "zero3": part_zero3, "zero3-save": part_zero3_save, "zero3-reshard": part_zero3_reshard, "lora14": part_lora14}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="*", help=f"{', '.join(PARTS)} (default: {' '.join(DEFAULT_PARTS)})")
    p.add_argument("--tiny", action="store_true", help="tiny model and clips (CPU with gloo, or GPUs)")
    p.add_argument("--gpus", type=int, default=0, help="processes of the multi-GPU runs (default: all GPUs)")
    p.add_argument("--clips", type=int, default=0, help="clips in the corpus (default 40; tiny 6)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all parts")
    p.add_argument("--work-dir", default=str(REPO / "bench" / "models" / "multi"),
                   help="random models, corpus, caches and runs (large; not copied back)")
    p.add_argument("--results-dir", default=str(REPO / "bench" / "results"))
    p.add_argument("--benchmarks-md", default=str(REPO / "BENCHMARKS.md"), help="'' to skip")
    a = p.parse_args(argv)
    unknown = [x for x in a.parts if x not in PARTS]
    if unknown:
        p.error(f"unknown part(s) {unknown}: choose from {', '.join(PARTS)}")
    b = Bench(a)
    b.work.mkdir(parents=True, exist_ok=True)
    b.log(f"{b.env['device']} x{b.gpus}, parts {a.parts or DEFAULT_PARTS}, budget {a.budget:.0f} s")
    failed = False
    for name in a.parts or DEFAULT_PARTS:
        need = PARTS[name] * (0.3 if b.tiny else 1.0)
        if b.left() < need:
            b.save(name, {"status": "skipped", "reason": f"{b.left():.0f} s left, the part needs ~{need:.0f} s"})
            b.log(f"{name}: skipped (time)")
            continue
        t0 = time.perf_counter()
        try:
            result = {"status": "ok", **RUNNERS[name](b)}
        except Exception as e:  # the next part may still run; the error is recorded
            traceback.print_exc()
            result, failed = {"status": "failed", "error": f"{type(e).__name__}: {e}"[-3000:]}, True
        result["seconds"] = round(time.perf_counter() - t0, 1)
        b.save(name, result)
        b.log(f"{name}: {result['status']} in {result['seconds']:.0f} s")
    print(json.dumps(b.results["parts"], indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
