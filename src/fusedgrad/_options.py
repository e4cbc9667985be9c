"""What a cross-entropy call hands to its kernels besides arrays, in one place.

The public API (``fusedgrad.cross_entropy``) builds these values, both backends
(``fusedgrad.cpu.cross_entropy``, ``fusedgrad.cuda.cross_entropy``) and the class-sharded version
(``fusedgrad.distributed``) read them, so none of those modules owns them:

* :class:`CrossEntropyOptions`: the scalar options of a call, validated by the caller;
* the kernel modes :data:`MODE_FUSED`, :data:`MODE_FORWARD`, :data:`MODE_BACKWARD`: which of the
  loss and the gradient a kernel launch computes (every cross-entropy kernel takes one);
* :func:`sample_count`: how many samples a logits shape holds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CrossEntropyOptions:
    """Scalar options of one cross-entropy call, already validated (see ``docs/api.md``).

    ``ignore_index``: the class index of samples that add no loss and get no gradient;
    ``label_smoothing``: ``s`` in ``[0, 1]``; ``z_loss``: the weight of the ``lse**2`` term;
    ``softcap``: ``None``, or ``c > 0`` to cap the logits as ``c * tanh(z / c)`` before
    everything else (gradients stay with respect to the uncapped logits).
    Every field has the API's default, so a new option is one more field with its default.
    """

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None


#: Loss (per sample, and the log-sum-exp) and the gradient from one pass over the logits.
MODE_FUSED = 0
#: Loss and log-sum-exp only; the gradient buffer is not written.
MODE_FORWARD = 1
#: Gradient only, from the log-sum-exp a forward saved; the loss is not written.
MODE_BACKWARD = 2


def sample_count(logits_shape) -> int:
    """Samples of logits shaped ``(N, C, d1, ..., dk)``: ``N * d1 * ... * dk`` (each sample is one
    row of C classes; the per-sample arrays of the kernels have this length)."""
    return int(logits_shape[0]) * math.prod(logits_shape[2:])
