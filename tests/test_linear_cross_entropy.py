"""fg.linear_cross_entropy and fusedgrad.torch.linear_cross_entropy on the CPU.

Oracles: the float64 reference (``reference.linear_cross_entropy``: the whole logits, then the
reference cross-entropy), PyTorch's ``F.linear_cross_entropy`` (its reference path, and its own
chunked path where it takes the case), the unfused composite
``F.cross_entropy(F.linear(x, W, b), t)`` under autograd, and float64 finite differences. The
chunk sizes include 1, sizes that do not divide N and sizes above N; the memory goal (extra
memory at most 1/8 of the logits) is measured with tracemalloc. The GPU path is tested in
``test_cuda_linear_cross_entropy.py``.
"""
import contextlib
import tracemalloc
import warnings

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracles import assert_close_scaled, central_differences
import fusedgrad as fg
import fusedgrad.torch as fgt
from fusedgrad import _matmul, linear_ce, reference
from fusedgrad.cpu import _arrays as host_arrays
from fusedgrad.cpu import cross_entropy as host_ce

RTOL = {np.float64: 1e-11, np.float32: 2e-5}
ATOL = {np.float64: 1e-12, np.float32: 2e-6}


def make_problem(n, d, c, *, dtype=np.float64, target_kind="index", ignore_every=3, seed=0):
    """input (n, d), linear_weight (c, d), linear_bias (c,), target, class weight (c,)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(dtype)
    w = (rng.standard_normal((c, d)) / np.sqrt(max(d, 1))).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    if target_kind == "index":
        target = rng.integers(0, c, n)
        if ignore_every:
            target[::ignore_every] = -100
    else:
        target = rng.random((n, c))
        target = (target / target.sum(axis=1, keepdims=True)).astype(dtype)
    weight = rng.uniform(0.5, 2.0, c).astype(dtype)
    return x, w, b, target, weight


def assert_close(actual, expected, dtype, what):
    assert_close_scaled(actual, expected, RTOL[dtype], ATOL[dtype], what)


def assert_all_close(results, expected, dtype):
    """The four results of linear_cross_entropy against the reference's four."""
    for name, actual, wanted in zip(("loss", "grad_input", "grad_linear_weight",
                                     "grad_linear_bias"), results, expected):
        if wanted is None:
            assert actual is None, name
        elif np.all(np.isnan(wanted)):
            assert np.all(np.isnan(actual)), name
        else:
            assert_close(actual, wanted, dtype, name)


def upstream_for(reduction, n, seed=7):
    """A grad_loss other than 1: a scalar for "mean"/"sum", one value per row for "none"."""
    if reduction == "none":
        return np.random.default_rng(seed).uniform(-1.0, 2.0, n)
    return 0.75


# --------------------------------------------------------------------------------------------
# Against the float64 reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 100])
def test_matches_reference(dtype, target_kind, reduction, with_bias, chunk_size):
    x, w, b, target, weight = make_problem(23, 5, 17, dtype=dtype, target_kind=target_kind)
    options = dict(linear_bias=b if with_bias else None, weight=weight, reduction=reduction,
                   label_smoothing=0.1, z_loss=1e-3, grad_loss=upstream_for(reduction, 23))
    results = fg.linear_cross_entropy(x, w, target, chunk_size=chunk_size, **options)
    assert_all_close(results, reference.linear_cross_entropy(x, w, target, **options), dtype)
    loss, grad_input, grad_weight, grad_bias = results
    stat = np.float64 if dtype == np.float64 else np.float32
    assert loss.dtype == stat and loss.shape == ((23,) if reduction == "none" else ())
    assert grad_input.dtype == dtype and grad_input.shape == x.shape
    assert grad_weight.dtype == stat and grad_weight.shape == w.shape
    assert grad_bias is None if not with_bias else grad_bias.shape == (17,)


@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_reference_matches_torch(target_kind, reduction):
    x, w, b, target, weight = make_problem(9, 4, 7, target_kind=target_kind, seed=1)
    upstream = upstream_for(reduction, 9)
    expected = torch_results(F.linear_cross_entropy, x, w, b, target, upstream,
                             weight=torch.tensor(weight), reduction=reduction,
                             label_smoothing=0.2)
    assert_all_close(reference.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight,
                                                    reduction=reduction, label_smoothing=0.2,
                                                    grad_loss=upstream),
                     expected, np.float64)


