#!/usr/bin/env bash
# Issue 27's GPU measurement, as one call on a lent GPU machine (the device tool): the `finetune`
# profile run whole through the local pipeline on the rest of the real sample, its model brought
# back and scored here, once, on the locked part (which never travels):
#
#   here:    make gpu-pipeline-carry    # build/gpu-pipeline: rest/ (320x320 JPEGs), whl/ (what the image lacks)
#   device:  run(command="bash benchmarks/gpu_pipeline.sh", carry=["build/gpu-pipeline"], timeout_s=590)
#   here:    python benchmarks/locked_split.py predict <files_at>/model.tar.gz --tta flips \
#                --out build/locked/counts-finetune.csv
#
# `predict` prints the locked score (accuracy and RMSE with 95% intervals, per count), as for the
# `real` runs in docs/model.md. The machine reaches no package registry and its image's python3 is
# 3.12 with its own torch: the project runs from this checkout by plain import, the few packages
# the image lacks come as wheels, and every step runs in that interpreter (INVMON_STEP_ENVS=runner;
# the log names what a step's requirements list that is not there, such as Lite1's and Lite2's
# weights, which a Lite0 run never imports). EXTRA passes more options to `invmon run`, e.g.
#   run(command="EXTRA='--param TuningMaxJobs=4' bash benchmarks/gpu_pipeline.sh", ...)
# where the device time left would not cover the profile's 8 trials.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu-pipeline-out}
CARRY=${CARRY:-build/gpu-pipeline}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$CARRY"/whl/*.whl || exit
# The project and the step folders by plain name, as `make env`'s .pth file gives them.
steps=$(find "$PWD/scripts" -mindepth 1 -maxdepth 1 -type d | sort | paste -sd:)
export PYTHONPATH=/tmp/site:$PWD:$steps INVMON_STEP_ENVS=runner INVMON_HOME=${INVMON_HOME:-/tmp/invmon-home}
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python3 --version; } 2>&1 | tee "$OUT/log.txt"
# shellcheck disable=SC2086  # EXTRA is a list of options
python3 -m pipeline run --recipe finetune --data "$CARRY/rest" ${EXTRA:-} 2>&1 | tee -a "$OUT/log.txt"
status=${PIPESTATUS[0]}
# What comes back (8 files at most): the registered model, and the run's record and step logs.
cp "$INVMON_HOME"/artifacts/*/model.tar.gz "$OUT/" 2>/dev/null
run=$(ls -d "$INVMON_HOME"/runs/*/ 2>/dev/null | tail -n1)
[ -n "$run" ] && tar -czf "$OUT/run.tar.gz" -C "$run" --exclude='*.tar.gz' --exclude='*.pt' --exclude='*.jpg' \
    --exclude='*.pth' .
exit "$status"
