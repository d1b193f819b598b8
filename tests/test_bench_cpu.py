"""tools/bench.py --tiny on the CPU: every kind of case runs and the JSON, table and
BENCHMARKS.md section come out (the GPU run happens once, so its code paths are proved here)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report
from bench.cases import all_cases, select
from bench.flops import forward_flops, step_flops
from wan_model.configs import FLAVOURS

REPO = Path(__file__).resolve().parents[1]
# ours with selective checkpointing, the diffusers reference, fp8 + block swap + offload,
# both VAEs and both samplers, the caching stage and training with previews, and a sequence
# parallel case on two ranks (the other cases only change sizes and settings)
CASES = "lora-1.3B-81,ref-lora-1.3B-81,lora-14B-81-24G,vae-*,cache-stage,train-previews,sample-*,sp2-lora-1.3B-81"


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
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    files = list((tmp_path / "results").glob("*-tiny-*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    expected = ["matmul", "lora-1.3B-81", "ref-lora-1.3B-81", "lora-14B-81-24G", "vae-ours",
                "vae-ours-eager", "vae-ours-chunk2", "vae-ours-chunk5", "vae-ours-chunk10",
                "vae-ours-chunk20", "cache-stage", "train-previews", "vae-diffusers", "sample-ours",
                "sample-diffusers-cudnn", "sample-diffusers", "sp2-lora-1.3B-81"]
    assert list(res["cases"]) == expected
    bad = {k: v.get("error") for k, v in res["cases"].items() if v["status"] != "ok"}
    assert not bad, bad
    ours = res["cases"]["lora-1.3B-81"]
    assert ours["steps"] == 2 and len(ours["times_s"]) == 2 and ours["step_s"] > 0
    assert len(ours["losses"]) == 2 and all(l == l and l > 0 for l in ours["losses"])
    assert "ckpt=selective" in ours["settings_label"] and ours["speedup_vs_reference"] > 0
    capped = res["cases"]["lora-14B-81-24G"]
    assert capped["settings"]["base_dtype"] == "fp8" and capped["block_swap_host_gib"] > 0
    assert res["cases"]["sample-ours"]["est_50_steps_s"] == pytest.approx(50 * res["cases"]["sample-ours"]["step_s"])
    assert res["cases"]["vae-ours"]["clips_per_min"] > 0
    cache = res["cases"]["cache-stage"]
    assert cache["clips"] == 6 and cache["clip_s"] > cache["vae_clip_s"] > 0 and cache["text_s"] > 0
    assert cache["speedup_vs_reference"] > 0 and cache["end_to_end_s"] > cache["clips"] * cache["vae_clip_s"]
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
