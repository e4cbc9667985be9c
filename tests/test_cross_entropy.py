"""fg.softmax_cross_entropy{,_forward,_backward} on the CPU.

Oracles: ``fusedgrad.reference`` (float64 NumPy), ``torch.nn.functional.cross_entropy`` (loss
and autograd gradient), and float64 central finite differences. Most checks run in float64
(tolerance ~1e-12); float32 runs against the reference with a relative tolerance of ~1e-5.
Shapes are small: every distinct array layout is a Numba specialisation compiled once.
"""
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from oracles import assert_close_scaled, central_differences
import fusedgrad as fg
from fusedgrad import reference

RTOL = {np.float64: 1e-12, np.float32: 2e-5}
ATOL = {np.float64: 1e-13, np.float32: 2e-6}


def make_problem(shape, target_kind, dtype=np.float64, seed=0, ignore_some=True):
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal(shape)).astype(dtype)
    n_classes = shape[1]
    sample_shape = (shape[0],) + tuple(shape[2:])
    if target_kind == "index":
        target = rng.integers(0, n_classes, sample_shape)
        if ignore_some and target.size > 1:
            target.flat[::3] = -100
    else:
        target = rng.random(shape)
        target = (target / target.sum(axis=1, keepdims=True)).astype(dtype)
    return logits, target


def assert_close(actual, expected, dtype, what):
    assert_close_scaled(actual, expected, RTOL[dtype], ATOL[dtype], what)


def run_all(logits, target, **options):
    """Fused call, forward and backward; returns (loss, grad, forward loss, lse, grad2)."""
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)
    loss_f, lse = fg.softmax_cross_entropy_forward(logits, target, **options)
    reduction = options.get("reduction", "mean")
    grad_loss = np.ones(np.shape(loss_f)) if reduction == "none" else 1.0
    grad2 = fg.softmax_cross_entropy_backward(grad_loss, logits, target, lse, **options)
    return loss, grad, loss_f, lse, grad2


# --------------------------------------------------------------------------------------------
# Against the float64 reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(9, 7), (3, 5000), (4, 6, 3, 5)])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(dtype, shape, target_kind, reduction):
    logits, target = make_problem(shape, target_kind, dtype)
    weight = np.linspace(0.5, 2.0, shape[1])
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    loss, grad, loss_f, lse, grad2 = run_all(logits, target, **options)
    ref_loss, ref_grad, ref_lse = reference.softmax_cross_entropy(logits, target, **options)
    expected_dtype = np.float64 if dtype == np.float64 else np.float32
    assert loss.dtype == expected_dtype and lse.dtype == expected_dtype
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert lse.shape == (shape[0],) + shape[2:]
    assert np.shape(loss) == np.shape(ref_loss)
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(loss_f, ref_loss, dtype, "forward loss")
    assert_close(lse, ref_lse, dtype, "lse")
    assert_close(grad, ref_grad, dtype, "grad")
    assert_close(grad2, ref_grad, dtype, "backward grad")


@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_backward_scales_by_grad_loss(target_kind):
    logits, target = make_problem((6, 5), target_kind)
    _, ref_grad, _ = reference.softmax_cross_entropy(logits, target, reduction="none")
    _, lse = fg.softmax_cross_entropy_forward(logits, target, reduction="none")
    grad_loss = np.linspace(-1.0, 2.0, 6)
    grad = fg.softmax_cross_entropy_backward(grad_loss, logits, target, lse, reduction="none")
    assert_close(grad, ref_grad * grad_loss[:, None], np.float64, "grad")
    _, lse_mean = fg.softmax_cross_entropy_forward(logits, target)
    _, ref_mean_grad, _ = reference.softmax_cross_entropy(logits, target)
    grad = fg.softmax_cross_entropy_backward(np.float64(3.0), logits, target, lse_mean)
    assert_close(grad, 3.0 * ref_mean_grad, np.float64, "grad")


# --------------------------------------------------------------------------------------------
# Against PyTorch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.25])
@pytest.mark.parametrize("shape", [(8, 6), (3, 4, 2, 3)])
def test_matches_torch(target_kind, reduction, use_weight, label_smoothing, shape):
    logits, target = make_problem(shape, target_kind, seed=3)
    weight = np.linspace(0.2, 1.5, shape[1]) if use_weight else None
    options = dict(weight=weight, reduction=reduction, label_smoothing=label_smoothing)
    if target_kind == "index":
        options["ignore_index"] = -100
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)

    x = torch.tensor(logits, requires_grad=True)
    t = torch.tensor(target)
    w = None if weight is None else torch.tensor(weight)
    torch_loss = F.cross_entropy(x, t, weight=w, reduction=reduction,
                                 label_smoothing=label_smoothing)
    torch_loss.sum().backward()
    assert_close(loss, torch_loss.detach().numpy(), np.float64, "loss vs torch")
    assert_close(grad, x.grad.numpy(), np.float64, "grad vs torch")