def test_default_chunk_rows_rule():
    rows = linear_ce.default_chunk_rows
    # In place: the buffer takes the whole 1/8 of the logits but the per-row float64 arrays.
    assert rows(2048, 32000, 4, True) == 251
    assert rows(512, 4096, 4, True) == 59
    # Accumulating through a temporary of half the buffer: 2/3 of that.
    assert rows(2048, 32000, 4, False) == 167
    # ... or through a temporary of at most 4 MiB (the host's), whichever leaves more rows.
    assert rows(2048, 32000, 4, False, 4 << 20) == 218
    assert rows(512, 4096, 4, False, 4 << 20) == 39           # half the buffer is smaller
    assert rows(100_000, 32000, 4, True) == 524       # 64 MiB of logits per chunk
    assert rows(100_000, 512_000, 4, True) == 32      # wide rows: MIN_CHUNK_ROWS
    assert rows(64, 500, 4, True) == 32               # small batches too
    assert rows(10, 50, 8, True) == 10                # ... or the whole batch
    for n, c, itemsize in [(512, 4096, 4), (2048, 32000, 4), (3000, 1000, 8),
                           (8192, 128256, 4)]:
        reserve = n * linear_ce.ROW_BYTES + c * linear_ce.CLASS_BYTES
        for in_place, scratch in [(True, None), (False, None), (False, 4 << 20)]:
            buffer = rows(n, c, itemsize, in_place, scratch) * c * itemsize
            temporary = 0 if in_place else min(buffer / 2, scratch or buffer)
            assert buffer + temporary + reserve <= n * c * itemsize / 8


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 13, 14, 1000])
def test_every_chunk_size_gives_the_unchunked_result(chunk_size):
    x, w, b, target, weight = make_problem(13, 4, 9, seed=4)
    options = dict(linear_bias=b, weight=weight, label_smoothing=0.05)
    whole = fg.linear_cross_entropy(x, w, target, chunk_size=13, **options)
    chunked = fg.linear_cross_entropy(x, w, target, chunk_size=chunk_size, **options)
    assert_all_close(chunked, whole, np.float64)


# --------------------------------------------------------------------------------------------
# Against PyTorch: F.linear_cross_entropy and the unfused composite, under autograd
# --------------------------------------------------------------------------------------------
def torch_results(loss_function, x, w, b, target, upstream, **options):
    """Loss and the gradients of sum(loss * upstream) w.r.t. input, weight and bias."""
    xt = torch.tensor(x, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    bt = None if b is None else torch.tensor(b, requires_grad=True)
    loss = loss_function(xt, wt, torch.tensor(target), linear_bias=bt, **options)
    grads = torch.autograd.grad((loss * torch.as_tensor(upstream)).sum(),
                                [t for t in (xt, wt, bt) if t is not None])
    return (loss.detach().numpy(), *(g.numpy() for g in grads)) + ((None,) if b is None else ())


def composite(x, w, target, *, linear_bias=None, softcap=None, **options):
    """PyTorch's unfused linear + cross-entropy, with Gemma 2's capping when asked."""
    logits = F.linear(x, w, linear_bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, target, **options)


@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("smoothing_and_weight", [(0.0, False), (0.0, True), (0.2, True)])
def test_matches_torch_linear_cross_entropy(target_kind, reduction, with_bias,
                                            smoothing_and_weight):
    label_smoothing, weighted = smoothing_and_weight
    x, w, b, target, weight = make_problem(19, 6, 11, target_kind=target_kind, seed=2)
    b = b if with_bias else None
    weight = weight if weighted else None
    upstream = upstream_for(reduction, 19)
    options = dict(reduction=reduction, label_smoothing=label_smoothing)
    expected = torch_results(F.linear_cross_entropy, x, w, b, target, upstream,
                             weight=None if weight is None else torch.tensor(weight), **options)
    ours = fg.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, chunk_size=4,
                                   grad_loss=upstream, **options)
    assert_all_close(ours, expected, np.float64)
    through_torch = torch_results(fgt.linear_cross_entropy, x, w, b, target, upstream,
                                  weight=None if weight is None else torch.tensor(weight),
                                  chunk_size=4, **options)
    assert_all_close(through_torch, expected, np.float64)
    if label_smoothing == 0.0 and target_kind == "index":
        # PyTorch's own chunked implementation takes this case (the warning would say it fell
        # back to the reference path): the same numbers again.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            chunked = torch_results(F.linear_cross_entropy, x, w, b, target, upstream,
                                    weight=None if weight is None else torch.tensor(weight),
                                    options=torch.nn.LinearCrossEntropyOptions(), **options)
        assert_all_close(chunked, expected, np.float64)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_composite_with_custom_ignore_index_and_int32_target(reduction):
    x, w, b, target, _ = make_problem(12, 3, 5, ignore_every=0, seed=8)
    target[[1, 6, 7]] = 2
    upstream = upstream_for(reduction, 12)
    expected = torch_results(composite, x, w, b, target, upstream, ignore_index=2,
                             reduction=reduction)
    ours = fg.linear_cross_entropy(x, w, target.astype(np.int32), linear_bias=b, ignore_index=2,
                                   reduction=reduction, grad_loss=upstream, chunk_size=5)
    assert_all_close(ours, expected, np.float64)


