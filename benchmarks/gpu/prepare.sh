#!/usr/bin/env bash
# Here (the CPU machine, from the repo root): gather everything the lent GPU machine lacks into .gpu/part_*,
# each under 56 MiB, so that `run` calls can carry them one at a time (see benchmarks/gpu/README.md).
#   vLLM 0.26 and its dependencies  (../shared/gpu/prepare-vllm-wheels.sh)
#   DeepSpeed 0.19.8 as a pure-Python wheel (ops compile just in time there) and what it needs
#   reasonrl's own runtime and test needs that the machine lacks (math-verify, pytest, ...)
# usage: bash benchmarks/gpu/prepare.sh [OUT_DIR]     (default .gpu; needs .venv from `make install`)
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-.gpu}"
../shared/gpu/prepare-vllm-wheels.sh "$out"
n=$(find "$out" -maxdepth 1 -name 'part_*' | wc -l)
extra="$out/part_$n"
mkdir -p "$extra"
plat=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# versions as in this project's CPU environment (tested together there)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$extra" \
  math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
  pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1 pygments==2.21.0 \
  hjson==3.1.0 py-cpuinfo==9.0.0 msgpack==1.1.2 ninja==1.13.2 einops==0.8.2
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$extra"
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
du -sh "$out"/part_*
echo "carry $out/part_0 .. $extra, one per run call; then: bash benchmarks/gpu/run_all.sh (benchmarks/gpu/README.md)"
