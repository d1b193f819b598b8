"""Environment record, the incremental JSON file, the table, and the BENCHMARKS.md section."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from wan_model.atomic import write_text_atomic

BEGIN = "<!-- bench:table:begin -->"
END = "<!-- bench:table:end -->"


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:
        return None


def _git(repo: Path, *args: str, env: dict | None = None) -> str:
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=60,
                         env=env, check=True)
    return out.stdout.strip()


def code_version(repo: Path) -> dict:
    """Which code ran: HEAD's short hash, the git tree of the files as they are (tracked and
    untracked, as `git add -A` sees them; the hash `git log --format=%T` shows for a commit of
    exactly these files) and whether they differ from HEAD's. A GPU machine gets a copy of the
    working tree on top of the last landed commit, so HEAD alone does not say what ran there.
    The tree is computed in a temporary index: the repository's index is left alone."""
    try:
        head = _git(repo, "rev-parse", "--short", "HEAD")
    except Exception:
        return {"commit": None}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            index = Path(tmp) / "index"
            real = Path(repo) / _git(repo, "rev-parse", "--git-path", "index")
            if real.exists():
                shutil.copyfile(real, index)  # its stat cache: only changed files are read again
            env = dict(os.environ, GIT_INDEX_FILE=str(index))
            _git(repo, "add", "-A", env=env)
            tree = _git(repo, "write-tree", env=env)
        return {"commit": head, "code_tree": tree[:12],
                "code_changed": tree != _git(repo, "rev-parse", "HEAD^{tree}")}
    except Exception:
        return {"commit": head}


def portable(value, repo: Path):
    """A recorded path or command line without this machine's folders: the repository's own
    paths relative to it, the GPU run's output folder ($OUT of bench/gpu_run.sh) as $OUT."""
    if not isinstance(value, str):
        return value
    out = os.environ.get("OUT", "")
    if os.path.isabs(out) and out.rstrip("/"):
        value = value.replace(out.rstrip("/"), "$OUT")
    root = str(Path(repo).resolve())
    return value.replace(root + "/", "").replace(root, ".")


def environment(device: torch.device, repo: Path) -> dict:
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
        "driver": _driver() if device.type == "cuda" else None,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "torch": torch.__version__, "diffusers": _version("diffusers"), "peft": _version("peft"),
        "transformers": _version("transformers"), "flash_attn": _version("flash_attn") or _version("flash_attn_3"),
        "flash_attn_4": _version("flash-attn-4"), "nvidia_cutlass_dsl": _version("nvidia-cutlass-dsl"),
        "python": sys.version.split()[0], "date": _dt.datetime.now().isoformat(timespec="seconds"),
        **code_version(repo), "command": portable(" ".join(sys.argv), repo),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env["memory_gib"] = round(p.total_memory / 2**30, 1)
        from wan_model import attention
        names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
        env["torch_sdpa_order"] = [names.get(b, b) for b in (attention._TORCH_ORDER or [])]
        env["sm_count"] = p.multi_processor_count
    return env


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for name, r in results["cases"].items():
        status = r.get("status")
        if status != "ok":
            why = r.get("error", "") or r.get("reason", "")
            rows.append([name, r.get("what", ""), status.upper() if status else "?", "", "", "", "", "",
                         why.splitlines()[0][:80] if why else ""])
            continue
        kind = r.get("kind")
        if kind == "matmul":
            rows.append([name, r["what"], f"{r['seconds'] * 1e3:.2f} ms", "", "", f"{r['tflops']:.0f}", "", "", ""])
        elif kind == "vae":
            rows.append([name, r["what"], f"{r['clip_s']:.2f} s/clip", _f(r.get("peak_allocated_gib")),
                         _f(r.get("peak_reserved_gib")), "", "", _ratio(r), f"{r['clips_per_min']:.1f} clips/min"])
        elif kind == "cache":
            rows.append([name, r["what"], f"{r['clip_s']:.2f} s/clip", _f(r.get("peak_allocated_gib")),
                         _f(r.get("peak_reserved_gib")), "", "", _ratio(r),
                         f"{r['clips_per_min']:.1f} clips/min steady (VAE+decode {r['vae_clip_s']:.2f} s, "
                         f"T5 {r['text_per_clip_s']:.3f} s per clip); {r['clips']} clips end to end "
                         f"{r['end_to_end_s']:.0f} s incl. loads = {r['end_to_end_clips_per_min']:.1f}/min"
                         + _stage_peaks(r)])
        elif kind == "previews":
            p = r["preview"]
            rows.append([name, r["what"], f"{r['render_s']:.2f} s/render", _f(r.get("peak_allocated_gib")),
                         _f(r.get("peak_reserved_gib")), "", "", "",
                         f"{p['width']}x{p['height']}x{p['frames']} {p['steps']} steps; first render "
                         f"{r['first_render_s']:.1f} s (compiles); train step {r['step_before_preview_s']:.3f} s "
                         f"before / {r['step_after_preview_s']:.3f} s after a preview"
                         + (f"; peak GiB: training {max(r['step_peak_gib']):.1f}, render "
                            f"{max(r['render_peak_gib']):.1f}" if r.get("step_peak_gib") and r.get("render_peak_gib")
                            else "")])
        elif kind == "sample":
            rows.append([name, r["what"], f"{r['step_s']:.3f} s/step", _f(r.get("peak_allocated_gib")),
                         _f(r.get("peak_reserved_gib")), _f(r.get("tflops"), "{:.0f}"), _f(r.get("mfu"), "{:.0%}"),
                         _ratio(r), f"{r['steps']} steps timed; x50 = {r['est_50_steps_s']:.1f} s (extrapolated)"])
        else:
            note = r.get("settings_label", "")
            if r.get("settings", {}).get("planned"):
                note += f"; plan: {r.get('plan_text')}"
            if r.get("prediction_error") is not None:
                note += f"; predicted peak {r['predicted_gib']:.2f} GiB ({r['prediction_error']:+.1%})"
            if r.get("processes", 1) > 1:  # memory is the fullest GPU's, TFLOP/s per GPU
                note += (f"; {r['sample_s']:.3f} s/sample ({r['samples_per_step']} per step), "
                         f"{r['tokens_per_gpu']:,} tokens and peak {_f(r.get('peak_allocated_gib'))} "
                         "GiB per GPU")
            rows.append([name, r["what"], f"{r['step_s']:.3f}", _f(r.get("peak_allocated_gib")),
                         _f(r.get("peak_reserved_gib")), _f(r.get("tflops"), "{:.0f}"), _f(r.get("mfu"), "{:.0%}"),
                         _ratio(r), note])
    return rows


