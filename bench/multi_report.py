"""The BENCHMARKS.md section of the multi-GPU bench (bench/multi.py): one table from its JSON."""
from __future__ import annotations

from pathlib import Path

from wan_model.atomic import write_text_atomic
from wantune.bench.report import code_label

BEGIN = "<!-- bench:multi:begin -->"
END = "<!-- bench:multi:end -->"


def _g(d: dict | None, *keys, fmt="{}"):
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return "—" if d is None else fmt.format(d)


def _gpus(r: dict) -> str:
    used = r.get("gpu_used_peak_gib") or {}
    return " / ".join(f"{v:.1f}" for _, v in sorted(used.items())) or "—"


def _not_ok(what: str, p: dict) -> list[str]:
    why = " ".join((p.get("error") or p.get("reason", "")).split())[:900]  # one table row: no newlines
    return [what, "", p.get("status", "?").upper(), "", "", "", why + (f" ({p['note']})" if p.get("note") else "")]


def _train_row(what: str, r: dict, note: str = "") -> list[str]:
    return [what, f"{r['procs']}", _g(r, "step_s", fmt="{:.3f} s"), _g(r, "rank0_peak_allocated_gib", fmt="{:.1f}"),
            _gpus(r), _g(r, "host_used_peak_gib", fmt="{:.0f}"), note]


def rows(results: dict) -> list[list[str]]:
    parts, gpus, out = results["parts"], results["gpus"], []
    for name, label in (("ddp", "1.3B LoRA (t2v-1.3B-lora.yaml)"), ("lora14", "14B LoRA (t2v-14B-lora.yaml)")):
        p = parts.get(name, {})
        if p.get("status") == "ok":
            eff = p.get("scaling_efficiency")
            out.append(_train_row(label + ", 1 GPU", p["1"]))
            out.append(_train_row(f"{label}, DDP", p[str(gpus)],
                                  f"scaling efficiency {eff:.0%} (per-GPU s/step on 1 over on {gpus})" if eff else ""))
        elif p:
            out.append(_not_ok(label, p))
    p = parts.get("zero2", {})
    if p.get("status") == "ok":
        out.append(_train_row("1.3B full (t2v-1.3B-full.yaml), ZeRO-2", p["run"],
                              f"checkpoint {p['run'].get('checkpoint_gb')} GB; resumed at step 6 on the same "
                              f"GPUs: steps {p['resume'].get('steps')}, losses {p['resume'].get('losses')}"))
    elif p:
        out.append(_not_ok("1.3B full, ZeRO-2", p))
    p = parts.get("zero2-reshard", {})
    if p.get("status") == "ok":
        out.append(_train_row("1.3B full, ZeRO-2 checkpoint of all GPUs resumed on 1", p,
                              f"grad_accum {gpus}; losses {p.get('losses')} vs {p.get('losses_on_all_gpus')} on "
                              f"{gpus} GPUs (max relative gap {p.get('max_rel_loss_gap')})"))
    elif p:
        out.append(_not_ok("1.3B full, ZeRO-2 resumed on 1 GPU", p))
    p = parts.get("zero3", {})
    if p.get("status") == "ok":
        tried = "; ".join(f"{a['config']} {a['overrides']} failed" for a in p.get("failed_attempts", []))
        out.append(_train_row(f"14B full (t2v-14B-full.yaml), ZeRO-3: {p.get('what')}", p,
                              f"{p.get('config')} {p.get('overrides') or ''}; every block trained; stopped "
                              "after 4 steps (a checkpoint would be ~170 GB)" + (f"; {tried}" if tried else "")))
    elif p:
        out.append(_not_ok("14B full, ZeRO-3", p))
    p = parts.get("zero3-save", {})
    if p.get("status") == "ok":
        e = p.get("export", {})
        out.append(_train_row(f"14B full, ZeRO-3 ({p.get('config')}), blocks 0-3 trained", p,
                              f"checkpoint {p.get('checkpoint_gb')} GB; export {e.get('gb')} GB loaded by "
                              f"load_transformer: {e.get('trained_tensors_changed')} tensors of block 0 moved, "
                              f"the rest equal to the base: {e.get('untrained_equal_base')}"))
    elif p:
        out.append(_not_ok("14B full, ZeRO-3 save + export", p))
    p = parts.get("zero3-reshard", {})
    if p.get("status") == "ok":
        out.append(_train_row("14B full, ZeRO-3 checkpoint of all GPUs resumed on 1", p,
                              f"step 3 loss {p.get('losses')} vs {p.get('loss_step3_all_gpus')} on {gpus} GPUs"))
    elif p:
        out.append(_not_ok("14B full, ZeRO-3 resumed on 1 GPU", p))
    return out


def cache_lines(results: dict) -> list[str]:
    p, gpus = results["parts"].get("cache", {}), results["gpus"]
    if p.get("status") != "ok":
        return [f"Caching: {p.get('status', 'not run')} {p.get('error') or p.get('reason') or ''}".strip()] if p else []
    one, many = p["1"], p[str(gpus)]
    return [f"Caching {one['clips']} clips ({'x'.join(map(str, results['size']))}) with `accelerate launch "
            f"tools/cache.py`: 1 GPU {one['steady_clips_per_min']} clips/min steady, "
            f"{one['end_to_end_clips_per_min']} end to end ({one['launch_s']} s); {gpus} GPUs "
            f"{many['steady_clips_per_min']} steady, {many['end_to_end_clips_per_min']} end to end "
            f"({many['launch_s']} s): {p.get('speedup_steady_clips_per_min')}x steady, "
            f"{p.get('speedup_end_to_end_clips_per_min')}x end to end"
            + (f" (each rank's own steady rate: {many['rank_steady_clips_per_min']}, together "
               f"{many.get('sum_of_rank_rates')})"
               if many.get("rank_steady_clips_per_min") else "")
            + f". The {gpus}-GPU cache is "
            + ("byte-identical to the 1-GPU cache." if p["identical"]
               else f"NOT byte-identical to the 1-GPU cache: {'; '.join(p['differences'][:6])}.")
            + (" Both with data.vae_deterministic=true; as shipped (cuDNN timing its algorithms) 1 GPU "
               f"ran {p['1-timed']['steady_clips_per_min']} clips/min steady, "
               f"{p['1-timed']['end_to_end_clips_per_min']} end to end." if "1-timed" in p else "")]


HEADER = ["run", "GPUs", "s/step", "rank-0 peak alloc GiB", "per-GPU peak used GiB (nvidia-smi)",
          "host peak GiB", "notes"]


def markdown(results: dict) -> str:
    env = results["env"]
    lines = [f"Device: {results['gpus']}x {env['device']} (driver {env.get('driver')}, CUDA {env.get('cuda')}); "
             f"torch {env['torch']}; {env['date']}; {code_label(env)}. Command: `{env.get('command')}`. "
             "Random weights at real size; every run is `accelerate launch` of train.py or tools/cache.py "
             "with the shipped recipe and accelerate config (previews off, bench/multi.py). s/step is the "
             "median after the first two steps, per step of every GPU (each GPU trains its own sample).",
             "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows(results)]
    lines += [""] + cache_lines(results)
    skipped = [n for n, p in results["parts"].items() if p.get("status") == "skipped"]
    if skipped:
        lines += ["", f"Skipped for time: {', '.join(skipped)}."]
    return "\n".join(lines)


def update_benchmarks_md(path: Path, results: dict) -> None:
    section = f"{BEGIN}\n{markdown(results)}\n{END}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n## Several GPUs (bench/multi.py)\n\n" + section + "\n"
    write_text_atomic(path, text)
