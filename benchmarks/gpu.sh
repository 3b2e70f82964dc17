#!/usr/bin/env bash
# Issue 11's GPU benchmarks in one script: a few minutes on an H200 (any CUDA GPU works), prints every table.
#
# From a fresh clone (nothing is downloaded: random weights of the SD2-size architecture, synthetic data):
#   pip install torch --index-url https://download.pytorch.org/whl/cu124   # a CUDA build first, if not there
#   pip install -e .
#   bash benchmarks/gpu.sh                       # tables on stdout; JSON + Markdown in results/benchmark/gpu_*
#
# What it measures (docs/benchmarks.md explains each number):
#   1. SD2-size E2E training step at 480x640, batch 2, bf16-mixed, gradient checkpointing off and on, channels_last
#      off and on: ms/step,
#      CUDA peak memory and whether it fits a 24 GB card; ours (Lightning) against the bare loop and the
#      reference-style baseline (fp32, data prepared in the step).
#   2. SD2-size single-step prediction at 576x768, fp32 and bf16: ms and images/s against the bare floor
#      (the paper reports 121 ms per image on an RTX 4090).
#   3. Tiny-model ratios: train (every configuration), predict (+ the infer folder throughput), data.
#
# Environment: PYTHON (default python), DEVICE (cuda; cpu runs the same code paths), OUT (results/benchmark),
# SD2_ARCH (sd2; tests set tiny), SMOKE=1 (tiny sizes and counts: what tests/test_benchmark.py runs on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-results/benchmark}
SD2_ARCH=${SD2_ARCH:-sd2}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if [[ "${SMOKE:-0}" == 1 ]]; then
  TRAIN_SIZE=(--height 32 --width 32); PREDICT_SIZE=(--height 32 --width 32); TINY_SIZE=(--height 32 --width 32)
  TIMING=(--warmup 1 --iters 1 --repeats 1); IMAGES=2; DATA=(--resolutions 32x32 --workers 0 1 --samples 4 --shuffle_buffer 2 --iters 2)
  TINY_TRAIN=(--objectives e2e --no_memory); TINY_PREDICT=(--steps 2 --members 2)
else
  TRAIN_SIZE=(--height 480 --width 640); PREDICT_SIZE=(--height 576 --width 768); TINY_SIZE=(--height 480 --width 640)
  TIMING=(--warmup 2 --iters 5 --repeats 3); IMAGES=64; DATA=(--workers 0 1 2 4)
  TINY_TRAIN=(); TINY_PREDICT=()
fi

bench() {
  echo; echo "== python -m experiments.benchmark $*"
  "$PY" -m experiments.benchmark --device "$DEVICE" "$@"
}

"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

# 1. SD2-size E2E step, batch 2, bf16-mixed, checkpointing off / on, NCHW / NHWC (decides speed.channels_last on GPUs)
bench --mode train --arch "$SD2_ARCH" --objectives e2e --precisions bf16-mixed --checkpointing off on \
  --channels_last off on --batch 2 "${TRAIN_SIZE[@]}" "${TIMING[@]}" --out "$OUT/gpu_sd2_train"
# 2. SD2-size single-step prediction (no multi-step row, no folder run: --steps 0, --images 0)
bench --mode predict --arch "$SD2_ARCH" "${PREDICT_SIZE[@]}" --precisions 32-true bf16-mixed --steps 0 --images 0 \
  "${TIMING[@]}" --out "$OUT/gpu_sd2_predict"
# 3. tiny-model ratios
bench --mode train --arch tiny --batch 2 "${TINY_SIZE[@]}" "${TIMING[@]}" "${TINY_TRAIN[@]}" --out "$OUT/gpu_tiny_train"
bench --mode predict --arch tiny "${TINY_SIZE[@]}" --images "$IMAGES" "${TIMING[@]}" "${TINY_PREDICT[@]}" \
  --out "$OUT/gpu_tiny_predict"
bench --mode data --batch 2 "${DATA[@]}" --out "$OUT/gpu_data"

echo; echo "== summary"
"$PY" -m experiments.benchmark.report "$OUT"/gpu_sd2_train.json "$OUT"/gpu_sd2_predict.json \
  "$OUT"/gpu_tiny_train.json "$OUT"/gpu_tiny_predict.json "$OUT"/gpu_data.json
