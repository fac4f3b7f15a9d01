#!/usr/bin/env bash
# Host-to-device bandwidth on a GPU machine (benches/h2d.rs): pinned, pageable
# and slot-recycling copies of 1 to 256 MiB, then a markdown table of GB/s
# (10^9 bytes/s, from the time per copy criterion reports). Runs the staged bench:
#
#   ../shared/tools/gpu-pack --benches --bench h2d     # here: stages .gpu/bench/h2d
#   bash scripts/gpu-h2d-bench.sh                       # there, from the repository root
#
# Extra arguments go to the bench (a criterion filter, --measurement-time S).
# The log and the table go to $OUT when set (criterion's files to $CRITERION_HOME).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.gpu/bench/h2d}
LOGS=${OUT:-$(mktemp -d)}
if [ ! -x "$BIN" ]; then
    echo "gpu-h2d-bench: no bench binary at $BIN (stage it with ../shared/tools/gpu-pack --benches)" >&2
    exit 1
fi
export CRITERION_HOME=${CRITERION_HOME:-$(mktemp -d)}
# No GPU is a failure here, not a skip.
export LS_REQUIRE_GPU=1
mkdir -p "$LOGS"
"$BIN" --bench "$@" 2>&1 | tee "$LOGS/h2d-bench.txt"
python3 - "$CRITERION_HOME" <<'PY' | tee "$LOGS/h2d-table.md"
"""Prints the table from criterion's h2d/<case>/<size>/new/{benchmark,estimates}.json."""
import json, pathlib, re, sys

root = pathlib.Path(sys.argv[1])
cases = ["pinned", "pageable", "recycle"]
rows = {}  # bytes -> {case: GB/s}
for bench in root.glob("h2d/*/*/new/benchmark.json"):
    meta = json.loads(bench.read_text())
    if meta.get("group_id") != "h2d" or meta.get("function_id") not in cases:
        continue
    size = (meta.get("throughput") or {}).get("Bytes")
    est = json.loads((bench.parent / "estimates.json").read_text())
    # Nanoseconds per copy: the figure criterion prints (the slope under linear
    # sampling, the mean under the flat sampling benches/h2d.rs uses).
    ns = (est.get("slope") or est["mean"])["point_estimate"]
    if not size or ns <= 0:
        sys.exit(f"gpu-h2d-bench: {bench} has no byte throughput or time")
    rows.setdefault(size, {})[meta["function_id"]] = size / ns  # bytes/ns = GB/s
if not rows:
    sys.exit(f"gpu-h2d-bench: no h2d results under {root}")
print("| size | pinned GB/s | pageable GB/s | recycle GB/s |")
print("|---:|---:|---:|---:|")
for size in sorted(rows):
    cells = [f"{rows[size][c]:.2f}" if c in rows[size] else "—" for c in cases]
    print(f"| {size >> 20} MiB | " + " | ".join(cells) + " |")
PY