# Soft-capping is computed by the cross-entropy kernels (CrossEntropyOptions.softcap); these
# tests check linear_cross_entropy's part against PyTorch's composite with the cap written out.
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_matches_composite(target_kind, reduction):
    x, w, b, target, weight = make_problem(14, 4, 9, target_kind=target_kind, seed=9)
    x = 4.0 * x  # logits of a few units, so that the cap (at 2) bends them
    upstream = upstream_for(reduction, 14)
    options = dict(reduction=reduction, label_smoothing=0.1)
    expected = torch_results(composite, x, w, b, target, upstream, softcap=2.0,
                             weight=torch.tensor(weight), **options)
    ours = fg.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, softcap=2.0,
                                   grad_loss=upstream, chunk_size=3, **options)
    assert_all_close(ours, expected, np.float64)
    assert_all_close(reference.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight,
                                                    softcap=2.0, grad_loss=upstream, **options),
                     expected, np.float64)
    through_torch = torch_results(fgt.linear_cross_entropy, x, w, b, target, upstream,
                                  softcap=2.0, weight=torch.tensor(weight), chunk_size=3,
                                  **options)
    assert_all_close(through_torch, expected, np.float64)


def test_softcap_with_z_loss_matches_reference_and_gradcheck():
    x, w, b, target, _ = make_problem(6, 3, 7, seed=10)
    options = dict(linear_bias=b, softcap=1.5, z_loss=0.05)
    assert_all_close(fg.linear_cross_entropy(x, w, target, chunk_size=4, **options),
                     reference.linear_cross_entropy(x, w, target, **options), np.float64)
    inputs = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    assert torch.autograd.gradcheck(
        lambda xt, wt, bt: fgt.linear_cross_entropy(xt, wt, torch.tensor(target),
                                                    linear_bias=bt, softcap=1.5, z_loss=0.05,
                                                    chunk_size=4), inputs)


# --------------------------------------------------------------------------------------------
# Finite differences (float64)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_gradients_match_finite_differences(target_kind):
    x, w, b, target, weight = make_problem(5, 3, 4, target_kind=target_kind, seed=11)
    options = dict(weight=weight, label_smoothing=0.2, z_loss=0.05, chunk_size=2)
    _, grad_input, grad_weight, grad_bias = fg.linear_cross_entropy(x, w, target, linear_bias=b,
                                                                    **options)
    def loss_at(arrays):
        return float(fg.linear_cross_entropy(arrays[0], arrays[1], target, linear_bias=arrays[2],
                                             **options)[0])

    inputs = (x, w, b)
    for which, analytic in enumerate((grad_input, grad_weight, grad_bias)):
        def loss_of(a, which=which):
            return loss_at(inputs[:which] + (a,) + inputs[which + 1:])
        numeric = central_differences(loss_of, inputs[which])
        np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Hypothesis: random shapes, chunk sizes and options against the reference
# --------------------------------------------------------------------------------------------
@st.composite
def problems(draw):
    n = draw(st.integers(1, 24))
    d = draw(st.integers(1, 6))
    c = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["index", "prob"]))
    seed = draw(st.integers(0, 2**31 - 1))
    x, w, b, target, weight = make_problem(n, d, c, target_kind=kind, seed=seed,
                                           ignore_every=draw(st.sampled_from([0, 1, 2, 5])))
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    if reduction == "none" and draw(st.booleans()):
        grad_loss = np.random.default_rng(seed).uniform(-2.0, 2.0, n)
    else:
        grad_loss = draw(st.sampled_from([1.0, 0.0, -0.5, 3.0]))
    options = dict(
        linear_bias=draw(st.sampled_from([None, b])),
        weight=draw(st.sampled_from([None, weight])),
        reduction=reduction,
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-4, 0.5])),
        grad_loss=grad_loss,
    )
    chunk_size = draw(st.one_of(st.none(), st.integers(1, n + 3)))
    return x, w, target, options, chunk_size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_hypothesis_against_reference(problem):
    x, w, target, options, chunk_size = problem
    results = fg.linear_cross_entropy(x, w, target, chunk_size=chunk_size, **options)
    assert_all_close(results, reference.linear_cross_entropy(x, w, target, **options),
                     np.float64)


