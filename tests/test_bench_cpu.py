"""tools/bench.py --tiny on the CPU: every kind of case runs and the JSON, table and
BENCHMARKS.md section come out (the GPU run happens once, so its code paths are proved here)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from wantune.bench import report
from wantune.bench.cases import all_cases, select
from wan_model.flops import forward_flops, step_flops
from wan_model.configs import FLAVOURS

REPO = Path(__file__).resolve().parents[1]
# ours with selective checkpointing, the diffusers reference, fp8 + block swap + offload,
# both VAEs and both samplers, the caching stage and training with previews, and a sequence
# parallel case on two ranks (the other cases only change sizes and settings)
CASES = ("lora-1.3B-81,ref-lora-1.3B-81,lora-14B-81-24G,vae-*,cache-stage,cache-8G,train-previews,sample-*,"
         "sp2-lora-1.3B-81")


def test_flop_counts_match_the_issue_floors():
    """The issue quotes ~1.0 s (1.3B) and ~5.5 s (14B) LoRA floors at 773 TFLOP/s, and ~37 s for
    50 CFG sampling steps of the 1.3B model; 832x480x81 is 32,760 tokens."""
    f13 = forward_flops(FLAVOURS["t2v-1.3B"].dit, 832, 480, 81, lora_rank=32)
    f14 = forward_flops(FLAVOURS["t2v-14B"].dit, 832, 480, 81, lora_rank=32)
    assert f13.tokens == 32760
    assert forward_flops(FLAVOURS["t2v-1.3B"].dit, 512, 320, 33).tokens == 5760
    assert step_flops(f13, "lora", "none")[0] / 773e12 == pytest.approx(1.0, abs=0.05)
    assert step_flops(f14, "lora", "none")[0] / 773e12 == pytest.approx(5.5, abs=0.1)
    assert 100 * forward_flops(FLAVOURS["t2v-1.3B"].dit, 832, 480, 81).total / 773e12 == pytest.approx(37, abs=1)
    model, hw = step_flops(f13, "lora", "selective")
    assert hw - model == pytest.approx(f13.total - f13.self_attention)
    assert step_flops(f13, "full", "full")[0] == pytest.approx(3 * f13.total)


def test_profile_breakdown_sorts_kernels_by_kind():
    """The step profile's GPU time by kind (bench/NOTES.md's "where the time goes"): attention
    kernels whose names also say gemm or cutlass count as attention, Inductor's matmul templates
    as GEMMs, its fused pointwise kernels (even `_to_copy` ones, and the norm+RoPE kernels named
    after the SDPA they feed) as fused elementwise."""
    from wantune.bench.profiling import breakdown

    kernels = [
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0", 400.0),
        ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", 100.0),
        ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits>", 50.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", 200.0),
        ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NTN", 100.0),
        ("triton_tem_fused_mm_0", 10.0),
        ("triton_per_fused__to_copy_add_mul_native_layer_norm_0", 30.0),
        ("triton_red_fused__scaled_dot_product_cudnn_attention__to_copy_add_mean_mul_pow_rsqrt_1", 20.0),
        ("Memcpy HtoD (Pinned -> Device)", 5.0),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 3.0),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", 2.0),
    ]
    got = breakdown(kernels)
    want = {"attention": 0.55, "gemm": 0.31, "fused elementwise (triton)": 0.05, "copies": 0.005,
            "optimizer": 0.003, "other": 0.002, "total": 0.92}
    assert got == pytest.approx(want) and set(got) == set(want)
    assert list(got)[:2] == ["attention", "gemm"]


@pytest.mark.parametrize("case,recipe", [("lora-1.3B-81", "t2v-1.3B-lora"), ("full-1.3B-81", "t2v-1.3B-full"),
                                         ("lora-14B-81", "t2v-14B-lora")])
def test_headline_cases_time_what_the_shipped_recipes_run(case, recipe):
    """A headline case's first setting trains as its shipped recipe does: the same mode, the
    same model flavour, compiled blocks when the recipe compiles, and the float8 levers only when
    the recipe turns them on (the full fine-tune case ran eager while its recipe compiled)."""
    from wantune.train.config import load_recipe

    r = load_recipe(REPO / "recipes" / f"{recipe}.yaml")
    c = next(c for c in all_cases() if c.name == case)
    s = c.settings[0]
    assert (s.mode, c.flavour, s.compile) == (r.train.mode, r.model.flavour, r.train.compile)
    assert s.fp8_matmul == r.train.fp8_matmul
    assert s.base_dtype == "bf16" or r.train.base_dtype == s.base_dtype


def test_every_case_is_a_recipe_the_trainer_accepts_and_refusals_are_not_smoothed_over():
    """Every case's settings pass the trainer's checks of the train section; settings it would
    refuse stop the bench with its message (they were once silently changed into others)."""
    from wantune.bench.steps import StepSettings, to_recipe

    for c in all_cases():
        for s in c.settings or []:
            to_recipe(s)
    with pytest.raises(ValueError, match="fp8_fast_accum=false only applies to float8 GEMMs"):
        to_recipe(StepSettings(mode="lora", base_dtype="fp8", fp8_matmul=False, fp8_fast_accum=False))
    with pytest.raises(ValueError, match="train.mode='nonsense'"):
        to_recipe(StepSettings(mode="nonsense", planned=True))


def test_case_selection():
    cases = all_cases()
    names = [c.name for c in select(cases, "default")]
    assert names[0] == "matmul" and "lora-14B-81-24G" in names and not any(n.startswith("lever-") for n in names)
    assert [c.name for c in select(cases, "vae-*")] == ["matmul", "vae-ours", "vae-ours-eager", "vae-ours-chunk2",
                                                     "vae-ours-chunk5", "vae-ours-chunk10", "vae-ours-chunk20",
                                                     "vae-diffusers"]
    assert all(c.name.startswith("lever-") or c.name == "matmul" for c in select(cases, "levers"))
    with pytest.raises(ValueError, match="matches no case"):
        select(cases, "nonsense")


def test_tiny_run_writes_json_table_and_markdown(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nIntro kept.\n")
    cmd = [sys.executable, str(REPO / "tools" / "bench.py"), "--tiny", "--cases", CASES,
           "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results"),
           "--benchmarks-md", str(md), "--max-steps", "2", "--step-seconds", "0.01"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)  # a hang guard, not a time limit
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = list((tmp_path / "results").glob("*-tiny-*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    expected = ["matmul", "lora-1.3B-81", "ref-lora-1.3B-81", "lora-14B-81-24G", "vae-ours",
                "vae-ours-eager", "vae-ours-chunk2", "vae-ours-chunk5", "vae-ours-chunk10",
                "vae-ours-chunk20", "cache-stage", "cache-8G", "train-previews", "vae-diffusers", "sample-ours",
                "sample-ours-fp8",
                "sample-diffusers-cudnn", "sample-diffusers", "sp2-lora-1.3B-81", "sample-ours-fa4",
                "sample-ours-fp8-fa4", "sample-ours-fp8-fa4-cfg2", "sample-ours-fp8-fa4-cfg2-gelu",
                "sample-ours-fp8-fa4-cfg2-rows"]
    assert list(res["cases"]) == expected
    bad = {k: v.get("error") for k, v in res["cases"].items() if v["status"] != "ok"}
    assert not bad, bad
    ours = res["cases"]["lora-1.3B-81"]
    assert ours["steps"] == 2 and len(ours["times_s"]) == 2 and ours["step_s"] > 0
    assert len(ours["losses"]) == 2 and all(l == l and l > 0 for l in ours["losses"])
    assert "ckpt=selective" in ours["settings_label"] and ours["speedup_vs_reference"] > 0
    capped = res["cases"]["lora-14B-81-24G"]  # a memory tier: the trainer's planner chose the levers
    assert capped["settings"]["planned"] and capped["cap_gib"] == 24.0
    assert capped["plan"]["gradient_checkpointing"] is False  # the tiny model fits without recompute
    assert all(v["predicted_gib"] > 0 for v in res["cases"].values() if v.get("kind") == "train" and "plan" in v)
    assert res["cases"]["sample-ours-fp8-fa4"]["dit_batches"] == [1]  # cond and uncond apart...
    assert res["cases"]["sample-ours-fp8-fa4-cfg2"]["dit_batches"] == [2]  # ...or in one forward
    assert res["cases"]["sample-ours"]["est_50_steps_s"] == pytest.approx(50 * res["cases"]["sample-ours"]["step_s"])
    assert res["cases"]["vae-ours"]["clips_per_min"] > 0
    cache = res["cases"]["cache-stage"]
    assert cache["clips"] == 6 and cache["clip_s"] > cache["vae_clip_s"] > 0 and cache["text_s"] > 0
    assert cache["speedup_vs_reference"] > 0 and cache["end_to_end_s"] > cache["clips"] * cache["vae_clip_s"]
    small = res["cases"]["cache-8G"]  # its own data settings, in its own cache
    assert small["text_encoder_device"] == "stream" and small["low_memory"] is True
    assert small["clips"] == 6 and small["clips_per_min"] > 0
    prev = res["cases"]["train-previews"]
    assert len(prev["renders_s"]) == 3 and prev["render_s"] > 0 and len(prev["step_times_s"]) == 4
    assert prev["videos"] == [f"samples/step-{s}/00-mystyle-a-cat-walks-through-a-sunlit-gar.mp4"
                              for s in (0, 2, 4)]
    sp = res["cases"]["sp2-lora-1.3B-81"]  # two gloo ranks through torchrun share one sample
    assert sp["processes"] == 2 and sp["sequence_parallel"] == 2 and sp["samples_per_step"] == 1
    assert sp["sample_s"] == sp["step_s"] > 0 and sp["tokens_per_gpu"] == sp["tokens"] // 2
    assert len(sp["losses"]) == sp["steps"] and all(l == l and l > 0 for l in sp["losses"])
    assert "| sp2-lora-1.3B-81 |" in md.read_text() and "s/sample" in md.read_text()
    assert res["env"]["torch"] and res["env"]["diffusers"]
    check_relations(res["cases"])
    # the table is printed last, and the markdown section replaces itself on a rewrite
    assert out.stdout.rstrip().splitlines()[-1].startswith("results:")
    assert "lora-14B-81-24G" in out.stdout and "s/step" in out.stdout
    text = md.read_text()
    assert text.startswith("# Benchmarks\n\nIntro kept.") and text.count(report.BEGIN) == 1
    assert "| lora-1.3B-81 |" in text
    res["cases"]["lora-1.3B-81"]["step_s"] = 123.0
    report.update_benchmarks_md(md, res)
    text2 = md.read_text()
    assert text2.count(report.BEGIN) == 1 and "123.000" in text2 and "Intro kept." in text2


def check_relations(cases: dict) -> None:
    """Each figure is what its definition says, from the raw times of the same run: a swapped
    ratio, a mean for a median or a per-minute rate turned upside down shows here."""
    from statistics import median

    from wan_model.lora_formats import BLOCK_LINEARS

    ours, ref = cases["lora-1.3B-81"], cases["ref-lora-1.3B-81"]
    for r in (ours, ref):
        assert r["steps"] == len(r["times_s"]) and r["step_s"] == median(r["times_s"])
        assert r["tflops"] == pytest.approx(r["model_tflop"] / r["step_s"])
        assert all(0.3 < x < 20 for x in r["losses"]), r["losses"]  # flow loss of a random model: ~2
    assert ours["hardware_tflops"] == pytest.approx(ours["hardware_tflop"] / ours["step_s"])
    assert ours["hardware_tflop"] > ours["model_tflop"]  # selective checkpointing recomputes
    assert ours["speedup_vs_reference"] == pytest.approx(ref["step_s"] / ours["step_s"])
    assert ours["mfu"] == pytest.approx(ours["tflops"] / cases["matmul"]["tflops"])
    # rank-32 LoRA on every block Linear of the tiny t2v model, counted from its shapes
    cfg = FLAVOURS["tiny-t2v"].dit
    io = {"ffn.0": cfg.dim + cfg.ffn_dim, "ffn.2": cfg.ffn_dim + cfg.dim}
    per_block = sum(32 * io.get(k, 2 * cfg.dim) for k in BLOCK_LINEARS if "_img" not in k)
    assert ours["trained_params"] == cfg.num_layers * per_block
    for name in ("vae-ours", "vae-diffusers"):
        v = cases[name]
        assert v["clip_s"] == sorted(v["times_s"])[len(v["times_s"]) // 2]
        assert v["clips_per_min"] == pytest.approx(60 / v["clip_s"])
    assert cases["vae-ours"]["speedup_vs_reference"] == pytest.approx(
        cases["vae-diffusers"]["clip_s"] / cases["vae-ours"]["clip_s"])
    c = cases["cache-stage"]
    assert c["clips_per_min"] == pytest.approx(60 / c["clip_s"])
    assert c["clip_s"] == pytest.approx(c["vae_clip_s"] + c["text_s"] / c["clips"])
    assert c["text_per_clip_s"] == pytest.approx(c["text_s"] / c["clips"])
    assert c["end_to_end_clips_per_min"] == pytest.approx(60 * c["clips"] / c["end_to_end_s"])
    p = cases["train-previews"]
    assert p["render_s"] == median(p["renders_s"][1:]) and p["first_render_s"] == p["renders_s"][0]
    assert len(p["losses"]) == p["steps"] and all(0.3 < x < 20 for x in p["losses"])
    for name in ("sample-ours", "sample-diffusers"):
        smp = cases[name]
        assert smp["step_s"] == pytest.approx(smp["total_s"] / smp["steps"])
    assert cases["sample-ours"]["tflops"] / cases["sample-diffusers"]["tflops"] == pytest.approx(
        cases["sample-diffusers"]["total_s"] / cases["sample-ours"]["total_s"])  # same work, same FLOPs


def test_multi_gpu_bench_overrides_are_valid_recipes():
    """Every recipe override bench/multi.py tries on the GPUs must load (a wrongly typed value
    fails the launch in seconds and the part falls back to its next attempt, or fails)."""
    from wantune.bench.multi import ZERO3_ATTEMPTS
    from wantune.train.config import load_recipe

    for config, extra, _ in ZERO3_ATTEMPTS:
        assert (REPO / "recipes" / "accelerate" / config).exists(), config
        load_recipe(str(REPO / "recipes" / "t2v-14B-full.yaml"), [f"{k}={v}" for k, v in extra.items()])


def test_results_record_no_machine_folders(monkeypatch, tmp_path):
    """The command and options in a results file name the repository's paths relative to it and
    the GPU run's output folder as $OUT: the file is committed and read elsewhere."""
    import torch

    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(sys, "argv", [str(REPO / "tools" / "bench.py"), "--results-dir", f"{out}/results",
                                      "--work-dir", str(REPO / "bench" / "models")])
    env = report.environment(torch.device("cpu"), REPO)
    assert env["command"] == "tools/bench.py --results-dir $OUT/results --work-dir bench/models"
    assert report.portable(str(REPO), REPO) == "." and report.portable(3, REPO) == 3