def test_matches_torch_with_custom_ignore_index_and_int32_target():
    logits, target = make_problem((10, 4), "index", seed=5, ignore_some=False)
    target[[1, 4]] = 2
    target32 = target.astype(np.int32)
    loss, grad = fg.softmax_cross_entropy(logits, target32, ignore_index=2)
    x = torch.tensor(logits, requires_grad=True)
    torch_loss = F.cross_entropy(x, torch.tensor(target), ignore_index=2)
    torch_loss.backward()
    assert_close(loss, torch_loss.item(), np.float64, "loss")
    assert_close(grad, x.grad.numpy(), np.float64, "grad")


# --------------------------------------------------------------------------------------------
# Finite differences (float64)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(4, 5), (2, 3, 4)])
def test_gradient_matches_finite_differences(target_kind, shape):
    logits, target = make_problem(shape, target_kind, seed=11)
    options = dict(weight=np.linspace(0.5, 1.5, shape[1]), label_smoothing=0.2, z_loss=0.05)
    _, grad = fg.softmax_cross_entropy(logits, target, **options)
    numeric = central_differences(
        lambda z: float(fg.softmax_cross_entropy_forward(z, target, **options)[0]), logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------
# Hypothesis: random shapes and options against the reference
# --------------------------------------------------------------------------------------------
@st.composite
def problems(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 9))
    spatial = draw(st.sampled_from([(), (3,), (2, 3)]))
    shape = (n, c) + spatial
    kind = draw(st.sampled_from(["index", "prob"]))
    seed = draw(st.integers(0, 2**31 - 1))
    logits, target = make_problem(shape, kind, seed=seed, ignore_some=draw(st.booleans()))
    options = dict(
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-4, 0.5])),
        weight=draw(st.sampled_from([None, "random"])),
    )
    if options["weight"] == "random":
        options["weight"] = np.random.default_rng(seed).random(c) + 0.1
    return logits, target, options


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_hypothesis_against_reference(problem):
    logits, target, options = problem
    loss, grad, loss_f, lse, grad2 = run_all(logits, target, **options)
    ref_loss, ref_grad, ref_lse = reference.softmax_cross_entropy(logits, target, **options)
    if np.all(np.isnan(ref_loss)):
        assert np.all(np.isnan(loss)) and np.all(np.isnan(loss_f))
    else:
        assert_close(loss, ref_loss, np.float64, "loss")
        assert_close(loss_f, ref_loss, np.float64, "forward loss")
    assert_close(lse, ref_lse, np.float64, "lse")
    assert_close(grad, ref_grad, np.float64, "grad")
    assert_close(grad2, ref_grad, np.float64, "backward grad")


# --------------------------------------------------------------------------------------------
# Named edge cases
# --------------------------------------------------------------------------------------------
def test_single_class():
    logits = np.array([[3.0], [-1.0]])
    loss, grad = fg.softmax_cross_entropy(logits, np.array([0, 0]))
    assert float(loss) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_single_sample():
    logits, target = make_problem((1, 7), "index", ignore_some=False)
    loss, grad = fg.softmax_cross_entropy(logits, target)
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(logits, target)
    assert_close(loss, ref_loss, np.float64, "loss")
    assert_close(grad, ref_grad, np.float64, "grad")


@pytest.mark.parametrize("shape", [(5, 4), (2, 4, 3)])
def test_every_target_ignored(shape):
    logits, _ = make_problem(shape, "index")
    target = np.full((shape[0],) + shape[2:], -100)
    loss, grad = fg.softmax_cross_entropy(logits, target)
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)
    loss_sum, grad_sum = fg.softmax_cross_entropy(logits, target, reduction="sum")
    assert float(loss_sum) == 0.0
    np.testing.assert_array_equal(grad_sum, 0.0)
    loss_none, _ = fg.softmax_cross_entropy(logits, target, reduction="none")
    np.testing.assert_array_equal(loss_none, 0.0)
    x = torch.tensor(logits, requires_grad=True)
    torch_loss = F.cross_entropy(x, torch.tensor(target))
    torch_loss.backward()
    assert np.isnan(torch_loss.item())
    np.testing.assert_array_equal(x.grad.numpy(), 0.0)