# --------------------------------------------------------------------------------------------
# Named edge cases
# --------------------------------------------------------------------------------------------
def test_every_target_ignored_with_mean_is_nan_and_zero_gradients():
    x, w, b, _, _ = make_problem(6, 3, 4)
    target = np.full(6, -100)
    loss, grad_input, grad_weight, grad_bias = fg.linear_cross_entropy(
        x, w, target, linear_bias=b, chunk_size=4)
    assert np.isnan(loss)
    assert not grad_input.any() and not grad_weight.any() and not grad_bias.any()
    torch_loss, *torch_grads = torch_results(F.linear_cross_entropy, x, w, b, target, 1.0)
    assert np.isnan(torch_loss) and not any(g.any() for g in torch_grads)
    assert_all_close(torch_results(fgt.linear_cross_entropy, x, w, b, target, 1.0),
                     (torch_loss, *torch_grads), np.float64)
    loss, *grads = fg.linear_cross_entropy(x, w, target, reduction="sum")
    assert float(loss) == 0.0 and not any(g is not None and g.any() for g in grads)


def test_mean_over_targets_weighted_zero_is_nan_like_pytorch():
    """Targets whose classes all weigh 0 leave "mean" at 0 / 0: NaN loss, NaN gradient rows
    for the targets not ignored (so NaN weight and bias gradients), zero rows for the ignored,
    as PyTorch's composite and its own linear_cross_entropy give."""
    x, w, b, _, _ = make_problem(6, 3, 4)
    target = np.array([-100, 0, 1, 0, 1, -100])
    weight = np.array([0.0, 0.0, 1.0, 1.0])
    ours = fg.linear_cross_entropy(x, w, target, linear_bias=b, weight=weight, chunk_size=4)
    theirs = torch_results(F.linear_cross_entropy, x, w, b, target, 1.0,
                           weight=torch.tensor(weight))
    for loss, grad_input, grad_weight, grad_bias in (ours, theirs):
        assert np.isnan(loss) and np.all(np.isnan(grad_weight)) and np.all(np.isnan(grad_bias))
        np.testing.assert_array_equal(grad_input[[0, 5]], 0.0)
        assert np.all(np.isnan(grad_input[1:5]))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    x, w, b, _, _ = make_problem(0, 3, 4)
    loss, grad_input, grad_weight, grad_bias = fg.linear_cross_entropy(
        x, w, np.zeros(0, dtype=np.int64), linear_bias=b, reduction=reduction,
        grad_loss=np.zeros(0) if reduction == "none" else 1.0)
    assert grad_input.shape == (0, 3)
    assert grad_weight.shape == (4, 3) and not grad_weight.any() and not grad_bias.any()
    if reduction == "mean":
        assert np.isnan(loss)
    else:
        assert np.shape(loss) == ((0,) if reduction == "none" else ()) and not np.any(loss)


def test_single_class_and_single_row():
    x, w, b, target, _ = make_problem(1, 3, 1, ignore_every=0)
    loss, grad_input, grad_weight, grad_bias = fg.linear_cross_entropy(x, w, target,
                                                                       linear_bias=b)
    assert float(loss) == 0.0 and not grad_input.any() and not grad_weight.any()
    assert not grad_bias.any()


def test_list_inputs_are_accepted():
    results = fg.linear_cross_entropy([[1.0, 2.0], [0.5, -1.0]], [[0.3, 0.1], [0.2, -0.4],
                                                                  [1.0, 0.0]], [2, 0])
    x, w = np.array([[1.0, 2.0], [0.5, -1.0]]), np.array([[0.3, 0.1], [0.2, -0.4], [1.0, 0.0]])
    assert_all_close(results, reference.linear_cross_entropy(x, w, np.array([2, 0])),
                     np.float64)


def test_non_contiguous_operands():
    x, w, b, target, _ = make_problem(10, 8, 12, seed=12)
    x_strided, w_strided = x[:, ::2], np.asfortranarray(w)[:, 1::2]
    results = fg.linear_cross_entropy(x_strided, w_strided, target, linear_bias=b[::-1],
                                      chunk_size=3)
    expected = reference.linear_cross_entropy(x_strided, w_strided, target,
                                              linear_bias=b[::-1])
    assert_all_close(results, expected, np.float64)


# --------------------------------------------------------------------------------------------
# Validation: every check before anything is written
# --------------------------------------------------------------------------------------------
class FakeDeviceArray:
    """Anything exposing __cuda_array_interface__ counts as a GPU array for the location
    check, which runs before any GPU code is touched."""

    __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "data": (0, False),
                                "version": 3}


