"""GPU batch normalization (``fusedgrad.cuda.batch_norm``) against the float64 reference.

Runs on a real GPU when there is one, else in Numba's CUDA simulator (in a subprocess, see
``cuda_support``); shapes stay tiny because the simulator runs one Python thread per GPU thread.
Both reduction layouts are exercised (a block per channel over (N, S) positions; 8 or 32
adjacent channels per block for rows / channels-last), with several parts per channel merged in
fixed order, both kernel families (the spatial reduction and elementwise kernels for
unit-stride rows, at both widths, with whole and partial chunks and several rows per part; the
general ones for every other layout), and the fused batch norm + ReLU
(``relu=True`` / ``relu_output=``).
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
    ((2, 3, 9, 9), 1, np.float32, True, True),  # the wide spatial kernel: whole + partial chunks
    ((24, 5), 1, np.float16, True, True),  # the column kernels on half-precision rows
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
@pytest.mark.parametrize("shape,axis,family", [
    ((3, 2, 9, 9), 1, "spatial"), ((5, 4, 4, 3), -1, "columns"), ((300, 5), 1, "columns")])
def test_layout_kernels_loop_over_many_rows_and_chunks(api, monkeypatch, shape, axis, family):
    """Long parts and a one-row grid make every thread of the spatial and column kernels walk
    many rows and chunks (the test shapes otherwise give one chunk per thread): forward and
    backward with the fused ReLU still match the reference."""
    from fusedgrad.cuda import batch_norm as backend
    monkeypatch.setattr(backend, "_ITEMS_PER_THREAD", 512)
    monkeypatch.setattr(backend, "_MAX_GRID_Y", 1)
    monkeypatch.setattr(backend, "_SPATIAL_MAX_BLOCKS", 1)
    launched = []
    family_of = backend._kernel_family
    monkeypatch.setattr(backend, "_kernel_family",
                        lambda arrays: launched.append(family_of(arrays)[0]) or family_of(arrays))
    rng = np.random.default_rng(len(shape))
    x = (rng.normal(size=shape) * 2 + 3).astype(np.float32)
    dy = rng.normal(size=shape).astype(np.float32)
    y_ref, mean_ref, invstd_ref, _ = ref.batch_norm_forward(
        x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, channel_axis=axis)
    y, mean, invstd = api.batch_norm_forward(cs.to_device(x), channel_axis=axis, relu=True)
    _check(y, np.maximum(y_ref, 0.0), np.float32)
    _check(mean, mean_ref, np.float32)
    dy_masked = np.where(y_ref > 0, dy, 0.0)
    dx_ref, _, _ = ref.batch_norm_backward(dy_masked, x, mean_ref, invstd_ref, None,
                                           training=True, channel_axis=axis)
    dx, _, _ = api.batch_norm_backward(cs.to_device(dy), cs.to_device(x), mean, invstd,
                                       channel_axis=axis, relu_output=y)
    _check(dx, dx_ref, np.float32)
    assert launched and set(launched) == {family}


@cs.direct
def test_stand_ins_for_absent_arguments_are_shared_and_never_written(api):
    """Absent weight, bias and running buffers (and the statistics' unused arguments) are
    cached stand-in arrays: the same object from call to call, and still zero afterwards."""
    from fusedgrad.cuda import _arrays
    rng = np.random.default_rng(9)
    before = {dtype: _arrays.stand_in(dtype) for dtype in (np.float64, np.int64)}
    for shape, axis in (((3, 4, 5), 1), ((6, 4), 1), ((2, 3, 3, 4), -1)):
        x = cs.to_device(rng.normal(size=shape).astype(np.float32))
        y, mean, invstd = api.batch_norm_forward(x, channel_axis=axis)
        api.batch_norm_backward(x, x, mean, invstd, channel_axis=axis)
        api.softmax_cross_entropy(cs.to_device(rng.normal(size=(4, 40)).astype(np.float32)),
                                  cs.to_device(rng.dirichlet(np.ones(40), size=4)
                                               .astype(np.float32)))
    for dtype, array in before.items():
        assert _arrays.stand_in(dtype) is array
        assert not cs.to_host(array).any()

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
@pytest.mark.parametrize("relu", [False, True])
def test_results_are_bitwise_reproducible(api, relu):
    rng = np.random.default_rng(10)
    x = cs.to_device(rng.normal(size=(9, 5, 7)).astype(np.float32))
    dy = cs.to_device(rng.normal(size=(9, 5, 7)).astype(np.float32))
    outputs = []
    for _ in range(2):
        y, mean, invstd = api.batch_norm_forward(x, relu=relu)
        dx, dweight, dbias = api.batch_norm_backward(dy, x, mean, invstd,
                                                     relu_output=y if relu else None)
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


@cs.direct
@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4, 4), 1), ((2, 3, 0, 0), 1),
                                        ((0, 4, 3), -1)])
def test_empty_batch_in_eval_gives_empty_outputs_and_zero_parameter_grads(api, shape, axis):
    """No value per channel: eval normalises nothing and the parameter gradients are sums of
    nothing (zeros), as on the host; no launch reads x[0] for its idle threads."""
    x, dy = np.zeros(shape), np.zeros(shape)
    stats = (cs.to_device(np.zeros(3)), cs.to_device(np.ones(3)))
    weight = cs.to_device(np.ones(3))
    y = api.batch_norm_forward(cs.to_device(x), weight, None, *stats, training=False,
                               channel_axis=axis)[0]
    assert y.shape == shape
    dx, dweight, dbias = api.batch_norm_backward(cs.to_device(dy), cs.to_device(x), *stats,
                                                 weight, training=False, channel_axis=axis)
    assert dx.shape == shape
    assert not cs.to_host(dweight).any() and not cs.to_host(dbias).any()


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


RELU_CASES = [
    # shape, channel_axis, dtype, training: NCHW with one or several channels per block, rows,
    # channels-last, eval; float16 reads and writes half precision, sums in float32
    ((4, 3, 5), 1, np.float64, True),
    ((6, 2, 37), 1, np.float32, True),
    ((40, 3), -1, np.float32, True),
    ((3, 2, 2, 4), -1, np.float64, True),
    ((2, 3, 2, 3), 1, np.float32, False),
    ((6, 3, 4), 1, np.float16, True),
    ((2, 2, 9, 9), 1, np.float32, True),
]


def _relu_inputs(rng, shape, axis, dtype):
    n_channels = shape[axis]
    x = (rng.normal(size=shape) * 2 + 1).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    # Some of every channel's outputs on each side of the ReLU's kink...
    weight = (rng.uniform(0.5, 1.5, size=n_channels) * (-1.0) ** np.arange(n_channels))
    bias = rng.uniform(-0.5, 0.5, size=n_channels)
    weight[0] = bias[0] = 0.0  # ...but channel 0's: y = 0 exactly, an exact-zero pre-activation
    weight, bias = weight.astype(dtype), bias.astype(dtype)
    running_mean = rng.normal(size=n_channels).astype(dtype)
    running_var = rng.uniform(1, 2, size=n_channels).astype(dtype)
    return x, dy, weight, bias, running_mean, running_var


@cs.direct
@pytest.mark.parametrize("shape,axis,dtype,training", RELU_CASES)
def test_fused_relu_matches_reference_and_cpu(api, shape, axis, dtype, training):
    """relu=True gives max(BN(x), 0) (the float64 reference with the ReLU applied, the CPU
    kernels' result, and bit for bit the clamped output of the plain GPU forward); the
    backward with relu_output= gives the reference gradients of dy masked where y > 0 (y == 0
    masked too), and bit for bit the plain GPU backward of that masked dy."""
    rng = np.random.default_rng(sum(shape) + 100)
    x, dy, weight, bias, rm, rv = _relu_inputs(rng, shape, axis, dtype)
    kw = dict(training=training, momentum=0.1, eps=1e-5, channel_axis=axis)
    y_ref, mean_ref, invstd_ref, _ = ref.batch_norm_forward(x, weight, bias, rm, rv, **kw)
    d_x, d_w, d_b = cs.to_device(x), cs.to_device(weight), cs.to_device(bias)
    y, mean, invstd = api.batch_norm_forward(d_x, d_w, d_b, cs.to_device(rm), cs.to_device(rv),
                                             relu=True, **kw)
    y_plain, _, _ = api.batch_norm_forward(d_x, d_w, d_b, cs.to_device(rm), cs.to_device(rv),
                                           **kw)
    host_y = cs.to_host(y)
    _check(y, np.maximum(y_ref, 0.0), dtype)
    assert host_y.tobytes() == np.maximum(cs.to_host(y_plain), 0).astype(dtype).tobytes()
    assert (host_y >= 0).all()
    channel0 = np.moveaxis(host_y, axis, 0)[0]
    assert (channel0 == 0).all()  # weight 0, bias 0: the exact-zero pre-activation
    if dtype != np.float16:  # the CPU kernels take float32 and float64 only
        y_cpu, _, _ = api.batch_norm_forward(x, weight, bias, rm.copy(), rv.copy(), relu=True,
                                             **kw)
        np.testing.assert_allclose(host_y.astype(np.float64), y_cpu, **TOL[dtype])

    masked = np.where(host_y > 0, dy, np.zeros_like(dy))
    assert (host_y == 0).any() and (host_y > 0).any()
    dx_ref, dw_ref, db_ref = ref.batch_norm_backward(
        masked, x, mean_ref, invstd_ref, weight, training=training, channel_axis=axis)
    dx, dweight, dbias = api.batch_norm_backward(cs.to_device(dy), d_x, mean, invstd, d_w,
                                                 training=training, channel_axis=axis,
                                                 relu_output=y)
    tol = dict(rtol=5e-2, atol=5e-2) if dtype == np.float16 else TOL[dtype]
    for actual, expected in ((dx, dx_ref), (dweight, dw_ref), (dbias, db_ref)):
        np.testing.assert_allclose(cs.to_host(actual).astype(np.float64), expected, **tol)
    # Channel 0 is masked entirely: no gradient reaches it.
    assert cs.to_host(dbias)[0] == 0 and cs.to_host(dweight)[0] == 0
    assert not np.moveaxis(cs.to_host(dx), axis, 0)[0].any()
    plain = api.batch_norm_backward(cs.to_device(masked), d_x, mean, invstd, d_w,
                                    training=training, channel_axis=axis)
    for fused, unfused in zip((dx, dweight, dbias), plain):
        assert cs.to_host(fused).tobytes() == cs.to_host(unfused).tobytes()
    if dtype != np.float16:
        cpu = api.batch_norm_backward(dy, x, cs.to_host(mean), cs.to_host(invstd), weight,
                                      training=training, channel_axis=axis, relu_output=host_y)
        for actual, expected in zip((dx, dweight, dbias), cpu):
            np.testing.assert_allclose(cs.to_host(actual), expected, **TOL[dtype])


@cs.direct
def test_fused_relu_masks_exact_zero_outputs_in_eval(api):
    """x equal to the running mean gives y = +0 exactly (no bias): the backward masks dy there,
    as the ReLU's backward does (its gradient at 0 is 0, as in torch.relu); NaN stays NaN."""
    x = np.array([[0.5, -1.0, 0.5, 2.0], [3.0, 0.5, -0.25, 0.5]]).reshape(2, 1, 4)
    x = np.concatenate([x, x[:, :, ::-1] - 0.5], axis=1)  # (2, 2, 4); channel 1 centre 0
    x[1, 1, 3] = np.nan
    rm, rv = np.array([0.5, 0.0]), np.array([1.0, 4.0])
    dy = np.arange(1.0, 17.0).reshape(2, 2, 4)
    d_x = cs.to_device(x)
    y, mean, invstd = api.batch_norm_forward(d_x, running_mean=cs.to_device(rm),
                                             running_var=cs.to_device(rv), training=False,
                                             relu=True)
    host_y = cs.to_host(y)
    y_cpu, _, _ = api.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False,
                                         relu=True)
    assert host_y.tobytes() == y_cpu.tobytes()
    assert np.isnan(host_y[1, 1, 3]) and np.isnan(host_y).sum() == 1
    zeros = x == rm[None, :, None]
    assert zeros.sum() == 8 and (host_y[zeros] == 0).all()
    dx, dweight, dbias = api.batch_norm_backward(cs.to_device(dy), d_x, mean, invstd,
                                                 training=False, relu_output=y)
    keep = host_y > 0  # NaN and exact zeros are masked
    expected = np.where(keep, dy * cs.to_host(invstd)[None, :, None], 0.0)
    expected[1, 1, 3] = np.nan  # x itself NaN: 0 * (x - mean) is NaN, as on the CPU
    np.testing.assert_array_equal(cs.to_host(dx), expected)
    np.testing.assert_array_equal(cs.to_host(dbias), np.where(keep, dy, 0.0).sum(axis=(0, 2)))


@cs.direct
def test_fused_relu_split_building_blocks_compose_to_fused(api):
    """normalize(relu=True) is forward(relu=True)'s y, and backward_elementwise(relu_output3=)
    on the sums of the masked dy is backward(relu_output3=)'s dx, bit for bit."""
    from fusedgrad.cuda import _arrays
    from fusedgrad.cuda import batch_norm as backend
    rng = np.random.default_rng(17)
    x3 = rng.normal(size=(3, 4, 6)).astype(np.float32)
    dy3 = rng.normal(size=(3, 4, 6)).astype(np.float32)
    weight = cs.to_device(rng.normal(size=4).astype(np.float32))
    bias = cs.to_device(rng.normal(size=4).astype(np.float32))
    d_x, d_dy = cs.to_device(x3), cs.to_device(dy3)

    y_fused = _arrays.empty(x3.shape, np.float32)
    mean, invstd = backend.forward(d_x, weight, bias, None, None, y_fused, training=True,
                                   momentum=0.1, eps=1e-5, relu=True)
    count, mean64, m2 = backend.channel_stats(d_x)
    invstd64 = cs.to_device(1.0 / np.sqrt(cs.to_host(m2) / count + 1e-5))
    y_split = backend.normalize(d_x, mean64, invstd64, weight, bias,
                                _arrays.empty(x3.shape, np.float32), relu=True)
    assert cs.to_host(y_split).tobytes() == cs.to_host(y_fused).tobytes()
    host_y = cs.to_host(y_fused)
    assert (host_y == 0).any() and (host_y > 0).any()

    dx_fused = _arrays.empty(x3.shape, np.float32)
    dweight, dbias = backend.backward(d_dy, d_x, mean, invstd, weight, dx_fused, training=True,
                                      relu_output3=y_fused)
    masked = cs.to_device(np.where(host_y > 0, dy3, np.float32(0)))
    sum_dy, sum_dy_xhat = backend.backward_reduce(masked, d_x, mean, invstd)
    dx_split = backend.backward_elementwise(d_dy, d_x, mean, invstd, weight, sum_dy, sum_dy_xhat,
                                            count, _arrays.empty(x3.shape, np.float32),
                                            relu_output3=y_fused)
    assert cs.to_host(dx_split).tobytes() == cs.to_host(dx_fused).tobytes()
    np.testing.assert_array_equal(cs.to_host(dbias), cs.to_host(sum_dy).astype(np.float32))
    with pytest.raises(ValueError, match="relu_output3"):
        backend.backward(d_dy, d_x, mean, invstd, weight, dx_fused, training=True,
                         relu_output3=cs.to_device(host_y[:2]))


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
