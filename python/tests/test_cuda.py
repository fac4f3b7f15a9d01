"""The CUDA backend from PyTorch (GPU machine only): every weight through
torch.from_dlpack, casts on the device, the compute stream as PyTorch's
current stream, consumers on other streams, errors and stale views.

Skips without torch or a CUDA device; LS_REQUIRE_GPU=1 makes that a failure.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import layer_streamer as ls
from conftest import LAYER_KEYS, STATICS, Model

try:
    import torch
except ImportError:
    torch = None
if torch is None or not torch.cuda.is_available():
    if os.environ.get("LS_REQUIRE_GPU") == "1":
        raise RuntimeError("LS_REQUIRE_GPU=1, but torch is missing or sees no CUDA device")
    pytest.skip("needs torch and a CUDA device", allow_module_level=True)

STORED = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32}


def reference(model: Model, name: str) -> "torch.Tensor":
    """The tensor from the safetensors bytes, on the CPU, in its stored type."""
    dtype, shape, data = model.raw[name]
    return torch.frombuffer(bytearray(data), dtype=STORED[dtype]).reshape(shape)


def same_bits(a: "torch.Tensor", b: "torch.Tensor") -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    return a.dtype == b.dtype and a.shape == b.shape and a.view(torch.uint8).equal(b.view(torch.uint8))


def cuda(model: Model, **options) -> ls.LayerStreamer:
    return ls.LayerStreamer(model.path, device="cuda:0", reader_threads=2, **options)


@pytest.mark.parametrize("dtype", ["file", "bf16"])
def test_every_weight_through_torch_from_dlpack(model: Model, dtype: str):
    seen = {}
    with cuda(model, dtype=dtype, pinned_cache="auto") as s:
        for _ in range(2):

            def layer_fn(x, weights, layer):
                assert torch.cuda.current_stream().cuda_stream == s.compute_stream
                for key, t in weights.items():
                    w = torch.from_dlpack(t)
                    assert w.is_cuda and w.data_ptr() == t.data_ptr()
                    seen[t.name] = w.clone()
                    x = x + w.double().sum()
                return x

            total = s.run_pass(torch.zeros((), dtype=torch.float64, device="cuda"), layer_fn)
            expect = 0.0
            for name, w in seen.items():
                ref = reference(model, name)
                if dtype == "bf16" and ref.is_floating_point():
                    ref = ref.float().to(torch.bfloat16)  # round to nearest even, as the device casts
                assert same_bits(w, ref), name
                expect += float(ref.double().sum())
            assert float(total) == pytest.approx(expect, rel=1e-9, abs=1e-6)
    assert len(seen) == model.num_layers * len(LAYER_KEYS)


def test_consumers_on_other_streams_wait_for_the_layer(model: Model):
    other = torch.cuda.Stream()
    with cuda(model, dtype="file") as s:

        def layer_fn(x, weights, layer):
            t = weights["mlp.down_proj.weight"]
            with torch.cuda.stream(other):
                w = torch.from_dlpack(t)  # __dlpack__(stream=other): other waits for compute
                copy = w.clone()
            torch.cuda.current_stream().wait_stream(other)
            return x + [(t.name, copy)]

        out = s.run_pass([], layer_fn)
    for name, copy in out:
        assert same_bits(copy, reference(model, name)), name


def test_statics_outlive_the_streamer_and_views_do_not(model: Model):
    kept = []
    with cuda(model, dtype="bf16") as s:
        statics = {n: torch.from_dlpack(s.load_static(n)) for n in STATICS}
        s.run_pass(None, lambda x, w, i: kept.append(w["input_layernorm.weight"]))
        with pytest.raises(ls.StaleTensorError):
            torch.from_dlpack(kept[0])
        err = ValueError("boom")

        def failing(x, w, i):
            raise err

        with pytest.raises(ValueError) as info:
            s.run_pass(None, failing)
        assert info.value is err
        s.run_pass(None, lambda x, w, i: x)
    for name, t in statics.items():
        ref = reference(model, name)
        assert same_bits(t, ref.float().to(torch.bfloat16) if ref.is_floating_point() else ref)


def test_cupy_takes_the_views_too(model: Model):
    cupy = pytest.importorskip("cupy")
    with cuda(model, dtype="file") as s:

        def layer_fn(x, weights, layer):
            t = weights["input_layernorm.weight"]
            return x + [(t.name, cupy.asnumpy(cupy.from_dlpack(t)))]

        out = s.run_pass([], layer_fn)
    for name, got in out:
        np.testing.assert_array_equal(got, model.reference(name))