def _bad_calls():
    x, w, b, target, weight = make_problem(4, 3, 5, ignore_every=0)
    return x, w, target, [
        (dict(input=x[0]), ValueError, "input"),
        (dict(input=x.astype(np.int64)), TypeError, "input"),
        (dict(input=x.astype(np.float16)), TypeError, "input"),
        (dict(linear_weight=w[:, :2]), ValueError, "linear_weight"),
        (dict(linear_weight=w[0]), ValueError, "linear_weight"),
        (dict(linear_weight=w[:0]), ValueError, "linear_weight"),
        (dict(linear_weight=w.astype(np.float32)), TypeError, "linear_weight"),
        (dict(linear_bias=b[:4]), ValueError, "linear_bias"),
        (dict(linear_bias=b.astype(np.float32)), TypeError, "linear_bias"),
        (dict(target=target[:3]), ValueError, "target"),
        (dict(target=np.array([0, 1, 5, 2])), ValueError, "target"),
        (dict(target=np.zeros((4, 4))), ValueError, "target"),
        (dict(target=np.full((4, 5), 0.2, dtype=np.float32)), TypeError, "target"),
        (dict(target=target.astype(np.uint8)), TypeError, "target"),
        (dict(weight=weight[:4]), ValueError, "weight"),
        (dict(weight=weight.astype(np.float32)), TypeError, "weight"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(softcap=0.0), ValueError, "softcap"),
        (dict(softcap=-2.0), ValueError, "softcap"),
        (dict(softcap="1"), TypeError, "softcap"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(chunk_size=True), TypeError, "chunk_size"),
        (dict(grad_loss=np.ones(4)), ValueError, "grad_loss"),
        (dict(reduction="none", grad_loss=np.ones(3)), ValueError, "grad_loss"),
        (dict(reduction="none", grad_loss=np.ones(4, dtype=np.int64)), TypeError, "grad_loss"),
        (dict(weight=FakeDeviceArray()), TypeError, "weight"),
        (dict(reduction="none", grad_loss=FakeDeviceArray()), TypeError, "grad_loss"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls()[3])))
def test_validation_errors_name_the_argument_and_write_nothing(case):
    x, w, target, cases = _bad_calls()
    changes, error, name = cases[case]
    args = dict(input=x, linear_weight=w, target=target)
    args.update({k: v for k, v in changes.items() if k in args})
    options = {k: v for k, v in changes.items() if k not in args}
    before = {k: np.array(v, copy=True) for k, v in args.items()}
    with pytest.raises(error, match=name):
        fg.linear_cross_entropy(args["input"], args["linear_weight"], args["target"],
                                **options)
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k])


def test_mixed_host_and_device_arrays_name_both():
    x, w, _, target, _ = make_problem(4, 3, 5)
    with pytest.raises(TypeError, match="linear_bias.*input|input.*linear_bias"):
        fg.linear_cross_entropy(x, w, target, linear_bias=FakeDeviceArray())


# --------------------------------------------------------------------------------------------
# Memory: at most 1/8 of the logits beyond the inputs and the returned gradients
# --------------------------------------------------------------------------------------------
def traced_peak(call):
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = call()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, result


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_peak_extra_memory_is_at_most_an_eighth_of_the_logits(reduction, monkeypatch):
    # No pool of released buffers: every allocation of the call is a fresh, traced one. The
    # products through NumPy (PyTorch's, which this process has loaded, allocate out of
    # tracemalloc's sight), with the temporary NumPy needs to accumulate the weight gradient.
    monkeypatch.setenv("FUSEDGRAD_HOST_CACHE_MB", "0")
    monkeypatch.setattr(host_arrays, "torch_if_loaded", lambda: None)
    n, d, c = 512, 64, 4096
    x, w, b, target, _ = make_problem(n, d, c, dtype=np.float32, ignore_every=5)
    grad_loss = np.linspace(0.5, 1.5, n) if reduction == "none" else 1.0
    options = dict(linear_bias=b, reduction=reduction, grad_loss=grad_loss)
    fg.linear_cross_entropy(x, w, target, **options)     # compile outside the trace
    peak, (_, grad_input, grad_weight, grad_bias) = traced_peak(
        lambda: fg.linear_cross_entropy(x, w, target, **options))
    returned = grad_input.nbytes + grad_weight.nbytes + grad_bias.nbytes
    logits_bytes = n * c * 4
    extra = peak - returned
    assert extra <= logits_bytes / 8, f"{extra} bytes: {extra / logits_bytes:.3f} of the logits"


def test_peak_extra_memory_with_the_host_scratch_bound(monkeypatch):
    """Logits large enough (134 MB) that the chunk buffer takes the budget but the host's
    MATMUL_SCRATCH_BYTES, not two thirds of it; the products through NumPy (as on AMD's Zen,
    or without PyTorch)."""
    monkeypatch.setenv("FUSEDGRAD_HOST_CACHE_MB", "0")
    monkeypatch.setattr(host_arrays, "TORCH_BLAS_PAYS", False)
    n, d, c = 2048, 16, 16384
    x, w, _, target, _ = make_problem(n, d, c, dtype=np.float32, ignore_every=5)
    call = linear_ce.prepare(x, w, target, None, None, -100, "mean", 0.0, 0.0, None, None)
    assert call.chunk_rows == linear_ce.default_chunk_rows(n, c, 4, False, 4 << 20) > \
        linear_ce.default_chunk_rows(n, c, 4, False)
    fg.linear_cross_entropy(x, w, target)
    peak, (_, grad_input, grad_weight, _) = traced_peak(
        lambda: fg.linear_cross_entropy(x, w, target))
    extra = peak - grad_input.nbytes - grad_weight.nbytes
    assert extra <= n * c * 4 / 8, f"{extra / (n * c * 4):.3f} of the logits"


