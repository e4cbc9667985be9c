"""fusedgrad.torch vs PyTorch: values, gradcheck, modules, training side by side, checkpoints."""
from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fusedgrad.torch as fgt  # noqa: E402
from fusedgrad import reference  # noqa: E402
from fusedgrad._torch_ops import meta_copy_arguments  # noqa: E402

F64 = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits_and_targets(shape, seed=0, dtype=F64, ignore=False, probabilities=False):
    """Logits of ``shape`` (N, C, ...) and matching class-index or probability targets."""
    gen = _generator(seed)
    n_classes = shape[1]
    logits = (3 * torch.randn(shape, generator=gen)).to(dtype)
    if probabilities:
        target = torch.softmax(torch.randn(shape, generator=gen), dim=1).to(dtype)
    else:
        target = torch.randint(0, n_classes, (shape[0],) + tuple(shape[2:]), generator=gen)
        if ignore:
            target.view(-1)[::3] = -100
    return logits, target


def _class_weight(n_classes, seed=1, dtype=F64):
    return (0.5 + torch.rand(n_classes, generator=_generator(seed))).to(dtype)


# --------------------------------------------------------------------------------------------
# softmax_cross_entropy vs F.cross_entropy
# --------------------------------------------------------------------------------------------
def _loss_and_grad(loss_function, logits, target, **options):
    """The loss, and the gradient of sum(loss * upstream) with respect to ``logits``."""
    z = logits.clone().requires_grad_()
    loss = loss_function(z, target, **options)
    upstream = torch.rand(loss.shape, generator=_generator(2), dtype=loss.dtype)
    (grad,) = torch.autograd.grad((loss * upstream).sum(), z)
    return loss, grad


CE_CASES = [
    # shape, probability targets, ignored targets, class weights, label smoothing
    ((7, 5), False, False, False, 0.0),
    ((7, 5), False, True, True, 0.0),
    ((7, 5), False, True, True, 0.2),
    ((4, 6, 3), False, True, True, 0.1),
    ((3, 4, 2, 3), False, False, True, 0.0),
    ((6, 5), True, False, False, 0.0),
    ((6, 5), True, False, True, 0.3),
    ((2, 4, 3, 2), True, False, True, 0.1),
]


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,probabilities,ignore,weighted,smoothing", CE_CASES)
def test_cross_entropy_matches_torch(shape, probabilities, ignore, weighted, smoothing,
                                     reduction, dtype):
    logits, target = _logits_and_targets(shape, dtype=dtype, ignore=ignore,
                                         probabilities=probabilities)
    weight = _class_weight(shape[1], dtype=dtype) if weighted else None
    options = dict(weight=weight, reduction=reduction, label_smoothing=smoothing)
    ours, grad_ours = _loss_and_grad(fgt.softmax_cross_entropy, logits, target, **options)
    theirs, grad_theirs = _loss_and_grad(F.cross_entropy, logits, target, **options)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=2e-5, atol=2e-6)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **tol)
    torch.testing.assert_close(grad_ours, grad_theirs, **tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape,probabilities,ignore,weighted,smoothing", CE_CASES)
def test_cross_entropy_gradcheck(shape, probabilities, ignore, weighted, smoothing, reduction):
    logits, target = _logits_and_targets(shape, ignore=ignore, probabilities=probabilities)
    weight = _class_weight(shape[1]) if weighted else None
    inputs = [logits.requires_grad_()]
    if probabilities:  # PyTorch differentiates probability targets too
        inputs.append(target.requires_grad_())

    def loss(z, *soft_target):
        t = soft_target[0] if soft_target else target
        return fgt.softmax_cross_entropy(z, t, weight, reduction=reduction,
                                         label_smoothing=smoothing)

    assert torch.autograd.gradcheck(loss, tuple(inputs))


@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_z_loss_matches_reference_and_gradcheck(reduction, probabilities):
    logits, target = _logits_and_targets((5, 4, 2), seed=3, ignore=not probabilities,
                                         probabilities=probabilities)
    weight = _class_weight(4)
    z = logits.clone().requires_grad_()
    loss = fgt.softmax_cross_entropy(z, target, weight, reduction=reduction,
                                     label_smoothing=0.1, z_loss=1e-2)
    loss.sum().backward()
    want_loss, want_grad, _ = reference.softmax_cross_entropy(
        logits.numpy(), target.numpy(), weight=weight.numpy(), reduction=reduction,
        label_smoothing=0.1, z_loss=1e-2)
    np.testing.assert_allclose(loss.detach().numpy(), want_loss, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(z.grad.numpy(), want_grad, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(
        lambda x: fgt.softmax_cross_entropy(x, target, weight, reduction=reduction,
                                            z_loss=0.05), (logits.requires_grad_(),))


def test_cross_entropy_unbatched_input():
    logits = torch.randn(6, dtype=F64, generator=_generator(4))
    for target in (torch.tensor(2), torch.softmax(torch.randn(6, dtype=F64), 0)):
        for reduction in ("mean", "none"):
            ours = fgt.softmax_cross_entropy(logits, target, reduction=reduction)
            theirs = F.cross_entropy(logits, target, reduction=reduction)
            assert ours.shape == theirs.shape
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_every_target_ignored_gives_nan_mean_and_zero_grad():
    logits = torch.randn(4, 3, dtype=F64, requires_grad=True)
    target = torch.full((4,), -100)
    loss = fgt.softmax_cross_entropy(logits, target)
    loss.backward()
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(logits, target))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_mean_over_targets_weighted_zero_gives_nan_like_pytorch():
    logits = torch.randn(4, 3, dtype=F64, requires_grad=True)
    target = torch.tensor([0, -100, 1, 0])
    weight = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    fgt.softmax_cross_entropy(logits, target, weight=weight).backward()
    ours, logits.grad = logits.grad, None
    F.cross_entropy(logits, target, weight=weight).backward()
    torch.testing.assert_close(ours, logits.grad, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(ours[[0, 2, 3]]).all() and not ours[1].any()


def test_cross_entropy_saves_only_inputs_and_lse():
    logits, target = _logits_and_targets((8, 5, 3))
    logits.requires_grad_()
    loss = fgt.softmax_cross_entropy(logits, target)
    saved_logits, saved_target, saved_weight, lse = loss.grad_fn.saved_tensors
    # The inputs are kept by reference (same memory), plus one log-sum-exp per row.
    assert saved_logits.data_ptr() == logits.data_ptr()
    assert saved_target.data_ptr() == target.data_ptr()
    assert saved_weight is None
    assert lse.shape == (8, 3)
    torch.testing.assert_close(lse, torch.logsumexp(logits.detach(), dim=1))


def test_cross_entropy_loss_module_is_a_drop_in():
    weight = _class_weight(5)
    ours = fgt.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.05)
    theirs = nn.CrossEntropyLoss(weight=weight, ignore_index=1, label_smoothing=0.05)
    assert isinstance(ours, nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    logits, target = _logits_and_targets((9, 5))
    torch.testing.assert_close(ours(logits, target), theirs(logits, target),
                               rtol=1e-12, atol=1e-12)
    assert "z_loss=0.5" in repr(fgt.CrossEntropyLoss(z_loss=0.5))


def test_cross_entropy_bad_arguments():
    logits, target = _logits_and_targets((4, 3))
    with pytest.raises(TypeError, match="input"):
        fgt.softmax_cross_entropy(logits.numpy(), target)
    with pytest.raises(TypeError, match="target"):
        fgt.softmax_cross_entropy(logits, target.tolist())
    with pytest.raises(ValueError, match="reduction"):
        fgt.softmax_cross_entropy(logits, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        fgt.softmax_cross_entropy(logits, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="z_loss"):
        fgt.CrossEntropyLoss(z_loss=-1.0)
    with pytest.raises(ValueError, match="weight"):
        fgt.softmax_cross_entropy(logits, target, torch.ones(3, dtype=F64, requires_grad=True))
    with pytest.raises(TypeError, match="bfloat16"):
        fgt.softmax_cross_entropy(logits.to(torch.bfloat16), target)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), n_classes=st.integers(2, 9), spatial=st.lists(st.integers(1, 3),
       max_size=2), reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.25]), weighted=st.booleans(),
       probabilities=st.booleans(), seed=st.integers(0, 2**16))
