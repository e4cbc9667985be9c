"""Readable float64 NumPy versions of the equations of ``docs/derivations.md``: the test oracle
and the baseline.

Nothing here is fast or fused; every function computes in float64, follows the notation of
``docs/derivations.md`` and PyTorch's conventions for the options (class weights,
``ignore_index``, label smoothing, reductions; see ``docs/api.md``).

Softmax cross-entropy (``docs/derivations.md``, section 1), for one sample with logits ``z``
(C,):

    p_i = exp(z_i) / sum_j exp(z_j)
    L   = -sum_i y_i log p_i = lse(z) - sum_i y_i z_i,    lse = log sum_j exp(z_j)
    dL/dz_i = p_i - y_i                                  (section 1(b))

Batch normalization (section 2), per channel over the m reduced values:

    mu = mean(z),  var = mean((z - mu)^2)
    zhat = (z - mu) / sqrt(var + eps),  y = gamma zhat + beta
    dL/dbeta = sum dy,  dL/dgamma = sum dy zhat                              (section 2(a))
    dL/dz_i = gamma / (m sqrt(var + eps)) * (m dy_i - sum_j dy_j - zhat_i sum_j dy_j zhat_j)
                                                                             (section 2(b))
"""
from __future__ import annotations

import numpy as np


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy
# --------------------------------------------------------------------------------------------
def _classes_last(a: np.ndarray) -> np.ndarray:
    """(N, C, d1, ..., dk) -> (N * d1 * ... * dk, C) in float64 (a copy)."""
    a = np.asarray(a, dtype=np.float64)
    return np.moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def _classes_back(rows: np.ndarray, shape) -> np.ndarray:
    """Inverse of :func:`_classes_last` for an array of ``shape``."""
    moved = rows.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
    return np.ascontiguousarray(np.moveaxis(moved, -1, 1))


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """log p = z - lse(z), stabilised by subtracting the maximum (float64)."""
    z = np.asarray(z, dtype=np.float64)
    return z - logsumexp(z, axis=axis, keepdims=True)


