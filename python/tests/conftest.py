"""A random model in the Hugging Face layout, written with the safetensors
package's own writer, and its reference tensors read back by that package."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import safetensors
from safetensors import safe_open

# Keys of every layer: (dtype, shape as multiples of the hidden size).
LAYER_KEYS = {
    "input_layernorm.weight": ("F32", (1,)),
    "self_attn.q_proj.weight": ("F16", (1, 1)),
    "self_attn.q_proj.bias": ("BF16", (1,)),
    "mlp.up_proj.weight": ("BF16", (2, 1)),
    "mlp.down_proj.weight": ("F32", (1, 2)),
    "extra.positions": ("I32", (1,)),
}
STATICS = {
    "model.embed_tokens.weight": ("BF16", (3, 1)),
    "model.norm.weight": ("F32", (1,)),
    "lm_head.weight": ("F16", (3, 1)),
}


def seed() -> int:
    s = int(os.environ.get("LS_SEED", random.randrange(2**32)))
    print(f"LS_SEED={s}")
    return s


# The safetensors writer's names for the header's dtypes.
WRITER_DTYPE = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "I32": "int32"}


def _random(rng: np.random.Generator, dtype: str, shape: Tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if dtype == "I32":
        return rng.integers(-(2**31), 2**31 - 1, n, dtype=np.int32)
    x = rng.standard_normal(n).astype(np.float32)
    if dtype == "F32":
        return x
    if dtype == "F16":
        return x.astype(np.float16)
    # bf16: the high half of random f32 bit patterns (finite by construction).
    return (x.view(np.uint32) >> 16).astype(np.uint16)


class Model:
    """The directory, its layout, and the reference load of every tensor."""

    def __init__(self, path: Path, num_layers: int, hidden: int):
        self.path = path
        self.num_layers = num_layers
        self.hidden = hidden
        files = sorted(path.glob("*.safetensors"))
        # Bytes, dtype and shape per tensor, through the package's parser.
        self.raw: Dict[str, Tuple[str, Tuple[int, ...], bytes]] = {}
        self.numpy: Dict[str, np.ndarray] = {}
        for f in files:
            for name, t in safetensors.deserialize(f.read_bytes()):
                self.raw[name] = (t["dtype"], tuple(t["shape"]), bytes(t["data"]))
            # NumPy has no bf16: the package's NumPy loader reads the others.
            with safe_open(str(f), framework="numpy") as st:
                for name in st.keys():
                    if self.raw[name][0] != "BF16":
                        self.numpy[name] = st.get_tensor(name)

    def layer_name(self, layer: int, key: str) -> str:
        return f"model.layers.{layer}.{key}"

    def reference(self, name: str) -> np.ndarray:
        """The tensor as NumPy sees it: through `safetensors.numpy` where NumPy
        has the dtype, bf16 as its uint16 bit patterns."""
        dtype, shape, data = self.raw[name]
        if name in self.numpy:
            return self.numpy[name]
        np_dtype = {"F32": np.float32, "F16": np.float16, "I32": np.int32, "BF16": np.uint16}
        return np.frombuffer(data, dtype=np_dtype[dtype]).reshape(shape)


def serialize(arrays, layout, path: Path) -> None:
    """Writes `arrays` with the safetensors package's writer (0.8's TensorSpec
    API, or the dict API of earlier versions)."""
    if hasattr(safetensors, "TensorSpec"):
        specs = {
            n: safetensors.TensorSpec(
                dtype=WRITER_DTYPE[layout[n][0]],
                shape=list(layout[n][1]),
                data_ptr=a.ctypes.data,
                data_len=a.nbytes,
            )
            for n, a in arrays.items()
        }
    else:
        specs = {
            n: {"dtype": WRITER_DTYPE[layout[n][0]], "shape": list(layout[n][1]), "data": a.tobytes()}
            for n, a in arrays.items()
        }
    safetensors.serialize_file(specs, str(path))


def write_model(path: Path, rng: np.random.Generator) -> Model:
    num_layers = int(rng.integers(3, 6))
    hidden = int(rng.choice([8, 16, 24]))
    tensors = {}
    for name, (dtype, mult) in STATICS.items():
        shape = tuple(m * hidden for m in mult)
        tensors[name] = (dtype, shape)
    for layer in range(num_layers):
        for key, (dtype, mult) in LAYER_KEYS.items():
            shape = tuple(m * hidden for m in mult)
            tensors[f"model.layers.{layer}.{key}"] = (dtype, shape)
    # Two shards with an index, split in the middle of the layers.
    names = list(tensors)
    cut = len(STATICS) + (num_layers // 2) * len(LAYER_KEYS) + 2
    shards = {"model-00001-of-00002.safetensors": names[:cut],
              "model-00002-of-00002.safetensors": names[cut:]}
    weight_map = {}
    for file, members in shards.items():
        arrays = {n: _random(rng, tensors[n][0], tensors[n][1]) for n in members}
        serialize(arrays, {n: tensors[n] for n in members}, path / file)
        weight_map.update({n: file for n in members})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return Model(path, num_layers, hidden)


@pytest.fixture(scope="session")
def model(tmp_path_factory: pytest.TempPathFactory) -> Model:
    rng = np.random.default_rng(seed())
    return write_model(tmp_path_factory.mktemp("model"), rng)
