#!/usr/bin/env bash
# On a machine with a package index (from the repo root, after `make install`): gather, as wheels for the GPU
# machine's platform, what benchmarks/gpu/wheels-*.txt pin, and build DeepSpeed 0.19.8 as a pure-Python wheel (its
# CUDA ops compile just in time on the GPU machine):
#   OUT_DIR/learner/   wheels-learner.txt + DeepSpeed: all that `run_all.sh learner` needs (a few MiB)
#   OUT_DIR/vllm/      wheels-vllm.txt: what `run_all.sh rollout|async` need on top (vLLM 0.26, about 400 MiB)
# Copy OUT_DIR (or only its learner/ folder) to the GPU machine.
#
# usage: bash benchmarks/gpu/prepare.sh [OUT_DIR] [--part-mib N]
#   OUT_DIR       default .gpu (git-ignored)
#   --part-mib N  for a copy channel that limits transfer size: split files larger than N MiB into pieces
#                 (NAME.whl.part_aa, ...; run_all.sh joins them) and sort each folder's files into OUT_DIR/part_0,
#                 part_1, ... of at most N MiB each (part_0: the learner's), to copy one at a time into one folder
# environment: PY_VERSION (default 3.12), the GPU machine's Python
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.gpu part_mib=""
while [ $# -gt 0 ]; do
  case "$1" in
    --part-mib) part_mib="${2:?--part-mib needs a size in MiB}"; shift 2 ;;
    -*) echo "prepare.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
[ -x .venv/bin/python ] || { echo "prepare.sh: run 'make install' first (DeepSpeed is built with .venv's torch)" >&2; exit 2; }

rm -rf "$out" && mkdir -p "$out/learner" "$out/vllm"
plat=(--only-binary=:all: --python-version "${PY_VERSION:-3.12}" --implementation cp)
for n in 35 34 31 28 27 26 24 17; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for stage in learner vllm; do
  python3 -m pip download -q --no-deps "${plat[@]}" -d "$out/$stage" -r "benchmarks/gpu/wheels-$stage.txt"
done
.venv/bin/python -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$out/learner"

if [ -n "$part_mib" ]; then  # split the big files, then fill folders of at most part_mib MiB, largest first
  limit=$((part_mib * 1024 * 1024))
  for stage in learner vllm; do
    (cd "$out/$stage" && for f in *; do
       if [ "$(stat -c %s "$f")" -gt "$limit" ]; then split -b "$limit" "$f" "$f.part_" && rm "$f"; fi
     done)
  done
  python3 - "$out" "$limit" <<'EOF'
import os, sys
out, limit = sys.argv[1], int(sys.argv[2])
k = 0
for stage in ("learner", "vllm"):  # first fit, largest first; each stage's files in parts of their own
    files = sorted(os.scandir(f"{out}/{stage}"), key=lambda e: -e.stat().st_size)
    parts, sizes = [], []
    for f in files:
        size = f.stat().st_size
        i = next((i for i, s in enumerate(sizes) if s + size <= limit), len(parts))
        if i == len(parts):
            parts.append([]); sizes.append(0)
        parts[i].append(f); sizes[i] += size
    for group in parts:
        os.makedirs(f"{out}/part_{k}")
        for f in group:
            os.rename(f.path, f"{out}/part_{k}/{f.name}")
        k += 1
    os.rmdir(f"{out}/{stage}")
EOF
fi
du -sh "$out"/*
echo "copy $out to the GPU machine (into one folder there), then: WHEELS=<that folder> bash benchmarks/gpu/run_all.sh learner"
