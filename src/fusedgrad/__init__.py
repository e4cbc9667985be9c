"""fusedgrad: fused softmax cross-entropy (also behind a linear layer) and batch normalization,
forward and backward.

Numba kernels for the CPU (``@njit``) and NVIDIA GPUs (``@cuda.jit``) behind one API, described
in ``docs/api.md``::

    import fusedgrad as fg
    loss, grad = fg.softmax_cross_entropy(logits, target)
    loss, dx, dw, db = fg.linear_cross_entropy(hidden, head_weight, target)   # no (N, C) logits
    y, mean, invstd = fg.batch_norm_forward(x, weight, bias, running_mean, running_var)
    dx, dweight, dbias = fg.batch_norm_backward(dy, x, mean, invstd, weight)

Importing the package compiles nothing: each kernel is compiled (or loaded from Numba's cache,
``NUMBA_CACHE_DIR``) on its first call, and the operation modules load on first attribute access.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "softmax_cross_entropy": "cross_entropy",
    "softmax_cross_entropy_forward": "cross_entropy",
    "softmax_cross_entropy_backward": "cross_entropy",
    "linear_cross_entropy": "linear_ce",
    "batch_norm_forward": "batch_norm",
    "batch_norm_backward": "batch_norm",
    "cuda_available": "_device",
    "empty_cache": "_buffer_cache",
    "reference": None,
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'fusedgrad' has no attribute {name!r}")
    module_name = _PUBLIC[name]
    if module_name is None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