@pytest.mark.parametrize("shape", [(5, 4), (5, 40), (5, 3000), (2, 40, 3)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mean_over_targets_weighted_zero_is_nan_like_pytorch(shape, label_smoothing):
    """"mean" divides by the targets' summed weight; when that is 0 the loss is NaN and so is
    every gradient row whose target is not ignored (PyTorch's 0 / 0); ignored rows are zeros."""
    logits, target = make_problem(shape, "index", ignore_some=False)
    target = target % 2
    target.flat[0] = -100
    weight = np.zeros(shape[1])
    weight[2:] = 1.0
    options = dict(weight=weight, label_smoothing=label_smoothing)
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)
    x = torch.tensor(logits, requires_grad=True)
    torch_loss = F.cross_entropy(x, torch.tensor(target), weight=torch.tensor(weight),
                                 label_smoothing=label_smoothing)
    torch_loss.backward()
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(logits, target, **options)
    assert np.isnan(loss) and np.isnan(torch_loss.item()) and np.isnan(ref_loss)
    ignored = target == -100
    for gradient in (grad, x.grad.numpy(), ref_grad):
        rows = np.moveaxis(gradient, 1, -1)          # (samples..., classes)
        np.testing.assert_array_equal(rows[ignored], 0.0)
        assert np.all(np.isnan(rows[~ignored]))


@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_mean_without_weight_counts_kept_targets(ignore_index):
    """weight=None divides the mean by the count of kept targets (counted, not gathered from
    unit weights): the same bits as explicit unit weights, for index and spatial targets."""
    from fusedgrad.cpu import cross_entropy as ce_cpu
    for shape in [(37, 5), (6, 5, 7)]:
        logits, target = make_problem(shape, "index", ignore_some=False)
        target.flat[1::4] = ignore_index
        ones = np.ones(shape[1])
        loss, grad = fg.softmax_cross_entropy(logits, target, ignore_index=ignore_index)
        loss_w, grad_w = fg.softmax_cross_entropy(logits, target, weight=ones,
                                                  ignore_index=ignore_index)
        np.testing.assert_array_equal(loss, loss_w)
        np.testing.assert_array_equal(grad, grad_w)
        flat = ce_cpu.index_target(target)
        kept = int(np.count_nonzero(flat != ignore_index))
        assert ce_cpu.target_weight_sum(flat, ones, ignore_index, unit_weights=True) == kept
        assert ce_cpu.target_weight_sum(flat, ones, ignore_index) == kept


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_minus_inf_logits_as_masks(dtype):
    logits, target = make_problem((6, 3000), "index", dtype, ignore_some=False)
    logits[:, 1::2] = -np.inf            # mask every odd class
    logits[:, :2048] = -np.inf           # and a whole first block of each row
    target = 2048 + 2 * (np.arange(6) % 400)
    loss, grad = fg.softmax_cross_entropy(logits, target, reduction="none")
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(logits, target, reduction="none")
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert_close(loss, ref_loss, dtype, "loss")
    assert_close(grad, ref_grad, dtype, "grad")
    assert np.all(grad[:, 1::2] == 0.0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("n_classes", [8, 40, 5000])
@pytest.mark.parametrize("inplace", [False, True])
def test_row_of_only_minus_inf_is_nan_like_pytorch(dtype, target_kind, n_classes, inplace):
    """A row with no finite logit has no softmax: its loss and gradient row are NaN in every
    kernel (small C, one block, several blocks), fused or not, as in PyTorch; the other rows
    are untouched by it."""
    logits, target = make_problem((3, n_classes), target_kind, dtype, ignore_some=False)
    logits[1] = -np.inf
    expected_grad = fg.softmax_cross_entropy_backward(
        np.ones(3), logits, target,
        fg.softmax_cross_entropy_forward(logits, target, reduction="none")[1],
        reduction="none")
    torch_logits = torch.tensor(logits, requires_grad=True)
    F.cross_entropy(torch_logits, torch.tensor(target), reduction="none").sum().backward()
    loss, grad = fg.softmax_cross_entropy(logits.copy(), target, reduction="none",
                                          inplace=inplace)
    assert np.isnan(loss[1]) and np.all(np.isnan(grad[1]))
    assert np.all(np.isnan(expected_grad[1])) and bool(torch_logits.grad[1].isnan().all())
    kept = [0, 2]
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(logits[kept], target[kept],
                                                            reduction="none")
    assert_close(loss[kept], ref_loss, dtype, "loss")
    assert_close(grad[kept], ref_grad, dtype, "grad")
    assert_close(expected_grad[kept], ref_grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(4, 50), (3, 6, 5)])
def test_logits_of_magnitude_1e4(dtype, shape):
    logits, target = make_problem(shape, "index", dtype)
    logits = (logits * 5e3).astype(dtype)
    options = dict(label_smoothing=0.1, reduction="none")
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(logits, target, **options)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(loss, ref_loss, rtol=RTOL[dtype] * 10, atol=1e-9 * 1e4)
    assert_close(grad, ref_grad, dtype, "grad")


@pytest.mark.parametrize("shape", [(3, 8), (2, 8, 4)])
def test_rows_of_equal_values(shape):
    logits = np.full(shape, 7.25)
    target = np.zeros((shape[0],) + shape[2:], dtype=np.int64)
    loss, grad = fg.softmax_cross_entropy(logits, target, reduction="sum")
    n_samples = target.size
    np.testing.assert_allclose(float(loss), n_samples * np.log(8.0), rtol=1e-14)
    expected = np.full(shape, 1.0 / 8.0)
    expected[:, 0] -= 1.0
    np.testing.assert_allclose(grad, expected, rtol=1e-14, atol=1e-16)


def test_nan_logits_give_nan_loss():
    logits, target = make_problem((3, 10), "index", ignore_some=False)
    logits[1, 4] = np.nan
    loss, _ = fg.softmax_cross_entropy(logits, target, reduction="none")
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))


