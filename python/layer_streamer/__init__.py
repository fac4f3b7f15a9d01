"""Stream a transformer's layer weights from safetensors on disk to the GPU,
just ahead of the PyTorch (or CuPy, JAX, NumPy) code that uses them.

>>> import torch
>>> from layer_streamer import LayerStreamer
>>> with LayerStreamer("./Qwen2-7B-Instruct", device="cuda:0", pinned_cache="auto") as s:
...     embed = torch.from_dlpack(s.load_static("model.embed_tokens.weight"))
...     def layer_fn(x, weights, layer_idx):
...         w = {k: torch.from_dlpack(t) for k, t in weights.items()}
...         return x + (x @ w["mlp.up_proj.weight"].T).sum()   # your layer here
...     x = s.run_pass(embed[ids], layer_fn)
...     print(s.last_pass_stats["gbps"], "GB/s")

Weights cross zero-copy through DLPack: a layer's views are valid only inside
``layer_fn`` (using one later raises :class:`StaleTensorError`). On CUDA,
``layer_fn`` runs with the streamer's compute stream as PyTorch's current
stream, so its kernels are ordered after the layer's copy and the slot is
reused only after they finish. See :class:`LayerStreamer` and :func:`tune`.
"""

from ._native import (
    ConfigError,
    CudaError,
    CudaUnavailableError,
    InputError,
    IoError,
    LayerFnError,
    LayerStreamerError,
    LimitError,
    ModelError,
    PipelineError,
    StaleTensorError,
    Tensor,
    UnknownTensorError,
)
from ._streamer import LayerStreamer
from ._tune import tune

__all__ = [
    "LayerStreamer",
    "Tensor",
    "tune",
    "LayerStreamerError",
    "ConfigError",
    "CudaError",
    "CudaUnavailableError",
    "InputError",
    "IoError",
    "LayerFnError",
    "LimitError",
    "ModelError",
    "PipelineError",
    "StaleTensorError",
    "UnknownTensorError",
]
