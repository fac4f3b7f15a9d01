"""`LayerStreamer`: the native streamer, plus PyTorch's stream and a context manager."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Dict, Optional, TypeVar

from . import _native
from ._native import Tensor

X = TypeVar("X")


class LayerStreamer(_native.Streamer):
    """Streams a model's layers to a device, pass after pass.

    ``LayerStreamer(model_dir, *, device="cuda:0", dtype="bf16", n_gpu=2,
    n_cpu_pinned=4, n_cpu=0, batch_gpu=1, batch_cpu_pinned=1, batch_cpu=1,
    reader_threads=8, read_chunk="16MiB", io_mode="auto", pinned_cache="auto",
    gpu_cache=None, cpu_affinity=None, progress=False, dequant="auto",
    cpu_share=None)``

    - ``model_dir``: a Hugging Face model directory (``*.safetensors``, sharded
      or not); its ``<prefix>.<i>.<key>`` tensors are the layers.
    - ``device``: ``"cuda"``, ``"cuda:N"``, or ``"host"`` (the same pipeline
      with host memory as the device: no GPU needed, NumPy can read the weights).
    - ``dtype``: ``"bf16"`` (f16/f32 weights are cast on the device),
      ``"f16"``/``"f32"`` (host backend), or ``"file"`` (each tensor's stored type).
    - ``n_gpu``: device prefetch depth (``n_gpu + 1`` slots). ``n_cpu_pinned``:
      pinned host slots the readers fill. ``n_cpu``: unpinned slots before a
      pin thread. None or 0 switches a stage off, as in ``llm-layer-prefetch``.
    - ``batch_*``: items a stage hands over at once.
    - ``reader_threads``, ``read_chunk`` (bytes or ``"16MiB"``), ``io_mode``
      (``"auto"``: O_DIRECT where the filesystem allows, ``"direct"``, ``"buffered"``).
    - ``pinned_cache`` / ``gpu_cache``: layers kept in pinned RAM / VRAM across
      passes: None (off), ``"auto"`` (as much as fits safely; the pinned
      cache's default), bytes or ``"12GB"``.
    - ``progress``: a progress bar per pass on stderr.
    - ``dequant``: where quantized weights (GGUF blocks, FP8) become ``dtype``:
      ``"slot"`` (on the device before ``layer_fn`` runs; ``"auto"`` is this)
      or ``"use"`` (``layer_fn`` receives the stored bytes as uint8).
    - ``cpu_share``: the share of each streamed layer's rows the CPU computes
      from host memory while the rest streams (the model commands' hybrid
      split): None (off), a fraction in ``[0, 1]`` or ``"auto"``.

    Errors raise subclasses of :class:`LayerStreamerError` with the Rust message.
    Use it as a context manager (or call :meth:`close`) to free its memory.
    """

    _torch_stream: Any = None

    def run_pass(self, x: X, layer_fn: Callable[[X, Dict[str, Tensor], int], X]) -> X:
        """Runs one pass: ``x = layer_fn(x, weights, layer_idx)`` for every layer.

        ``weights`` maps each key of the layer (``"self_attn.q_proj.weight"``,
        ...) to a :class:`Tensor` on the device; wrap it with
        ``torch.from_dlpack`` (zero-copy). It is valid only until ``layer_fn``
        returns. ``x`` is any object; what the last layer returns is the result.

        On CUDA with PyTorch installed, ``layer_fn`` runs inside
        ``torch.cuda.stream(ExternalStream(compute_stream))``, after the
        compute stream was made to wait for PyTorch's current stream (so it sees
        ``x``). The pass returns once every layer's work has finished. An
        exception in ``layer_fn`` ends the pass and propagates unchanged; the
        streamer stays usable.
        """
        with self._stream_scope():
            return super().run_pass(x, layer_fn)

    def _stream_scope(self) -> ContextManager[Any]:
        ptr = self.compute_stream
        if not ptr:
            return contextlib.nullcontext()
        try:
            import torch
        except ImportError:
            return contextlib.nullcontext()
        device = torch.device("cuda", self.device_index)
        if self._torch_stream is None:
            self._torch_stream = torch.cuda.ExternalStream(ptr, device=device)
        self._torch_stream.wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.stream(self._torch_stream)

    def close(self) -> None:
        """Frees the slots, caches and streams; later views raise."""
        self._torch_stream = None
        super().close()

    def __enter__(self) -> "LayerStreamer":
        return self

    def __exit__(self, *exc: Optional[object]) -> None:
        self.close()