def test_torch_function_peak_extra_memory(monkeypatch):
    """The torch function's NumPy allocations (its chunk buffers and gradients), forward and
    the recomputing "none" backward."""
    monkeypatch.setenv("FUSEDGRAD_HOST_CACHE_MB", "0")
    n, d, c = 512, 64, 4096
    x, w, _, target, _ = make_problem(n, d, c, dtype=np.float32, ignore_every=5)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    t = torch.tensor(target)
    upstream = torch.rand(n)
    fgt.linear_cross_entropy(xt, wt, t, reduction="none").backward(upstream)  # compile
    logits_bytes = n * c * 4
    gradients = x.nbytes + w.nbytes
    peak, loss = traced_peak(lambda: fgt.linear_cross_entropy(xt, wt, t))
    assert peak - gradients <= logits_bytes / 8   # "mean": the gradients come from forward
    loss = fgt.linear_cross_entropy(xt, wt, t, reduction="none")
    peak, _ = traced_peak(lambda: loss.backward(upstream))
    assert peak - gradients <= logits_bytes / 8


# --------------------------------------------------------------------------------------------
# fusedgrad.torch.linear_cross_entropy under autograd
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_torch_gradcheck(reduction, target_kind):
    x, w, b, target, weight = make_problem(5, 3, 4, target_kind=target_kind, seed=13)
    inputs = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    t, class_weight = torch.tensor(target), torch.tensor(weight)
    assert torch.autograd.gradcheck(
        lambda xt, wt, bt: fgt.linear_cross_entropy(
            xt, wt, t, linear_bias=bt, weight=class_weight, reduction=reduction,
            label_smoothing=0.1, z_loss=0.01, chunk_size=2), inputs)


def test_torch_none_with_non_uniform_upstream_gradient_and_float32():
    x, w, b, target, weight = make_problem(21, 5, 13, dtype=np.float32, seed=14)
    upstream = upstream_for("none", 21)
    options = dict(weight=torch.tensor(weight), reduction="none", label_smoothing=0.1)
    expected = torch_results(composite, x, w, b, target, upstream, **options)
    ours = torch_results(fgt.linear_cross_entropy, x, w, b, target, upstream, chunk_size=6,
                         **options)
    for name, actual, wanted in zip(("loss", "input", "weight", "bias"), ours, expected):
        np.testing.assert_allclose(actual, wanted, rtol=1e-5, atol=1e-6, err_msg=name)
    assert ours[0].dtype == np.float32


def test_torch_computes_only_the_gradients_autograd_needs(monkeypatch):
    """A frozen weight (or bias) skips its product: the chunks run the logits' product plus one
    product per wanted gradient."""
    x, w, b, target, _ = make_problem(12, 4, 6, seed=15)
    products = []
    real_matmul = host_arrays.matmul

    def counting_matmul(a, b_, out, **kwargs):
        products.append(out.shape)
        real_matmul(a, b_, out, **kwargs)

    monkeypatch.setattr(host_arrays, "matmul", counting_matmul)
    column_sums = []
    real_column_sums = host_arrays.column_sums

    def counting_column_sums(a, out, **kwargs):
        column_sums.append(out.shape)
        real_column_sums(a, out, **kwargs)

    monkeypatch.setattr(host_arrays, "column_sums", counting_column_sums)
    for frozen_weight, frozen_bias, reduction in [(False, False, "mean"), (True, True, "mean"),
                                                  (True, False, "sum"), (True, True, "none")]:
        products.clear()
        column_sums.clear()
        xt = torch.tensor(x, requires_grad=True)
        wt = torch.tensor(w, requires_grad=not frozen_weight)
        bt = torch.tensor(b, requires_grad=not frozen_bias)
        loss = fgt.linear_cross_entropy(xt, wt, torch.tensor(target), linear_bias=bt,
                                        reduction=reduction, chunk_size=5)
        loss.sum().backward()
        chunks = 3 * (2 if reduction == "none" else 1)   # "none" forms the logits twice
        expected = chunks + 3 * (2 - frozen_weight)       # logits, dX, dW
        assert len(products) == expected, (frozen_weight, frozen_bias, reduction)
        assert len(column_sums) == (0 if frozen_bias else 3)
        assert (wt.grad is None) == frozen_weight and (bt.grad is None) == frozen_bias
        expected_grads = reference.linear_cross_entropy(x, w, target, linear_bias=b,
                                                        reduction=reduction,
                                                        grad_loss=np.ones(12)
                                                        if reduction == "none" else 1.0)
        assert_close(xt.grad.numpy(), expected_grads[1], np.float64, "input")


