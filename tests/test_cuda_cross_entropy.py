"""GPU softmax cross-entropy (``fusedgrad.cuda.cross_entropy``) against the float64 reference.

Runs on a real GPU when there is one, else in Numba's CUDA simulator (in a subprocess, see
``cuda_support``); shapes stay tiny because the simulator runs one Python thread per GPU thread.
Every launch shape of the row kernel is exercised: a thread per sample (small C, spatial),
a warp per sample, and several warps per sample (``threads_per_row=64``: the multi-warp
reduction path).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cuda_support as cs
from cuda_support import api  # noqa: F401  (fixture)
from oracles import assert_close_scaled
from fusedgrad import reference as ref

test_kernels_in_simulator = cs.simulator_test(__file__)


def _problem(rng, shape, *, prob=False, ignore_every=0, weighted=False, scale=3.0):
    logits = rng.normal(size=shape) * scale
    n_classes = shape[1]
    if prob:
        target = np.moveaxis(rng.dirichlet(np.ones(n_classes), size=(shape[0],) + shape[2:]),
                             -1, 1).copy()
    else:
        target = rng.integers(0, n_classes, size=(shape[0],) + shape[2:])
        if ignore_every:
            target.reshape(-1)[::ignore_every] = -100
    weight = rng.uniform(0.5, 2.0, size=n_classes) if weighted else None
    return logits, target, weight


def _close(actual, expected, dtype):
    rtol, atol = {np.float64: (1e-11, 1e-12), np.float32: (2e-5, 2e-6),
                  np.float16: (2e-2, 2e-3)}[dtype]
    assert_close_scaled(actual, expected, rtol, atol)


CASES = [
    # shape, prob, weighted, reduction, label_smoothing, z_loss, dtype, threads_per_row
    ((5, 7), False, True, "mean", 0.1, 0.01, np.float64, None),
    ((5, 7), False, False, "sum", 0.0, 0.0, np.float32, None),
    ((3, 40), False, True, "mean", 0.2, 0.0, np.float64, None),
    ((3, 40), False, False, "none", 0.0, 1e-3, np.float32, 64),
    ((4, 6, 2, 3), False, True, "none", 0.2, 0.0, np.float64, None),
    ((2, 5, 7), False, False, "mean", 0.0, 0.01, np.float32, None),
    ((4, 6, 3), True, True, "mean", 0.1, 0.02, np.float64, None),
    ((4, 9), True, False, "sum", 0.0, 0.0, np.float32, 32),
    ((3, 33), True, True, "none", 0.3, 0.0, np.float64, 64),
]


@cs.direct
@pytest.mark.parametrize("shape,prob,weighted,reduction,smoothing,z_loss,dtype,per_row", CASES)
def test_fused_forward_backward_match_reference(api, shape, prob, weighted, reduction, smoothing,
                                                z_loss, dtype, per_row, monkeypatch):
    from fusedgrad.cuda import cross_entropy as backend
    if per_row is not None:
        monkeypatch.setattr(backend, "_threads_per_row", lambda n_classes, n_spatial: per_row)
    rng = np.random.default_rng(len(shape) * 100 + shape[1])
    logits, target, weight = _problem(rng, shape, prob=prob, ignore_every=0 if prob else 3,
                                      weighted=weighted)
    logits = logits.astype(dtype)
    target = target.astype(dtype) if prob else target.astype(np.int32)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)
    expected_loss, expected_grad, expected_lse = ref.softmax_cross_entropy(
        logits, target, weight=weight, **kwargs)
    d_logits, d_target = cs.to_device(logits), cs.to_device(target)
    d_weight = None if weight is None else cs.to_device(weight.astype(dtype))
    if weight is not None:
        expected_loss, expected_grad, expected_lse = ref.softmax_cross_entropy(
            logits, target, weight=weight.astype(dtype), **kwargs)

    loss, grad = api.softmax_cross_entropy(d_logits, d_target, weight=d_weight, **kwargs)
    _close(cs.to_host(loss), expected_loss, dtype)
    _close(cs.to_host(grad), expected_grad, dtype)
    assert cs.to_host(grad).dtype == dtype

    loss2, lse = api.softmax_cross_entropy_forward(d_logits, d_target, weight=d_weight, **kwargs)
    _close(cs.to_host(loss2), expected_loss, dtype)
    _close(cs.to_host(lse), expected_lse, dtype)
    grad_loss = cs.to_device(np.ones(np.shape(expected_loss))) if reduction == "none" else 1.0
    grad2 = api.softmax_cross_entropy_backward(grad_loss, d_logits, d_target, lse,
                                               weight=d_weight, **kwargs)
    _close(cs.to_host(grad2), expected_grad, dtype)


@cs.real_gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("n_classes", [10, 1000, 4096, 40000])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_every_launch_shape_at_the_size_that_selects_it(api, n_classes, dtype, softcap):
    """C = 10, 1000, 4096 and 40000 choose a thread, a warp, 256 and 1024 threads per sample.
    Label smoothing and class weights take the most registers: a kernel that needs more than a
    1024-thread block can hold fails only at launch, on a real GPU (seen on the H200)."""
    rng = np.random.default_rng(n_classes)
    logits, target, weight = _problem(rng, (3, n_classes), ignore_every=3, weighted=True)
    logits = logits.astype(dtype)
    kwargs = dict(label_smoothing=0.1, z_loss=1e-3, softcap=softcap)
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(logits, target, weight=weight,
                                                                 **kwargs)
    loss, grad = api.softmax_cross_entropy(cs.to_device(logits), cs.to_device(target),
                                           weight=cs.to_device(weight), **kwargs)
    _close(cs.to_host(loss), expected_loss, dtype)
    _close(cs.to_host(grad), expected_grad, dtype)


@cs.direct
def test_float16_logits_accumulate_in_float32(api):
    rng = np.random.default_rng(1)
    logits, target, _ = _problem(rng, (4, 9), ignore_every=4)
    logits = logits.astype(np.float16)
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(logits, target)
    loss, grad = api.softmax_cross_entropy(cs.to_device(logits), cs.to_device(target))
    assert cs.to_host(loss).dtype == np.float32 and cs.to_host(grad).dtype == np.float16
    np.testing.assert_allclose(cs.to_host(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(cs.to_host(grad).astype(np.float64), expected_grad, atol=1e-3)


@cs.direct
def test_inplace_overwrites_logits_with_gradient(api):
    rng = np.random.default_rng(2)
    logits, target, _ = _problem(rng, (3, 40))
    _, expected_grad, _ = ref.softmax_cross_entropy(logits, target, label_smoothing=0.1)
    d_logits = cs.to_device(logits)
    loss, grad = api.softmax_cross_entropy(d_logits, cs.to_device(target), inplace=True,
                                           label_smoothing=0.1)
    assert grad is d_logits
    _close(cs.to_host(d_logits), expected_grad, np.float64)


@cs.direct
def test_every_target_ignored_gives_nan_mean_and_zero_grad(api):
    logits = np.random.default_rng(3).normal(size=(3, 5))
    target = np.full(3, -100)
    loss, grad = api.softmax_cross_entropy(cs.to_device(logits), cs.to_device(target))
    assert np.isnan(cs.to_host(loss))
    assert not cs.to_host(grad).any()


@cs.direct
def test_mean_over_targets_weighted_zero_gives_nan_rows_except_ignored(api):
    logits = np.random.default_rng(3).normal(size=(3, 5))
    target = np.array([0, -100, 1])
    weight = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    loss, grad = api.softmax_cross_entropy(cs.to_device(logits), cs.to_device(target),
                                           weight=cs.to_device(weight))
    grad = cs.to_host(grad)
    assert np.isnan(cs.to_host(loss))
    assert np.all(np.isnan(grad[[0, 2]])) and not grad[1].any()


@cs.direct
@pytest.mark.parametrize("shape", [(0, 5), (0, 40, 3), (2, 5, 0)])
@pytest.mark.parametrize("prob", [False, True])
def test_empty_batch_gives_what_the_host_gives(api, shape, prob):
    """No sample: nothing is launched that would read sample 0 (the idle threads of a launch
    do), "mean" is NaN, "sum" 0, "none" and the gradients empty, as on the host."""
    import fusedgrad as fg
    logits = np.zeros(shape)
    target = np.zeros(shape) if prob else np.zeros((shape[0],) + shape[2:], np.int64)
    d_logits, d_target = cs.to_device(logits), cs.to_device(target)
    for reduction in ("mean", "sum", "none"):
        host_loss, host_grad = fg.softmax_cross_entropy(logits, target, reduction=reduction)
        loss, grad = api.softmax_cross_entropy(d_logits, d_target, reduction=reduction)
        np.testing.assert_array_equal(cs.to_host(loss), host_loss)
        assert grad.shape == host_grad.shape
        loss, lse = api.softmax_cross_entropy_forward(d_logits, d_target, reduction=reduction)
        np.testing.assert_array_equal(cs.to_host(loss), host_loss)
        upstream = cs.to_device(np.zeros(lse.shape)) if reduction == "none" else 1.0
        grad = api.softmax_cross_entropy_backward(upstream, d_logits, d_target, lse,
                                                  reduction=reduction)
        assert grad.shape == shape


@cs.direct
@pytest.mark.parametrize("reduction,prob", [("mean", False), ("sum", False), ("mean", True)])
def test_upstream_gradient_on_the_device_gives_the_host_scalars_bits(api, reduction, prob):
    """Autograd hands the backward its upstream gradient as a one-value device array, which the
    kernels read on the device (no wait for it): the same bits as the same value from the host,
    with the "mean" denominator kept on the device too; and the forward's 0-d loss."""
    rng = np.random.default_rng(11)
    logits, target, weight = _problem(rng, (6, 7), prob=prob, ignore_every=0 if prob else 2,
                                      weighted=True)
    d_logits, d_target, d_weight = (cs.to_device(a) for a in (logits, target, weight))
    kwargs = dict(weight=d_weight, reduction=reduction)
    loss, lse = api.softmax_cross_entropy_forward(d_logits, d_target, **kwargs)
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(logits, target, weight=weight,
                                                                reduction=reduction)
    assert cs.to_host(loss).shape == ()
    _close(cs.to_host(loss), expected_loss, np.float64)
    from_host = api.softmax_cross_entropy_backward(2.5, d_logits, d_target, lse, **kwargs)
    from numba import cuda  # cs.to_device makes 0-d arrays 1-d (np.ascontiguousarray)
    on_device = api.softmax_cross_entropy_backward(cuda.to_device(np.array(2.5)), d_logits,
                                                   d_target, lse, **kwargs)
    assert cs.to_host(on_device).tobytes() == cs.to_host(from_host).tobytes()
    _close(cs.to_host(from_host), 2.5 * expected_grad, np.float64)
    # the (1,) form fusedgrad.torch passes for a 0-d CUDA tensor
    from fusedgrad import cross_entropy as api_module
    call = api_module.prepare(d_logits, d_target, d_weight, -100, reduction, 0.0, 0.0)
    scales = [call.backend.sample_scale(upstream, call.denominator, call.n_samples)
              for upstream in (2.5, cs.to_device(np.array([2.5])))]
    assert cs.to_host(scales[0]).tobytes() == cs.to_host(scales[1]).tobytes()


