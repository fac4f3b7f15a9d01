#!/usr/bin/env python3
"""Times passes of a model from Python, to set next to `layer-streamer bench`.

    python pass_speed.py --model ./Qwen2-7B-Instruct [--passes 5] [--torch]

The first pass reads the disk (and fills the pinned cache, `--pinned-cache
auto` by default); the later ones are warm passes. Each layer function does no
compute; with `--torch` it wraps every weight with `torch.from_dlpack`, as a
PyTorch model would. Prints each pass's wall time and GB/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from layer_streamer import LayerStreamer


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--passes", type=int, default=5)
    p.add_argument("--n-gpu", type=int, default=2)
    p.add_argument("--n-cpu-pinned", type=int, default=4)
    p.add_argument("--reader-threads", type=int, default=8)
    p.add_argument("--pinned-cache", default="auto")
    p.add_argument("--torch", action="store_true", help="torch.from_dlpack every weight")
    args = p.parse_args()

    wrap = None
    if args.torch:
        import torch

        wrap = torch.from_dlpack

    def layer_fn(x, weights, layer):
        if wrap is not None:
            for t in weights.values():
                wrap(t)
        return x

    with LayerStreamer(
        args.model,
        device=args.device,
        dtype=args.dtype,
        n_gpu=args.n_gpu,
        n_cpu_pinned=args.n_cpu_pinned,
        reader_threads=args.reader_threads,
        pinned_cache=args.pinned_cache,
    ) as s:
        warm = []
        for i in range(args.passes):
            t0 = time.perf_counter()
            s.run_pass(None, layer_fn)
            wall = time.perf_counter() - t0
            st = s.last_pass_stats
            gbps = st["layer_bytes"] / wall / 1e9
            kind = "cold" if i == 0 else "warm"
            print(f"pass {i + 1} ({kind}): {wall:.3f} s, {gbps:.2f} GB/s, "
                  f"bound by {st['bound_by']}, pinned-cache hits {st['pinned_cache_hits']}")
            if i:
                warm.append(gbps)
        if warm:
            print(f"warm passes: median {statistics.median(warm):.2f} GB/s over {len(warm)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