def test_cross_entropy_random_shapes_match_torch(n, n_classes, spatial, reduction, smoothing,
                                                 weighted, probabilities, seed):
    shape = (n, n_classes) + tuple(spatial)
    logits, target = _logits_and_targets(shape, seed=seed, ignore=True,
                                         probabilities=probabilities)
    weight = _class_weight(n_classes, seed=seed) if weighted else None
    options = dict(weight=weight, reduction=reduction, label_smoothing=smoothing)
    ours, grad_ours = _loss_and_grad(fgt.softmax_cross_entropy, logits, target, **options)
    theirs, grad_theirs = _loss_and_grad(F.cross_entropy, logits, target, **options)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12, equal_nan=True)
    if not torch.isnan(theirs).any():  # all targets ignored: see the dedicated test
        torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Batch norm
# --------------------------------------------------------------------------------------------
def _bn_pair(torch_class, fused_class, num_features, dtype=F64, **kwargs):
    """A PyTorch batch norm and fusedgrad's, with the same random affine parameters."""
    theirs = torch_class(num_features, dtype=dtype, **kwargs)
    if theirs.weight is not None:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5, generator=_generator(5))
        if theirs.bias is not None:
            with torch.no_grad():
                theirs.bias.uniform_(-0.5, 0.5, generator=_generator(6))
    ours = fused_class(num_features, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


BN_CASES = [
    (nn.BatchNorm1d, fgt.BatchNorm1d, (16, 5)),
    (nn.BatchNorm1d, fgt.BatchNorm1d, (4, 5, 7)),
    (nn.BatchNorm2d, fgt.BatchNorm2d, (3, 4, 5, 6)),
    (nn.BatchNorm3d, fgt.BatchNorm3d, (2, 3, 4, 3, 5)),
]
BN_OPTIONS = [
    dict(),
    dict(momentum=None),
    dict(track_running_stats=False),
    dict(affine=False),
    dict(bias=False, momentum=0.3, eps=1e-3),
]


def _run_bn(module, x, upstream):
    x = x.clone().requires_grad_()
    y = module(x)
    (y * upstream).sum().backward()
    return y, x.grad


def _train_then_eval_side_by_side(ours, theirs, shape, seed, memory_format=None):
    """Three training steps (updating the running buffers), then one in eval, on the same
    inputs: outputs and input gradients agree at every step; returns the last outputs."""
    gen = _generator(seed)
    for step in range(3):
        x = 1.0 + 2.0 * torch.randn(shape, generator=gen, dtype=F64)
        if memory_format is not None:
            x = x.to(memory_format=memory_format)
        upstream = torch.randn(shape, generator=gen, dtype=F64)
        for mode in ("train", "eval") if step == 2 else ("train",):
            ours.train(mode == "train")
            theirs.train(mode == "train")
            y_ours, dx_ours = _run_bn(ours, x, upstream)
            y_theirs, dx_theirs = _run_bn(theirs, x, upstream)
            torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(dx_ours, dx_theirs, rtol=1e-10, atol=1e-12)
    return y_ours


def _assert_same_grads_and_buffers(ours, theirs):
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12, msg=name)
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("options", BN_OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("torch_class,fused_class,shape", BN_CASES,
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else "")
def test_batch_norm_module_matches_torch(torch_class, fused_class, shape, options):
    ours, theirs = _bn_pair(torch_class, fused_class, shape[1], **options)
    _train_then_eval_side_by_side(ours, theirs, shape, seed=7)
    _assert_same_grads_and_buffers(ours, theirs)


@pytest.mark.parametrize("module_class", [fgt.BatchNorm2d, fgt.BatchNormReLU2d])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_gradcheck_via_module(module_class, training, channels_last):
    module = module_class(3, dtype=F64)
    with torch.no_grad():
        module.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        module.running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    module.train(training)
    x = torch.randn(3, 3, 2, 3, dtype=F64, generator=_generator(8))
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = torch.tensor([0.7, 1.3, -0.4], dtype=F64, requires_grad=True)
    bias = torch.tensor([0.1, -0.2, 0.3], dtype=F64, requires_grad=True)

    def forward(x, weight, bias):
        return torch.func.functional_call(module, {"weight": weight, "bias": bias}, (x,))

    if module_class is fgt.BatchNormReLU2d:  # the ReLU's kink is inside the data
        assert (forward(x, weight, bias) == 0).any()
    assert torch.autograd.gradcheck(forward, (x.requires_grad_(), weight, bias))


RELU_CASES = [
    (nn.BatchNorm1d, fgt.BatchNormReLU1d, (16, 5), None),
    (nn.BatchNorm2d, fgt.BatchNormReLU2d, (3, 4, 5, 6), None),
    (nn.BatchNorm2d, fgt.BatchNormReLU2d, (3, 4, 5, 6), torch.channels_last),
    (nn.BatchNorm3d, fgt.BatchNormReLU3d, (2, 3, 4, 3, 5), None),
]


@pytest.mark.parametrize("options", BN_OPTIONS[:4], ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("torch_class,fused_class,shape,memory_format", RELU_CASES,
                         ids=["1d", "2d", "2d-channels-last", "3d"])
def test_batch_norm_relu_module_is_batch_norm_then_relu(torch_class, fused_class, shape,
                                                         memory_format, options):
    ours, bn = _bn_pair(torch_class, fused_class, shape[1], **options)
    y = _train_then_eval_side_by_side(ours, nn.Sequential(bn, nn.ReLU()), shape, seed=17,
                                      memory_format=memory_format)
    assert (y == 0).any()
    _assert_same_grads_and_buffers(ours, bn)
    assert ours.state_dict().keys() == bn.state_dict().keys()


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("torch_class,fused_class,shape",
                         [(nn.BatchNorm2d, fgt.BatchNorm2d, (4, 6, 5, 3)),
                          (nn.BatchNorm3d, fgt.BatchNorm3d, (2, 6, 3, 4, 2))])
def test_batch_norm_channels_last(torch_class, fused_class, shape, dtype):
    memory_format = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    ours, theirs = _bn_pair(torch_class, fused_class, shape[1], dtype=dtype)
    gen = _generator(9)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(memory_format=memory_format)
    upstream = torch.randn(shape, generator=gen, dtype=dtype)
    y_ours, dx_ours = _run_bn(ours, x, upstream)
    y_theirs, dx_theirs = _run_bn(theirs, x, upstream)
    assert y_ours.is_contiguous(memory_format=memory_format)
    assert dx_ours.is_contiguous(memory_format=memory_format)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == F64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_ours, y_theirs, **tol)
    torch.testing.assert_close(dx_ours, dx_theirs, **tol)
    torch.testing.assert_close(ours.running_var, theirs.running_var, **tol)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, **tol)