def _stage_peaks(r: dict) -> str:
    """Caching: each stage's peak (allocated GiB), the placement, and the cap if there was one."""
    if r.get("text_peak_allocated_gib") is None:
        return ""
    text = (f"; peaks T5 ({r.get('text_encoder_device', 'device')}) {r['text_peak_allocated_gib']:.1f}, "
            f"VAE{' tiled' if r.get('low_memory') else ''} {r['vae_peak_allocated_gib']:.1f} GiB")
    if r.get("cap_gib"):
        text += f"; cap {r['cap_gib']:.0f} GiB {'respected' if r.get('cap_respected') else 'EXCEEDED'}"
    return text


def _ratio(r: dict) -> str:
    x = r.get("speedup_vs_reference")
    if x is None:
        return ""
    mark = "" if r.get("same_run_as_reference", True) else "*"
    return f"{x:.2f}x{mark}"


HEADER = ["case", "what", "s/step", "peak alloc GiB", "peak reserved GiB", "TFLOP/s", "MFU",
          "vs reference", "settings / notes"]


def code_label(env: dict) -> str:
    """'commit X', or 'commit X with changes (tree T)' when the files that ran were not X's."""
    label = f"commit {env.get('commit')}"
    return label + (f" with changes (tree {env['code_tree']})" if env.get("code_changed") else "")


def attention_label(env: dict) -> str:
    """The attention packages the run had: flash-attn (2/3) and flash-attn-4 are separate wheels."""
    fa4 = env.get("flash_attn_4")
    fa4 = f"{fa4} (cutlass-dsl {env.get('nvidia_cutlass_dsl')})" if fa4 else "not installed"
    return f"flash-attn {env.get('flash_attn') or 'not installed'}, flash-attn-4 {fa4}"


def markdown_table(results: dict) -> str:
    env = results["env"]
    mm = results["cases"].get("matmul", {})
    lines = [
        f"Device: {env['device']} (driver {env.get('driver')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}); "
        f"torch {env['torch']}, diffusers {env.get('diffusers')}, peft {env.get('peft')}, "
        f"{attention_label(env)}; {env['date']}; {code_label(env)}.",
        f"Command: `{env.get('command')}`.",
        f"bf16 matmul rate measured in the same run: {mm.get('tflops', float('nan')):.0f} TFLOP/s "
        "(the MFU denominator). TFLOP/s counts model FLOPs (see bench/NOTES.md: LoRA = 2x forward "
        "for the frozen Linears + 3x for attention; full = 3x forward; recompute not counted).",
        "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER),
    ]
    for row in table_rows(results):
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in row) + " |")
    lines.append("")
    lines.append("`*` = ratio against a reference measured in a different run. Speed-ups are "
                 "reference s/step over ours (s/sample where either runs on several GPUs); VAE and "
                 "sampler ratios likewise (higher is better).")
    return "\n".join(lines)


def plain_table(results: dict) -> str:
    rows = [HEADER] + table_rows(results)
    widths = [min(max(len(str(r[i])) for r in rows), 48) for i in range(len(HEADER))]
    out = []
    for r in rows:
        out.append("  ".join(str(c)[:48].ljust(w) for c, w in zip(r, widths)))
    return "\n".join(out)


def update_benchmarks_md(path: Path, results: dict) -> None:
    section = f"{BEGIN}\n{markdown_table(results)}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
    else:
        text = ("# Benchmarks\n\nWritten by `python tools/bench.py` (see bench/NOTES.md for the FLOP "
                "convention, the levers and the floor analysis).\n\n" + section + "\n")
    write_text_atomic(path, text)