@cs.direct
def test_masked_and_huge_logits(api):
    logits = np.array([[1e4, -np.inf, 1e4 - 1.0, 0.0], [-np.inf, 2.0, -np.inf, 1.0],
                       [3.0, 3.0, 3.0, 3.0]], dtype=np.float32)
    target = np.array([0, 1, 2])
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(logits, target,
                                                                reduction="none")
    loss, grad = api.softmax_cross_entropy(cs.to_device(logits), cs.to_device(target),
                                           reduction="none")
    _close(cs.to_host(loss), expected_loss, np.float32)
    _close(cs.to_host(grad), expected_grad, np.float32)


@cs.direct
def test_strided_logits_and_spatial_class_axis(api):
    rng = np.random.default_rng(4)
    base = rng.normal(size=(4, 12, 5))
    logits = base[:, ::2, :]  # class axis strided by 2 * S elements
    target = rng.integers(0, 6, size=(4, 5))
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(logits, target, z_loss=0.1)
    d_base = cs.to_device(base)
    loss, grad = api.softmax_cross_entropy(d_base[:, ::2, :], cs.to_device(target), z_loss=0.1)
    _close(cs.to_host(loss), expected_loss, np.float64)
    _close(cs.to_host(grad), expected_grad, np.float64)


@cs.direct
def test_out_of_range_target_raises_before_writing(api):
    logits = np.zeros((2, 3))
    out = cs.to_device(np.full((2, 3), 7.0))
    with pytest.raises(ValueError, match="target"):
        api.softmax_cross_entropy(cs.to_device(logits), cs.to_device(np.array([0, 3])), out=out)
    assert (cs.to_host(out) == 7.0).all()