def test_torch_no_grad_forms_no_gradients(monkeypatch):
    x, w, _, target, _ = make_problem(12, 4, 6, seed=16)
    monkeypatch.setattr(linear_ce, "fused_of_checked", None)   # would raise if called
    with torch.no_grad():
        loss = fgt.linear_cross_entropy(torch.tensor(x, requires_grad=True),
                                        torch.tensor(w, requires_grad=True),
                                        torch.tensor(target))
    assert_close(loss.numpy(), reference.linear_cross_entropy(x, w, target)[0], np.float64,
                 "loss")


def test_torch_retained_graph():
    """A second backward through a retained graph: right with upstream gradient 1; with another
    one the in-place scaled gradients are refused by autograd rather than scaled twice."""
    x, w, _, target, _ = make_problem(8, 3, 5, seed=17)
    xt = torch.tensor(x, requires_grad=True)
    loss = fgt.linear_cross_entropy(xt, torch.tensor(w), torch.tensor(target))
    loss.backward(retain_graph=True)
    loss.backward()
    expected = reference.linear_cross_entropy(x, w, target)[1]
    assert_close(xt.grad.numpy(), 2.0 * expected, np.float64, "input")
    loss = fgt.linear_cross_entropy(xt, torch.tensor(w), torch.tensor(target))
    (2.0 * loss).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        (2.0 * loss).backward()


def test_torch_unbatched_input_and_ignore_index_none():
    x, w, b, target, _ = make_problem(1, 4, 6, ignore_every=0, seed=18)
    xt = torch.tensor(x[0], requires_grad=True)
    loss = fgt.linear_cross_entropy(xt, torch.tensor(w), torch.tensor(target[0]),
                                    linear_bias=torch.tensor(b), ignore_index=None,
                                    reduction="none")
    xr = torch.tensor(x[0], requires_grad=True)
    expected = F.linear_cross_entropy(xr, torch.tensor(w), torch.tensor(target[0]),
                                      linear_bias=torch.tensor(b), reduction="none")
    assert loss.shape == expected.shape == ()
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(xt.grad, xr.grad)


def test_torch_bad_arguments():
    x, w, _, target, weight = make_problem(4, 3, 5)
    xt, wt, t = torch.tensor(x), torch.tensor(w), torch.tensor(target)
    with pytest.raises(TypeError, match="input"):
        fgt.linear_cross_entropy(x, wt, t)
    with pytest.raises(TypeError, match="linear_weight"):
        fgt.linear_cross_entropy(xt, w, t)
    with pytest.raises(ValueError, match="weight"):
        fgt.linear_cross_entropy(xt, wt, t, weight=torch.tensor(weight, requires_grad=True))
    with pytest.raises(ValueError, match="target"):
        fgt.linear_cross_entropy(xt, wt, torch.full((4, 5), 0.2, dtype=torch.float64,
                                                    requires_grad=True))
    with pytest.raises(ValueError, match="linear_weight"):
        fgt.linear_cross_entropy(xt, wt[:, :2], t)
    with pytest.raises(ValueError, match="chunk_size"):
        fgt.linear_cross_entropy(xt, wt, t, chunk_size=0)
    with pytest.raises(TypeError, match="linear_bias"):
        fgt.linear_cross_entropy(xt, wt, t, linear_bias=torch.zeros(5, dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# The products (fusedgrad._matmul), in NumPy and in PyTorch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("accumulate", [False, True])
def test_host_matmul(transpose_a, accumulate):
    rng = np.random.default_rng(19)
    a = rng.standard_normal((7, 5) if transpose_a else (5, 7))
    b = rng.standard_normal((6, 7))
    out = rng.standard_normal((5, 6))
    expected = (a.T if transpose_a else a) @ b.T + (out if accumulate else 0.0)
    host_arrays.matmul(a, b, out, transpose_a=transpose_a, transpose_b=True,
                       accumulate=accumulate)
    np.testing.assert_allclose(out, expected, rtol=1e-13)


def test_host_products_leave_pytorch_where_its_blas_does_not_pay(monkeypatch):
    """On AMD's Zen cores (MKL's AVX2 path) the products go through NumPy even with PyTorch
    loaded; elsewhere through PyTorch's addmm_, in place."""
    assert not host_arrays.torch_blas_pays_on("znver5")
    assert host_arrays.torch_blas_pays_on("sapphirerapids")
    rng = np.random.default_rng(22)
    g, x = rng.standard_normal((8, 40)), rng.standard_normal((8, 6))
    for pays in (False, True):
        monkeypatch.setattr(host_arrays, "TORCH_BLAS_PAYS", pays)
        viewed = []
        monkeypatch.setattr(torch, "from_numpy",
                            lambda arr, real=torch.from_numpy: viewed.append(arr) or real(arr))
        out = rng.standard_normal((40, 6))
        expected = out + g.T @ x
        host_arrays.matmul(g, x, out, transpose_a=True, accumulate=True)
        np.testing.assert_allclose(out, expected, rtol=1e-13)
        assert host_arrays.matmul_accumulates_in_place(g.dtype, out.dtype) == pays
        assert len(viewed) == (3 if pays else 0)
        monkeypatch.undo()


@pytest.mark.parametrize("torch_runs_products", [False, True])
def test_chunk_kernels_run_on_one_thread_where_numpy_runs_the_products(torch_runs_products,
                                                                       monkeypatch):
    """Numba's spinning workers would take a core from NumPy's BLAS threads (see
    ``kernels_between_products``); the results are those of the two-thread kernels."""
    monkeypatch.setattr(host_arrays, "TORCH_BLAS_PAYS", torch_runs_products)
    x, w, b, target, _ = make_problem(64, 8, 300, dtype=np.float64, ignore_every=5)
    threads_seen = []
    real_fused = host_ce.fused

    def recording_fused(*args):
        threads_seen.append(numba.get_num_threads())
        return real_fused(*args)

    with monkeypatch.context() as patch:  # the kernels on every thread, as outside the loop
        patch.setattr(host_arrays, "kernels_between_products", contextlib.nullcontext)
        expected = fg.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=16)
    monkeypatch.setattr(host_ce, "fused", recording_fused)
    threads = numba.get_num_threads()
    result = fg.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=16)
    assert threads_seen == [threads if torch_runs_products else 1] * 4
    assert numba.get_num_threads() == threads
    for got, want in zip(result, expected):
        np.testing.assert_array_equal(got, want)