def test_non_contiguous_inputs_match_torch():
    gen = _generator(14)
    logits_t = torch.randn(7, 9, dtype=F64, generator=gen)
    logits = logits_t.t().requires_grad_()  # (9, 7), strides (1, 9)
    target = torch.randint(0, 7, (9,), generator=gen)
    ours = fgt.softmax_cross_entropy(logits, target, label_smoothing=0.1)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    theirs = F.cross_entropy(logits, target, label_smoothing=0.1)
    (grad_theirs,) = torch.autograd.grad(theirs, logits)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-12, atol=1e-12)

    ours_bn, theirs_bn = _bn_pair(nn.BatchNorm2d, fgt.BatchNorm2d, 4)
    base = torch.randn(3, 4, 6, 10, dtype=F64, generator=gen, requires_grad=True)
    x = base[:, :, 1:5, ::2]  # a strided view, neither contiguous nor channels-last
    assert not x.is_contiguous()
    upstream = torch.randn(x.shape, dtype=F64, generator=gen)
    y_ours, y_theirs = ours_bn(x), theirs_bn(x)
    (dx_ours,) = torch.autograd.grad(y_ours, base, upstream)
    (dx_theirs,) = torch.autograd.grad(y_theirs, base, upstream)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_ours, dx_theirs, rtol=1e-10, atol=1e-12)