# --------------------------------------------------------------------------------------------
# out=, inplace=, layouts
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(7, 9), (2, 5, 3, 2)])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_out_and_inplace(shape, target_kind):
    logits, target = make_problem(shape, target_kind)
    loss, grad = fg.softmax_cross_entropy(logits, target, label_smoothing=0.1)
    out = np.full_like(logits, 123.0)
    loss_out, grad_out = fg.softmax_cross_entropy(logits, target, label_smoothing=0.1, out=out)
    assert grad_out is out
    np.testing.assert_array_equal(out, grad)
    assert float(loss_out) == float(loss)
    work = logits.copy()
    loss_in, grad_in = fg.softmax_cross_entropy(work, target, label_smoothing=0.1, inplace=True)
    assert grad_in is work
    # Inplace runs a differently vectorised loop (one pointer, no overlap check), so sums may
    # be associated differently: equal to rounding, not bitwise.
    np.testing.assert_allclose(work, grad, rtol=1e-14, atol=1e-17)
    assert float(loss_in) == pytest.approx(float(loss), rel=1e-14)
    _, lse = fg.softmax_cross_entropy_forward(logits, target, label_smoothing=0.1)
    work = logits.copy()
    grad_back = fg.softmax_cross_entropy_backward(1.0, work, target, lse, label_smoothing=0.1,
                                                  inplace=True)
    assert grad_back is work
    np.testing.assert_allclose(work, grad, rtol=1e-12, atol=1e-15)


def test_gradient_rows_are_not_streamed_where_streaming_does_not_pay(monkeypatch):
    from fusedgrad.cpu import _stream
    from fusedgrad.cpu.cross_entropy import _streams_rows
    assert not _stream.streaming_pays_on("znver5") and not _stream.streaming_pays_on("znver4")
    assert _stream.streaming_pays_on("sapphirerapids") and _stream.streaming_pays_on("skylake")
    grad = np.empty((64, 32768), dtype=np.float32)
    monkeypatch.setattr(_stream, "STREAMING_PAYS", True)
    assert _streams_rows(grad)
    monkeypatch.setattr(_stream, "STREAMING_PAYS", False)
    assert not _streams_rows(grad)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_streamed_gradient_rows_equal_ordinary_ones(dtype, target_kind, monkeypatch):
    # 2-D rows of more than one block whose gradient reaches STREAM_MIN_BYTES go through a
    # staging row and non-temporal stores; a few of the same rows, too small a gradient to
    # stream, take the ordinary path. With reduction="none" each row's gradient depends on its
    # row alone, so the two must agree bit for bit (out=, inplace= and a row of -inf logits
    # and an ignored target included).
    from fusedgrad.cpu import _stream
    from fusedgrad.cpu.cross_entropy import BLOCK, _streams_rows
    monkeypatch.setattr(_stream, "STREAMING_PAYS", True)  # streamed on any CPU
    n_classes = 2 * BLOCK + 37
    n_rows = (4 << 20) // (n_classes * np.dtype(dtype).itemsize) + 3
    logits, target = make_problem((n_rows, n_classes), target_kind, dtype)
    logits[1, BLOCK:2 * BLOCK] = -np.inf
    options = dict(reduction="none", label_smoothing=0.1, z_loss=1e-3, softcap=20.0)
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)
    assert _streams_rows(grad)
    few = slice(0, 5)
    few_loss, few_grad = fg.softmax_cross_entropy(logits[few], target[few], **options)
    assert not _streams_rows(few_grad)
    np.testing.assert_array_equal(grad[few], few_grad)
    np.testing.assert_array_equal(loss[few], few_loss)
    out = np.full_like(logits, 7.0)
    fg.softmax_cross_entropy(logits, target, out=out, **options)
    np.testing.assert_array_equal(out, grad)
    work = logits.copy()
    fg.softmax_cross_entropy(work, target, inplace=True, **options)
    np.testing.assert_array_equal(work, grad)
    expected_loss, expected_grad, _ = reference.softmax_cross_entropy(
        logits.astype(np.float64), target if target_kind == "index" else
        target.astype(np.float64), **options)
    assert_close(loss, expected_loss, dtype, "loss")
    assert_close(grad, expected_grad, dtype, "grad")