@cs.direct
def test_results_are_bitwise_reproducible(api):
    rng = np.random.default_rng(5)
    logits, target, weight = _problem(rng, (6, 70), weighted=True, ignore_every=4)
    d = [cs.to_device(a) for a in (logits.astype(np.float32), target, weight.astype(np.float32))]
    runs = [api.softmax_cross_entropy(d[0], d[1], weight=d[2], label_smoothing=0.1)
            for _ in range(2)]
    assert cs.to_host(runs[0][0]).tobytes() == cs.to_host(runs[1][0]).tobytes()
    assert cs.to_host(runs[0][1]).tobytes() == cs.to_host(runs[1][1]).tobytes()


@cs.direct
def test_host_and_device_arrays_mixed_raise_type_error(api):
    with pytest.raises(TypeError, match="logits"):
        api.softmax_cross_entropy(cs.to_device(np.zeros((2, 3))), np.array([0, 1]))


@cs.real_gpu_only
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_bfloat16_logits_from_pytorch(api, softcap):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    logits, target, _ = _problem(rng, (8, 300), ignore_every=5)
    t_logits, values = cs.torch_bfloat16(logits)
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(values, target,
                                                                label_smoothing=0.1,
                                                                softcap=softcap)
    loss, grad = api.softmax_cross_entropy(t_logits, torch.tensor(target, device="cuda"),
                                           label_smoothing=0.1, softcap=softcap)
    np.testing.assert_allclose(cs.to_host(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(cs.bfloat16_values(grad), expected_grad,
                               atol=1e-2 * np.abs(expected_grad).max())


SOFTCAP_CASES = [
    # shape, prob, reduction, dtype, threads_per_row
    ((5, 7), False, "mean", np.float64, None),      # a thread per sample
    ((3, 40), False, "none", np.float32, None),     # a warp per sample
    ((3, 40), True, "sum", np.float64, 64),         # several warps per sample
    ((4, 6, 3), False, "none", np.float64, None),   # spatial: the class axis strided
    ((4, 6, 3), True, "mean", np.float32, None),
]


@cs.direct
@pytest.mark.parametrize("shape,prob,reduction,dtype,per_row", SOFTCAP_CASES)
def test_softcap_fused_forward_backward_inplace_match_reference(api, shape, prob, reduction,
                                                                dtype, per_row, monkeypatch):
    """Logits capped as c tanh(z / c) in the kernel; gradients with respect to the uncapped
    logits; -inf logits become -c (slope 0)."""
    from fusedgrad.cuda import cross_entropy as backend
    if per_row is not None:
        monkeypatch.setattr(backend, "_threads_per_row", lambda n_classes, n_spatial: per_row)
    rng = np.random.default_rng(shape[1] + 7 * len(shape))
    logits, target, weight = _problem(rng, shape, prob=prob, ignore_every=0 if prob else 3,
                                      weighted=True, scale=4.0)
    logits.reshape(-1)[1::5] = -np.inf
    logits = logits.astype(dtype)
    target = target.astype(dtype) if prob else target
    weight = weight.astype(dtype)
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-3,
                  softcap=2.0)
    expected_loss, expected_grad, expected_lse = ref.softmax_cross_entropy(logits, target,
                                                                           **kwargs)
    d_target = cs.to_device(target)
    kwargs["weight"] = cs.to_device(weight)

    loss, grad = api.softmax_cross_entropy(cs.to_device(logits), d_target, **kwargs)
    _close(cs.to_host(loss), expected_loss, dtype)
    _close(cs.to_host(grad), expected_grad, dtype)
    assert np.all(cs.to_host(grad)[np.isneginf(logits)] == 0)

    loss2, lse = api.softmax_cross_entropy_forward(cs.to_device(logits), d_target, **kwargs)
    _close(cs.to_host(loss2), expected_loss, dtype)
    _close(cs.to_host(lse), expected_lse, dtype)
    grad_loss = (np.linspace(-1.0, 2.0, np.size(expected_lse)).reshape(np.shape(expected_lse))
                 if reduction == "none" else 0.5)
    grad2 = api.softmax_cross_entropy_backward(
        cs.to_device(grad_loss) if reduction == "none" else grad_loss, cs.to_device(logits),
        d_target, lse, **kwargs)
    scale = grad_loss.reshape(grad_loss.shape[:1] + (1,) + grad_loss.shape[1:]) \
        if reduction == "none" else grad_loss
    _close(cs.to_host(grad2), expected_grad * scale, dtype)

    d_logits = cs.to_device(logits)
    _, grad3 = api.softmax_cross_entropy(d_logits, d_target, inplace=True, **kwargs)
    assert grad3 is d_logits
    _close(cs.to_host(d_logits), expected_grad, dtype)



DENSE_CASES = [
    # shape, weighted, reduction, label_smoothing, z_loss, softcap, dtype, threads_per_row
    ((5, 70), False, "mean", 0.0, 0.0, None, np.float32, 32),     # the usual call
    ((4, 70), True, "sum", 0.1, 0.01, None, np.float32, 32),      # every option but the cap
    ((3, 300), True, "none", 0.2, 1e-3, 2.0, np.float32, 64),     # several warps, a cap
    ((9, 45), False, "mean", 0.1, 0.0, 5.0, np.float16, 32),      # 16-bit, unweighted smoothing
    ((2, 33), False, "none", 0.0, 0.0, None, np.float32, 128),    # fewer classes than threads
]


@cs.direct
@pytest.mark.parametrize("shape,weighted,reduction,smoothing,z_loss,softcap,dtype,per_row",
                         DENSE_CASES)
def test_dense_row_kernel_matches_reference(api, monkeypatch, shape, weighted, reduction,
                                            smoothing, z_loss, softcap, dtype, per_row):
    """The dense-row kernel (contiguous rows of 16/32-bit logits, class-index targets): fused,
    forward, backward from the saved lse, and in place, with masked (-inf) and ignored
    samples and a chunk of CHUNK logits per thread that the row does not fill."""
    from fusedgrad.cuda import cross_entropy as backend
    monkeypatch.setattr(backend, "_threads_per_row", lambda n_classes, n_spatial: per_row)
    recorder = _LaunchRecorder(backend._dense_kernel(per_row))
    monkeypatch.setattr(backend, "_dense_kernel", lambda width: recorder)
    rng = np.random.default_rng(shape[1])
    logits, target, weight = _problem(rng, shape, ignore_every=3, weighted=weighted)
    logits[0, 1::4] = -np.inf
    logits[-1] += 1e4 if dtype == np.float32 else 0.0  # large logits: no cancellation
    logits = logits.astype(dtype)
    weight = None if weight is None else weight.astype(dtype)
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=smoothing,
                  z_loss=z_loss, softcap=softcap)
    expected_loss, expected_grad, expected_lse = ref.softmax_cross_entropy(logits, target,
                                                                           **kwargs)
    d_target = cs.to_device(target)
    kwargs["weight"] = None if weight is None else cs.to_device(weight)

    loss, grad = api.softmax_cross_entropy(cs.to_device(logits), d_target, **kwargs)
    _close(cs.to_host(loss), expected_loss, dtype)
    _close(cs.to_host(grad), expected_grad, dtype)
    loss2, lse = api.softmax_cross_entropy_forward(cs.to_device(logits), d_target, **kwargs)
    _close(cs.to_host(loss2), expected_loss, dtype)
    _close(cs.to_host(lse), expected_lse, dtype)
    # the backward from a float64 lse (a float32 one is off by 5e-4 at 1e4): the kernel keeps
    # what rounding the saved lse to float32 loses
    grad_loss = np.linspace(-1.0, 2.0, shape[0]) if reduction == "none" else 0.5
    grad2 = api.softmax_cross_entropy_backward(
        cs.to_device(grad_loss) if reduction == "none" else grad_loss, cs.to_device(logits),
        d_target, cs.to_device(np.asarray(expected_lse, dtype=np.float64)), **kwargs)
    scale = grad_loss[:, None] if reduction == "none" else grad_loss
    _close(cs.to_host(grad2), expected_grad * scale, dtype)
    d_logits = cs.to_device(logits)
    _, grad3 = api.softmax_cross_entropy(d_logits, d_target, inplace=True, **kwargs)
    assert grad3 is d_logits
    assert cs.to_host(d_logits).tobytes() == cs.to_host(grad).tobytes()
    assert len(recorder.launches) == 4
    assert all(arg is not None for args in recorder.launches for arg in args)


