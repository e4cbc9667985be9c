"""Logit soft-capping (``softcap=``) in fg.softmax_cross_entropy{,_forward,_backward} on the CPU.

The logits are capped as z' = c tanh(z / c) inside the kernels' pass over them, and gradients
are with respect to the uncapped z. The oracle is PyTorch's composite: ``F.cross_entropy`` of
``c * torch.tanh(z / c)`` in float64 (plus the z_loss term written out), differentiated by
autograd with respect to z; float64 finite differences check the gradient independently. Every
kernel path is exercised: rows with many classes (one block and several), the small-C kernel,
probability targets, k-D logits with index and probability targets, in place, ``out=``, and
forward + backward with a per-sample upstream gradient.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracles import central_differences
import fusedgrad as fg
import fusedgrad.torch as fgt
from fusedgrad import reference
from fusedgrad.cpu import cross_entropy as cpu_backend

# float32 kernels against a float64 oracle: tanh, exp and the sums round in float32.
RTOL = {np.float64: 1e-11, np.float32: 3e-5}
ATOL = {np.float64: 1e-13, np.float32: 3e-6}


def make_problem(shape, target_kind, dtype=np.float64, seed=0, scale=4.0, ignore_index=-100):
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal(shape)).astype(dtype)
    sample_shape = (shape[0],) + tuple(shape[2:])
    if target_kind == "index":
        target = rng.integers(0, shape[1], sample_shape)
        if target.size > 2:
            target.flat[::3] = ignore_index
    else:
        target = rng.random(shape)
        target = (target / target.sum(axis=1, keepdims=True)).astype(dtype)
    return logits, target


def torch_composite(logits, target, softcap, *, weight=None, ignore_index=-100,
                    reduction="mean", label_smoothing=0.0, z_loss=0.0, grad_loss=None):
    """(loss, d(grad_loss . loss)/d(logits), lse) of the capped logits through PyTorch's
    autograd, in float64. z_loss adds z_loss * w_t * lse^2 per non-ignored sample (w_t = 1 for
    probabilities) before PyTorch's reduction."""
    z = torch.tensor(np.asarray(logits, dtype=np.float64), requires_grad=True)
    capped = softcap * torch.tanh(z / softcap)
    t = torch.tensor(target)
    w = None if weight is None else torch.tensor(weight, dtype=torch.float64)
    if t.is_floating_point():
        t = t.double()
    per_sample = F.cross_entropy(capped, t, weight=w, ignore_index=ignore_index,
                                 reduction="none", label_smoothing=label_smoothing)
    lse = torch.logsumexp(capped, dim=1)
    if t.is_floating_point():
        sample_weight = torch.ones_like(lse)
        denominator = float(lse.numel())
    else:
        valid = t != ignore_index
        classes = torch.where(valid, t, 0)
        class_weight = torch.ones(z.shape[1], dtype=torch.float64) if w is None else w
        sample_weight = torch.where(valid, class_weight[classes], 0.0)
        denominator = float(sample_weight.sum())
    per_sample = per_sample + z_loss * sample_weight * lse ** 2
    if reduction == "none":
        loss = per_sample
    elif reduction == "sum":
        loss = per_sample.sum()
    elif denominator == 0.0:  # PyTorch's "mean" over no sample: a NaN loss, a zero gradient
        loss = per_sample.sum() * 0.0 + float("nan")
    else:
        loss = per_sample.sum() / denominator
    upstream = torch.ones_like(loss) if grad_loss is None else torch.as_tensor(grad_loss)
    loss.backward(upstream)
    return loss.detach().numpy(), z.grad.numpy(), lse.detach().numpy()