def test_non_contiguous_inputs_and_output():
    base, _ = make_problem((8, 12), "index")
    logits = base[:, ::2]                          # strided columns
    target = np.arange(16)[::2] % 6                # strided int64 target
    weight = np.linspace(1, 2, 12)[::2]
    out_base = np.zeros((6, 8))
    out = out_base.T                               # Fortran-ordered output
    options = dict(weight=weight, label_smoothing=0.1, z_loss=0.01)
    loss, grad = fg.softmax_cross_entropy(logits, target, out=out, **options)
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(logits, target, **options)
    assert_close(loss, ref_loss, np.float64, "loss")
    assert_close(out, ref_grad, np.float64, "grad")
    assert np.shares_memory(out_base, grad)


@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_non_contiguous_spatial_and_inplace(target_kind):
    # Channels-last memory seen as (N, C, H, W): the spatial axes merge without a copy.
    nhwc, target = make_problem((2, 3, 4, 5), target_kind, seed=4)
    nhwc = np.ascontiguousarray(np.moveaxis(nhwc, 1, -1))
    logits = np.moveaxis(nhwc, -1, 1)
    assert not logits.flags.c_contiguous
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(logits, target)
    loss, grad = fg.softmax_cross_entropy(logits, target)
    assert_close(loss, ref_loss, np.float64, "loss")
    assert_close(grad, ref_grad, np.float64, "grad")
    # A (N, C, H, W) view whose spatial axes cannot merge: still correct, also inplace.
    padded = np.zeros((2, 3, 4, 10))
    padded[..., ::2] = logits
    view = padded[..., ::2].transpose(0, 1, 3, 2).transpose(0, 1, 3, 2)
    loss2, grad2 = fg.softmax_cross_entropy(view, target)
    assert_close(grad2, ref_grad, np.float64, "grad")
    view_t = padded.transpose(0, 1, 3, 2)[:, :, ::2, :]       # (2, 3, 5, 4), strides unmergeable
    target_t = target.transpose(0, 2, 1) if target_kind == "index" else \
        np.ascontiguousarray(target.transpose(0, 1, 3, 2))
    ref_loss_t, ref_grad_t, _ = reference.softmax_cross_entropy(view_t, target_t)
    loss3, grad3 = fg.softmax_cross_entropy(view_t, target_t, inplace=True)
    assert grad3 is view_t
    assert_close(loss3, ref_loss_t, np.float64, "loss")
    assert_close(view_t, ref_grad_t, np.float64, "grad written over logits")
    assert float(loss2) == pytest.approx(float(ref_loss))


# --------------------------------------------------------------------------------------------
# Validation: errors name the argument, and nothing is written before they are raised
# --------------------------------------------------------------------------------------------
def _bad_calls():
    logits, target = make_problem((4, 3), "index", ignore_some=False)
    return logits, target, [
        (dict(target=np.array([0, 1, 3, 0])), ValueError, "target"),
        (dict(target=np.array([0, 1, -1, 0])), ValueError, "target"),
        (dict(target=np.array([0, 1, 2])), ValueError, "target"),
        (dict(target=np.zeros(4, dtype=np.int16)), TypeError, "target"),
        (dict(target=np.zeros((4, 3), dtype=np.float32)), TypeError, "target"),
        (dict(weight=np.ones(4)), ValueError, "weight"),
        (dict(weight=np.ones(3, dtype=np.int64)), TypeError, "weight"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(label_smoothing=1.5), ValueError, "label_smoothing"),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
        (dict(z_loss=-1.0), ValueError, "z_loss"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(logits=np.zeros(4)), ValueError, "logits"),
        (dict(logits=np.zeros((4, 3), dtype=np.int64)), TypeError, "logits"),
        (dict(logits=np.zeros((4, 3), dtype=np.float16)), TypeError, "logits"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls()[2])))