@cs.direct
@settings(max_examples=8, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), n_classes=st.sampled_from([33, 64, 255, 256, 257, 300]),
       width=st.sampled_from([32, 64]), smoothing=st.sampled_from([0.0, 0.2]),
       weighted=st.booleans(), softcap=st.sampled_from([None, 3.0]), seed=st.integers(0, 999))
def test_dense_row_kernel_at_chunk_boundaries(n, n_classes, width, smoothing, weighted, softcap,
                                              seed):
    """Row lengths around whole chunks (8 x width classes): no chunk, only a partial one, whole
    ones with and without a partial one after them."""
    import fusedgrad as fg
    from fusedgrad.cuda import cross_entropy as backend
    rng = np.random.default_rng(seed)
    logits, target, weight = _problem(rng, (n, n_classes), ignore_every=3, weighted=weighted)
    logits = logits.astype(np.float32)
    weight = None if weight is None else weight.astype(np.float32)
    kwargs = dict(reduction="none", label_smoothing=smoothing, softcap=softcap)
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(logits, target, weight=weight,
                                                                **kwargs)
    saved = backend._threads_per_row
    backend._threads_per_row = lambda n_classes, n_spatial: width
    try:
        loss, grad = fg.softmax_cross_entropy(
            cs.to_device(logits), cs.to_device(target),
            weight=None if weight is None else cs.to_device(weight), **kwargs)
    finally:
        backend._threads_per_row = saved
    _close(cs.to_host(loss), expected_loss, np.float32)
    _close(cs.to_host(grad), expected_grad, np.float32)

