"""Workloads for the tuner tests; a module of its own so that the tuner's
children can import them by name."""

from __future__ import annotations

from typing import Callable, Optional


def toy_pass(streamer, best_n_gpu: int, unit_s: float) -> Callable[[], Optional[float]]:
    """Runs a real pass, and reports a time that is least at `best_n_gpu`
    and grows with the distance from it (so the answer is known)."""
    n_gpu = streamer.config["n_gpu"]

    def run() -> float:
        n = streamer.run_pass(0, lambda x, weights, layer: x + len(weights))
        assert n == streamer.num_layers * len(streamer.layer_keys)
        return unit_s * (1 + abs(n_gpu - best_n_gpu))

    return run


def raises_on_run(streamer) -> Callable[[], None]:
    def run() -> None:
        raise ValueError("this workload always fails")

    return run


def share_pass(streamer, best_share: Optional[float], unit_s: float) -> Callable[[], float]:
    """Runs a real pass, and reports a time that is least at the CPU share
    `best_share` (None: off)."""
    share = streamer.config["cpu_share"]

    def run() -> float:
        streamer.run_pass(0, lambda x, weights, layer: x + 1)
        return unit_s * (1 if share == best_share else 2)

    return run