@pytest.mark.parametrize("destination", ["out", "inplace"])
def test_validation_errors_name_argument_and_write_nothing(case, destination):
    logits, target, cases = _bad_calls()
    changes, error, name = cases[case]
    args = dict(logits=logits, target=target)
    args.update({k: v for k, v in changes.items() if k in ("logits", "target")})
    options = {k: v for k, v in changes.items() if k not in ("logits", "target")}
    before = args["logits"].copy()
    out = np.full((4, 3), 5.0)
    if destination == "out":
        options["out"] = out
    else:
        options["inplace"] = True
    with pytest.raises(error, match=name):
        fg.softmax_cross_entropy(args["logits"], args["target"], **options)
    np.testing.assert_array_equal(out, 5.0)
    np.testing.assert_array_equal(args["logits"], before)


def test_out_errors():
    logits, target = make_problem((4, 3), "index", ignore_some=False)
    with pytest.raises(ValueError, match="out and inplace"):
        fg.softmax_cross_entropy(logits, target, out=np.empty_like(logits), inplace=True)
    with pytest.raises(ValueError, match="out"):
        fg.softmax_cross_entropy(logits, target, out=np.empty((4, 4)))
    with pytest.raises(TypeError, match="out"):
        fg.softmax_cross_entropy(logits, target, out=np.empty((4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="out"):
        fg.softmax_cross_entropy(logits, target, out=logits)
    frozen = np.empty_like(logits)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out"):
        fg.softmax_cross_entropy(logits, target, out=frozen)
    with pytest.raises(TypeError, match="out"):
        fg.softmax_cross_entropy(logits, target, out=[[0.0] * 3] * 4)
    read_only = logits.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="inplace"):
        fg.softmax_cross_entropy(read_only, target, inplace=True)
    with pytest.raises(TypeError, match="inplace"):
        fg.softmax_cross_entropy(logits.tolist(), target, inplace=True)


def test_backward_validation():
    logits, target = make_problem((4, 3), "index", ignore_some=False)
    _, lse = fg.softmax_cross_entropy_forward(logits, target)
    out = np.full_like(logits, 5.0)
    with pytest.raises(ValueError, match="lse"):
        fg.softmax_cross_entropy_backward(1.0, logits, target, lse[:3], out=out)
    with pytest.raises(ValueError, match="grad_loss"):
        fg.softmax_cross_entropy_backward(np.ones(4), logits, target, lse, out=out)
    with pytest.raises(ValueError, match="grad_loss"):
        fg.softmax_cross_entropy_backward(1.0, logits, target, lse, reduction="none", out=out)
    with pytest.raises(ValueError, match="grad_loss"):
        fg.softmax_cross_entropy_backward(np.ones(3), logits, target, lse, reduction="none",
                                          out=out)
    with pytest.raises(ValueError, match="target"):
        fg.softmax_cross_entropy_backward(1.0, logits, np.array([0, 9, 0, 0]), lse, out=out)
    np.testing.assert_array_equal(out, 5.0)


@pytest.mark.parametrize("grad_loss", ["1", None, True, object(), np.array("x")])
def test_grad_loss_of_a_wrong_type_is_a_type_error(grad_loss):
    """Not a number and not an array: TypeError naming grad_loss (it was a ValueError saying
    the value, of shape (), must be a scalar), in the backward and in linear + cross-entropy."""
    logits, target = make_problem((4, 3), "index", ignore_some=False)
    _, lse = fg.softmax_cross_entropy_forward(logits, target)
    with pytest.raises(TypeError, match="grad_loss must be a real number"):
        fg.softmax_cross_entropy_backward(grad_loss, logits, target, lse)
    with pytest.raises(TypeError, match="grad_loss must be a real number"):
        fg.linear_cross_entropy(logits, np.eye(3, dtype=logits.dtype), target,
                                grad_loss=grad_loss)


def test_probability_targets_refuse_a_class_to_ignore():
    logits, probs = make_problem((4, 3), "prob")
    for call in (fg.softmax_cross_entropy, fg.softmax_cross_entropy_forward):
        with pytest.raises(ValueError, match="ignore_index must be negative"):
            call(logits, probs, ignore_index=0)
    loss, grad = fg.softmax_cross_entropy(logits, probs, ignore_index=-7)
    expected, expected_grad = fg.softmax_cross_entropy(logits, probs)
    assert loss == expected
    np.testing.assert_array_equal(grad, expected_grad)


@pytest.mark.parametrize("n_classes", [3, 100])  # the small-C kernel, the row kernel
def test_zero_upstream_gradient_keeps_nan_rows_as_pytorch(n_classes):
    """The row kernel zero-filled a row scaled by 0, so NaN or inf logits gave zeros where
    PyTorch (and the small-C kernel) give 0 * NaN = NaN."""
    logits = np.random.default_rng(0).standard_normal((4, n_classes))
    logits[1, 2], logits[2, 1] = np.nan, np.inf
    target = np.array([0, 1, 2, 0])
    _, lse = fg.softmax_cross_entropy_forward(logits, target, reduction="none")
    grad = fg.softmax_cross_entropy_backward(np.zeros(4), logits, target, lse,
                                             reduction="none")
    z = torch.tensor(logits, requires_grad=True)
    F.cross_entropy(z, torch.tensor(target), reduction="none").backward(torch.zeros(4))
    np.testing.assert_array_equal(grad, z.grad.numpy())


def test_list_inputs_are_accepted():
    loss, grad = fg.softmax_cross_entropy([[1.0, 2.0], [0.5, 0.0]], [1, 0])
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(
        np.array([[1.0, 2.0], [0.5, 0.0]]), np.array([1, 0]))
    assert_close(loss, ref_loss, np.float64, "loss")
    assert_close(grad, ref_grad, np.float64, "grad")


# --------------------------------------------------------------------------------------------
# Allocation: no N x C temporary
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 4096), (4, 256, 16, 16)])
def test_no_n_by_c_temporary(shape):
    logits, target = make_problem(shape, "index", np.float32)
    nbytes = logits.nbytes
    work = logits.copy()
    out = np.empty_like(logits)
    for kwargs in (dict(out=out), dict(inplace=True), dict()):     # compile outside the trace
        fg.softmax_cross_entropy(work.copy() if "inplace" in kwargs else logits, target,
                                 **kwargs)

    def peak(call):
        tracemalloc.start()
        tracemalloc.reset_peak()
        call()
        _, high = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return high

    # Per-sample arrays (loss, lse: 16 bytes a sample) and per-chunk scratch are all that is
    # allocated besides the gradient: a few percent of N x C here.
    assert peak(lambda: fg.softmax_cross_entropy(logits, target, out=out)) < 0.05 * nbytes
    assert peak(lambda: fg.softmax_cross_entropy(work, target, inplace=True)) < 0.05 * nbytes
    assert peak(lambda: fg.softmax_cross_entropy(logits, target)) < 1.05 * nbytes
    _, lse = fg.softmax_cross_entropy_forward(logits, target)
    assert peak(lambda: fg.softmax_cross_entropy_forward(logits, target)) < 0.05 * nbytes
    assert peak(lambda: fg.softmax_cross_entropy_backward(
        1.0, logits, target, lse, out=out)) < 0.05 * nbytes