@cs.direct
def test_softcap_float16_accumulates_in_float32(api):
    rng = np.random.default_rng(12)
    logits, target, _ = _problem(rng, (4, 40), ignore_every=4, scale=6.0)
    logits = logits.astype(np.float16)
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(logits, target, softcap=3.0)
    loss, grad = api.softmax_cross_entropy(cs.to_device(logits), cs.to_device(target),
                                           softcap=3.0)
    assert cs.to_host(loss).dtype == np.float32 and cs.to_host(grad).dtype == np.float16
    np.testing.assert_allclose(cs.to_host(loss), expected_loss, rtol=1e-5)
    np.testing.assert_allclose(cs.to_host(grad).astype(np.float64), expected_grad, atol=1e-3)


@cs.direct
def test_bad_softcap_raises_before_writing(api):
    logits = np.zeros((2, 3))
    out = cs.to_device(np.full((2, 3), 7.0))
    for softcap, error in ((0.0, ValueError), (float("nan"), ValueError), ("1", TypeError)):
        with pytest.raises(error, match="softcap"):
            api.softmax_cross_entropy(cs.to_device(logits), cs.to_device(np.array([0, 2])),
                                      out=out, softcap=softcap)
    assert (cs.to_host(out) == 7.0).all()


@cs.direct
@settings(max_examples=6, deadline=None, derandomize=True)
@given(n=st.integers(1, 4), n_classes=st.integers(1, 40), spatial=st.sampled_from([(), (3,)]),
       reduction=st.sampled_from(["mean", "sum", "none"]), smoothing=st.sampled_from([0.0, 0.3]),
       z_loss=st.sampled_from([0.0, 0.05]), weighted=st.booleans(), prob=st.booleans(),
       softcap=st.sampled_from([None, 0.5, 5.0]), seed=st.integers(0, 2**16))