def test_multi_bench_says_why_a_zero3_attempt_stopped():
    from wantune.bench.multi import why_stopped

    log = ("cache: ...\nerror: no memory plan fits: the most frugal plan (full checkpointing) needs 185.6 GiB\n"
           "  - LoRA instead of a full fine-tune (train.mode=lora)\n"
           "  - the full fine-tune sharded over 4 or more such GPUs with DeepSpeed ZeRO-3 (...)\n"
           "Traceback (most recent call last):\n")
    assert why_stopped(log) == ("no memory plan fits: the most frugal plan (full checkpointing) needs 185.6 GiB "
                                "- LoRA instead of a full fine-tune (train.mode=lora) - the full fine-tune "
                                "sharded over 4 or more such GPUs with DeepSpeed ZeRO-3 (...)")
    assert "out-of-memory" in why_stopped("rank 1 exitcode -9\n  traceback : Signal 9 (SIGKILL) received")
    assert why_stopped("exit 1\nValueError: something else") == ""


def test_multi_bench_puts_a_failed_run_s_own_error_first():
    """A failed part's table row (cut at 900 characters) starts with the entry point's error line,
    not with a launcher traceback (seen: the ZeRO-3 resume row on 2 H200s was all traceback)."""
    from wantune.bench.multi import error_line

    log = ("  File \"accelerate/launch.py\", line 3\nerror: training failed: RuntimeError: state_steps is on cpu\n"
           "train:  67%|##   | 2/3\nE1130 failed (exitcode: 1) local_rank: 0\nTraceback (most recent call last):\n")
    assert error_line(log) == "training failed: RuntimeError: state_steps is on cpu"
    assert error_line("Traceback (most recent call last):\nValueError: x") == ""


