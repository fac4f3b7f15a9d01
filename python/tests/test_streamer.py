"""The host backend from Python: every weight of every layer as the
safetensors package reads it, stage switches, errors, stale views."""

from __future__ import annotations

import numpy as np
import pytest

import layer_streamer as ls
from conftest import LAYER_KEYS, STATICS, Model, seed


def host(model: Model, **options) -> ls.LayerStreamer:
    options.setdefault("reader_threads", 2)
    return ls.LayerStreamer(model.path, device="host", **options)


def bf16_bits_of(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even f32 -> bf16, as bit patterns (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def as_f32(model: Model, name: str) -> np.ndarray:
    ref = model.reference(name)
    if model.raw[name][0] == "BF16":
        return (ref.astype(np.uint32) << 16).view(np.float32)
    return ref.astype(np.float32)


def collect(s: ls.LayerStreamer):
    """One pass; a copy of every tensor, and the layer order."""
    seen = {}

    def layer_fn(x, weights, layer):
        assert layer == len(x)
        for key, t in weights.items():
            assert t.key == key and t.layer == layer and t.is_valid
            seen[t.name] = (t.dtype, t.shape, np.array(t.numpy()))
        return x + [layer]

    order = s.run_pass([], layer_fn)
    return seen, order


def test_every_tensor_of_every_layer_is_the_safetensors_load(model: Model):
    with host(model, dtype="file") as s:
        assert s.num_layers == model.num_layers
        assert sorted(s.layer_keys) == sorted(LAYER_KEYS)
        seen, order = collect(s)
    assert order == list(range(model.num_layers))
    assert len(seen) == model.num_layers * len(LAYER_KEYS)
    for layer in range(model.num_layers):
        for key in LAYER_KEYS:
            name = model.layer_name(layer, key)
            dtype, shape, got = seen[name]
            ref = model.reference(name)
            assert dtype == model.raw[name][0].lower()
            assert shape == ref.shape
            assert got.dtype == ref.dtype, name
            np.testing.assert_array_equal(got, ref, err_msg=name)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16"])
def test_floats_are_cast_to_the_compute_dtype(model: Model, dtype: str):
    with host(model, dtype=dtype) as s:
        seen, _ = collect(s)
    for name, (got_dtype, _, got) in seen.items():
        stored = model.raw[name][0]
        if stored == "I32":
            assert got_dtype == "i32"
            np.testing.assert_array_equal(got, model.reference(name))
            continue
        assert got_dtype == dtype, name
        x = as_f32(model, name)
        if dtype == "f32":
            np.testing.assert_array_equal(got, x, err_msg=name)
        elif dtype == "bf16":
            np.testing.assert_array_equal(got, bf16_bits_of(x), err_msg=name)
        else:
            np.testing.assert_array_equal(got, x.astype(np.float16), err_msg=name)


def test_bf16_reaches_numpy_as_bits_or_float32(model: Model):
    name = model.layer_name(0, "mlp.up_proj.weight")
    with host(model, dtype="file") as s:

        def layer_fn(x, weights, layer):
            t = weights["mlp.up_proj.weight"]
            assert t.dtype == "bf16"
            with pytest.raises(Exception):  # NumPy rejects the bf16 DLPack code
                np.from_dlpack(t)
            bits = t.numpy()
            assert bits.dtype == np.uint16 and not bits.flags.writeable
            np.testing.assert_array_equal(bits, model.reference(t.name))
            np.testing.assert_array_equal(t.numpy(bf16="float32"), as_f32(model, t.name))
            return x + 1

        s.run_pass(0, layer_fn)
    assert model.raw[name][0] == "BF16"


STAGES = [
    dict(n_gpu=2, n_cpu_pinned=4, n_cpu=0),
    dict(n_gpu=None, n_cpu_pinned=None, n_cpu=None),
    dict(n_gpu=0, n_cpu_pinned=0, n_cpu=3, batch_cpu=2),
    dict(n_gpu=1, n_cpu_pinned=2, n_cpu=2, batch_gpu=2, batch_cpu_pinned=2),
    dict(n_gpu=3, n_cpu_pinned=1, pinned_cache="auto"),
    dict(n_gpu=1, n_cpu_pinned=2, gpu_cache="auto", read_chunk="4KiB"),
]


@pytest.mark.parametrize("stages", STAGES, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_stage_switches_stream_the_same_bytes(model: Model, stages):
    with host(model, dtype="file", **stages) as s:
        for p in range(3):
            seen, order = collect(s)
            assert order == list(range(model.num_layers))
            for name, (_, _, got) in seen.items():
                np.testing.assert_array_equal(got, model.reference(name), err_msg=name)
            st = s.last_pass_stats
            assert st["pass"] == p + 1 and st["layers"] == model.num_layers
            assert st["compute"]["items"] == model.num_layers
            assert st["layer_bytes"] == sum(got.nbytes for _, _, got in seen.values())
        if stages.get("pinned_cache") == "auto":
            assert st["pinned_cache_hits"] == model.num_layers
        cfg = s.config
        for k, v in stages.items():
            if k in ("n_gpu", "n_cpu_pinned", "n_cpu"):
                assert cfg[k] == (v or 0)


class Boom(Exception):
    pass


def test_an_exception_in_layer_fn_propagates_and_the_streamer_stays_usable(model: Model):
    rng = np.random.default_rng(seed())
    at = int(rng.integers(0, model.num_layers))
    err = Boom(f"layer {at}")
    calls = []
    with host(model, dtype="file") as s:

        def failing(x, weights, layer):
            calls.append(layer)
            if layer == at:
                raise err
            return x

        with pytest.raises(Boom) as info:
            s.run_pass(None, failing)
        assert info.value is err
        assert calls == list(range(at + 1))
        seen, order = collect(s)
        assert order == list(range(model.num_layers))
        for name, (_, _, got) in seen.items():
            np.testing.assert_array_equal(got, model.reference(name))
        assert s.last_pass_stats["pass"] == 1


def test_a_view_used_after_its_layer_raises(model: Model):
    kept = {}
    arrays = {}
    with host(model, dtype="file") as s:

        def layer_fn(x, weights, layer):
            if layer == 0:
                kept.update(weights)
                arrays["w"] = np.from_dlpack(weights["input_layernorm.weight"])
            else:
                old = kept["input_layernorm.weight"]
                assert not old.is_valid
                for use in (old.__dlpack__, old.__dlpack_device__, old.data_ptr, old.numpy):
                    with pytest.raises(ls.StaleTensorError, match="layer 0"):
                        use()
            return x

        s.run_pass(None, layer_fn)
        for t in kept.values():
            assert not t.is_valid
            with pytest.raises(ls.StaleTensorError):
                np.from_dlpack(t)
        assert "stale" in repr(kept["mlp.up_proj.weight"])
    # An export taken inside the layer keeps the streamer's memory alive,
    # even past close(): reading it never touches freed memory.
    assert s.closed
    assert arrays["w"].shape == (model.hidden,)
    float(arrays["w"].sum())


def test_static_tensors_are_owned_and_cast(model: Model):
    with host(model, dtype="f32") as s:
        statics = {n: s.load_static(n) for n in STATICS}
        with pytest.raises(ls.UnknownTensorError, match="model.nope") as info:
            s.load_static("model.nope")
        assert info.value.kind == "input"
    for name, t in statics.items():
        assert t.is_valid and t.layer is None and t.key is None and t.dtype == "f32"
        np.testing.assert_array_equal(t.numpy(), as_f32(model, name))
    with host(model, dtype="file") as s:
        t = s.load_static("model.embed_tokens.weight")
    np.testing.assert_array_equal(t.numpy(), model.reference(t.name))


def test_state_is_any_object_and_stats_are_reported(model: Model):
    with host(model) as s:
        assert s.last_pass_stats is None
        out = s.run_pass({"n": 0, "t": ()}, lambda x, w, i: {"n": x["n"] + 1, "t": x["t"] + (i,)})
        assert out == {"n": model.num_layers, "t": tuple(range(model.num_layers))}
        st = s.last_pass_stats
        assert set(st) >= {"pass", "wall_s", "gbps", "bound_by", "read", "pin", "h2d", "compute"}
        assert st["wall_s"] > 0 and st["bound_by"] in ("read", "pin", "h2d", "compute")
        mem = s.memory
        assert mem["gpu_slots"] == s.config["n_gpu"] + 1


def test_a_pass_inside_a_pass_is_refused(model: Model):
    with host(model) as s:

        def nested(x, weights, layer):
            s.run_pass(None, lambda *a: None)

        with pytest.raises(ls.LayerStreamerError, match="running a pass"):
            s.run_pass(None, nested)
        s.run_pass(None, lambda x, w, i: x)


def test_closed_streamer_raises(model: Model):
    s = host(model)
    with s:
        pass
    assert s.closed
    with pytest.raises(ls.LayerStreamerError, match="closed"):
        s.run_pass(None, lambda x, w, i: x)
    s.close()


def test_rust_errors_become_their_classes(model: Model, tmp_path):
    with pytest.raises(ls.ModelError) as info:
        ls.LayerStreamer(tmp_path, device="host")
    assert str(tmp_path) in str(info.value) and info.value.kind == "model"
    with pytest.raises(ls.ConfigError, match="reader_threads") as info:
        host(model, reader_threads=0)
    assert info.value.kind == "config"
    with pytest.raises(ls.InputError, match="n_gpus"):
        host(model, n_gpus=2)
    with pytest.raises(ls.InputError, match="dtype"):
        host(model, dtype="int4")
    with pytest.raises(ls.InputError, match="pinned_cache"):
        host(model, pinned_cache="lots")
    assert issubclass(ls.StaleTensorError, ls.LayerStreamerError)
    assert issubclass(ls.LayerStreamerError, RuntimeError)


def test_config_round_trips_through_the_constructor(model: Model):
    rng = np.random.default_rng(seed())
    n_gpu = int(rng.integers(0, 5))
    chunk = int(rng.integers(1, 64)) * 4096
    with host(model, n_gpu=n_gpu, pinned_cache=None, gpu_cache="1MiB", read_chunk=chunk,
              io_mode="buffered", dtype="file") as s:
        cfg = s.config
        with ls.LayerStreamer(model.path, **cfg) as again:
            assert again.config == cfg
    assert cfg["device"] == "host" and cfg["dtype"] == "file"
    assert cfg["n_gpu"] == n_gpu and cfg["read_chunk"] == chunk
    assert cfg["pinned_cache"] is None and cfg["gpu_cache"] == 1 << 20
    assert cfg["io_mode"] == "buffered" and cfg["reader_threads"] == 2
    with host(model) as s:
        assert s.config["pinned_cache"] == "auto" and s.config["dtype"] == "bf16"
        assert s.config["cpu_share"] is None
    share = round(float(rng.uniform(0.05, 0.95)), 2)
    with host(model, cpu_share=share) as s:
        assert s.config["cpu_share"] == share
        with ls.LayerStreamer(model.path, **s.config) as again:
            assert again.config == s.config
    for bad in (1.5, -0.1, "half", True):
        with pytest.raises(ls.InputError, match="cpu_share"):
            host(model, cpu_share=bad)
