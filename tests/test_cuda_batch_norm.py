"""GPU batch normalization (``fusedgrad.cuda.batch_norm``) against the float64 reference.

Runs on a real GPU when there is one, else in Numba's CUDA simulator (in a subprocess, see
``cuda_support``); shapes stay tiny because the simulator runs one Python thread per GPU thread.
Both reduction layouts are exercised (a block per channel over (N, S) positions; 8 or 32
adjacent channels per block for rows / channels-last), with several parts per channel merged in
fixed order.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import cuda_support as cs
from cuda_support import api  # noqa: F401  (fixture)
from fusedgrad import reference as ref

test_kernels_in_simulator = cs.simulator_test(__file__)


TOL = {np.float64: dict(rtol=1e-11, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-5),
       np.float16: dict(rtol=1e-2, atol=1e-2)}


def _check(actual, expected, dtype):
    np.testing.assert_allclose(cs.to_host(actual).astype(np.float64), expected, **TOL[dtype])


CASES = [
    # shape, channel_axis, dtype, affine, training
    ((4, 3, 5), 1, np.float64, True, True),
    ((6, 5), 1, np.float32, True, True),
    ((3, 2, 2, 4), -1, np.float64, False, True),
    ((2, 3, 2, 3), 1, np.float32, True, False),
    ((40, 3), -1, np.float32, True, True),
    ((5, 2, 37), 1, np.float64, True, True),
]


@cs.direct
@pytest.mark.parametrize("shape,axis,dtype,affine,training", CASES)
def test_forward_backward_match_reference(api, shape, axis, dtype, affine, training):
    rng = np.random.default_rng(sum(shape))
    x = (rng.normal(size=shape) * 2 + 3).astype(dtype)
    n_channels = shape[axis]
    weight = rng.normal(size=n_channels).astype(dtype) if affine else None
    bias = rng.normal(size=n_channels).astype(dtype) if affine else None
    running_mean = rng.normal(size=n_channels).astype(dtype)
    running_var = rng.uniform(1, 2, size=n_channels).astype(dtype)
    y_ref, mean_ref, invstd_ref, running_ref = ref.batch_norm_forward(
        x, weight, bias, running_mean, running_var, training=training, momentum=0.1, eps=1e-5,
        channel_axis=axis)
    d_rm, d_rv = cs.to_device(running_mean), cs.to_device(running_var)
    dev = (lambda a: None if a is None else cs.to_device(a))
    y, mean, invstd = api.batch_norm_forward(cs.to_device(x), dev(weight), dev(bias), d_rm, d_rv,
                                             training=training, momentum=0.1, eps=1e-5,
                                             channel_axis=axis)
    _check(y, y_ref, dtype)
    _check(mean, mean_ref, dtype)
    _check(invstd, invstd_ref, dtype)
    if training:
        _check(d_rm, running_ref[0], dtype)
        _check(d_rv, running_ref[1], dtype)
    else:
        assert cs.to_host(d_rm).tobytes() == running_mean.tobytes()

    dy = rng.normal(size=shape).astype(dtype)
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, weight,
                                                     training=training, channel_axis=axis)
    dx, dweight, dbias = api.batch_norm_backward(cs.to_device(dy), cs.to_device(x), mean, invstd,
                                                 dev(weight), training=training,
                                                 channel_axis=axis)
    _check(dx, dx_ref, dtype)
    _check(dweight, dw_ref, dtype)
    _check(dbias, db_ref, dtype)
    assert cs.to_host(dweight).dtype == (np.float64 if dtype == np.float64 else np.float32)


@cs.direct
def test_split_building_blocks_compose_to_fused(api):
    from fusedgrad.cuda import _arrays
    from fusedgrad.cuda import batch_norm as backend
    rng = np.random.default_rng(7)
    x3 = rng.normal(size=(3, 4, 6)).astype(np.float32)
    dy3 = rng.normal(size=(3, 4, 6)).astype(np.float32)
    weight = cs.to_device(rng.normal(size=4).astype(np.float32))
    d_x, d_dy = cs.to_device(x3), cs.to_device(dy3)

    y_fused = _arrays.empty(x3.shape, np.float32)
    mean, invstd = backend.forward(d_x, weight, None, None, None, y_fused, training=True,
                                   momentum=0.1, eps=1e-5)
    count, mean64, m2 = backend.channel_stats(d_x)
    assert count == 18
    invstd64 = cs.to_device(1.0 / np.sqrt(cs.to_host(m2) / count + 1e-5))
    y_split = backend.normalize(d_x, mean64, invstd64, weight, None,
                                _arrays.empty(x3.shape, np.float32))
    assert cs.to_host(y_split).tobytes() == cs.to_host(y_fused).tobytes()

    dx_fused = _arrays.empty(x3.shape, np.float32)
    dweight, dbias = backend.backward(d_dy, d_x, mean, invstd, weight, dx_fused, training=True)
    sum_dy, sum_dy_xhat = backend.backward_reduce(d_dy, d_x, mean, invstd)
    dx_split = backend.backward_elementwise(d_dy, d_x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                            count, _arrays.empty(x3.shape, np.float32))
    assert cs.to_host(dx_split).tobytes() == cs.to_host(dx_fused).tobytes()
    np.testing.assert_array_equal(cs.to_host(dbias), cs.to_host(sum_dy).astype(np.float32))
    np.testing.assert_array_equal(cs.to_host(dweight),
                                  cs.to_host(sum_dy_xhat).astype(np.float32))


@cs.direct
def test_float16_input_float32_statistics(api):
    rng = np.random.default_rng(8)
    x = rng.normal(size=(6, 3, 4)).astype(np.float16)
    y_ref, mean_ref, invstd_ref, _ = ref.batch_norm_forward(x, None, None, None, None)
    y, mean, invstd = api.batch_norm_forward(cs.to_device(x))
    assert cs.to_host(y).dtype == np.float16 and cs.to_host(mean).dtype == np.float32
    _check(y, y_ref, np.float16)
    np.testing.assert_allclose(cs.to_host(mean), mean_ref, rtol=1e-5, atol=1e-6)


@cs.direct
def test_large_mean_and_constant_channel_in_float32(api):
    rng = np.random.default_rng(9)
    x = np.empty((16, 2, 3), dtype=np.float32)
    x[:, 0] = 1e4 + rng.normal(size=(16, 3))
    x[:, 1] = 5.0
    y_ref, mean_ref, invstd_ref, _ = ref.batch_norm_forward(x, None, None, None, None)
    y, mean, invstd = api.batch_norm_forward(cs.to_device(x))
    host_y = cs.to_host(y)
    assert np.isfinite(host_y).all() and not host_y[:, 1].any()
    np.testing.assert_allclose(host_y[:, 0], y_ref[:, 0], atol=2e-3)
    np.testing.assert_allclose(cs.to_host(invstd), invstd_ref, rtol=1e-3)


@cs.direct
def test_results_are_bitwise_reproducible(api):
    rng = np.random.default_rng(10)
    x = cs.to_device(rng.normal(size=(9, 5, 7)).astype(np.float32))
    dy = cs.to_device(rng.normal(size=(9, 5, 7)).astype(np.float32))
    outputs = []
    for _ in range(2):
        y, mean, invstd = api.batch_norm_forward(x)
        dx, dweight, dbias = api.batch_norm_backward(dy, x, mean, invstd)
        outputs.append(b"".join(cs.to_host(a).tobytes() for a in (y, mean, invstd, dx, dweight,
                                                                    dbias)))
    assert outputs[0] == outputs[1]


class _ReadOnlyExport:
    """A device array's memory exported read-only through ``__cuda_array_interface__``."""

    def __init__(self, array):
        self._array = array

    @property
    def __cuda_array_interface__(self):
        desc = dict(self._array.__cuda_array_interface__)
        desc["data"] = (desc["data"][0], True)
        return desc


