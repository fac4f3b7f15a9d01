#!/usr/bin/env bash
# The forward pass against Hugging Face transformers on a GPU machine.
#
# For each combination of architecture, preset, checkpoint dtype and tied
# embeddings, writes a random model with reference logits
# (.gpu/hf_reference.py, transformers in float32 on the GPU) and checks
# `layer-streamer check-reference` on cuda:0 (with a batch of three) in each
# precision (fast: 16-bit GEMM inputs; exact: split GEMM inputs), and on the
# host backend for the tiny preset. Prints a summary table with each check's
# worst relative L2 error and argmax agreement; exits non-zero if any check
# fails. Logs go to $OUT (or a temporary directory).
#
#   bash scripts/gpu-reference-check.sh [--precision fast|exact|both]
#
# Environment: LS (the binary, default .gpu/bin/layer-streamer), PYTHON (a
# python3 with torch and transformers), HF_REF (default .gpu/hf_reference.py),
# WORK (where the models go, default a temporary directory).
set -uo pipefail
cd "$(dirname "$0")/.."
PRECISIONS="fast exact"
while [ $# -gt 0 ]; do
    case "$1" in
        --precision)
            case "${2:-}" in
                fast | exact) PRECISIONS=$2 ;;
                both) PRECISIONS="fast exact" ;;
                *) echo "gpu-reference-check: --precision takes fast, exact or both, not '${2:-}'" >&2; exit 2 ;;
            esac
            shift 2 ;;
        *) echo "gpu-reference-check: unknown argument '$1' (usage: [--precision fast|exact|both])" >&2; exit 2 ;;
    esac
done
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
        --prompt-len 12 --steps 64 >"$LOGS/$name.hf.log" 2>&1; then
        summary+=("$(printf '%-34s %-8s %s' "$name" "-" "HF REFERENCE FAILED (see $LOGS/$name.hf.log)")")
        failed=1
        continue
    fi
    runs=()
    for p in $PRECISIONS; do runs+=("cuda:0 $p"); done
    # The host backend computes in f32 whatever the precision.
    [ "$preset" = tiny ] && runs+=("host -")
    for run in "${runs[@]}"; do
        read -r dev prec <<<"$run"
        log="$LOGS/$name.${dev/:/}.$prec.log"
        batch=3
        pflag=()
        [ "$prec" != - ] && pflag=(--precision "$prec")
        "$LS" check-reference "$dir" --device "$dev" --batch "$batch" "${pflag[@]}" >"$log" 2>&1
        rc=$?
        line=$(grep -E '^(PASS|FAIL)' "$log" | tail -1)
        [ -z "$line" ] && line="ERROR: $(grep -m1 -i error "$log")"
        [ $rc -ne 0 ] && failed=1
        summary+=("$(printf '%-34s %-8s %-6s %s' "$name" "$dev" "$prec" "$line")")
    done
done
echo
printf '%-34s %-8s %-6s %s\n' "model" "device" "prec" "result"
printf '%s\n' "${summary[@]}" | tee "$LOGS/summary.txt"
exit $failed