def test_random_shapes_and_options(n, n_classes, spatial, reduction, smoothing, z_loss, weighted,
                                   prob, softcap, seed):
    import fusedgrad as fg
    rng = np.random.default_rng(seed)
    logits, target, weight = _problem(rng, (n, n_classes) + spatial, prob=prob,
                                      ignore_every=0 if prob else 2, weighted=weighted)
    kwargs = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss, softcap=softcap)
    expected_loss, expected_grad, _ = ref.softmax_cross_entropy(logits, target,
                                                                weight=weight, **kwargs)
    loss, grad = fg.softmax_cross_entropy(
        cs.to_device(logits), cs.to_device(target),
        weight=None if weight is None else cs.to_device(weight), **kwargs)
    np.testing.assert_allclose(cs.to_host(loss), expected_loss, rtol=1e-11, atol=1e-12,
                               equal_nan=True)
    np.testing.assert_allclose(cs.to_host(grad), expected_grad, rtol=1e-11, atol=1e-12)


class _LaunchRecorder:
    """Stands in for a ``@cuda.jit`` kernel and records the arguments of every launch."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, config):
        launch = self.kernel[config]

        def run(*args):
            self.launches.append(args)
            return launch(*args)
        return run


@cs.direct
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_kernel_launches_pass_no_none(api, monkeypatch, softcap):
    # numba-cuda compiles a None argument (and the simulator runs it) but a real GPU launch
    # raises NotImplementedError: (none, None); an uncapped call passes the cap as 0.0.
    from fusedgrad.cuda import cross_entropy as ce_cuda
    recorder = _LaunchRecorder(ce_cuda._ce_rows)
    monkeypatch.setattr(ce_cuda, "_ce_rows", recorder)
    logits, target, _ = _problem(np.random.default_rng(5), (4, 6))
    z, t = cs.to_device(logits.astype(np.float32)), cs.to_device(target)
    loss, grad = api.softmax_cross_entropy(z, t, softcap=softcap)
    loss2, lse = api.softmax_cross_entropy_forward(z, t, softcap=softcap)
    api.softmax_cross_entropy_backward(1.0, z, t, lse, softcap=softcap)
    assert len(recorder.launches) == 3
    for args in recorder.launches:
        assert all(arg is not None for arg in args)
        assert args[9] == (0.0 if softcap is None else softcap)