def _read_only(device_array):
    """``device_array`` as a read-only device array: under the simulator its host memory made
    read-only (simulated arrays have no ``__cuda_array_interface__``), else a read-only export."""
    if cs.SIMULATED:
        device_array._ary.flags.writeable = False
        return device_array
    return _ReadOnlyExport(device_array)


@cs.direct
def test_out_and_running_buffers_are_checked_as_on_the_cpu(api):
    """out= must be writeable and must not overlap an input, and running buffers updated in
    training must be writeable, on the GPU as on the CPU; nothing is written before the
    checks pass."""
    rng = np.random.default_rng(13)
    x_host, dy_host = rng.normal(size=(4, 3, 5)), rng.normal(size=(4, 3, 5))
    x, dy = cs.to_device(x_host), cs.to_device(dy_host)
    running_mean, running_var = cs.to_device(np.zeros(3)), cs.to_device(np.ones(3))
    with pytest.raises(ValueError, match="out must not share memory with x"):
        api.batch_norm_forward(x, running_mean=running_mean, running_var=running_var, out=x)
    frozen = _read_only(cs.to_device(np.full((4, 3, 5), 7.0)))
    with pytest.raises(ValueError, match="out must be writeable"):
        api.batch_norm_forward(x, running_mean=running_mean, running_var=running_var,
                               out=frozen)
    with pytest.raises(ValueError, match="running_var must be writeable"):
        api.batch_norm_forward(x, running_mean=running_mean,
                               running_var=_read_only(cs.to_device(np.ones(3))))
    assert (cs.to_host(running_mean) == 0.0).all() and (cs.to_host(running_var) == 1.0).all()
    assert (cs.to_host(x) == x_host).all()

    _, mean, invstd = api.batch_norm_forward(x)
    with pytest.raises(ValueError, match="out must not share memory with dy"):
        api.batch_norm_backward(dy, x, mean, invstd, out=dy)
    with pytest.raises(ValueError, match="out must be writeable"):
        api.batch_norm_backward(dy, x, mean, invstd, out=frozen)
    assert (cs.to_host(dy) == dy_host).all()
    out = cs.to_device(np.full((4, 3, 5), 7.0))
    dx, _, _ = api.batch_norm_backward(dy, x, mean, invstd, out=out)
    assert dx is out