def assert_close(actual, expected, dtype, what, magnitude=1.0):
    """Close to rounding; ``magnitude``: a bound on the capped logits, whose rounding the loss
    carries (it is lse * sum_c w_c q_c - sum_c w_c q_c z'_c, two terms of that size)."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, magnitude, float(np.max(np.abs(expected))) if expected.size else 1.0)
    np.testing.assert_allclose(actual, expected, rtol=RTOL[dtype], atol=ATOL[dtype] * scale,
                               err_msg=what)


# --------------------------------------------------------------------------------------------
# Every kernel path against PyTorch's composite
# --------------------------------------------------------------------------------------------
#: (shape, target kind): which kernel each one reaches is asserted in test_paths_are_the_kernels.
PATHS = {
    "rows": ((6, 50), "index"),
    "rows_blocks": ((3, 5000), "index"),       # several BLOCKs per row
    "small_c": ((40, 10), "index"),           # C <= SMALL_C
    "rows_prob": ((6, 50), "prob"),
    "rows_prob_blocks": ((3, 5000), "prob"),
    "tiles": ((3, 7, 4, 5), "index"),
    "tiles_wide": ((2, 5, 70), "index"),       # more positions than one TILE
    "tiles_prob": ((3, 7, 4, 5), "prob"),
}
OPTION_SETS = {
    "plain": dict(),
    "all": dict(weight="linspace", label_smoothing=0.1, z_loss=1e-3),
    "ignore_index": dict(ignore_index=1, label_smoothing=0.25),   # class-index targets only
}


def _options(option_set, n_classes):
    options = dict(OPTION_SETS[option_set])
    if options.get("weight") == "linspace":
        options["weight"] = np.linspace(0.5, 2.0, n_classes)
    return options


def test_paths_are_the_kernels(monkeypatch):
    """The shapes of PATHS reach the kernels they are named after."""
    expected = {"rows": "_rows_index_kernel", "rows_blocks": "_rows_index_kernel",
                "small_c": "_rows_small_kernel", "rows_prob": "_rows_prob_kernel",
                "rows_prob_blocks": "_rows_prob_kernel", "tiles": "_tiles_index_kernel",
                "tiles_wide": "_tiles_index_kernel", "tiles_prob": "_tiles_prob_kernel"}
    launched = []
    launch = cpu_backend._launch
    monkeypatch.setattr(cpu_backend, "_launch",
                        lambda kernel, *args: launched.append(kernel) or launch(kernel, *args))
    assert PATHS["rows_blocks"][0][1] > cpu_backend.BLOCK
    assert PATHS["small_c"][0][1] <= cpu_backend.SMALL_C
    assert PATHS["tiles_wide"][0][2] > cpu_backend.TILE
    for name, (shape, kind) in PATHS.items():
        launched.clear()
        logits, target = make_problem(shape, kind)
        fg.softmax_cross_entropy(logits, target, softcap=2.0)
        assert [k.py_func.__name__ for k in launched] == [expected[name]], name


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("path,option_set", [
    (path, option_set) for path in PATHS for option_set in OPTION_SETS
    if not (PATHS[path][1] == "prob" and option_set == "ignore_index")])
def test_matches_torch_composite(path, option_set, reduction, dtype):
    shape, kind = PATHS[path]
    softcap = 2.5
    options = dict(_options(option_set, shape[1]), reduction=reduction)
    logits, target = make_problem(shape, kind, dtype, seed=len(path),
                                  ignore_index=options.get("ignore_index", -100))
    want_loss, want_grad, want_lse = torch_composite(logits, target, softcap, **options)

    loss, grad = fg.softmax_cross_entropy(logits, target, softcap=softcap, **options)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close(loss, want_loss, dtype, "fused loss")
    assert_close(grad, want_grad, dtype, "fused grad")

    loss_f, lse = fg.softmax_cross_entropy_forward(logits, target, softcap=softcap, **options)
    assert_close(loss_f, want_loss, dtype, "forward loss")
    assert_close(lse, want_lse, dtype, "lse of the capped logits")
    # a per-sample upstream gradient for "none", a scalar otherwise
    grad_loss = (np.linspace(-1.0, 2.0, lse.size).reshape(lse.shape) if reduction == "none"
                 else 0.75)
    _, want_scaled, _ = torch_composite(logits, target, softcap, grad_loss=grad_loss, **options)
    grad_b = fg.softmax_cross_entropy_backward(grad_loss, logits, target, lse, softcap=softcap,
                                               **options)
    assert_close(grad_b, want_scaled, dtype, "backward grad")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("path", list(PATHS))
def test_out_and_inplace(path, dtype):
    shape, kind = PATHS[path]
    softcap = 1.5
    options = dict(weight=np.linspace(0.5, 2.0, shape[1]), label_smoothing=0.1, z_loss=1e-3,
                   softcap=softcap)
    logits, target = make_problem(shape, kind, dtype, seed=3)
    _, want_grad, _ = torch_composite(logits, target, **options)
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)

    out = np.full_like(logits, 7.0)
    loss_out, grad_out = fg.softmax_cross_entropy(logits, target, out=out, **options)
    assert grad_out is out
    np.testing.assert_array_equal(out, grad)
    assert float(loss_out) == float(loss)

    work = logits.copy()
    loss_in, grad_in = fg.softmax_cross_entropy(work, target, inplace=True, **options)
    assert grad_in is work
    assert_close(work, want_grad, dtype, "inplace grad")
    assert float(loss_in) == pytest.approx(float(loss), rel=RTOL[dtype])

    _, lse = fg.softmax_cross_entropy_forward(logits, target, **options)
    work = logits.copy()
    grad_back = fg.softmax_cross_entropy_backward(1.0, work, target, lse, inplace=True,
                                                  **options)
    assert grad_back is work
    assert_close(work, want_grad, dtype, "inplace backward grad")
    out = np.full_like(logits, 7.0)
    fg.softmax_cross_entropy_backward(1.0, logits, target, lse, out=out, **options)
    assert_close(out, want_grad, dtype, "backward grad into out")


def test_non_contiguous_and_unmergeable_spatial_logits():
    # strided 2-D rows (not the small-C kernel), and k-D logits whose spatial axes cannot be
    # merged into one (the kernel works on a copy and copies the gradient back)
    base, _ = make_problem((8, 24), "index", seed=4)
    logits = base[:, ::2]
    target = np.arange(8) % 12
    options = dict(label_smoothing=0.1, softcap=3.0)
    _, want_grad, _ = torch_composite(logits, target, **options)
    _, grad = fg.softmax_cross_entropy(logits, target, **options)
    assert_close(grad, want_grad, np.float64, "strided rows")

    padded = np.zeros((2, 3, 4, 10))
    padded[..., ::2] = make_problem((2, 3, 4, 5), "index", seed=5)[0]
    view = padded.transpose(0, 1, 3, 2)[:, :, ::2, :]
    target = np.random.default_rng(5).integers(0, 3, (2, 5, 4))
    _, want_grad, _ = torch_composite(view, target, **options)
    loss, grad = fg.softmax_cross_entropy(view, target, inplace=True, **options)
    assert grad is view
    assert_close(view, want_grad, np.float64, "unmergeable spatial axes, in place")


# --------------------------------------------------------------------------------------------
# Finite differences (float64), the reference, and named edge cases
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["rows", "small_c", "rows_prob", "tiles", "tiles_prob"])
def test_gradient_matches_finite_differences(path):
    shape = {"rows": (3, 40), "small_c": (4, 5), "rows_prob": (3, 40), "tiles": (2, 3, 4),
             "tiles_prob": (2, 3, 4)}[path]
    kind = PATHS[path][1]
    logits, target = make_problem(shape, kind, seed=11, scale=2.0)
    options = dict(weight=np.linspace(0.5, 1.5, shape[1]), label_smoothing=0.2, z_loss=0.05,
                   softcap=1.5)
    _, grad = fg.softmax_cross_entropy(logits, target, **options)
    numeric = central_differences(
        lambda z: float(fg.softmax_cross_entropy_forward(z, target, **options)[0]), logits)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("target_kind", ["index", "prob"])
@pytest.mark.parametrize("shape", [(5, 9), (2, 4, 3)])
def test_reference_matches_torch_composite(target_kind, shape):
    logits, target = make_problem(shape, target_kind, seed=2)
    logits.flat[::7] = -np.inf
    options = dict(weight=np.linspace(0.5, 2.0, shape[1]), reduction="sum",
                   label_smoothing=0.1, z_loss=0.01, softcap=2.0)
    got = reference.softmax_cross_entropy(logits, target, **options)
    want = torch_composite(logits, target, **options)
    for g, w, what in zip(got, want, ("loss", "grad", "lse")):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-14, err_msg=what)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("path", list(PATHS))
def test_minus_inf_logits_become_minus_softcap(path, dtype):
    """tanh(-inf) = -1: a masked logit is capped to -c (not masked any more, as in PyTorch's
    composite) and its gradient is 0 (the slope 1 - tanh^2 is 0 there); a row of -inf only is
    a uniform softmax over -c."""
    shape, kind = PATHS[path]
    logits, target = make_problem(shape, kind, dtype, seed=6)
    logits.flat[1::4] = -np.inf
    logits[0] = -np.inf
    if kind == "index":
        target.flat[0] = 0
    options = dict(label_smoothing=0.1, reduction="none", softcap=2.0)
    want_loss, want_grad, want_lse = torch_composite(logits, target, **options)
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)
    _, lse = fg.softmax_cross_entropy_forward(logits, target, **options)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad))
    assert np.all(grad[np.isneginf(logits)] == 0.0)
    assert_close(loss, want_loss, dtype, "loss")
    assert_close(grad, want_grad, dtype, "grad")
    assert_close(lse, want_lse, dtype, "lse")
    n_classes = shape[1]
    assert_close(lse.reshape(shape[0], -1)[0], np.full(lse[0].size, -2.0 + np.log(n_classes)),
                 dtype, "lse of a row of -inf")


@pytest.mark.parametrize("path", list(PATHS))
def test_tiny_softcap_saturates(path):
    """With c = 1e-3 nearly every logit saturates to +-c with slope 0: the loss is that of
    logits in [-c, c] and only the few unsaturated logits get a gradient."""
    shape, kind = PATHS[path]
    logits, target = make_problem(shape, kind, seed=7)
    logits.flat[::5] *= 1e-4
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=1e-3)
    want_loss, want_grad, _ = torch_composite(logits, target, **options)
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)
    assert_close(loss, want_loss, np.float64, "loss")
    assert_close(grad, want_grad, np.float64, "grad")
    assert np.count_nonzero(grad) <= np.count_nonzero(np.abs(logits) < 0.05)


def test_nan_logit_gives_nan_loss_for_its_sample_only():
    logits, target = make_problem((3, 40), "index", seed=8)
    target[:] = 1
    logits[1, 4] = np.nan
    loss, _ = fg.softmax_cross_entropy(logits, target, reduction="none", softcap=5.0)
    assert np.isnan(loss[1]) and np.all(np.isfinite(loss[[0, 2]]))


def test_every_target_ignored():
    logits, _ = make_problem((4, 6), "index")
    target = np.full(4, -100)
    loss, grad = fg.softmax_cross_entropy(logits, target, softcap=3.0)
    assert np.isnan(loss)
    np.testing.assert_array_equal(grad, 0.0)


def test_large_softcap_approaches_no_cap():
    logits, target = make_problem((5, 40), "index", seed=9)
    options = dict(weight=np.linspace(0.5, 2.0, 40), label_smoothing=0.1, z_loss=1e-3)
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)
    loss_cap, grad_cap = fg.softmax_cross_entropy(logits, target, softcap=1e6, **options)
    np.testing.assert_allclose(loss_cap, loss, rtol=1e-9)
    np.testing.assert_allclose(grad_cap, grad, rtol=1e-8, atol=1e-12)


@st.composite
def capped_problems(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(1, 40))
    spatial = draw(st.sampled_from([(), (3,), (2, 3)]))
    shape = (n, c) + spatial
    kind = draw(st.sampled_from(["index", "prob"]))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1.0, 30.0]))
    logits, target = make_problem(shape, kind, seed=seed, scale=scale)
    if draw(st.booleans()):
        logits.flat[::3] = -np.inf
    options = dict(
        softcap=draw(st.sampled_from([1e-3, 0.1, 1.0, 15.0, 1e4])),
        reduction=draw(st.sampled_from(["mean", "sum", "none"])),
        label_smoothing=draw(st.sampled_from([0.0, 0.1, 1.0])),
        z_loss=draw(st.sampled_from([0.0, 1e-3])),
    )
    if draw(st.booleans()):
        options["weight"] = np.random.default_rng(seed).random(c) + 0.1
    return logits, target, options


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(capped_problems())
def test_hypothesis_against_torch_composite(problem):
    logits, target, options = problem
    want_loss, want_grad, want_lse = torch_composite(logits, target, **options)
    loss, grad = fg.softmax_cross_entropy(logits, target, **options)
    loss_f, lse = fg.softmax_cross_entropy_forward(logits, target, **options)
    grad_loss = np.ones(lse.shape) if options["reduction"] == "none" else 1.0
    grad_b = fg.softmax_cross_entropy_backward(grad_loss, logits, target, lse, **options)
    if np.all(np.isnan(want_loss)):
        assert np.all(np.isnan(loss)) and np.all(np.isnan(loss_f))
    else:
        capped_size = options["softcap"]  # |c tanh(z / c)| < c
        assert_close(loss, want_loss, np.float64, "loss", capped_size)
        assert_close(loss_f, want_loss, np.float64, "forward loss", capped_size)
    assert_close(lse, want_lse, np.float64, "lse")
    assert_close(grad, want_grad, np.float64, "grad")
    assert_close(grad_b, want_grad, np.float64, "backward grad")


@pytest.mark.parametrize("path", list(PATHS))
def test_softcap_none_is_the_default_bit_for_bit(path):
    # The uncapped kernels are compiled for softcap=None; passing it explicitly is the default.
    shape, kind = PATHS[path]
    logits, target = make_problem(shape, kind, np.float32, seed=10)
    options = dict(weight=np.linspace(0.5, 2.0, shape[1]), label_smoothing=0.1, z_loss=1e-3)
    default = fg.softmax_cross_entropy(logits, target, **options)
    explicit = fg.softmax_cross_entropy(logits, target, softcap=None, **options)
    for a, b in zip(default, explicit):
        assert a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------------------------
# Bad softcap values: refused before anything is written
# --------------------------------------------------------------------------------------------
BAD_SOFTCAPS = [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                (float("inf"), ValueError), ("2", TypeError), (True, TypeError),
                ([1.0], TypeError), (1 + 2j, TypeError)]


@pytest.mark.parametrize("softcap,error", BAD_SOFTCAPS)
@pytest.mark.parametrize("destination", ["out", "inplace"])
def test_bad_softcap_raises_before_writing(softcap, error, destination):
    logits, target = make_problem((4, 3), "index")
    _, lse = fg.softmax_cross_entropy_forward(logits, target)
    before = logits.copy()
    out = np.full_like(logits, 5.0)
    where = dict(out=out) if destination == "out" else dict(inplace=True)
    with pytest.raises(error, match="softcap"):
        fg.softmax_cross_entropy(logits, target, softcap=softcap, **where)
    with pytest.raises(error, match="softcap"):
        fg.softmax_cross_entropy_backward(1.0, logits, target, lse, softcap=softcap, **where)
    with pytest.raises(error, match="softcap"):
        fg.softmax_cross_entropy_forward(logits, target, softcap=softcap)
    np.testing.assert_array_equal(out, 5.0)
    np.testing.assert_array_equal(logits, before)


@pytest.mark.parametrize("softcap,error", BAD_SOFTCAPS)
def test_bad_softcap_is_refused_by_the_torch_wrappers(softcap, error):
    logits = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(error, match="softcap"):
        fgt.softmax_cross_entropy(logits, torch.tensor([0, 1]), softcap=softcap)
    with pytest.raises(error, match="softcap"):
        fgt.CrossEntropyLoss(softcap=softcap)


def test_integer_and_numpy_softcaps_are_accepted():
    logits, target = make_problem((4, 6), "index")
    expected = fg.softmax_cross_entropy(logits, target, softcap=2.0)
    for softcap in (2, np.float32(2.0), np.int64(2)):
        got = fg.softmax_cross_entropy(logits, target, softcap=softcap)
        for a, b in zip(got, expected):
            assert a.tobytes() == b.tobytes()


# --------------------------------------------------------------------------------------------
# fusedgrad.torch
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["index", "prob"])
def test_torch_function_matches_composite_and_gradcheck(reduction, target_kind):
    shape = (4, 6, 3)
    logits, target = make_problem(shape, target_kind, seed=12)
    weight = torch.linspace(0.5, 2.0, shape[1], dtype=torch.float64)
    options = dict(reduction=reduction, label_smoothing=0.1)
    z = torch.tensor(logits, requires_grad=True)
    t = torch.tensor(target, requires_grad=target_kind == "prob")
    loss = fgt.softmax_cross_entropy(z, t, weight, z_loss=1e-3, softcap=2.0, **options)
    want_loss, want_grad, _ = torch_composite(logits, target, 2.0, weight=weight.numpy(),
                                              z_loss=1e-3, **options)
    loss.sum().backward()
    np.testing.assert_allclose(loss.detach().numpy(), want_loss, rtol=1e-12)
    np.testing.assert_allclose(z.grad.numpy(), want_grad, rtol=1e-11, atol=1e-14)

    def capped_loss(x, y):
        return fgt.softmax_cross_entropy(x, y, weight, softcap=2.0, z_loss=0.05, **options)

    inputs = (torch.tensor(logits, requires_grad=True),
              torch.tensor(target, requires_grad=target_kind == "prob"))
    assert torch.autograd.gradcheck(capped_loss, inputs, eps=1e-6, atol=1e-7)


def test_probability_target_gradient_uses_the_capped_logits():
    logits, target = make_problem((5, 7), "prob", seed=13)
    y = torch.tensor(target, requires_grad=True)
    fgt.softmax_cross_entropy(torch.tensor(logits), y, label_smoothing=0.2,
                              softcap=1.5).backward()
    y_ref = torch.tensor(target, requires_grad=True)
    capped = 1.5 * torch.tanh(torch.tensor(logits) / 1.5)
    F.cross_entropy(capped, y_ref, label_smoothing=0.2).backward()
    np.testing.assert_allclose(y.grad.numpy(), y_ref.grad.numpy(), rtol=1e-12)


def test_cross_entropy_loss_module():
    weight = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)
    module = fgt.CrossEntropyLoss(weight=weight, label_smoothing=0.1, softcap=3.0)
    assert module.softcap == 3.0 and "softcap=3.0" in repr(module)
    assert "softcap" not in repr(fgt.CrossEntropyLoss())
    logits, target = make_problem((6, 5), "index", seed=14)
    z = torch.tensor(logits, requires_grad=True)
    module(z, torch.tensor(target)).backward()
    _, want_grad, _ = torch_composite(logits, target, 3.0, weight=weight.numpy(),
                                      label_smoothing=0.1)
    np.testing.assert_allclose(z.grad.numpy(), want_grad, rtol=1e-11, atol=1e-14)
    state = module.state_dict()
    assert set(state) == {"weight"}


def test_torch_float32_and_unbatched_input():
    logits, target = make_problem((7, 40), "index", np.float32, seed=15)
    z = torch.tensor(logits, requires_grad=True)
    loss = fgt.softmax_cross_entropy(z, torch.tensor(target), softcap=4.0)
    loss.backward()
    assert loss.dtype == torch.float32 and z.grad.dtype == torch.float32
    want_loss, want_grad, _ = torch_composite(logits, target, 4.0)
    np.testing.assert_allclose(loss.item(), want_loss, rtol=3e-6)
    np.testing.assert_allclose(z.grad.numpy(), want_grad, rtol=3e-5, atol=3e-7)
    single = torch.tensor(logits[0], dtype=torch.float64)
    capped = 4.0 * torch.tanh(single / 4.0)
    np.testing.assert_allclose(
        fgt.softmax_cross_entropy(single, torch.tensor(target[0]), softcap=4.0).item(),
        F.cross_entropy(capped, torch.tensor(target[0])).item(), rtol=1e-13)
