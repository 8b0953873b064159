#!/usr/bin/env bash
# One prepared GPU campaign: everything tanuki claims about GPUs, in at most 10 minutes on one H100/H200.
#
#   bash benchmarks/gpu/run_all.sh                  # on the GPU machine: writes benchmarks/results/*_gpu.md
#   bash benchmarks/gpu/run_all.sh --out DIR        # results elsewhere
#   bash benchmarks/gpu/run_all.sh --smoke --out DIR   # the same steps on CPU at tiny sizes (tests/test_gpu_campaign.py)
#
# Steps (each timed, its status and output file listed in DIR/gpu_campaign_gpu.md):
#   1. environment: GPU, driver, CUDA, torch, triton, deepspeed, transformers versions
#   2. kernel correctness on CUDA against the PyTorch references (the kernel tests, bf16 and fp32)
#   3. kernel benchmark (--quick): Triton vs eager vs torch.compile (and Liger-Kernel when installed)
#   4. training step of the 1.8b shape at seq 4096, ZeRO-3, bf16: tokens/s, MFU, peak memory;
#      tanuki vs transformers LlamaForCausalLM under the same DeepSpeed config
#   5. output head + loss memory: full logits vs the chunked head vs transformers' loss path
# A failing step is recorded and the campaign goes on, so one run always yields every result it can.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=benchmarks/results
SMOKE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "usage: $0 [--smoke] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_campaign_gpu.md"
STATUS=0
ROWS=()

step() {  # step NAME RESULT_FILE COMMAND...
  local name=$1 result=$2; shift 2
  echo "=== $name: $*"
  local t0=$SECONDS
  if "$@"; then local ok=ok; else local ok="FAILED (exit $?)"; STATUS=1; fi
  local dt=$((SECONDS - t0))
  echo "=== $name: $ok in ${dt}s"
  ROWS+=("| $name | $ok | ${dt} s | \`$result\` |")
}

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1   # the kernels run through Triton's CPU interpreter
  step environment "$OUT/environment_gpu.md" "$PY" benchmarks/gpu/env_report.py --out "$OUT/environment_gpu.md"
  step "kernel correctness" "$OUT/kernel_tests_gpu.txt" \
    bash -c "$PY -m pytest -q -p no:cacheprovider tests/test_kernels_swiglu.py > '$OUT/kernel_tests_gpu.txt' 2>&1"
  step "kernel benchmark" "$OUT/kernels_gpu.md" \
    "$PY" benchmarks/kernels/bench_kernels.py --smoke --compile-backend aot_eager --out "$OUT/kernels_gpu.md"
  step "training step" "$OUT/train_step_cpu.md" \
    "$PY" benchmarks/train_step_bench.py --device cpu --size tiny --seq-len 64 --micro-batch-size 2 --grad-accum 1 \
      --warmup 1 --rounds 2 --steps 1 --results-dir "$OUT"
  step "loss memory" "$OUT/loss_memory_gpu.md" "$PY" benchmarks/gpu/loss_memory_gpu.py --smoke --out "$OUT/loss_memory_gpu.md"
else
  step environment "$OUT/environment_gpu.md" "$PY" benchmarks/gpu/env_report.py --out "$OUT/environment_gpu.md"
  step "kernel correctness" "$OUT/kernel_tests_gpu.txt" \
    bash -c "$PY -m pytest -q -p no:cacheprovider tests/test_kernels_rms_norm.py tests/test_kernels_rotary.py tests/test_kernels_swiglu.py tests/test_fused.py > '$OUT/kernel_tests_gpu.txt' 2>&1"
  step "kernel benchmark" "$OUT/kernels_gpu.md" "$PY" benchmarks/kernels/bench_kernels.py --quick --out "$OUT/kernels_gpu.md"
  step "training step" "$OUT/train_step_gpu.md" \
    "$PY" benchmarks/train_step_bench.py --device cuda --size 1.8b --seq-len 4096 --rounds 2 --steps 5 --results-dir "$OUT"
  step "loss memory" "$OUT/loss_memory_gpu.md" "$PY" benchmarks/gpu/loss_memory_gpu.py --out "$OUT/loss_memory_gpu.md"
fi

{
  echo "# GPU campaign"
  echo
  echo "\`bash benchmarks/gpu/run_all.sh$( [ "$SMOKE" = 1 ] && echo ' --smoke')\` on $(grep '^| device |' "$OUT/environment_gpu.md" 2>/dev/null | cut -d'|' -f3 | sed 's/^ *//;s/ *$//'), $(date -u +%Y-%m-%d)."
  echo
  echo "| step | status | time | result |"
  echo "|---|---|---:|---|"
  printf '%s\n' "${ROWS[@]}"
} > "$SUMMARY"
cat "$SUMMARY"
exit $STATUS
