"""NumPy views of host-backend tensors (``Tensor.numpy``)."""

from __future__ import annotations

from typing import Any

# Types NumPy has no dtype for: handed over as unsigned bit patterns.
_BITS_ONLY = {"bf16", "f8_e4m3", "f8_e5m2"}


def to_numpy(t: Any, bf16: str = "uint16") -> Any:
    """A read-only NumPy array over ``t``'s memory (see ``Tensor.numpy``)."""
    import numpy as np

    if bf16 not in ("uint16", "float32"):
        raise ValueError(f'bf16: expected "uint16" or "float32", got {bf16!r}')
    if t.dtype in _BITS_ONLY:
        a = np.from_dlpack(t._bits())
        if t.dtype == "bf16" and bf16 == "float32":
            return (a.astype(np.uint32) << 16).view(np.float32)
    else:
        a = np.from_dlpack(t)
    a.flags.writeable = False
    return a