# --------------------------------------------------------------------------------------------
# Edge cases found by differential testing against PyTorch (2026-12-06)
# --------------------------------------------------------------------------------------------
def test_inplace_refuses_inputs_that_share_memory_with_the_logits():
    """inplace=True writes over the logits while the kernel still reads the weights or the
    probability targets: a view of the logits there must raise, as out= does."""
    rng = np.random.default_rng(0)
    z = rng.random((6, 50)) + 0.5
    target = rng.integers(0, 50, 6)
    before = z.copy()
    with pytest.raises(ValueError, match="weight must not share memory with logits"):
        fg.softmax_cross_entropy(z, target, weight=z[0], inplace=True)
    p = rng.random((5, 7))
    with pytest.raises(ValueError, match="target must not share memory with logits"):
        fg.softmax_cross_entropy(p, p, inplace=True)
    np.testing.assert_array_equal(z, before)


@pytest.mark.parametrize("dtype", [np.float64])
@pytest.mark.parametrize("shape,target_kind", [((4, 100), "index"), ((2, 5, 3), "index")])
def test_forward_and_backward_take_read_only_logits(dtype, shape, target_kind):
    """Read-only logits (a frozen array, a broadcast view) go through the forward, which
    writes no gradient (it used to fail in Numba's typing, where the fused call worked). Each
    case compiles a kernel for the stand-in's layout, so two cases stand for the rest (the
    row and the tile kernels; the same stand-in serves every kernel and dtype)."""
    logits, target = make_problem(shape, target_kind, dtype, ignore_some=False)
    logits.flags.writeable = False
    loss, lse = fg.softmax_cross_entropy_forward(logits, target, reduction="none")
    fused_loss, fused_grad = fg.softmax_cross_entropy(logits, target, reduction="none")
    grad = fg.softmax_cross_entropy_backward(np.ones(loss.shape), logits, target, lse,
                                             reduction="none")
    ref_loss, ref_grad, _ = reference.softmax_cross_entropy(logits, target, reduction="none")
    for actual in (loss, fused_loss):
        assert_close(actual, ref_loss, dtype, "loss")
    for actual in (grad, fused_grad):
        assert_close(actual, ref_grad, dtype, "grad")
    row = np.linspace(-1.0, 1.0, 40).astype(dtype)
    broadcast = np.broadcast_to(row, (3, 40))
    expected, _, _ = reference.softmax_cross_entropy(np.tile(row, (3, 1)), np.arange(3))
    assert_close(fg.softmax_cross_entropy_forward(broadcast, np.arange(3))[0], expected, dtype,
                 "loss")


