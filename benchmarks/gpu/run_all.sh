#!/usr/bin/env bash
# On the GPU machine (from the repo root, offline): install the wheels that benchmarks/gpu/prepare.sh gathered,
# once, then run one stage of GPU checks, each under its own time limit, logging to $OUT.
#   bash benchmarks/gpu/run_all.sh learner   # no vLLM: learner benchmark (layouts, MFU, checkpointing, compile), DeepSpeed
#                                            # ZeRO-2/3 step + resume and the other learner gpu tests
#   bash benchmarks/gpu/run_all.sh rollout   # rollout benchmark, colocated vLLM gpu tests, GRPO step, doctor
#   bash benchmarks/gpu/run_all.sh async     # synchronous vs asynchronous GRPO through a rollout server
#   bash benchmarks/gpu/run_all.sh install   # only install the wheels (each stage first installs those not yet in)
# Each stage's checks fit one 10-minute command (their time limits add up to at most 600 s), the install aside.
# environment: WHEELS (default .gpu) the folder holding the wheels (any depth; split pieces NAME.part_* are
# joined), OUT (default /tmp/reasonrl-gpu-out) the logs, MODEL (default /tmp/qwen25-math-1.5b-shaped) the
# checkpoint, built there when absent, SITE (default /tmp/reasonrl-site) where the wheels are installed.
# Each check prints its last lines and a "name rc=N seconds" line to $OUT/summary.txt; one failing check does
# not stop the next; the exit status is the number of failed checks.
set -uo pipefail
cd "$(dirname "$0")/../.."
stage="${1:?usage: run_all.sh install|learner|rollout|async}"
out="${OUT:-/tmp/reasonrl-gpu-out}" wheels="${WHEELS:-.gpu}" site="${SITE:-/tmp/reasonrl-site}"
model="${MODEL:-/tmp/qwen25-math-1.5b-shaped}"
mkdir -p "$out"
export PYTHONPATH="$site:$PWD" VLLM_USE_FLASHINFER_SAMPLER=0 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
       WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PATH="$site/bin:$PATH"

install_wheels() {  # join split pieces, then every wheel not installed yet into $site (no index, no resolver)
  local whl new=()
  while IFS= read -r whl; do  # a split wheel's pieces may lie in several folders: joined in their suffix order
    find "$wheels" -name "$whl.part_*" -printf '%f\t%p\n' | sort | cut -f2 | xargs cat > "$wheels/$whl.joining" &&
      find "$wheels" -name "$whl.part_*" -delete && mv "$wheels/$whl.joining" "$wheels/$whl"
  done < <(find "$wheels" -name '*.whl.part_aa' -printf '%f\n' | sed 's/\.part_aa$//')
  mkdir -p "$site" && touch "$site/.installed"  # the names of the wheels installed there, one per line
  while IFS= read -r whl; do
    grep -qxF "$(basename "$whl")" "$site/.installed" || new+=("$whl")
  done < <(find "$wheels" -name '*.whl')
  [ "${#new[@]}" -eq 0 ] && return 0
  timeout 150 python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" "${new[@]}" &&
    for whl in "${new[@]}"; do basename "$whl"; done >> "$site/.installed"
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

shaped() {  # shaped [SECONDS]: the random Qwen2.5-Math-1.5B-shaped checkpoint, unless $MODEL already holds one
  [ -f "$model/config.json" ] || check shaped "${1:-120}" python3 -m trainer.tools.shaped "$model"
}

install_wheels > "$out/install.log" 2>&1 || { echo "install failed"; cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv > "$out/gpu.txt" 2>&1
echo "$0 $*" > "$out/command.txt"
launch=(python3 -m accelerate.commands.launch --config_file launch/single_gpu.yaml)
small_task=(data.task=arithmetic data.train_source=null data.eval_source=null logging.wandb_mode=disabled
            reward.num_workers=4)
case "$stage" in
  install) ;;
  learner)  # the limits add up to 580 s: one 600 s command; the most wanted numbers first
    shaped 90
    check learner 120 python3 benchmarks/learner_step.py --model "$model" --repeats 2 \
      --layouts padded,sorted,response,packed
    check learner_gc 50 python3 benchmarks/learner_step.py --model "$model" --repeats 2 --layouts response \
      --gradient-checkpointing
    check learner_compile 80 python3 benchmarks/learner_step.py --model "$model" --repeats 2 --layouts response \
      --compile
    check gpu_tests 240 python3 -m pytest -m gpu -q -p no:cacheprovider tests/trainer/test_deepspeed.py \
      tests/trainer/test_packing.py tests/trainer/losses/test_dpo_loss.py tests/rollout/engines/test_hf_engine.py
    ;;
  rollout)  # 600 s in all; a cut-short stage still leaves the logs of what finished
    shaped
    check rollout 150 python3 benchmarks/rollout.py --model "$model" --skip-hf --repeats 2 --max-new-tokens 512
    check gpu_tests 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/rollout/engines/test_vllm_engine.py \
      tests/rollout/engines/test_vllm_ranks.py tests/rollout/test_collective_transfer.py
    check grpo_step 180 "${launch[@]}" benchmarks/grpo_step.py --config configs/grpo_qwen2.5_math_1.5b_gsm8k.yaml \
      --steps 3 "model.path=$model" "${small_task[@]}" rollout.max_tokens=512 rollout.min_tokens=512
    check doctor 30 python3 -m trainer doctor
    ;;
  async)
    # one GPU: the server takes rollout.gpu_memory_utilization (0.3) of it, the learner the rest; responses of
    # exactly 256 tokens (random weights rarely stop), 128 rollouts per step
    shaped
    check async_step 420 "${launch[@]}" benchmarks/async_step.py --config configs/grpo_qwen2.5_math_1.5b_gsm8k.yaml \
      --steps 4 --staleness 1 -- "model.path=$model" "${small_task[@]}" rollout.max_tokens=256 \
      rollout.min_tokens=256 grpo.rollout_batch_size=128 grpo.train_batch_size=128
    ;;
  *) echo "unknown stage $stage (install|learner|rollout|async)"; exit 2 ;;
esac
[ ! -f "$out/summary.txt" ] || cat "$out/summary.txt"
exit "$failed"
