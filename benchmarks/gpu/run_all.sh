#!/usr/bin/env bash
# There (the lent GPU machine, one `run` call per stage, back to back while it stays warm): install the
# carried wheels once, then run the GPU checks of one stage, each under its own time limit, logging to $OUT.
#   bash benchmarks/gpu/run_all.sh bench   # doctor, shaped 1.5B model, learner (± checkpointing) + rollout benchmarks (~6 min)
#   bash benchmarks/gpu/run_all.sh tests   # pytest -m gpu, one GRPO step benchmark on the shaped model (~8 min)
# Each check prints its last lines and a "name rc=N seconds" line to $OUT/summary.txt; one failing check does
# not stop the next. Wheels are expected in /tmp/stash (benchmarks/gpu/README.md).
set -uo pipefail
cd "$(dirname "$0")/../.."
stage="${1:?usage: run_all.sh bench|tests}"
out="${OUT:-/tmp/reasonrl-gpu-out}"
site=/tmp/site model="${MODEL:-/tmp/qwen25-math-1.5b-shaped}"  # MODEL: an existing checkpoint instead
mkdir -p "$out"
export PYTHONPATH="$site:$PWD" VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
       WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PATH="$site/bin:$PATH"

install_wheels() {  # once per machine: the stashed wheels into $site
  [ -f "$site/.installed" ] && return 0
  (cd /tmp/stash && if ls vllm.whl.part_* >/dev/null 2>&1; then
     cat vllm.whl.part_* > vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl && rm vllm.whl.part_*; fi) &&
  timeout 150 python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" /tmp/stash/*.whl &&
  touch "$site/.installed"
}

failed=0
check() {  # check NAME SECONDS COMMAND...  (a program, not a shell function: `timeout` runs it)
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
  rc=$?
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$out/summary.txt"
  grep -v -E 'Loading weights|Writing model|it/s\]' "$out/$name.log" | tail -n 25
}

install_wheels > "$out/install.log" 2>&1 || { echo "install failed"; cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$out/gpu.txt" 2>&1
case "$stage" in
  bench)
    check doctor 60 python3 -m trainer doctor
    [ -f "$model/config.json" ] || check shaped 120 python3 -m trainer.tools.shaped "$model"
    check learner 150 python3 benchmarks/learner_step.py --model "$model" --repeats 2 \
      --layouts padded,sorted,response,packed
    check learner_gc 60 python3 benchmarks/learner_step.py --model "$model" --repeats 2 --layouts response \
      --gradient-checkpointing
    check rollout 180 python3 benchmarks/rollout.py --model "$model" --skip-hf --repeats 2
    ;;
  tests)
    # ZeRO-3 only here (the harder case: bucket-wise gathering); ZeRO-2 doubles the DeepSpeed launches
    check gpu_tests 270 python3 -m pytest -m gpu -q -p no:cacheprovider -x -k "not zero2"
    [ -f "$model/config.json" ] || check shaped 120 python3 -m trainer.tools.shaped "$model"
    check grpo_step 270 python3 -m accelerate.commands.launch --config_file launch/single_gpu.yaml benchmarks/grpo_step.py \
      --config configs/grpo_qwen2.5_math_1.5b_gsm8k.yaml --steps 3 "model.path=$model" data.task=arithmetic \
      data.train_source=null data.eval_source=null \
      logging.wandb_mode=disabled reward.num_workers=4
    ;;
  *) echo "unknown stage $stage (bench|tests)"; exit 2 ;;
esac
cat "$out/summary.txt"
exit "$failed"