def test_accumulating_product_temporary_is_half_of_a():
    """out (C, d) += a (C x k) @ b, with C * d much larger than a: the temporary is bounded by
    half of a, not by out."""
    rng = np.random.default_rng(20)
    g = rng.standard_normal((8, 2048)).astype(np.float32)     # a chunk's G: k = 8 rows
    x = rng.standard_normal((8, 256)).astype(np.float32)
    out = rng.standard_normal((2048, 256)).astype(np.float32)
    expected = out + g.T @ x
    peak, _ = traced_peak(lambda: host_arrays.matmul(g, x, out, transpose_a=True,
                                                     accumulate=True))
    assert peak <= g.nbytes / 2 + 4096
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_accumulating_product_temporary_keeps_within_scratch_bytes():
    rng = np.random.default_rng(23)
    g = rng.standard_normal((64, 2048)).astype(np.float32)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    out = rng.standard_normal((2048, 256)).astype(np.float32)
    expected = out + g.T @ x
    scratch = 64 * 256 * 4                           # 64 rows of out, a quarter of half of g
    peak, _ = traced_peak(lambda: _matmul.product(np, g.T, x, out, accumulate=True,
                                                  scratch_bytes=scratch))
    assert peak <= scratch + 4096
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    assert host_arrays.MATMUL_SCRATCH_BYTES == 4 << 20


@pytest.mark.parametrize("accumulate", [False, True])
def test_torch_products_same_dtype_and_bfloat16_into_float32(accumulate):
    """The GPU's library path, run on CPU tensors: same dtype (addmm_ when accumulating), and
    bfloat16 operands into a float32 accumulator (blocks, summed in float32)."""
    gen = torch.Generator().manual_seed(21)
    a = torch.randn(9, 40, generator=gen)
    b = torch.randn(9, 6, generator=gen)
    out = torch.randn(40, 6, generator=gen)
    expected = a.T @ b + (out if accumulate else 0.0)
    _matmul.product(torch, a.T, b, out, accumulate=accumulate)
    torch.testing.assert_close(out, expected)
    a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
    out32 = torch.randn(40, 6, generator=gen)
    expected = (a16.T @ b16).float() + (out32 if accumulate else 0.0)
    _matmul.product(torch, a16.T, b16, out32, accumulate=accumulate)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32, expected)
    sums = torch.zeros(6) if not accumulate else torch.ones(6)
    _matmul.column_sums(torch, b16, sums, accumulate=accumulate)
    torch.testing.assert_close(sums, b16.float().sum(0) + (1.0 if accumulate else 0.0))


def test_empty_inner_dimension_gives_zeros():
    out = np.full((3, 2), 5.0)
    host_arrays.matmul(np.zeros((0, 3)), np.zeros((0, 2)), out, transpose_a=True)
    assert not out.any()
    out[:] = 5.0
    host_arrays.matmul(np.zeros((0, 3)), np.zeros((0, 2)), out, transpose_a=True,
                       accumulate=True)
    assert (out == 5.0).all()
