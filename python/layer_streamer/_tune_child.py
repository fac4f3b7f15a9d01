"""A tuner child: ``python -m layer_streamer._tune_child SETUP.pkl``.

Started by the Rust tuner with the configuration in ``LS_TUNER_REQUEST``; it
builds a :class:`LayerStreamer` with it, calls the user's ``setup_fn`` and
times ``run``, writing the tuner protocol's JSON lines to stdout:
``{"run": i, "seconds": t}`` per run, then ``{"done": {"runs", "mean_s"}}``,
or ``{"error": {"kind", "message"}}`` and exit status 2. Everything else the
workload prints goes to stderr.
"""

from __future__ import annotations

import json
import multiprocessing.spawn
import os
import pickle
import sys
import time
from typing import Any, Dict, TextIO


def _emit(out: TextIO, line: Dict[str, Any]) -> None:
    out.write(json.dumps(line) + "\n")
    out.flush()


def _fail(out: TextIO, e: BaseException, default_kind: str) -> "int":
    kind = getattr(e, "kind", None) or default_kind
    message = str(e) if hasattr(e, "kind") else f"{type(e).__name__}: {e}"
    _emit(out, {"error": {"kind": kind, "message": message}})
    from . import _native

    return int(_native.TUNER_ERROR_EXIT)


def main(argv: "list[str]") -> int:
    # The protocol gets the real stdout; the workload's prints (Python's and
    # native code's) go to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from . import _native
    from ._streamer import LayerStreamer

    try:
        with open(argv[1], "rb") as f:
            blob = pickle.load(f)
        multiprocessing.spawn.prepare(blob["prep"])
        setup_fn, args = pickle.loads(blob["payload"])
        req = _native.tune_request()
        streamer = LayerStreamer(req["model"], **req["config"])
        run = setup_fn(streamer, *args)
    except BaseException as e:  # noqa: BLE001 - every failure is the config's
        return _fail(out, e, "input")
    measured = []
    try:
        for i in range(req["runs"]):
            if i and req["sleep_s"] > 0:
                time.sleep(req["sleep_s"])
            t0 = time.perf_counter()
            r = run()
            seconds = time.perf_counter() - t0
            if isinstance(r, (int, float)) and not isinstance(r, bool):
                seconds = float(r)
            _emit(out, {"run": i, "seconds": seconds})
            if i:
                measured.append(seconds)
    except BaseException as e:  # noqa: BLE001
        return _fail(out, e, "layer_fn")
    mean = sum(measured) / max(len(measured), 1)
    _emit(out, {"done": {"runs": len(measured), "mean_s": mean}})
    streamer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