def logsumexp(z: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """lse(z) = m + log sum exp(z - m) with m = max(z) (float64); -inf for all -inf rows."""
    z = np.asarray(z, dtype=np.float64)
    m = np.max(z, axis=axis, keepdims=True)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = m_safe + np.log(np.sum(np.exp(z - m_safe), axis=axis, keepdims=True))
    return out if keepdims else np.squeeze(out, axis=axis)


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """p_i = exp(z_i) / sum_j exp(z_j)  (``docs/derivations.md``, section 1), float64."""
    return np.exp(log_softmax(z, axis=axis))


def softmax_cross_entropy(logits, target, *, weight=None, ignore_index=-100, reduction="mean",
                          label_smoothing=0.0, z_loss=0.0, softcap=None):
    """Loss, gradient and per-sample log-sum-exp of softmax cross-entropy, in float64.

    ``logits`` (N, C) or (N, C, d1, ..., dk); ``target`` integer class indices (N, d1, ...) or
    class probabilities shaped like ``logits``. Semantics are PyTorch's
    ``F.cross_entropy`` plus PaLM's ``z_loss * lse**2`` term (see ``docs/api.md``), and
    ``softcap=c``: the logits are first capped as z' = c tanh(z / c) (Gemma 2).

    With q the smoothed target distribution, q_c = (1 - s) y_c + s / C, and class weights w,
    each sample's loss and gradient are

        loss = sum_c w_c q_c (lse - z_c) + z_loss * w_t * lse^2     (w_t: target-class weight,
                                                                     1 for probability targets)
        dloss/dz_j = p_j (sum_c w_c q_c + 2 z_loss w_t lse) - w_j q_j

    which is p - y (``docs/derivations.md``, section 1(b)) when w = 1, s = 0 and z_loss = 0;
    the general form is derived in section 1(d). With ``softcap`` the formulas read z' (lse is
    that of z'), and the gradient with respect to the uncapped z is dloss/dz'_j times
    dz'_j/dz_j = 1 - tanh^2(z_j / c) (section 1(e)).
    Returns ``(loss, grad, lse)``: loss is a float for "mean"/"sum" and an array shaped like
    the per-sample target for "none"; grad has the shape of ``logits`` and is the gradient of
    the reduced loss (of the summed losses for "none"); lse is shaped like the per-sample loss.
    """
    logits = np.asarray(logits)
    shape = logits.shape
    n_classes = shape[1]
    z = _classes_last(logits)
    slope = 1.0  # dz'/dz
    if softcap is not None:
        z_over_c = z / softcap
        z = softcap * np.tanh(z_over_c)
        with np.errstate(over="ignore"):  # cosh(+-inf) = inf: the slope is 0 there
            slope = 1.0 / np.cosh(z_over_c) ** 2  # = 1 - tanh^2, without its cancellation
    w = np.ones(n_classes) if weight is None else np.asarray(weight, dtype=np.float64)
    lse = logsumexp(z, axis=1)
    logp = z - lse[:, None]
    p = np.exp(logp)
    target = np.asarray(target)
    s = float(label_smoothing)

    if np.issubdtype(target.dtype, np.integer):
        t = target.reshape(-1).astype(np.int64)
        valid = t != ignore_index
        t_safe = np.where(valid, t, 0)
        q = np.zeros_like(z)
        q[np.arange(len(t)), t_safe] = 1.0
        q = (1.0 - s) * q + s / n_classes
        q[~valid] = 0.0
        w_target = np.where(valid, w[t_safe], 0.0)
        denom = w_target.sum()
    else:
        q = (1.0 - s) * _classes_last(target) + s / n_classes
        valid = np.ones(z.shape[0], dtype=bool)
        w_target = np.ones(z.shape[0])
        denom = float(z.shape[0])

    with np.errstate(invalid="ignore"):  # 0 * (-inf) where a masked class has q_c = 0
        cross = -np.where(q != 0.0, w * q * logp, 0.0).sum(axis=1)
    zl = np.where(valid, z_loss * w_target * lse ** 2, 0.0)
    per_sample = np.where(valid, cross + zl, 0.0)
    coef = (w * q).sum(axis=1) + 2.0 * z_loss * w_target * lse
    grad_rows = np.where(valid[:, None], (p * coef[:, None] - w * q) * slope, 0.0)

    sample_shape = (shape[0],) + tuple(shape[2:])
    if reduction == "none":
        loss = per_sample.reshape(sample_shape)
    elif reduction == "sum":
        loss = float(per_sample.sum())
    elif reduction == "mean":
        if denom == 0.0:
            loss = float("nan")
            # 0 / 0, as PyTorch: NaN rows, except the ignored ones (zeros)
            grad_rows = np.where(valid[:, None], np.nan, np.zeros_like(grad_rows))
        else:
            loss = float(per_sample.sum() / denom)
            grad_rows = grad_rows / denom
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return loss, _classes_back(grad_rows, shape), lse.reshape(sample_shape)


# --------------------------------------------------------------------------------------------
# Batch normalization
# --------------------------------------------------------------------------------------------
def _channels_first_rows(x: np.ndarray, channel_axis: int) -> np.ndarray:
    """View x as (C, m): one row per channel holding every reduced value (float64 copy)."""
    x = np.asarray(x, dtype=np.float64)
    return np.moveaxis(x, channel_axis, 0).reshape(x.shape[channel_axis], -1)


def _from_channel_rows(rows: np.ndarray, shape, channel_axis: int) -> np.ndarray:
    axis = channel_axis % len(shape)
    moved_shape = (shape[axis],) + tuple(s for i, s in enumerate(shape) if i != axis)
    return np.ascontiguousarray(np.moveaxis(rows.reshape(moved_shape), 0, axis))


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       training=True, momentum=0.1, eps=1e-5, channel_axis=1):
    """Seed eqs. (4)-(5) per channel, float64. Returns ``(y, mean, invstd, running)``.

    ``running`` is ``(new_running_mean, new_running_var)`` (new arrays, the inputs are not
    modified) when running buffers are given in training, else ``None``. In training the
    running variance is updated with the unbiased variance var * m / (m - 1), as PyTorch does.
    """
    rows = _channels_first_rows(x, channel_axis)
    n_channels, m = rows.shape
    gamma = np.ones(n_channels) if weight is None else np.asarray(weight, np.float64)
    beta = np.zeros(n_channels) if bias is None else np.asarray(bias, np.float64)
    running = None
    if training:
        mean = rows.mean(axis=1)
        var = ((rows - mean[:, None]) ** 2).mean(axis=1)
        if running_mean is not None:
            running = ((1.0 - momentum) * np.asarray(running_mean, np.float64) + momentum * mean,
                       (1.0 - momentum) * np.asarray(running_var, np.float64)
                       + momentum * var * m / (m - 1))
    else:
        mean = np.asarray(running_mean, np.float64)
        var = np.asarray(running_var, np.float64)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (rows - mean[:, None]) * invstd[:, None]
    y = gamma[:, None] * xhat + beta[:, None]
    return _from_channel_rows(y, np.shape(x), channel_axis), mean, invstd, running