def test_the_record_names_the_code_that_ran(tmp_path):
    """A results file says which files ran: HEAD, and when the files differ from it (a GPU
    machine's copy of a working tree over the last landed commit) the git tree they make, the
    same hash git gives a commit of exactly those files. The repository's index is untouched."""
    from wantune.bench.report import code_label, code_version

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    git("init", "-q")
    git("config", "user.email", "bench@example.com")
    git("config", "user.name", "bench")
    (tmp_path / ".gitignore").write_text("/ignored/\n")
    (tmp_path / "a.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "one")
    clean = code_version(tmp_path)
    assert clean == {"commit": git("rev-parse", "--short", "HEAD"), "code_tree": git("rev-parse", "HEAD^{tree}")[:12],
                     "code_changed": False}
    assert code_label(clean) == f"commit {clean['commit']}"
    (tmp_path / "a.py").write_text("x = 2\n")  # a changed file, a new one, an ignored one
    (tmp_path / "b.py").write_text("y = 1\n")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "big.bin").write_bytes(b"\0" * 1000)
    index_before = git("diff", "--cached", "--name-only")
    changed = code_version(tmp_path)
    assert changed["commit"] == clean["commit"] and changed["code_changed"]
    assert git("diff", "--cached", "--name-only") == index_before == ""  # nothing staged
    git("add", "-A")
    git("commit", "-qm", "two")
    assert changed["code_tree"] == git("rev-parse", "HEAD^{tree}")[:12]  # what ran = this commit's files
    assert code_label(changed) == f"commit {clean['commit']} with changes (tree {changed['code_tree']})"
    assert code_version(tmp_path / "ignored")["commit"] == git("rev-parse", "--short", "HEAD")
    assert code_version(tmp_path.parent / "nowhere") == {"commit": None}