def test_large_outputs_stay_valid_while_tensors_hold_them():
    """Kernel outputs are wrapped without a copy (and large ones may come from fusedgrad's
    buffer cache): a tensor must keep its memory to itself for as long as it lives."""
    gen = _generator(15)
    module = fgt.BatchNorm2d(16)
    inputs = [torch.randn(8, 16, 64, 64, generator=gen, requires_grad=True) for _ in range(3)]
    kept = []
    for x in inputs:  # 2 MiB per activation and gradient
        y = module(x)
        y.backward(torch.ones_like(y))
        kept.append((y, y.detach().clone(), x.grad, x.grad.clone()))
        logits = torch.randn(4096, 80, generator=gen, requires_grad=True)
        loss = fgt.softmax_cross_entropy(logits, torch.randint(0, 80, (4096,), generator=gen))
        loss.backward()
        kept.append((logits.grad, logits.grad.clone()))
        del y, logits, loss
    for tensors in kept:
        for live, snapshot in zip(tensors[::2], tensors[1::2]):
            assert torch.equal(live, snapshot)


@pytest.mark.parametrize("module_class", [fgt.BatchNorm2d, fgt.BatchNormReLU2d])
def test_batch_norm_saves_input_and_channel_statistics(module_class):
    module = module_class(3, dtype=F64)
    x = torch.randn(4, 3, 2, 2, dtype=F64, requires_grad=True)
    y = module(x)
    # The tensors autograd keeps (and version-checks): the input (as the kernels see it, and
    # as given, for a second-order backward), weight and bias, no copies; with the fused ReLU
    # also the output, whose sign is the ReLU's mask.
    saved_x, saved_weight, saved_output, saved_input, saved_bias = y.grad_fn.saved_tensors
    assert saved_x.data_ptr() == x.data_ptr() and saved_weight is module.weight
    assert saved_input is x and saved_bias is module.bias
    if module_class is fgt.BatchNormReLU2d:
        assert saved_output.data_ptr() == y.data_ptr()
    else:
        assert saved_output is None
    # The per-channel statistics, as the kernels returned them.
    mean, invstd = (torch.from_numpy(a) for a in y.grad_fn.stats)
    assert mean.shape == invstd.shape == (3,)
    var = x.detach().var(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean, x.detach().mean(dim=(0, 2, 3)))
    torch.testing.assert_close(invstd, 1.0 / torch.sqrt(var + module.eps))


def test_batch_norm_one_value_per_channel_raises():
    with pytest.raises(ValueError):
        fgt.BatchNorm1d(3)(torch.randn(1, 3))


def test_functional_batch_norm_matches_torch_without_weight():
    x = torch.randn(5, 4, 3, dtype=F64, generator=_generator(10), requires_grad=True)
    bias = torch.randn(4, dtype=F64, requires_grad=True)
    running = (torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64))
    y = fgt.batch_norm(x, *running, None, bias, training=True, momentum=0.2)
    y.pow(2).sum().backward()
    x2, bias2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    running2 = (torch.zeros(4, dtype=F64), torch.ones(4, dtype=F64))
    F.batch_norm(x2, *running2, None, bias2, training=True, momentum=0.2).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bias.grad, bias2.grad, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(running, running2):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# convert_model: a small CNN trained side by side, checkpoints both ways
# --------------------------------------------------------------------------------------------
def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
        nn.Sequential(nn.BatchNorm1d(16), nn.ReLU()), nn.Linear(16, 5))


def _batches(steps, seed=11):
    gen = _generator(seed)
    return [(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 5, (16,), generator=gen))
            for _ in range(steps)]


