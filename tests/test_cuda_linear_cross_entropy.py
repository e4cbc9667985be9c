"""fg.linear_cross_entropy on device arrays (``fusedgrad.cuda``) against the float64 reference.

Runs on a real GPU when there is one, else in Numba's CUDA simulator (in a subprocess, see
``cuda_support``), where the matrix products are NumPy's on the simulated arrays' host data and
the cross-entropy kernels are simulated: shapes stay tiny. The real-GPU tests run the products
through PyTorch (CUDA tensors, bfloat16 included) and the torch function under autograd.
"""
from __future__ import annotations

import numpy as np
import pytest

import cuda_support as cs
from cuda_support import api  # noqa: F401  (fixture)
from oracles import assert_close_scaled
from fusedgrad import reference as ref

test_kernels_in_simulator = cs.simulator_test(__file__)


def _problem(n, d, c, *, prob=False, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(dtype)
    w = (rng.normal(size=(c, d)) / np.sqrt(d)).astype(dtype)
    b = rng.normal(size=c).astype(dtype)
    if prob:
        target = rng.dirichlet(np.ones(c), size=n).astype(dtype)
    else:
        target = rng.integers(0, c, size=n)
        target[::3] = -100
    weight = rng.uniform(0.5, 2.0, size=c).astype(dtype)
    return x, w, b, target, weight


def _close(actual, expected, dtype, what):
    rtol, atol = {np.float64: (1e-11, 1e-12), np.float32: (2e-5, 2e-6)}[dtype]
    assert_close_scaled(actual, expected, rtol, atol, what)


CASES = [
    # prob, with bias, reduction, chunk_size, dtype
    (False, True, "mean", 3, np.float64),
    (False, False, "sum", None, np.float32),
    (False, True, "none", 2, np.float64),
    (True, True, "mean", 4, np.float32),
    (True, False, "none", 7, np.float64),
]


@cs.direct
@pytest.mark.parametrize("prob,with_bias,reduction,chunk_size,dtype", CASES)
def test_matches_reference(api, prob, with_bias, reduction, chunk_size, dtype):
    x, w, b, target, weight = _problem(5, 3, 6, prob=prob, dtype=dtype)
    grad_loss = np.linspace(-1.0, 2.0, 5) if reduction == "none" else 0.5
    options = dict(reduction=reduction, label_smoothing=0.1, z_loss=0.01)
    expected = ref.linear_cross_entropy(x, w, target, linear_bias=b if with_bias else None,
                                        weight=weight, grad_loss=grad_loss, **options)
    loss, grad_input, grad_weight, grad_bias = api.linear_cross_entropy(
        cs.to_device(x), cs.to_device(w), cs.to_device(target),
        linear_bias=cs.to_device(b) if with_bias else None, weight=cs.to_device(weight),
        grad_loss=cs.to_device(grad_loss) if reduction == "none" else grad_loss,
        chunk_size=chunk_size, **options)
    _close(cs.to_host(loss), expected[0], dtype, "loss")
    _close(cs.to_host(grad_input), expected[1], dtype, "grad_input")
    _close(cs.to_host(grad_weight), expected[2], dtype, "grad_linear_weight")
    assert cs.to_host(grad_input).dtype == dtype
    if with_bias:
        _close(cs.to_host(grad_bias), expected[3], dtype, "grad_linear_bias")
    else:
        assert grad_bias is None


@cs.direct
def test_softcap_matches_reference(api):
    """The capping itself is the cross-entropy kernels' (``CrossEntropyOptions.softcap``)."""
    x, w, b, target, _ = _problem(5, 3, 6, seed=4)
    x = 4.0 * x  # logits of a few units, so that the cap (at 1.5) bends them
    expected = ref.linear_cross_entropy(x, w, target, linear_bias=b, softcap=1.5, z_loss=0.01)
    results = api.linear_cross_entropy(cs.to_device(x), cs.to_device(w), cs.to_device(target),
                                       linear_bias=cs.to_device(b), softcap=1.5, z_loss=0.01,
                                       chunk_size=2)
    for name, actual, wanted in zip(("loss", "input", "weight", "bias"), results, expected):
        _close(cs.to_host(actual), wanted, np.float64, name)


@cs.direct
def test_forward_then_backward_from_lse(api):
    """The path of the torch function's "none" reduction: losses and lse, then the gradients
    for a per-row upstream gradient, each chunk's logits formed again."""
    from fusedgrad import linear_ce
    x, w, b, target, _ = _problem(5, 3, 6, seed=1)
    upstream = np.linspace(0.5, 1.5, 5)
    call = linear_ce.prepare(cs.to_device(x), cs.to_device(w), cs.to_device(target),
                             cs.to_device(b), None, -100, "none", 0.0, 0.0, None, 2)
    loss, lse = linear_ce.forward_of_checked(call)
    grads = linear_ce.backward_of_checked(call, cs.to_device(upstream), lse,
                                          linear_ce.ALL_GRADIENTS)
    expected = ref.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none",
                                        grad_loss=upstream)
    _close(cs.to_host(loss), expected[0], np.float64, "loss")
    _close(cs.to_host(lse), ref.logsumexp(x @ w.T + b, axis=1), np.float64, "lse")
    for name, actual, wanted in zip(("input", "weight", "bias"), grads, expected[1:]):
        _close(cs.to_host(actual), wanted, np.float64, name)