def batch_norm_backward(dy, x, mean, invstd, weight=None, *, training=True, channel_axis=1):
    """Gradients of y = gamma zhat + beta through the statistics (``docs/derivations.md``,
    sections 2(a), 2(b) and, for eval, 2(b)'s last paragraph), float64. Returns
    ``(dx, dweight, dbias)``.

        dbias   = sum_i dy_i
        dweight = sum_i dy_i zhat_i
        dx_i    = gamma invstd / m * (m dy_i - dbias - zhat_i dweight)     (training)
        dx_i    = gamma invstd dy_i                                       (eval: fixed stats)
    """
    rows = _channels_first_rows(x, channel_axis)
    g = _channels_first_rows(dy, channel_axis)
    n_channels, m = rows.shape
    mean = np.asarray(mean, np.float64)
    invstd = np.asarray(invstd, np.float64)
    gamma = np.ones(n_channels) if weight is None else np.asarray(weight, np.float64)
    xhat = (rows - mean[:, None]) * invstd[:, None]
    dbias = g.sum(axis=1)
    dweight = (g * xhat).sum(axis=1)
    if training:
        dx = (gamma * invstd / m)[:, None] * (m * g - dbias[:, None] - xhat * dweight[:, None])
    else:
        dx = (gamma * invstd)[:, None] * g
    return _from_channel_rows(dx, np.shape(x), channel_axis), dweight, dbias


# --------------------------------------------------------------------------------------------
# Linear + cross-entropy
# --------------------------------------------------------------------------------------------
def linear_cross_entropy(input, linear_weight, target, *, linear_bias=None, weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                         softcap=None, grad_loss=1.0):
    """Softmax cross-entropy of a linear layer's output and the gradients of its operands, in
    float64, with the (N, C) logits formed whole (``docs/derivations.md``, section 3):

        Z = X W^T + b                                   X (N, d), W (C, d), b (C,)
        G = grad_loss * dloss/dZ                        (:func:`softmax_cross_entropy`)
        dloss/dX = G W,   dloss/dW = G^T X,   dloss/db = sum_n G_n

    The options are :func:`softmax_cross_entropy`'s (with ``softcap`` G is the gradient with
    respect to the uncapped Z). ``grad_loss`` is a scalar, or an (N,) array for "none" (row n's
    gradient times its value). Returns ``(loss, grad_input, grad_linear_weight,
    grad_linear_bias)``, the last ``None`` without a bias; the loss as
    :func:`softmax_cross_entropy` returns it.
    """
    x = np.asarray(input, dtype=np.float64)
    w = np.asarray(linear_weight, dtype=np.float64)
    z = x @ w.T
    if linear_bias is not None:
        z = z + np.asarray(linear_bias, dtype=np.float64)
    loss, g, _ = softmax_cross_entropy(z, target, weight=weight, ignore_index=ignore_index,
                                       reduction=reduction, label_smoothing=label_smoothing,
                                       z_loss=z_loss, softcap=softcap)
    scale = np.asarray(grad_loss, dtype=np.float64)
    g = g * (scale[:, None] if scale.ndim == 1 else scale)
    grad_bias = None if linear_bias is None else g.sum(axis=0)
    return loss, g @ w, g.T @ x, grad_bias