def _train(model, criterion, batches, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    model.train()
    for x, t in batches:
        optimizer.zero_grad()
        loss = criterion(model(x), t)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_convert_model_swaps_layers_and_keeps_tensors():
    model = _small_cnn().eval()
    params = list(model.parameters())
    buffers = list(model.buffers())
    converted = fgt.convert_model(model)
    assert converted is model and not model.training
    kinds = [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [fgt.BatchNorm2d, fgt.BatchNorm2d, fgt.BatchNorm1d]
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(a is b for a, b in zip(buffers, model.buffers()))
    assert model[4].momentum is None and not model[4].training
    root = nn.BatchNorm3d(4, affine=False, track_running_stats=False)
    assert type(fgt.convert_model(root)) is fgt.BatchNorm3d
    with pytest.raises(TypeError, match="module"):
        fgt.convert_model("not a module")


def test_copies_pass_bias_only_where_older_pytorch_accepts_it():
    """``bias=`` is new in PyTorch 2.13's batch norm: a copy of a layer with a bias (the default)
    must not pass it, or convert_model fails on PyTorch 2.11 (seen on the GPU machine)."""
    assert "bias" not in meta_copy_arguments(nn.BatchNorm2d(4))
    assert "bias" not in meta_copy_arguments(nn.BatchNorm2d(4, affine=False))
    assert meta_copy_arguments(nn.BatchNorm2d(4, bias=False))["bias"] is False
    converted = fgt.convert_model(nn.Sequential(nn.BatchNorm2d(4, bias=False)))
    assert converted[0].bias is None and converted[0].weight is not None


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.fixture
def exact_float32():
    """Full float32 with deterministic algorithms on the GPU, restored afterwards.

    TF32 and cuDNN's autotuned algorithms would let two models' convolutions round differently;
    without them only the fused layers differ. The flags are set and restored by plain
    assignment: ``monkeypatch.setattr`` (pytest >= 9.2) restores by deleting the attribute,
    which ``torch.backends.cuda.matmul`` does not support.
    """
    flags = ((torch.backends.cudnn, "allow_tf32", False),
             (torch.backends.cudnn, "deterministic", True),
             (torch.backends.cuda.matmul, "allow_tf32", False))
    saved = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, saved):
            setattr(owner, name, value)


@pytest.mark.parametrize("fuse_relu", [False, True], ids=["convert", "fuse_relu"])
@pytest.mark.parametrize("device", DEVICES)
def test_converted_cnn_trains_like_torch(device, fuse_relu, exact_float32):
    reference_model = _small_cnn().to(device)
    fused_model = fgt.convert_model(copy.deepcopy(reference_model), fuse_relu=fuse_relu)
    assert any(isinstance(m, fgt.BatchNormReLU2d) for m in fused_model.modules()) == fuse_relu
    batches = [(x.to(device), t.to(device)) for x, t in _batches(6)]
    torch_losses = _train(reference_model, nn.CrossEntropyLoss(), batches)
    fused_losses = _train(fused_model, fgt.CrossEntropyLoss(), batches)
    np.testing.assert_allclose(fused_losses, torch_losses, rtol=1e-5, atol=1e-5)
    for (name, a), (_, b) in zip(fused_model.state_dict().items(),
                                 reference_model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    x = _batches(1, seed=12)[0][0].to(device)
    torch.testing.assert_close(fused_model.eval()(x), reference_model.eval()(x),
                               rtol=1e-5, atol=1e-5)


def test_convert_model_fuses_relu_only_after_batch_norm_in_sequentials():
    class Branchy(nn.Module):  # children order is not call order: never fused
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.bn(x))

    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),  # fused
        nn.BatchNorm2d(4), nn.GELU(),                                  # not a ReLU
        nn.ReLU(),                                                     # not after a BN
        Branchy(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 9, 5), nn.BatchNorm1d(5), nn.ReLU()))
    keys = model.state_dict().keys()
    tensors = [model[1].weight, model[1].running_mean, model[7][2].weight]
    fgt.convert_model(model, fuse_relu=True)
    kinds = [type(m).__name__ for m in model.modules() if not isinstance(m, nn.Sequential)]
    assert type(model[3]) is fgt.BatchNorm2d
    assert kinds == ["Conv2d", "BatchNormReLU2d", "Identity", "BatchNorm2d", "GELU", "ReLU",
                     "Branchy", "BatchNorm2d", "ReLU", "Flatten", "Linear", "BatchNormReLU1d",
                     "Identity"]
    assert model.state_dict().keys() == keys
    assert all(a is b for a, b in zip(tensors, [model[1].weight, model[1].running_mean,
                                               model[7][2].weight]))
    model(torch.randn(2, 3, 3, 3)).sum().backward()  # runs, with gradients


