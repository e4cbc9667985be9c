"""The float64 reference is the oracle of every other test, so it is checked first: against
PyTorch's float64 implementation and against central finite differences."""
import numpy as np
import pytest

from oracles import central_differences
from fusedgrad import reference as R

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_cross_entropy(logits, target, weight, **options):
    z = torch.tensor(logits, requires_grad=True)
    w = None if weight is None else torch.tensor(weight)
    loss = F.cross_entropy(z, torch.tensor(target), weight=w, **options)
    loss.sum().backward()
    return loss.detach().numpy(), z.grad.numpy()


def _problem(rng, shape, probabilities):
    logits = rng.normal(size=shape) * 3
    sample_shape = (shape[0],) + shape[2:]
    if probabilities:
        target = np.moveaxis(rng.dirichlet(np.ones(shape[1]), size=sample_shape), -1, 1)
    else:
        target = rng.integers(0, shape[1], size=sample_shape)
        target.flat[0] = -100
    return logits, target, rng.uniform(0.5, 2.0, size=shape[1])


@pytest.mark.parametrize("shape", [(7, 5), (4, 6, 3, 2)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("probabilities", [False, True])
def test_cross_entropy_matches_torch(shape, reduction, label_smoothing, weighted, probabilities):
    rng = np.random.default_rng(0)
    logits, target, weight = _problem(rng, shape, probabilities)
    weight = weight if weighted else None
    loss, grad, _ = R.softmax_cross_entropy(logits, target, weight=weight, reduction=reduction,
                                            label_smoothing=label_smoothing)
    expected_loss, expected_grad = _torch_cross_entropy(
        logits, target, weight, reduction=reduction, label_smoothing=label_smoothing)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("probabilities", [False, True])
def test_cross_entropy_gradient_matches_finite_differences(probabilities):
    rng = np.random.default_rng(1)
    logits, target, weight = _problem(rng, (3, 4), probabilities)
    options = dict(weight=weight, label_smoothing=0.2, z_loss=0.1)
    _, grad, _ = R.softmax_cross_entropy(logits, target, **options)
    numeric = central_differences(
        lambda z: R.softmax_cross_entropy(z, target, **options)[0], logits)
    np.testing.assert_allclose(grad, numeric, atol=1e-8)


def test_cross_entropy_gradient_is_p_minus_y():
    """``docs/derivations.md``, 1(b): one-hot targets, no options: dL/dz = p - y (sum reduction)."""
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(5, 7))
    target = rng.integers(0, 7, size=5)
    _, grad, _ = R.softmax_cross_entropy(logits, target, reduction="sum")
    np.testing.assert_allclose(grad, R.softmax(logits) - np.eye(7)[target], atol=1e-15)


def test_cross_entropy_all_ignored_mean_is_nan_with_zero_gradient():
    loss, grad, _ = R.softmax_cross_entropy(np.zeros((3, 4)), np.full(3, -100))
    assert np.isnan(loss)
    assert not grad.any()


@pytest.mark.parametrize("shape,axis", [((8, 3), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1),
                                        ((2, 3, 4), 1)])
def test_batch_norm_matches_torch(shape, axis):
    rng = np.random.default_rng(3)
    x = rng.normal(size=shape) * 2 + 1
    channels = shape[axis]
    weight, bias = rng.normal(size=channels), rng.normal(size=channels)
    running_mean, running_var = rng.normal(size=channels), rng.uniform(0.5, 2, size=channels)
    y, mean, invstd, running = R.batch_norm_forward(x, weight, bias, running_mean, running_var,
                                                    momentum=0.1, channel_axis=axis)
    xt = torch.tensor(np.moveaxis(x, axis, 1).copy(), requires_grad=True)
    rm, rv = torch.tensor(running_mean), torch.tensor(running_var)
    wt = torch.tensor(weight, requires_grad=True)
    bt = torch.tensor(bias, requires_grad=True)
    yt = F.batch_norm(xt, rm, rv, wt, bt, training=True, momentum=0.1)
    np.testing.assert_allclose(np.moveaxis(yt.detach().numpy(), 1, axis), y, atol=1e-12)
    np.testing.assert_allclose(running[0], rm.numpy(), atol=1e-12)
    np.testing.assert_allclose(running[1], rv.numpy(), atol=1e-12)
    dy = rng.normal(size=shape)
    yt.backward(torch.tensor(np.moveaxis(dy, axis, 1).copy()))
    dx, dweight, dbias = R.batch_norm_backward(dy, x, mean, invstd, weight, channel_axis=axis)
    np.testing.assert_allclose(np.moveaxis(xt.grad.numpy(), 1, axis), dx, atol=1e-10)
    np.testing.assert_allclose(dweight, wt.grad.numpy(), atol=1e-10)
    np.testing.assert_allclose(dbias, bt.grad.numpy(), atol=1e-10)


def test_batch_norm_backward_matches_finite_differences():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 2, 3))
    weight, bias, dy = rng.normal(size=2), rng.normal(size=2), rng.normal(size=(5, 2, 3))

    def objective(values):
        return float((R.batch_norm_forward(values, weight, bias)[0] * dy).sum())

    _, mean, invstd, _ = R.batch_norm_forward(x, weight, bias)
    dx, _, _ = R.batch_norm_backward(dy, x, mean, invstd, weight)
    np.testing.assert_allclose(dx, central_differences(objective, x), atol=1e-7)


def test_batch_norm_eval_uses_running_statistics():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 3))
    running_mean, running_var = rng.normal(size=3), rng.uniform(0.5, 2, size=3)
    y, mean, invstd, running = R.batch_norm_forward(x, None, None, running_mean, running_var,
                                                    training=False)
    assert running is None
    np.testing.assert_allclose(mean, running_mean)
    np.testing.assert_allclose(y, (x - running_mean) / np.sqrt(running_var + 1e-5))