def test_the_table_names_the_attention_packages_that_ran():
    """A run with FlashAttention 4 (its own wheel, `flash_attn_4`) says so in the table's header,
    beside flash-attn 2/3; a run without either says neither is installed."""
    from wantune.bench.report import attention_label

    fa4 = {"flash_attn": None, "flash_attn_4": "4.0.0b36", "nvidia_cutlass_dsl": "4.8.1"}
    assert attention_label(fa4) == "flash-attn not installed, flash-attn-4 4.0.0b36 (cutlass-dsl 4.8.1)"
    assert attention_label({"flash_attn": "2.8.3"}) == "flash-attn 2.8.3, flash-attn-4 not installed"
    assert attention_label({}) == "flash-attn not installed, flash-attn-4 not installed"


def test_median_ms_is_milliseconds_per_call():
    """The kernel probes' timer: one call's time in milliseconds (a 20 ms sleep reads as ~20),
    the median over the timed calls, the warm-up calls not timed."""
    import time

    import torch

    from wantune.bench.timing import median_ms

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.02 if len(calls) > 2 else 0.5)  # slow warm-up calls must not count

    ms = median_ms(fn, reps=3, warm=2, device=torch.device("cpu"))
    assert len(calls) == 5 and 15 < ms < 150, (len(calls), ms)
