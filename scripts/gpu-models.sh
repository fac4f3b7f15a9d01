#!/usr/bin/env bash
# Everything the generation path needs checked on a GPU machine, in one go:
# the demo, the comparison against transformers (scripts/gpu-reference-check.sh)
# and the 7B speed measurement (scripts/gpu-bench.sh). Logs under $OUT.
#
#   bash scripts/gpu-models.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LS=${LS:-.gpu/bin/layer-streamer}
export OUT=${OUT:-$(mktemp -d)}
# cuBLAS from PyTorch's nvidia wheels where no CUDA toolkit is installed (the
# library searches pip packages only when asked).
if [ -z "${LS_CUBLAS_PIP:-}" ]; then
    sp=$(ls -d /opt/torch/.venv/lib/python3*/site-packages 2>/dev/null | head -n 1)
    [ -n "$sp" ] && export LS_CUBLAS_PIP="$sp"
fi
status=0
echo "== demo"
"$LS" demo --device cuda:0 2>&1 | tee "$OUT/demo.txt" || status=1
echo "== reference check"
bash scripts/gpu-reference-check.sh || status=1
echo "== speed (7B)"
bash scripts/gpu-bench.sh || status=1
echo "logs in $OUT"
exit $status