@pytest.mark.parametrize("shape", [(2, 40), (2, 40, 3)])
def test_probability_on_a_masked_class_weighted_zero_gives_nan_like_pytorch(shape):
    """A class with target probability > 0 and logit -inf has an infinite loss term, which a
    zero class weight turns into 0 * inf = NaN in PyTorch: the sums skip terms by y = 0 (a
    masked class nobody aims at), not by w y = 0."""
    logits, target = make_problem(shape, "prob", ignore_some=False)
    logits[:, 3] = -np.inf
    weight = np.ones(shape[1])
    weight[3] = 0.0
    loss, _ = fg.softmax_cross_entropy(logits, target, weight=weight)
    torch_loss = F.cross_entropy(torch.tensor(logits), torch.tensor(target),
                                 weight=torch.tensor(weight))
    assert np.isnan(loss) and np.isnan(torch_loss.item())
    target[:, 3] = 0.0  # nobody aims at the masked class: finite (PyTorch: NaN, docs/api.md)
    target /= target.sum(axis=1, keepdims=True)
    loss, _ = fg.softmax_cross_entropy(logits, target, weight=weight)
    ref_loss, _, _ = reference.softmax_cross_entropy(logits, target, weight=weight)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)


def test_backward_from_a_float64_lse_keeps_float32_precision():
    """The API returns lse in float32 for float32 logits (its rounding, 0.0005 at 1e4, limits a
    backward from it); given the float64 lse, the backward is as accurate as the fused call."""
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((16, 50)) + 1e4).astype(np.float32)
    target = rng.integers(0, 50, 16)
    _, ref_grad, ref_lse = reference.softmax_cross_entropy(logits.astype(np.float64), target)
    grad = fg.softmax_cross_entropy_backward(1.0, logits, target, ref_lse)
    assert np.abs(grad - ref_grad).max() < 1e-6 * np.abs(ref_grad).max()


@pytest.mark.parametrize("flag", ["no", 1, None])
def test_inplace_must_be_a_bool_and_nothing_is_overwritten(flag):
    """A truthy stand-in such as "no" would overwrite the logits: refused, before any write."""
    z = np.random.default_rng(0).random((3, 5))
    before = z.copy()
    with pytest.raises(TypeError, match="inplace must be a bool"):
        fg.softmax_cross_entropy(z, np.array([0, 1, 2]), inplace=flag)
    lse = fg.softmax_cross_entropy_forward(z, np.array([0, 1, 2]))[1]
    with pytest.raises(TypeError, match="inplace must be a bool"):
        fg.softmax_cross_entropy_backward(1.0, z, np.array([0, 1, 2]), lse, inplace=flag)
    np.testing.assert_array_equal(z, before)
    assert fg.softmax_cross_entropy(z, np.array([0, 1, 2]), inplace=np.bool_(False))[1] is not z


@pytest.mark.parametrize("ignore_index", [2**63, -2**63 - 1, 2**64])
def test_ignore_index_outside_int64_raises_value_error(ignore_index):
    with pytest.raises(ValueError, match="ignore_index must fit in a 64-bit signed integer"):
        fg.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1]), ignore_index=ignore_index)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_empty_batch_of_spatial_logits_matches_torch(reduction):
    z, t = np.zeros((0, 4, 2, 3)), np.zeros((0, 2, 3), np.int64)
    loss, grad = fg.softmax_cross_entropy(z, t, reduction=reduction)
    expected = F.cross_entropy(torch.tensor(z), torch.tensor(t), reduction=reduction).numpy()
    assert grad.shape == z.shape and loss.shape == expected.shape
    np.testing.assert_array_equal(loss, expected)
