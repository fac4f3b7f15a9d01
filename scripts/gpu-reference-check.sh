#!/usr/bin/env bash
# The forward pass against Hugging Face transformers on a GPU machine.
#
# For each combination of architecture, preset, checkpoint dtype and tied
# embeddings, writes a random model with reference logits
# (.gpu/hf_reference.py, transformers in float32 on the GPU) and checks
# `layer-streamer check-reference` on cuda:0 (with a batch of three), and on
# the host backend for the tiny preset. Prints a summary table; exits non-zero
# if any check fails. Logs go to $OUT (or a temporary directory).
#
#   bash scripts/gpu-reference-check.sh
#
# Environment: LS (the binary, default .gpu/bin/layer-streamer), PYTHON (a
# python3 with torch and transformers), HF_REF (default .gpu/hf_reference.py),
# WORK (where the models go, default a temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
LS=${LS:-.gpu/bin/layer-streamer}
HF_REF=${HF_REF:-.gpu/hf_reference.py}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if ! python3 -c 'import torch, transformers' 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
        PYTHON=/opt/torch/.venv/bin/python3
    fi
fi
LOGS=${OUT:-$(mktemp -d)}
mkdir -p "$LOGS"
WORK=${WORK:-$(mktemp -d)}
echo "binary $LS, python $PYTHON ($("$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1)), logs in $LOGS"

# arch preset dtype tie
COMBOS=(
    "qwen2 tiny bfloat16 no"
    "qwen2 tiny float16 tie"
    "llama tiny bfloat16 tie"
    "llama tiny float16 no"
    "qwen2 small bfloat16 no"
    "qwen2 small float16 tie"
    "llama small bfloat16 no"
    "llama small float16 tie"
)
summary=()
failed=0
for combo in "${COMBOS[@]}"; do
    read -r arch preset dtype tie <<<"$combo"
    name="$arch-$preset-$dtype-$tie"
    dir="$WORK/$name"
    tieflag=""
    [ "$tie" = tie ] && tieflag="--tie"
    if ! "$PYTHON" "$HF_REF" "$dir" --arch "$arch" --preset "$preset" --dtype "$dtype" $tieflag \
        --prompt-len 12 --steps 16 >"$LOGS/$name.hf.log" 2>&1; then
        summary+=("$(printf '%-34s %-8s %s' "$name" "-" "HF REFERENCE FAILED (see $LOGS/$name.hf.log)")")
        failed=1
        continue
    fi
    devices="cuda:0"
    [ "$preset" = tiny ] && devices="cuda:0 host"
    for dev in $devices; do
        log="$LOGS/$name.${dev/:/}.log"
        batch=3
        "$LS" check-reference "$dir" --device "$dev" --batch "$batch" >"$log" 2>&1
        rc=$?
        line=$(grep -E '^(PASS|FAIL)' "$log" | tail -1)
        [ -z "$line" ] && line="ERROR: $(grep -m1 -i error "$log")"
        [ $rc -ne 0 ] && failed=1
        summary+=("$(printf '%-34s %-8s %s' "$name" "$dev" "$line")")
    done
done
echo
printf '%-34s %-8s %s\n' "model" "device" "result"
printf '%s\n' "${summary[@]}" | tee "$LOGS/summary.txt"
exit $failed
