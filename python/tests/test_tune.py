"""The tuner from Python: one child process per configuration, the best
found on a toy grid, failures reported per configuration."""

from __future__ import annotations

import numpy as np
import pytest

import layer_streamer as ls
from conftest import Model, seed
from tune_workloads import raises_on_run, share_pass, toy_pass


def test_the_grid_search_finds_the_best_config(model: Model):
    grid_n_gpu = [0, 1, 2, 3]
    best = int(np.random.default_rng(seed()).choice(grid_n_gpu))
    print(f"best n_gpu {best}")
    report = ls.tune(
        model.path,
        toy_pass,
        {"n_gpu": grid_n_gpu, "reader_threads": [0, 2]},
        args=(best, 0.01),
        runs=2,
        sleep=0,
        timeout=60,
        progress=False,
        device="host",
        dtype="file",
    )
    assert report["strategy"] == "grid" and report["device"] == "host"
    assert report["workload"].endswith("toy_pass")
    configs = report["configs"]
    assert len(configs) == 8
    by_threads = {t: [c for c in configs if c["config"]["reader_threads"] == t] for t in (0, 2)}
    # reader_threads=0 cannot build: the child reports the ConfigError.
    for c in by_threads[0]:
        assert c["status"] == "build_failed", c
        assert "reader_threads" in c["reason"]
    ok = [c for c in by_threads[2] if c["status"] == "ok"]
    assert ok, configs
    assert report["best"]["n_gpu"] == best
    assert report["best"]["mean_s"] == pytest.approx(0.01)
    assert report["best_options"]["n_gpu"] == best
    assert report["best_options"]["device"] == "host"
    # The best options build a streamer.
    with ls.LayerStreamer(model.path, **report["best_options"]) as s:
        assert s.config["n_gpu"] == best


def test_the_cpu_share_is_a_grid_axis(model: Model):
    shares = [None, 0.25, 0.5, 1.0]
    best = shares[int(np.random.default_rng(seed()).integers(len(shares)))]
    report = ls.tune(
        model.path,
        share_pass,
        {"cpu_share": shares},
        args=(best, 0.01),
        runs=2,
        sleep=0,
        timeout=60,
        progress=False,
        device="host",
        dtype="file",
    )
    seen = sorted(str(c["config"]["cpu_share"]) for c in report["configs"])
    assert seen == sorted(str(s if s is not None else "off") for s in shares), report
    # As in the report's JSON: "off" for no share, as "none" for no cache.
    assert report["best_options"]["cpu_share"] == ("off" if best is None else best)
    with ls.LayerStreamer(model.path, **report["best_options"]) as s:
        assert s.config["cpu_share"] == best
    with pytest.raises(ls.InputError, match="cpu_share"):
        ls.tune(model.path, share_pass, {"cpu_share": [0.5, 2.0]}, args=(None, 0.01), device="host")


def test_descent_and_failing_workloads(model: Model):
    report = ls.tune(
        model.path,
        raises_on_run,
        {"n_gpu": [1, 2]},
        strategy="descent",
        runs=2,
        sleep=0,
        timeout=60,
        progress=False,
        device="host",
    )
    assert report["strategy"] == "descent"
    assert report["best"] is None and report["best_options"] is None
    assert report["configs"]
    for c in report["configs"]:
        assert c["status"] == "crashed"
        assert "always fails" in c["reason"] and "ValueError" in c["reason"]


def test_setup_must_be_picklable(model: Model):
    with pytest.raises(TypeError, match="picklable"):
        ls.tune(model.path, lambda s: (lambda: None), {"n_gpu": [1]}, device="host")
    with pytest.raises(ls.InputError, match="n_gpus"):
        ls.tune(model.path, toy_pass, {"n_gpus": [1]}, device="host", progress=False)
