#!/usr/bin/env bash
# The Python package on a GPU machine, which has torch but cannot reach PyPI.
#
#   bash scripts/gpu-python.sh prepare     (here: Rust and the network)
#       builds a release wheel into .gpu/wheels/ and installs pytest (pure
#       Python) into .gpu/pylib/; carry .gpu/ to the GPU machine.
#   bash scripts/gpu-python.sh             (on the GPU machine)
#       1. installs the wheel into $PYTHON (default: a python3 with torch and
#          transformers) without dependencies;
#       2. runs python/tests with LS_REQUIRE_GPU=1 (test_cuda.py: every weight
#          through torch.from_dlpack, device casts, the compute stream as
#          PyTorch's current stream, consumers on other streams);
#       3. python/examples/generate.py --check (logits against transformers,
#          rel-L2 <= 2e-2) on synthetic Qwen2 and Llama models, bf16 and f16;
#       4. warm passes of a synthetic 7B Qwen2 from Python
#          (python/examples/pass_speed.py) next to `layer-streamer bench`.
#
# Environment: LS (default .gpu/bin/layer-streamer), PYTHON, WORK (models,
# default /tmp/ls-python), OUT (logs, default $WORK/logs).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    set -e
    py=$(scripts/test-env python)
    rm -rf .gpu/wheels .gpu/pylib
    "$(dirname "$py")/maturin" build --release -m python/Cargo.toml --interpreter "$py" --out .gpu/wheels
    "$py" -m pip install --quiet --disable-pip-version-check --target .gpu/pylib pytest==9.2.0
    ls -l .gpu/wheels .gpu/pylib
    exit 0
fi

LS=${LS:-.gpu/bin/layer-streamer}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    if ! python3 -c 'import torch, transformers' 2>/dev/null && [ -x /opt/torch/.venv/bin/python3 ]; then
        PYTHON=/opt/torch/.venv/bin/python3
    fi
fi
WORK=${WORK:-/tmp/ls-python}
LOGS=${OUT:-$WORK/logs}
mkdir -p "$WORK" "$LOGS"
status=0
step() { printf '\n== %s\n' "$*"; }

step "install $(ls .gpu/wheels/*.whl) into $PYTHON"
"$PYTHON" -m pip install --quiet --no-index --no-deps --force-reinstall .gpu/wheels/*.whl || exit 1

step "pytest python/tests (LS_REQUIRE_GPU=1)"
(cd python/tests && LS_REQUIRE_GPU=1 PYTHONPATH="$PWD/../../.gpu/pylib" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -rs 2>&1 | tee "$LOGS/pytest.txt") || status=1

step "generate.py --check against transformers"
for combo in "qwen2 bf16" "qwen2 f16 --tie" "llama bf16 --tie" "llama f16"; do
    read -r arch dtype tie <<<"$combo"
    dir="$WORK/$arch-small-$dtype${tie:+-tie}"
    [ -f "$dir/config.json" ] || "$LS" synth "$dir" --arch "$arch" --preset small --dtype "$dtype" $tie >/dev/null
    echo "-- $dir"
    "$PYTHON" python/examples/generate.py --model "$dir" --check \
        --prompt-ids 1,17,33,250,9,4,77,120,5,61,2,300 2>&1 | tee -a "$LOGS/check.txt" || status=1
done

step "warm passes of a 7B model: Python, then the CLI"
model="$WORK/qwen2-7b"
[ -f "$model/config.json" ] || "$LS" synth "$model" --arch qwen2 --preset 7b >/dev/null
"$PYTHON" python/examples/pass_speed.py --model "$model" --passes 5 --torch 2>&1 | tee "$LOGS/pass-python.txt"
"$LS" bench --model "$model" --device cuda:0 --pinned-cache auto --passes 4 --skip-disk \
    --compute-ms 0 2>&1 | tee "$LOGS/pass-cli.txt"

echo "logs in $LOGS"
exit $status
