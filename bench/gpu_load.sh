#!/usr/bin/env bash
# The load benchmark through the real services on a GPU at paper size, surrogate batching off then on.
#
#   bash bench/gpu_load.sh FACES_DIR OUT_DIR [train flags...]
#
# Trains the paper's black box (all training faces) and surrogate (a seeded 10%) with
# `advexplain train` on the device (the GPU defaults: 100x100, full width, 20 / 50 epochs), then
# runs `bench.load` twice on them, 32 closed-loop clients x 6 explanations over HTTP, 32 slots,
# the uploads being misclassified validation photos at their own size: once with
# --surrogate-batch 0 (each explanation runs its own surrogate passes) and once with 512 (the
# CUDA default: concurrent explanations share them). Writes OUT_DIR/load_gpu_batch{0,512}.json.
# DEVICE=cpu and small train flags (--image-size 32 --width 0.25 --epochs 8) rehearse it on a CPU.
set -euo pipefail
data=$1
out=$2
shift 2
device=${DEVICE:-cuda}
models=$(mktemp -d)
mkdir -p "$out"
python3 -m advexplain train blackbox --data "$data" --device "$device" --out "$models/blackbox" --quiet "$@"
python3 -m advexplain train surrogate --data "$data" --device "$device" --fraction "${FRACTION:-0.1}" \
  --out "$models/surrogate" --quiet "$@"
for batch in 0 512; do
  python3 -m bench.load --data "$data" --device "$device" --blackbox "$models/blackbox" \
    --surrogate "$models/surrogate" --surrogate-batch "$batch" --max-concurrency "${SLOTS:-32}" \
    --max-queue 128 --clients "${CLIENTS:-32}" --per-client "${PER_CLIENT:-6}" --screen "${SCREEN:-600}" \
    --note "paper-size models on $device, surrogate batch $batch" --out "$out/load_gpu_batch$batch.json"
done
