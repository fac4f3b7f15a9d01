"""`tune`: the fastest streamer options for your own workload."""

from __future__ import annotations

import json
import multiprocessing.spawn
import os
import pickle
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

from . import _native

SetupFn = Callable[..., Callable[[], Optional[float]]]


def tune(
    model_dir: "str | os.PathLike[str]",
    setup_fn: SetupFn,
    grid: Dict[str, Iterable[Any]],
    *,
    args: Sequence[Any] = (),
    strategy: str = "grid",
    runs: int = 3,
    sleep: float = 1.0,
    timeout: float = 300.0,
    early_kill: bool = True,
    prune: bool = True,
    progress: bool = True,
    echo_stderr: bool = False,
    **options: Any,
) -> Dict[str, Any]:
    """Measures each configuration of ``grid`` in its own child process and
    returns the report, best first.

    ``setup_fn(streamer, *args)`` runs once in each child with a
    :class:`LayerStreamer` built with that configuration and returns ``run``,
    a function that does the work once (a pass, a generation step...). Each
    child calls ``run`` ``runs`` times; the first is a discarded warm-up.
    ``run`` may return the seconds to rank it by; else its wall time counts.
    ``setup_fn`` must be picklable: a module-level function (in a script,
    keep the call to ``tune`` under ``if __name__ == "__main__":``, as with
    ``multiprocessing``); ``args`` are pickled with it.

    ``grid`` maps parameters (``n_gpu``, ``n_cpu_pinned``, ``n_cpu``,
    ``batch_gpu``, ``batch_cpu_pinned``, ``batch_cpu``, ``reader_threads``,
    ``read_chunk``, ``pinned_cache``, ``gpu_cache``, ``cpu_share``) to the
    values to try.
    ``strategy="grid"`` tries every point; ``"descent"`` varies one
    parameter at a time from the base configuration (``options``: any
    :class:`LayerStreamer` keyword, e.g. ``device="cuda:0"``) and needs far
    fewer children. A child is killed as soon as a run is slower than the
    best mean so far (``early_kill``) or reports nothing for ``timeout``
    seconds; configurations whose memory cannot fit are not run (``prune``).
    A crash, CUDA out-of-memory error or exception ends only its child.

    Returns ``{"strategy", "workload", "device", "best", "configs",
    "children", "wall_s", "best_options"}``: ``best`` is the fastest
    configuration with its ``mean_s`` (None if none finished), ``configs``
    every configuration with its ``status`` (``ok``, ``slower``, ``crashed``,
    ``oom``, ``limit``, ``build_failed``, ``timed_out``, ``pruned``), runs
    and reason, and ``best_options`` the keywords that build the best
    streamer: ``LayerStreamer(model_dir, **report["best_options"])``.
    """
    try:
        payload = pickle.dumps((setup_fn, tuple(args)))
    except Exception as e:
        raise TypeError(
            f"tune: setup_fn and args must be picklable (a module-level function): {e}"
        ) from e
    name = f"{getattr(setup_fn, '__module__', '?')}.{getattr(setup_fn, '__qualname__', '?')}"
    # What multiprocessing's spawn gives a child: sys.path, the working
    # directory and the main module, so that setup_fn unpickles there.
    prep = multiprocessing.spawn.get_preparation_data("layer-streamer-tune")
    prep.pop("authkey", None)
    main_path = prep.get("init_main_from_path")
    if main_path is not None and not os.path.isfile(main_path):
        del prep["init_main_from_path"]  # `python -` or `-c`: nothing to re-import
    blob = {"prep": prep, "payload": payload}
    fd, path = tempfile.mkstemp(prefix="layer-streamer-tune-", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(blob, f)
        child = [sys.executable, "-m", "layer_streamer._tune_child", path]
        report = json.loads(
            _native.tune(
                os.fspath(model_dir),
                name,
                {k: list(v) for k, v in grid.items()},
                child,
                base=options,
                strategy=strategy,
                runs=runs,
                sleep=sleep,
                timeout=timeout,
                early_kill=early_kill,
                prune=prune,
                progress=progress,
                echo_stderr=echo_stderr,
            )
        )
    finally:
        os.unlink(path)
    best = report.get("best")
    if best is not None:
        chosen = {k: v for k, v in best.items() if k != "mean_s"}
        report["best_options"] = {**options, **chosen}
    else:
        report["best_options"] = None
    return report
