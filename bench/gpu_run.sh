#!/usr/bin/env bash
# Everything this project runs on a GPU machine, in one call:
#   bash bench/gpu_run.sh tests            # the GPU tests
#   bash bench/gpu_run.sh bench [args...]  # tools/bench.py (args passed through)
#   bash bench/gpu_run.sh all [args...]    # both
#   bash bench/gpu_run.sh multi [parts...] # bench/multi.py: several GPUs through accelerate launch
#                                          # (default parts: cache ddp zero2 zero2-reshard; then
#                                          # `multi zero3`, `multi zero3-save zero3-reshard`: its docstring)
#   bash bench/gpu_run.sh seqpar [args...] # 2 GPUs: sequence parallel vs 1 GPU (14B 720p) and vs DDP (~9 min)
#   bash bench/gpu_run.sh seqpar-tests     # 2 GPUs: sequence parallel equals one GPU (real sizes, trainer)
#   bash bench/gpu_run.sh tiers [args...]  # the memory tiers; with 2 GPUs in two queues side by side
#                                          # (~8 min): 1.3B tiers, I2V 24G | 14B LoRA 24G and 16G, caching
#   bash bench/gpu_run.sh fa4-stash        # FlashAttention 4 in two calls on one warm machine (too
#   bash bench/gpu_run.sh fa4-install      # big for one): bench/fa4_wheels.sh; later runs use it
# Installs the wheels carried in .whl/ (see the device notes in bench/NOTES.md), then writes logs,
# results JSON and the BENCHMARKS.md table under $OUT (default bench/out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT/results"
# FlashAttention 4 in two calls (bench/fa4_wheels.sh): the first keeps the runtime wheel's first
# part in .fa4-parts/ (ignored, so it stays on the warm machine), the second joins and installs it
if [ "${1:-}" = fa4-stash ]; then mkdir -p .fa4-parts && cp .fa4a/libs_cu12.part.aa .fa4-parts/; exit $?; fi
if [ "${1:-}" = fa4-install ]; then
  wheel=.fa4-parts/$(cat .fa4b/libs_cu12.name)
  cat .fa4-parts/libs_cu12.part.aa .fa4b/libs_cu12.part.ab > "$wheel" || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target .site-fa4 "$wheel" .fa4b/*.whl
  exit $?
fi
WHEELS=${WHEELS:-.whl}  # e.g. WHEELS=.whl-bench: a subset that fits the carry limit beside PyAV
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site "$WHEELS"/*.whl || exit 1
  export PYTHONPATH=$PWD/.site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ -d .site-fa4 ]; then  # installed by `fa4-install` on this machine (its .pth is not read here)
  export PYTHONPATH=$PYTHONPATH:$PWD/.site-fa4:$PWD/.site-fa4/nvidia_cutlass_dsl/dsl_packages
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
what=${1:-all}; shift || true
rc=0
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest -q -s -m gpu ${GPU_TESTS:-tests/test_gpu_memory.py tests/test_gpu_fastpath.py tests/test_fp8_triton.py tests/test_vae.py tests/test_data_cache.py tests/test_small_cards_gpu.py tests/test_sample_gpu.py tests/test_sequence_parallel_gpu.py} 2>&1 | tee "$OUT/gpu_tests.log"
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = seqpar-tests ]; then
  python3 -m pytest -q -s -m gpu tests/test_sequence_parallel_gpu.py 2>&1 | tee "$OUT/seqpar_tests.log"
  rc=${PIPESTATUS[0]}
fi
if [ "$what" = seqpar ]; then  # weights drawn on each GPU: no 28 GB checkpoint to write first
  python3 tools/bench.py --cases 'lora-14B-720p,sp2-*,ddp2-*' --weights direct --time-budget 540 \
    --results-dir "$OUT/results" --benchmarks-md "$OUT/BENCHMARKS.md" "$@" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = tiers ]; then
  T13='lora-1.3B-81-8G,lora-1.3B-81-12G,lora-1.3B-81-16G' T14='lora-14B-81-24G,lora-14B-81-16G' I2V=i2v-14B-81-24G
  tier() {  # GPU, cases, name: one bench process, its own results and work folder (its table
    mkdir -p "$OUT/$3"  # goes outside $OUT: fewer files to bring back)
    CUDA_VISIBLE_DEVICES=$1 python3 tools/bench.py --weights direct --work-dir "bench/models-$3" --cases "$2" \
      --max-steps 3 --step-seconds 10 --time-budget 480 --results-dir "$OUT/$3" \
      --benchmarks-md "bench/models-$3/BENCHMARKS.md" "${@:4}" > "$OUT/$3/bench.log" 2>&1
  }
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then  # two queues of about equal length (~8 min)
    { tier 0 "$T13,$I2V" tiers-gpu0 "$@"
      if [ -n "${TIER_TESTS:-}" ]; then  # e.g. TIER_TESTS="tests/test_gpu_memory.py -k segments"
        CUDA_VISIBLE_DEVICES=0 python3 -m pytest -q -s -m gpu $TIER_TESTS > "$OUT/tier_tests.log" 2>&1
      fi; } &
    { tier 1 "$T14" tiers-gpu1 "$@"; tier 1 cache-8G cache-8G "$@"; } &
    wait
  else
    tier 0 "$T13,$T14,$I2V" tiers "$@"
    tier 0 cache-8G cache-8G "$@"
  fi
  tail -n 12 "$OUT"/*/bench.log "$OUT"/tier_tests.log 2>/dev/null
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 tools/bench.py --results-dir "$OUT/results" --benchmarks-md "$OUT/BENCHMARKS.md" "$@" 2>&1 | tee "$OUT/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = multi ]; then
  # big files (random models, corpus, caches, checkpoints) stay outside $OUT, which is copied back
  python3 -m bench.multi --results-dir "$OUT/results" --benchmarks-md "$OUT/BENCHMARKS.md" "$@" 2>&1 | tee -a "$OUT/multi.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit $rc