def test_convert_model_replaces_a_shared_batch_norm_by_one_layer_everywhere():
    """A batch norm registered under two names, and in two containers, becomes one fusedgrad
    layer (named_children lists a shared child once: the second name kept PyTorch's layer)."""
    class Shared(nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.first, self.second = bn, bn
            self.inner = nn.Sequential(bn, nn.ReLU(), bn, nn.ReLU())

        def forward(self, x):
            return self.inner(self.second(self.first(x)))

    model = Shared(nn.BatchNorm2d(3))
    fgt.convert_model(model)
    assert type(model.first) is fgt.BatchNorm2d
    assert model.second is model.first
    assert model.inner[0] is model.first and model.inner[2] is model.first
    fused = fgt.convert_model(Shared(nn.BatchNorm2d(3)), fuse_relu=True)
    assert [type(m).__name__ for m in fused.inner] == ["BatchNormReLU2d", "Identity"] * 2
    fused(torch.randn(2, 3, 4, 4)).sum().backward()


def test_state_dict_round_trips_both_ways():
    trained = _small_cnn()
    _train(trained, nn.CrossEntropyLoss(), _batches(2))
    x, _ = _batches(1, seed=13)[0]
    expected = trained.eval()(x)

    fused = fgt.convert_model(_small_cnn())  # fresh weights, then the torch checkpoint
    fused.load_state_dict(trained.state_dict())
    torch.testing.assert_close(fused.eval()(x), expected, rtol=1e-5, atol=1e-6)

    back = _small_cnn()  # and the fused model's checkpoint into plain torch
    back.load_state_dict(fused.state_dict())
    assert back.state_dict().keys() == fused.state_dict().keys()
    for a, b in zip(back.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)


def test_distributed_drop_ins_are_re_exported():
    from fusedgrad import distributed
    for name in ("SyncBatchNorm", "convert_sync_batchnorm",
                 "vocab_parallel_softmax_cross_entropy"):
        assert getattr(fgt, name) is getattr(distributed, name)
        assert name in fgt.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        fgt.no_such_name


def test_only_fusedgrad_torch_imports_torch():
    code = ("import sys, numpy as np, fusedgrad as fg, fusedgrad.demo\n"
            "fg.softmax_cross_entropy(np.zeros((2, 3)), np.array([0, 1]))\n"
            "fg.batch_norm_forward(np.arange(8.0).reshape(4, 2))\n"
            "assert 'torch' not in sys.modules\n"
            "import fusedgrad.torch\n"
            "assert 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_match_cpu():
    logits, target = _logits_and_targets((32, 10), dtype=torch.float32)
    z_gpu = logits.cuda().requires_grad_()
    loss = fgt.softmax_cross_entropy(z_gpu, target.cuda(), label_smoothing=0.1)
    loss.backward()
    z_cpu = logits.clone().requires_grad_()
    F.cross_entropy(z_cpu, target, label_smoothing=0.1).backward()
    assert loss.device.type == "cuda" and z_gpu.grad.device.type == "cuda"
    torch.testing.assert_close(z_gpu.grad.cpu(), z_cpu.grad, rtol=1e-5, atol=1e-6)

    z_bf16 = logits.cuda().to(torch.bfloat16).requires_grad_()
    fgt.softmax_cross_entropy(z_bf16, target.cuda(), label_smoothing=0.1).backward()
    assert z_bf16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(z_bf16.grad.float().cpu(), z_cpu.grad, rtol=2e-2, atol=1e-3)

    ours, theirs = _bn_pair(nn.BatchNorm2d, fgt.BatchNorm2d, 6, dtype=torch.float32)
    x = torch.randn(8, 6, 5, 5)
    dy = torch.randn(8, 6, 5, 5)
    x_gpu = x.cuda().requires_grad_()
    y_gpu = ours.cuda()(x_gpu)
    x_cpu = x.clone().requires_grad_()
    y_cpu = theirs(x_cpu)
    torch.testing.assert_close(y_gpu.detach().cpu(), y_cpu.detach(), rtol=1e-5, atol=1e-5)
    # The backward on the GPU: device statistics kept from the forward, no re-checks.
    y_gpu.backward(dy.cuda())
    y_cpu.backward(dy)
    torch.testing.assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad.cpu(), theirs.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.running_mean.cpu(), theirs.running_mean,
                               rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Small CPU tensors go to PyTorch's own kernels (fusedgrad._torch_ops thresholds)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def default_thresholds(monkeypatch):
    from fusedgrad import _torch_ops
    monkeypatch.setattr(_torch_ops, "BATCH_NORM_MIN_ELEMENTS", 1 << 19)
    monkeypatch.setattr(_torch_ops, "CROSS_ENTROPY_MIN_SAMPLES", 512)
    return _torch_ops


def _kernel_calls(monkeypatch, ops):
    """Count the calls that reach fusedgrad's autograd Functions."""
    calls = []
    for cls in (ops.BatchNormFunction, ops.SoftmaxCrossEntropyFunction):
        original = cls.apply
        monkeypatch.setattr(cls, "apply", lambda *a, _o=original, _c=cls: calls.append(_c.__name__)
                            or _o(*a))
    return calls


@pytest.mark.parametrize("relu", [False, True])
def test_small_batch_norm_runs_pytorchs_kernel_and_large_runs_fusedgrads(
        default_thresholds, monkeypatch, relu):
    calls = _kernel_calls(monkeypatch, default_thresholds)
    cls = fgt.BatchNormReLU2d if relu else fgt.BatchNorm2d
    for shape, fused in (((4, 8, 4, 4), False), ((8, 64, 32, 32), True)):
        calls.clear()
        torch.manual_seed(0)
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        ours, theirs = cls(shape[1]).double(), nn.BatchNorm2d(shape[1]).double()
        y = ours(x)
        expected = theirs(x)
        expected = torch.relu(expected) if relu else expected
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        (gx,) = torch.autograd.grad(y.sum(), x)
        (gx_ref,) = torch.autograd.grad(expected.sum(), x)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
        assert calls == (["BatchNormFunction"] if fused else [])


@pytest.mark.parametrize("relu", [False, True])
def test_small_batch_norm_refuses_one_value_per_channel_in_training_as_pytorch_does(
        default_thresholds, relu):
    cls = fgt.BatchNormReLU2d if relu else fgt.BatchNorm2d
    ours, theirs = cls(3), nn.BatchNorm2d(3)
    x = torch.randn(1, 3, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel") as ours_error:
        ours(x)
    with pytest.raises(ValueError) as theirs_error:
        theirs(x)
    assert str(ours_error.value) == str(theirs_error.value)
    ours.eval()
    theirs.eval()
    torch.testing.assert_close(ours(x), theirs(x).relu() if relu else theirs(x))
    # an empty batch is not "one value per channel": PyTorch's kernel takes it
    empty = torch.randn(0, 3, 4, 4)
    assert ours.train()(empty).shape == empty.shape


def test_small_cross_entropy_runs_pytorchs_kernel_unless_an_option_needs_fusedgrads(
        default_thresholds, monkeypatch):
    calls = _kernel_calls(monkeypatch, default_thresholds)
    z = torch.randn(64, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 10, (64,))
    loss = fgt.softmax_cross_entropy(z, t, label_smoothing=0.1)
    torch.testing.assert_close(loss, F.cross_entropy(z, t, label_smoothing=0.1))
    assert calls == []
    fgt.softmax_cross_entropy(z, t, z_loss=1e-4)       # F.cross_entropy has no z_loss
    fgt.softmax_cross_entropy(z, t, softcap=5.0)       # nor a cap
    big = torch.randn(512, 10, dtype=torch.float64)
    fgt.softmax_cross_entropy(big, torch.randint(0, 10, (512,)))
    assert calls == ["SoftmaxCrossEntropyFunction"] * 3


# --------------------------------------------------------------------------------------------
# Named edge cases found by a differential hunt against PyTorch (2026-12-06)
# --------------------------------------------------------------------------------------------
def _penalty_gradient(loss_of, inputs):
    """The gradient of a gradient penalty, sum_i |d loss / d input_i|^2, with respect to the
    inputs: create_graph=True through the loss's backward, then a second backward."""
    grads = torch.autograd.grad(loss_of(*inputs), inputs, create_graph=True)
    penalty = sum((g ** 2).sum() for g in grads)
    return torch.autograd.grad(penalty, inputs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_second_order_gradients_match_pytorchs(reduction):
    """create_graph=True through the fused backward (a gradient penalty): it used to return a
    gradient cut off from the graph (the penalty's own gradient silently dropped), then
    raised; now the gradient is formed from PyTorch's operations and differentiates again."""
    logits = torch.randn(40, 7, dtype=F64, requires_grad=True)
    target = torch.randint(0, 7, (40,), generator=_generator(3))
    target[::5] = -100
    weight = torch.rand(7, dtype=F64) + 0.5
    probs = torch.softmax(torch.randn(40, 7, dtype=F64), dim=1)
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1)

    def summed(loss):
        return loss.sum() if reduction == "none" else loss
    for y in (target, probs):
        ours = _penalty_gradient(
            lambda z: summed(fgt.softmax_cross_entropy(z, y, **options)), (logits,))
        expected = _penalty_gradient(
            lambda z: summed(F.cross_entropy(z, y, **options)), (logits,))
        torch.testing.assert_close(ours, expected)


def test_second_order_path_keeps_zero_gradients_when_every_target_is_ignored():
    """With z_loss and every target ignored, "mean" divides by 0: the composite multiplied the
    ignored rows' z_loss term by a weight of 0, and its gradient became inf * 0 = NaN under
    create_graph=True, where the kernels (and PyTorch) give zeros."""
    target = torch.full((5,), -100)
    logits = torch.randn(5, 3, dtype=F64, requires_grad=True)
    grad, = torch.autograd.grad(fgt.softmax_cross_entropy(logits, target, z_loss=0.1), logits,
                                create_graph=True)
    assert torch.equal(grad, torch.zeros_like(logits))
    hidden = torch.randn(5, 4, dtype=F64, requires_grad=True)
    weight = torch.randn(3, 4, dtype=F64, requires_grad=True)
    grads = torch.autograd.grad(fgt.linear_cross_entropy(hidden, weight, target, z_loss=0.1),
                                (hidden, weight), create_graph=True)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_second_order_gradients_with_z_loss_and_softcap_pass_gradgradcheck():
    logits = torch.randn(12, 5, dtype=F64, requires_grad=True)
    target = torch.randint(0, 5, (12,), generator=_generator(4))
    assert torch.autograd.gradgradcheck(
        lambda z: fgt.softmax_cross_entropy(z, target, z_loss=0.01, softcap=3.0), (logits,))
    hidden = torch.randn(12, 4, dtype=F64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda h, w: fgt.linear_cross_entropy(h, w, target, z_loss=0.01, softcap=3.0,
                                              reduction="none"), (hidden, weight))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_second_order_gradients_match_pytorchs(reduction):
    hidden = torch.randn(30, 6, dtype=F64, requires_grad=True)
    weight = torch.randn(9, 6, dtype=F64, requires_grad=True)
    bias = torch.randn(9, dtype=F64, requires_grad=True)
    target = torch.randint(0, 9, (30,), generator=_generator(5))

    def summed(loss):
        return loss.sum() if reduction == "none" else loss
    ours = _penalty_gradient(lambda h, w, b: summed(fgt.linear_cross_entropy(
        h, w, target, linear_bias=b, reduction=reduction, chunk_size=7)),
        (hidden, weight, bias))
    expected = _penalty_gradient(lambda h, w, b: summed(F.cross_entropy(
        F.linear(h, w, b), target, reduction=reduction)), (hidden, weight, bias))
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_second_order_gradients_match_pytorchs(training, relu, channels_last):
    x = torch.randn(4, 3, 5, 5, dtype=F64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    state = {"weight": torch.rand(3) + 0.5, "bias": torch.randn(3),
             "running_mean": torch.randn(3), "running_var": torch.rand(3) + 0.5}

    def layer(cls):
        bn = cls(3).double().train(training)
        with torch.no_grad():
            for name, value in state.items():
                getattr(bn, name).copy_(value)
        return bn
    ours_bn = layer(fgt.BatchNormReLU2d if relu else fgt.BatchNorm2d)
    torch_bn = layer(nn.BatchNorm2d)
    activation = torch.relu if relu else (lambda y: y)
    ours = _penalty_gradient(lambda x, w, b: ours_bn(x).pow(3).sum(),
                             (x, ours_bn.weight, ours_bn.bias))
    expected = _penalty_gradient(lambda x, w, b: activation(torch_bn(x)).pow(3).sum(),
                                 (x, torch_bn.weight, torch_bn.bias))
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("ignore_index", [2.5, "3", None])
def test_ignore_index_must_be_an_integer_at_every_size(default_thresholds, ignore_index):
    for n in (100, 600):  # PyTorch's kernel below 512 samples, fusedgrad's above
        logits, target = torch.randn(n, 5, dtype=F64), torch.randint(0, 5, (n,))
        with pytest.raises(TypeError, match="ignore_index"):
            fgt.softmax_cross_entropy(logits, target, ignore_index=ignore_index)
    with pytest.raises(TypeError, match="ignore_index"):
        fgt.CrossEntropyLoss(ignore_index=ignore_index)


def test_small_cross_entropy_takes_and_refuses_what_the_kernels_do(default_thresholds):
    """Below the hand-over size the same dtypes are taken (int32 class indices) and refused
    (float16 logits, uint8 targets), and an out-of-range target is the same ValueError."""
    for n in (100, 600):
        logits, target = torch.randn(n, 5, dtype=F64), torch.randint(0, 5, (n,))
        expected = F.cross_entropy(logits, target)
        for loss_fn in (fgt.softmax_cross_entropy, fgt.CrossEntropyLoss()):
            torch.testing.assert_close(loss_fn(logits, target.int()), expected)
            with pytest.raises(TypeError, match="float32 or float64"):
                loss_fn(logits.half(), target)
            with pytest.raises(TypeError, match="int32 or int64"):
                loss_fn(logits, target.to(torch.uint8))
            bad = target.clone()
            bad[3] = 9
            with pytest.raises(ValueError, match="class indices in \\[0, 5\\)"):
                loss_fn(logits, bad)


def test_probability_targets_refuse_an_ignore_index_at_every_size(default_thresholds):
    """PyTorch refuses an ignore_index >= 0 with probability targets (RuntimeError, below the
    hand-over size); fusedgrad refuses it at every size with its ValueError, and takes a
    negative one other than -100, as PyTorch does."""
    for n in (100, 600):
        logits = torch.randn(n, 5, dtype=F64)
        probs = torch.softmax(torch.randn(n, 5, dtype=F64), dim=1)
        calls = {"functional": lambda i: fgt.softmax_cross_entropy(logits, probs, ignore_index=i),
                 "module": lambda i: fgt.CrossEntropyLoss(ignore_index=i)(logits, probs),
                 "linear": lambda i: fgt.linear_cross_entropy(logits, torch.eye(5, dtype=F64),
                                                              probs, ignore_index=i)}
        for name, loss_of in calls.items():
            with pytest.raises(ValueError, match="ignore_index must be negative"):
                loss_of(3)
            torch.testing.assert_close(loss_of(-5), F.cross_entropy(logits, probs), msg=name)


def test_empty_batch_in_training_gives_an_empty_output_as_pytorch():
    """The kernels' path refused a batch of 0 (fewer than 2 values per channel), and counted it
    in num_batches_tracked; PyTorch returns an empty output (running buffers untouched)."""
    for bn, reference in ((fgt.BatchNorm2d(3), nn.BatchNorm2d(3)),
                          (fgt.BatchNormReLU2d(3), nn.BatchNorm2d(3))):
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y = bn(x)
        assert y.shape == (0, 3, 4, 4)
        y.sum().backward()
        reference(torch.randn(0, 3, 4, 4))
        assert int(bn.num_batches_tracked) == int(reference.num_batches_tracked) == 1
        assert torch.equal(bn.running_mean, reference.running_mean)


@pytest.mark.parametrize("n", [8, 4096])  # 8 x 4 x 4 x 4: PyTorch's kernel; 4096: fusedgrad's
def test_batch_norm_refuses_other_dtypes_at_every_size_and_counts_no_batch(default_thresholds,
                                                                         n):
    bn = fgt.BatchNorm2d(4)
    x = torch.randn(n, 4, 4, 4)
    with pytest.raises(TypeError, match="input must be float32 or float64"):
        bn(x.half())
    assert int(bn.num_batches_tracked) == 0
    with pytest.raises(TypeError, match="weight must have the dtype of input"):
        bn(x.double())
    assert int(bn.num_batches_tracked) == 0
    with pytest.raises(TypeError, match="running_mean must have the dtype of input"):
        fgt.batch_norm(x, torch.zeros(4, dtype=F64), torch.ones(4), training=True)


@pytest.mark.parametrize("probabilities", [False, True])
@pytest.mark.parametrize("n_classes", [10, 3000])
def test_float32_gradient_keeps_its_precision_for_a_large_log_sum_exp(probabilities,
                                                                      n_classes):
    """The backward rebuilds p = exp(z - lse) from the forward's lse: saved in float32, its
    rounding (0.0005 at 1e4) was a relative error of every gradient element (3e-4 measured);
    saved in float64 and split against the float32 logits, PyTorch's accuracy."""
    logits, target = _logits_and_targets((64, n_classes), seed=3, probabilities=probabilities)
    logits = (logits + 1e4).float().requires_grad_()
    fgt.softmax_cross_entropy(logits, target.float() if probabilities else target).backward()
    exact = logits.detach().double().requires_grad_()
    F.cross_entropy(exact, target).backward()
    error = (logits.grad.double() - exact.grad).abs().max() / exact.grad.abs().max()
    assert error < 1e-6
