#!/usr/bin/env bash
# Prepares FlashAttention 4 for the GPU machines, whose calls carry 64 MiB at most: its CuTe DSL
# runtime wheel alone is 92 MB, so the wheels are split over two folders, each carried by one
# call on the same warm machine (bench/gpu_run.sh says how):
#   bash bench/fa4_wheels.sh          # writes .fa4a/ (the runtime wheel's first 58 MB) and .fa4b/
#   run 1, carry .fa4a:  bash bench/gpu_run.sh fa4-stash
#   run 2, carry .fa4b:  bash bench/gpu_run.sh fa4-install   (then any later run finds it)
# The versions are the ones BENCHMARKS.md measured (pyproject's `fa4` extra pins flash-attn-4).
set -euo pipefail
cd "$(dirname "$0")/.."
PLAT="--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
tmp=$(mktemp -d)
python3 -m pip download -q --no-deps $PLAT -d "$tmp" flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 \
  nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu12==4.8.1 \
  quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
rm -rf .fa4a .fa4b && mkdir -p .fa4a .fa4b
split -b 58000000 "$tmp"/nvidia_cutlass_dsl_libs_cu12-*.whl .fa4a/libs_cu12.part.
mv .fa4a/libs_cu12.part.ab .fa4b/
basename "$tmp"/nvidia_cutlass_dsl_libs_cu12-*.whl > .fa4b/libs_cu12.name
rm "$tmp"/nvidia_cutlass_dsl_libs_cu12-*.whl && mv "$tmp"/*.whl .fa4b/ && rm -rf "$tmp"
du -sh .fa4a .fa4b
