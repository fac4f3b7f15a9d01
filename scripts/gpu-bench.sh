#!/usr/bin/env bash
# Generation speed on a GPU machine: a synthetic 7B Qwen2 model (written once
# to $WORK), weights in the pinned cache, 3 GPU slots; prefill of 512 tokens
# and 16 decode steps at batch 1 and 8. Logs to $OUT when set.
#
#   bash scripts/gpu-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
LS=${LS:-.gpu/bin/layer-streamer}
WORK=${WORK:-/tmp/ls-bench}
LOGS=${OUT:-$WORK}
mkdir -p "$WORK" "$LOGS"
model="$WORK/qwen2-7b"
if [ ! -f "$model/config.json" ]; then
    "$LS" synth "$model" --arch qwen2 --preset 7b
fi
"$LS" bench-generate --model "$model" --prompt-len 512 --new-tokens 16 --batch 1,8 \
    --device cuda:0 --pinned-cache auto --n-gpu 2 "$@" 2>&1 | tee "$LOGS/bench-generate.txt"
