#!/usr/bin/env bash
# The GPU rows of BENCHMARKS.md in one call of the device tool (a GPU machine lent to a session;
# see /work/.library/device). That machine has torch, numpy, pyyaml and matplotlib but no Ray,
# boto3 or network, and local mode needs nothing more: training throughput against the card's
# matmul rate, the quality run on the card, then generation against the tutorial's method on
# that run's winner, all on the GPU. The corpus does not travel with the repository; carry it:
#   echo /.carry/ >> .git/info/exclude; mkdir -p .carry; cp ../shared/data/wonderland.txt .carry/
#   run: command "bash bench/device.sh .carry/wonderland.txt", carry [".carry"], timeout_s 480
# About 3 minutes; on a machine without a GPU it measures the CPU. Results: $OUT when set
# (what the device tool brings back), else bench/results/device/.
set -euo pipefail
cd "$(dirname "$0")/.."
CORPUS=${1:-../shared/data/wonderland.txt}
MINUTES=${MINUTES:-2}           # the quality run's limit; 40 epochs of alice.yaml end sooner on a GPU
DEST=${OUT:-bench/results/device}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$DEST"

nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: measuring this machine's CPU"
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")'
"$PY" bench/throughput.py --corpus "$CORPUS" --out "$DEST/throughput.json"
# A missed quality target exits 1 after writing its figures: the generation row still runs.
"$PY" bench/train_quality.py --corpus "$CORPUS" --minutes "$MINUTES" \
    --out "$DEST/train_quality.json" || echo "quality target not reached (figures written)"
RUN=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["run"])' "$DEST/train_quality.json")
"$PY" bench/generation.py --checkpoint "$RUN/quality/winner.json" --out "$DEST/generation.json"