@cs.direct
def test_every_target_ignored_gives_nan_mean_and_zero_grads(api):
    x, w, b, _, _ = _problem(4, 3, 5)
    loss, grad_input, grad_weight, grad_bias = api.linear_cross_entropy(
        cs.to_device(x), cs.to_device(w), cs.to_device(np.full(4, -100)),
        linear_bias=cs.to_device(b), chunk_size=3)
    assert np.isnan(cs.to_host(loss))
    assert not cs.to_host(grad_input).any() and not cs.to_host(grad_weight).any()
    assert not cs.to_host(grad_bias).any()


@cs.direct
def test_empty_batch_gives_zero_weight_gradients(api):
    _, w, b, _, _ = _problem(1, 3, 5)
    loss, grad_input, grad_weight, grad_bias = api.linear_cross_entropy(
        cs.to_device(np.zeros((0, 3))), cs.to_device(w), cs.to_device(np.zeros(0, np.int64)),
        linear_bias=cs.to_device(b), reduction="sum")
    assert float(cs.to_host(loss)) == 0.0 and cs.to_host(grad_input).shape == (0, 3)
    assert not cs.to_host(grad_weight).any() and not cs.to_host(grad_bias).any()


@cs.direct
def test_host_and_device_arrays_mixed_raise_type_error(api):
    x, w, _, target, _ = _problem(4, 3, 5)
    with pytest.raises(TypeError, match="linear_weight"):
        api.linear_cross_entropy(cs.to_device(x), w, cs.to_device(target))
    with pytest.raises(TypeError, match="grad_loss"):
        api.linear_cross_entropy(cs.to_device(x), cs.to_device(w), cs.to_device(target),
                                 reduction="none", grad_loss=np.ones(4))


# --------------------------------------------------------------------------------------------
# Real GPU: products through PyTorch, bfloat16, the torch function
# --------------------------------------------------------------------------------------------
def _cuda_torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    return torch


@cs.real_gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_function_on_cuda_matches_composite(reduction):
    torch = _cuda_torch()
    import torch.nn.functional as F
    import fusedgrad.torch as fgt
    x, w, b, target, weight = _problem(300, 64, 5000, dtype=np.float32, seed=2)
    upstream = torch.rand(300, device="cuda") if reduction == "none" else None

    def run(function, dtype, **extra):
        xt = torch.tensor(x, device="cuda", dtype=dtype, requires_grad=True)
        wt = torch.tensor(w, device="cuda", dtype=dtype, requires_grad=True)
        bt = torch.tensor(b, device="cuda", dtype=dtype, requires_grad=True)
        loss = function(xt, wt, torch.tensor(target, device="cuda"), linear_bias=bt,
                        weight=torch.tensor(weight, device="cuda", dtype=dtype),
                        reduction=reduction, label_smoothing=0.1, **extra)
        loss.backward(upstream.to(dtype) if upstream is not None else None)
        return [t.float().cpu() for t in (loss.detach(), xt.grad, wt.grad, bt.grad)]

    def composite(x, w, t, linear_bias, **options):
        # the unfused composite (F.linear_cross_entropy is new in PyTorch 2.13; GPU images
        # may have an older PyTorch)
        return F.cross_entropy(F.linear(x, w, linear_bias), t, **options)

    expected = run(composite, torch.float32)
    for actual, wanted in zip(run(fgt.linear_cross_entropy, torch.float32, chunk_size=64),
                              expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-5)
    for actual, wanted in zip(run(fgt.linear_cross_entropy, torch.bfloat16), expected):
        torch.testing.assert_close(actual, wanted, rtol=3e-2,
                                   atol=3e-2 * float(wanted.abs().max()))


@cs.real_gpu
def test_numpy_api_on_cuda_tensors_and_bfloat16_accumulates_in_float32(api):
    torch = _cuda_torch()
    x, w, b, target, _ = _problem(256, 32, 3000, dtype=np.float32, seed=3)
    expected = ref.linear_cross_entropy(x, w, target, linear_bias=b)
    device_args = [torch.tensor(a, device="cuda") for a in (x, w, target, b)]
    loss, grad_input, grad_weight, grad_bias = api.linear_cross_entropy(
        *device_args[:3], linear_bias=device_args[3], chunk_size=50)
    _close(cs.to_host(loss), expected[0], np.float32, "loss")
    for name, actual, wanted in zip(("input", "weight", "bias"),
                                    (grad_input, grad_weight, grad_bias), expected[1:]):
        np.testing.assert_allclose(cs.to_host(actual), wanted, rtol=1e-4,
                                   atol=1e-5 * np.abs(wanted).max(), err_msg=name)
    bf16 = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in device_args]
    loss, grad_input, grad_weight, grad_bias = api.linear_cross_entropy(
        *bf16[:3], linear_bias=bf16[3], chunk_size=50)
    assert cs.to_host(grad_weight).dtype == np.float32
    assert cs.to_host(grad_bias).dtype == np.float32
    np.testing.assert_allclose(cs.to_host(grad_weight), expected[2],
                               atol=2e-2 * np.abs(expected[2]).max())
    np.testing.assert_allclose(cs.bfloat16_values(grad_input), expected[1],
                               atol=2e-2 * np.abs(expected[1]).max())