@cs.direct
def test_fused_relu_is_cpu_only_and_says_so(api):
    x = cs.to_device(np.arange(24.0).reshape(4, 3, 2))
    with pytest.raises(NotImplementedError, match="CPU kernels only"):
        api.batch_norm_forward(x, relu=True)
    y, mean, invstd = api.batch_norm_forward(x)
    with pytest.raises(NotImplementedError, match="CPU kernels only"):
        api.batch_norm_backward(x, x, mean, invstd, relu_output=y)


@cs.real_gpu_only
def test_bfloat16_input_from_pytorch(api):
    rng = np.random.default_rng(12)
    t_x, values = cs.torch_bfloat16(rng.normal(size=(8, 3, 16)) + 2.0)
    y_ref, mean_ref, _, _ = ref.batch_norm_forward(values, None, None, None, None)
    y, mean, invstd = api.batch_norm_forward(t_x)
    np.testing.assert_allclose(cs.to_host(mean), mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cs.bfloat16_values(y), y_ref, atol=3e-2)


@cs.direct
@settings(max_examples=6, deadline=None, derandomize=True)
@given(shape=st.lists(st.integers(1, 5), min_size=2, max_size=4).map(tuple),
       channels_last=st.booleans(), affine=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(shape, channels_last, affine, seed):
    axis = -1 if channels_last else 1
    n_channels = shape[axis]
    assume(np.prod(shape) // n_channels >= 2)
    import fusedgrad as fg
    rng = np.random.default_rng(seed)
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    weight = rng.normal(size=n_channels) if affine else None
    y_ref, mean_ref, invstd_ref, _ = ref.batch_norm_forward(x, weight, None, None, None,
                                                            channel_axis=axis)
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(dy, x, mean_ref, invstd_ref, weight,
                                                     channel_axis=axis)
    d_weight = None if weight is None else cs.to_device(weight)
    y, mean, invstd = fg.batch_norm_forward(cs.to_device(x), d_weight, channel_axis=axis)
    dx, dweight, dbias = fg.batch_norm_backward(cs.to_device(dy), cs.to_device(x), mean,
                                                invstd, d_weight, channel_axis=axis)
    for actual, expected in ((y, y_ref), (dx, dx_ref), (dweight, dw_ref), (dbias, db_ref)):
        _check(actual, expected, np.float64)
