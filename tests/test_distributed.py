"""fusedgrad.distributed: building blocks in one process, and real gloo process groups.

The multi-process tests start one gloo world of 3 processes on 127.0.0.1 (a free port), once
per module (starting processes that import torch is the slow part): the 3-rank scenarios run on
the whole world, the 2-rank ones on a process group of ranks 0 and 1 (``process_group=`` /
``group=``), while rank 2 waits. Each rank records outputs, gradients, running statistics and the
collectives it issued, and the tests compare them with single-process results on the
concatenated batch (or the full logits). Every rank is bounded in time: the process group has a
timeout and the parent kills ranks still alive after JOIN_TIMEOUT_S.
"""
from __future__ import annotations

import datetime
import multiprocessing
import socket
import time
import traceback
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fusedgrad.distributed as fgd  # noqa: E402
from fusedgrad import reference  # noqa: E402

#: Seconds a process group may wait inside one collective before it raises.
COLLECTIVE_TIMEOUT_S = 60
#: Processes started by the multi-process tests.
WORLD = 3
#: Seconds the parent waits for all ranks before killing them.
JOIN_TIMEOUT_S = 150


# --------------------------------------------------------------------------------------------
# Batch norm building blocks (one process)
# --------------------------------------------------------------------------------------------
def _split(x, sizes, axis=0):
    edges = np.cumsum((0,) + tuple(sizes))
    return [np.take(x, np.arange(lo, hi), axis=axis) for lo, hi in zip(edges, edges[1:])]


def _merged(parts, channel_axis=1):
    stats = [fgd.bn_partial_stats(p, channel_axis=channel_axis) for p in parts]
    return fgd.bn_merge_stats([s[0] for s in stats], np.stack([s[1] for s in stats]),
                              np.stack([s[2] for s in stats]))


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=5).filter(lambda s: sum(s) >= 2),
       seed=st.integers(0, 2**16), offset=st.sampled_from([0.0, 1e4]))
def test_merge_equals_stats_of_concatenation(sizes, seed, offset):
    rng = np.random.default_rng(seed)
    x = offset + rng.normal(size=(sum(sizes), 3, 4))
    count, mean, m2 = _merged(_split(x, sizes))
    rows = np.moveaxis(x, 1, 0).reshape(3, -1)
    assert count == rows.shape[1]
    np.testing.assert_allclose(mean, rows.mean(axis=1), rtol=1e-14, atol=1e-14 * max(1.0, offset))
    np.testing.assert_allclose(m2, ((rows - rows.mean(axis=1, keepdims=True)) ** 2).sum(axis=1),
                               rtol=1e-11, atol=1e-12)


def test_merge_of_one_part_is_bitwise_identity_and_empty_parts_are_skipped():
    x = np.random.default_rng(1).normal(size=(6, 2, 5))
    count, mean, m2 = fgd.bn_partial_stats(x)
    merged = _merged([x[:0], x, x[:0]])
    assert merged[0] == count
    assert np.array_equal(merged[1], mean) and np.array_equal(merged[2], m2)
    assert fgd.bn_merge_stats([0, 0], np.full((2, 2), np.nan), np.full((2, 2), np.nan))[0] == 0


def test_merge_float32_large_offset_keeps_the_variance():
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(size=(64, 2, 8))).astype(np.float32)
    count, mean, m2 = _merged(_split(x, (7, 0, 30, 27)))
    exact = np.moveaxis(x.astype(np.float64), 1, 0).reshape(2, -1).var(axis=1)
    np.testing.assert_allclose(m2 / count, exact, rtol=1e-6)


@pytest.mark.parametrize("channel_axis,shape", [(1, (9, 3, 4, 2)), (-1, (9, 2, 3)), (1, (9, 4)),
                                               (2, (9, 2, 3, 4))])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_split_forward_and_backward_equal_whole_batch(channel_axis, shape, dtype, tol):
    rng = np.random.default_rng(3)
    x = (2 + 3 * rng.normal(size=shape)).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    n_channels = shape[channel_axis]
    weight, bias = rng.normal(size=n_channels), rng.normal(size=n_channels)
    running = (np.zeros(n_channels), np.ones(n_channels))
    y_ref, mean_ref, invstd_ref, running_ref = reference.batch_norm_forward(
        x, weight, bias, *running, training=True, momentum=0.1, eps=1e-5,
        channel_axis=channel_axis)
    dx_ref, dweight_ref, dbias_ref = reference.batch_norm_backward(
        dy, x, mean_ref, invstd_ref, weight, training=True, channel_axis=channel_axis)

    sizes = (2, 0, 7)
    parts, grads = _split(x, sizes), _split(dy, sizes)
    count, mean, m2 = _merged(parts, channel_axis)
    ys = [fgd.bn_forward_from_stats(p, count, mean, m2, weight, bias, *running,
                                    momentum=0.1, eps=1e-5, channel_axis=channel_axis)
          if i == 0 else
          fgd.bn_forward_from_stats(p, count, mean, m2, weight, bias, channel_axis=channel_axis)
          for i, p in enumerate(parts)]
    _, mean, invstd = ys[0]
    sums = [fgd.bn_backward_reduce(g, p, mean, invstd, channel_axis=channel_axis)
            for g, p in zip(grads, parts)]
    sum_dy = sums[0][0] + sums[1][0] + sums[2][0]
    sum_dy_xhat = sums[0][1] + sums[1][1] + sums[2][1]
    dx = np.concatenate([
        fgd.bn_backward_elementwise(g, p, mean, invstd, weight, sum_dy, sum_dy_xhat, count,
                                    channel_axis=channel_axis)
        for g, p in zip(grads, parts)])

    assert count == x.size // n_channels
    np.testing.assert_allclose(np.concatenate([y for y, _, _ in ys]), y_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(dx, dx_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(sum_dy, dbias_ref, rtol=tol, atol=tol * x.size)
    np.testing.assert_allclose(sum_dy_xhat, dweight_ref, rtol=tol, atol=tol * x.size)
    # float32 input: the statistics are summed in float32 within a tile (float64 across tiles).
    running_tol = 1e-12 if dtype == np.float64 else 1e-6
    for got, want in zip(running, running_ref):
        np.testing.assert_allclose(got, want, rtol=running_tol, atol=running_tol)


def test_batch_norm_blocks_reject_bad_arguments_before_writing():
    x = np.ones((4, 3))
    running = np.full(3, 7.0)
    with pytest.raises(ValueError, match="count"):
        fgd.bn_forward_from_stats(x, 1, np.zeros(3), np.zeros(3), running_mean=running)
    with pytest.raises(ValueError, match="running_var"):
        fgd.bn_forward_from_stats(x, 4, np.zeros(3), np.zeros(3), running_mean=running,
                                  running_var=np.ones(2))
    assert np.all(running == 7.0)
    with pytest.raises(ValueError, match="channel_axis"):
        fgd.bn_partial_stats(np.ones((2, 3, 4)), channel_axis=3)
    with pytest.raises(ValueError, match="counts"):
        fgd.bn_merge_stats([3, -1], np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="means"):
        fgd.bn_merge_stats([3, 1], np.zeros((3, 3)), np.zeros((3, 3)))
    with pytest.raises(TypeError, match="dy"):
        fgd.bn_backward_reduce(np.ones((4, 3), np.float32), x, np.zeros(3), np.ones(3))


def test_batch_norm_blocks_refuse_missing_statistics():
    """The statistics have no default: None is a TypeError naming it, not a read past the end
    of a placeholder (which it was)."""
    x = np.ones((4, 3))
    stats = np.zeros(3)
    with pytest.raises(TypeError, match="mean must be a \\(3,\\) array, got None"):
        fgd.bn_forward_from_stats(x, 4, None, stats)
    with pytest.raises(TypeError, match="m2"):
        fgd.bn_forward_from_stats(x, 4, stats, None)
    with pytest.raises(TypeError, match="invstd"):
        fgd.bn_backward_reduce(x, x, stats, None)
    with pytest.raises(TypeError, match="sum_dy_xhat"):
        fgd.bn_backward_elementwise(x, x, stats, np.ones(3), None, stats, None, 4)


# --------------------------------------------------------------------------------------------
# Cross-entropy building blocks (one process)
# --------------------------------------------------------------------------------------------
def _shards_vs_reference(logits, target, widths, *, global_shift=False, **options):
    """(loss, grad, lse) from the shard blocks, and the reference's on the full logits."""
    n_classes = logits.shape[1]
    edges = np.cumsum((0,) + tuple(widths))
    bounds = list(zip(edges, edges[1:]))
    stat_options = {k: options[k] for k in ("weight", "ignore_index", "label_smoothing",
                                            "softcap") if k in options}
    loss_options = {k: v for k, v in options.items() if k != "softcap"}
    shift = None
    if global_shift:
        softcap = options.get("softcap")
        shift = np.max(np.stack([fgd.ce_shard_max(logits[:, lo:hi], softcap=softcap)
                                 for lo, hi in bounds]), 0)
    stats = [fgd.ce_shard_stats(logits[:, lo:hi], target, lo, n_classes, shift=shift,
                                **stat_options) for lo, hi in bounds]
    lse, target_logit, weighted = fgd.ce_combine(stats)
    loss = fgd.ce_loss(lse, target_logit, weighted, target, n_classes, **loss_options)
    grad = np.concatenate([fgd.ce_shard_grad(logits[:, lo:hi], target, lo, lse, n_classes,
                                             **options) for lo, hi in bounds], axis=1)
    return (loss, grad, lse), reference.softmax_cross_entropy(logits, target, **options)


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=1, max_size=4), n_rows=st.integers(1, 6),
       seed=st.integers(0, 2**16), reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.15]), weighted=st.booleans(),
       z_loss=st.sampled_from([0.0, 1e-2]), global_shift=st.booleans(),
       softcap=st.sampled_from([None, 0.5, 3.0]))
def test_shard_combine_equals_full_cross_entropy(widths, n_rows, seed, reduction, smoothing,
                                                 weighted, z_loss, global_shift, softcap):
    rng = np.random.default_rng(seed)
    n_classes = sum(widths)
    logits = 4 * rng.normal(size=(n_rows, n_classes))
    target = rng.integers(0, n_classes, n_rows)
    target[rng.random(n_rows) < 0.3] = -100
    weight = rng.uniform(0.5, 2.0, n_classes) if weighted else None
    got, want = _shards_vs_reference(logits, target, widths, global_shift=global_shift,
                                     weight=weight, reduction=reduction,
                                     label_smoothing=smoothing, z_loss=z_loss, softcap=softcap)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_capped_shards_equal_capped_full_cross_entropy(dtype):
    """Each shard caps its own classes: -inf logits become -softcap on every shard."""
    rng = np.random.default_rng(4)
    logits = (6 * rng.normal(size=(6, 11))).astype(dtype)
    logits[:, 7:] = -np.inf
    target = np.array([0, 5, 2, -100, 10, 6])
    options = dict(weight=np.linspace(0.5, 2.0, 11), reduction="none", label_smoothing=0.1,
                   z_loss=1e-3, softcap=2.0)
    got, want = _shards_vs_reference(logits, target, (4, 3, 4), global_shift=True, **options)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    assert got[1].dtype == dtype and np.all(got[1][:, 7:] == 0)


def test_shard_of_masked_classes_float32():
    rng = np.random.default_rng(5)
    logits = (3 * rng.normal(size=(5, 9))).astype(np.float32)
    logits[:, 6:] = -np.inf  # the last shard holds only masked classes
    target = np.array([0, 5, 2, -100, 4])
    (loss, grad, lse), (loss_ref, grad_ref, lse_ref) = _shards_vs_reference(
        logits, target, (4, 2, 3), label_smoothing=0.0)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    np.testing.assert_allclose(grad, grad_ref, rtol=1e-5, atol=1e-7)
    assert grad.dtype == np.float32 and np.all(grad[:, 6:] == 0)


def test_shard_cross_entropy_all_ignored_mean_is_nan_with_zero_gradient():
    logits = np.random.default_rng(6).normal(size=(3, 5))
    target = np.full(3, -100)
    (loss, grad, _), _ = _shards_vs_reference(logits, target, (2, 3))
    assert np.isnan(loss) and np.all(grad == 0)


def test_shard_cross_entropy_mean_over_targets_weighted_zero_is_nan():
    logits = np.random.default_rng(6).normal(size=(3, 5))
    target = np.array([0, -100, 1])
    weight = np.array([0.0, 0.0, 1.0, 1.0, 1.0])
    (loss, grad, _), (ref_loss, ref_grad, _) = _shards_vs_reference(logits, target, (2, 3),
                                                                    weight=weight)
    assert np.isnan(loss) and np.isnan(ref_loss)
    np.testing.assert_array_equal(grad, ref_grad)      # NaN rows 0 and 2, zeros in row 1
    assert np.all(np.isnan(grad[[0, 2]])) and np.all(grad[1] == 0)


def test_bn_forward_from_stats_refuses_running_buffers_it_cannot_write():
    x = np.random.default_rng(1).normal(size=(4, 3))
    count, mean, m2 = 4, x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
    with pytest.raises(TypeError, match="running_mean is written in place"):
        fgd.bn_forward_from_stats(x, count, mean, m2, running_mean=[0.0, 0.0, 0.0])


def test_ce_loss_checks_the_shapes_of_the_combined_statistics():
    lse, target_logit, weighted = np.zeros(4), np.zeros(4), np.zeros(4)
    target = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match="target_logit must have shape \\(4,\\)"):
        fgd.ce_loss(lse, np.zeros(1), weighted, target, 3)
    with pytest.raises(ValueError, match="weighted_sum must have shape"):
        fgd.ce_loss(lse, target_logit, np.zeros((4, 1)), target, 3)
    with pytest.raises(ValueError, match="lse must have shape \\(N,\\)"):
        fgd.ce_loss(np.zeros((4, 1)), target_logit, weighted, target, 3)


def test_shard_cross_entropy_rejects_bad_arguments():
    logits = np.zeros((2, 3))
    with pytest.raises(TypeError, match="probability"):
        fgd.ce_shard_stats(logits, np.zeros(2), 0, 3)
    with pytest.raises(ValueError, match="class_offset"):
        fgd.ce_shard_stats(logits, np.zeros(2, np.int64), 2, 4)
    with pytest.raises(ValueError, match="target"):
        fgd.ce_shard_stats(logits, np.array([0, 7]), 0, 5)
    with pytest.raises(ValueError, match="weight"):
        fgd.ce_shard_grad(logits, np.zeros(2, np.int64), 0, np.zeros(2), 3, weight=np.ones(4))
    with pytest.raises(ValueError, match="grad_loss"):
        fgd.ce_shard_grad(logits, np.zeros(2, np.int64), 0, np.zeros(2), 3, reduction="none",
                          grad_loss=np.ones(3))
    with pytest.raises(ValueError, match="softcap"):
        fgd.ce_shard_max(logits, softcap=0.0)
    with pytest.raises(TypeError, match="softcap"):
        fgd.ce_shard_stats(logits, np.zeros(2, np.int64), 0, 3, softcap="1")
    out = np.full_like(logits, 5.0)
    with pytest.raises(ValueError, match="softcap"):
        fgd.ce_shard_grad(logits, np.zeros(2, np.int64), 0, np.zeros(2), 3, softcap=-1.0,
                          out=out)
    np.testing.assert_array_equal(out, 5.0)


def test_building_blocks_are_bitwise_identical_for_any_thread_count():
    import numba
    rng = np.random.default_rng(8)
    x = rng.normal(size=(64, 8, 300)).astype(np.float32)
    logits = rng.normal(size=(300, 2500)).astype(np.float32)
    target = rng.integers(0, 3000, 300)

    def run():
        count, mean, m2 = fgd.bn_partial_stats(x)
        stats = fgd.ce_shard_stats(logits, target, 500, 3000, label_smoothing=0.1)
        grad = fgd.ce_shard_grad(logits, target, 500, stats.row_max + np.log(stats.sum_exp),
                                 3000, label_smoothing=0.1)
        return [mean, m2, *stats, grad]

    previous = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        single = run()
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        threaded = run()
    finally:
        numba.set_num_threads(previous)
    for a, b in zip(single, threaded):
        assert np.array_equal(a, b)


@pytest.fixture
def one_rank_world(monkeypatch):
    """torch.distributed as a world of one rank, without a process group: an all-reduce over
    one rank leaves its tensor as it is."""
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: None)


@pytest.mark.parametrize("softcap", [None, 1.5])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocab_parallel_checks_once_and_equals_building_blocks(one_rank_world, monkeypatch,
                                                               reduction, softcap):
    rng = np.random.default_rng(9)
    logits, target = rng.normal(size=(7, 5)), rng.integers(0, 5, 7)
    target[::3] = -100
    weight = rng.uniform(0.5, 2.0, 5)
    options = dict(weight=weight, reduction=reduction, label_smoothing=0.1, z_loss=1e-3)
    checks = []
    checked = fgd._target_and_weights
    monkeypatch.setattr(fgd, "_target_and_weights",
                        lambda *args: checks.append(1) or checked(*args))
    shard = torch.tensor(logits, requires_grad=True)
    loss = fgd.vocab_parallel_softmax_cross_entropy(
        shard, torch.from_numpy(target), softcap=softcap,
        **dict(options, weight=torch.from_numpy(weight)))
    upstream = rng.normal(size=loss.shape)
    loss.backward(torch.from_numpy(upstream))
    assert len(checks) == 1  # in forward; the backward reuses what it checked

    stats = fgd.ce_shard_stats(logits, target, 0, 5,
                               shift=fgd.ce_shard_max(logits, softcap=softcap), weight=weight,
                               label_smoothing=0.1, softcap=softcap)
    lse, target_logit, weighted = fgd.ce_combine([stats])
    want_loss = fgd.ce_loss(lse, target_logit, weighted, target, 5, **options)
    want_grad = fgd.ce_shard_grad(logits, target, 0, lse, 5, grad_loss=upstream,
                                  softcap=softcap, **options)
    assert np.array_equal(loss.detach().numpy(), want_loss)
    assert np.array_equal(shard.grad.numpy(), want_grad)


def test_vocab_parallel_rejects_bad_target_and_in_place_changes(one_rank_world):
    shard = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="target values"):
        fgd.vocab_parallel_softmax_cross_entropy(shard, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="softcap"):
        fgd.vocab_parallel_softmax_cross_entropy(shard, torch.tensor([0, 2]), softcap=0.0)
    target = torch.tensor([0, 2])
    loss = fgd.vocab_parallel_softmax_cross_entropy(shard, target)
    target[1] = 1  # after forward: backward refuses it (it uses the target forward checked)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


# Named edge cases found by a differential hunt of the building blocks (2026-12-06)
def test_building_block_outputs_refuse_every_input_they_read():
    """An out= overlapping an input other than x was taken and gave a wrong result (dx off by
    5.7 with out overlapping dy, a gradient off by 0.35 with out overlapping lse)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3))
    buf = rng.standard_normal((5, 3))
    count, mean, m2 = fgd.bn_partial_stats(x)
    _, mean, invstd = fgd.bn_forward_from_stats(x, count, mean, m2)
    sums = fgd.bn_backward_reduce(buf[:4], x, mean, invstd)
    with pytest.raises(ValueError, match="out must not share memory with dy"):
        fgd.bn_backward_elementwise(buf[:4], x, mean, invstd, None, *sums, count, out=buf[1:])
    stats = np.zeros((2, 3))
    stats[0] = mean
    with pytest.raises(ValueError, match="out must not share memory with mean"):
        fgd.bn_forward_from_stats(x[:1].copy(), count, stats[0], m2,
                                  out=stats[0].reshape(1, 3))
    logits = rng.standard_normal((4, 6))
    target = np.array([0, 1, 2, 0])
    lse, _, _ = fgd.ce_combine([fgd.ce_shard_stats(logits, target, 0, 6)])
    lse_in = np.zeros(25)
    lse_in[:4] = lse
    with pytest.raises(ValueError, match="out must not share memory with lse"):
        fgd.ce_shard_grad(logits, target, 0, lse_in[:4], 6, out=lse_in[1:25].reshape(4, 6))
    wide = rng.standard_normal((4, 12))
    with pytest.raises(ValueError, match="out must not share memory with logits_shard"):
        fgd.ce_shard_grad(wide[:, ::2], target, 0, lse, 6, out=wide[:, :6])


def test_shard_grad_with_a_zero_upstream_gradient_keeps_nan_rows():
    """A row scaled by 0 was zero-filled, so a NaN logit gave zeros where PyTorch's 0 * NaN
    gives NaN (the same shortcut in the single-process row kernel, C > 32, is gone too)."""
    logits = np.array([[0.5, np.nan, 1.0], [0.2, 0.1, 0.3]])
    target = np.array([0, 2])
    lse, _, _ = fgd.ce_combine([fgd.ce_shard_stats(logits, target, 0, 3)])
    grad = fgd.ce_shard_grad(logits, target, 0, lse, 3, reduction="none",
                             grad_loss=np.zeros(2))
    assert np.isnan(grad[0]).all() and np.array_equal(grad[1], np.zeros(3))
    assert np.isnan(fgd.ce_shard_grad(logits, target, 0, lse, 3, reduction="sum",
                                      grad_loss=0.0)[0]).all()


@pytest.mark.parametrize("grad_loss", ["2", True, np.ones(2, dtype=np.int64)])
def test_shard_grad_refuses_a_grad_loss_that_is_not_real_or_floating(grad_loss):
    """A string was parsed ("2" doubled the gradient), True counted as 1, an integer array was
    taken: the TypeError of fg.softmax_cross_entropy_backward."""
    logits, target = np.zeros((2, 3)), np.array([0, 1])
    lse = np.full(2, np.log(3.0))
    with pytest.raises(TypeError, match="grad_loss"):
        fgd.ce_shard_grad(logits, target, 0, lse, 3, reduction="none", grad_loss=grad_loss)


def test_ce_combine_checks_its_shards():
    """Shards of different row counts were broadcast into a wrong lse (1 row against 4)."""
    rng = np.random.default_rng(1)
    four = fgd.ce_shard_stats(rng.standard_normal((4, 3)), np.zeros(4, np.int64), 0, 6)
    one = fgd.ce_shard_stats(rng.standard_normal((1, 3)), np.zeros(1, np.int64), 3, 6)
    with pytest.raises(ValueError, match="every shard holds the same rows"):
        fgd.ce_combine([four, one])
    with pytest.raises(TypeError, match="ShardStats"):
        fgd.ce_combine([tuple(four)])


def test_building_blocks_name_arguments_that_are_not_real_numbers():
    with pytest.raises(ValueError, match="counts must be non-negative integers"):
        fgd.bn_merge_stats([np.inf], np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(TypeError, match="counts must hold real numbers"):
        fgd.bn_merge_stats(["a"], np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(TypeError, match="means must hold real numbers"):
        fgd.bn_merge_stats([2], np.zeros((1, 2), complex), np.zeros((1, 2)))
    logits, target = np.zeros((2, 3)), np.array([0, 1])
    with pytest.raises(TypeError, match="shift must hold real numbers"):
        fgd.ce_shard_stats(logits, target, 0, 3, shift=np.array(["a", "b"]))
    with pytest.raises(TypeError, match="lse must hold real numbers"):
        fgd.ce_loss(np.zeros(2, complex), np.zeros(2), np.zeros(2), target, 3)


def test_vocab_parallel_refuses_a_second_order_gradient(one_rank_world):
    """create_graph=True through the sharded backward raises, where once_differentiable alone
    returned a gradient cut off from the graph (a gradient penalty's gradient dropped)."""
    shard = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    loss = fgd.vocab_parallel_softmax_cross_entropy(shard, torch.tensor([0, 2, 1, 0]))
    with pytest.raises(RuntimeError, match="vocab_parallel_softmax_cross_entropy has no "
                                           "double backward"):
        torch.autograd.grad(loss, shard, create_graph=True)


# --------------------------------------------------------------------------------------------
# torch modules in one process (no process group: plain batch norm)
# --------------------------------------------------------------------------------------------
def test_sync_batch_norm_state_dict_and_conversion_match_torch():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, momentum=None),
                          nn.Sequential(nn.BatchNorm1d(4, affine=False)))
    model[1].running_mean.fill_(0.5)
    weight = model[1].weight
    converted = fgd.convert_sync_batchnorm(model)
    assert type(converted[1]) is fgd.SyncBatchNorm and type(converted[2][0]) is fgd.SyncBatchNorm
    assert converted[1].weight is weight and converted[1].momentum is None
    assert converted[2][0].weight is None
    # DistributedDataParallel refuses CPU models holding an nn.SyncBatchNorm (isinstance check):
    assert not isinstance(converted[1], nn.SyncBatchNorm)
    torch_sync = nn.SyncBatchNorm(3)
    assert fgd.SyncBatchNorm(3).state_dict().keys() == torch_sync.state_dict().keys()
    fgd.SyncBatchNorm(3).load_state_dict(torch_sync.state_dict())
    assert type(fgd.convert_sync_batchnorm(torch_sync)) is fgd.SyncBatchNorm
    with pytest.raises(ValueError, match="2D"):
        fgd.SyncBatchNorm(3)(torch.ones(3))
    with pytest.raises(TypeError, match="module"):
        fgd.convert_sync_batchnorm("not a module")


def test_sync_conversion_refuses_a_fused_relu_instead_of_dropping_it():
    import fusedgrad.torch as fgt
    model = fgt.convert_model(nn.Sequential(nn.BatchNorm1d(3), nn.Sequential(
        nn.BatchNorm2d(3), nn.ReLU())), fuse_relu=True)
    with pytest.raises(ValueError, match="fused ReLU.*fuse_relu=False"):
        fgd.convert_sync_batchnorm(model)
    # refused before anything was converted
    assert [type(m) for m in (model[0], model[1][0])] == [fgt.BatchNorm1d, fgt.BatchNormReLU2d]


def test_sync_batch_norm_without_process_group_is_batch_norm():
    x = torch.randn(6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    ours, theirs = fgd.SyncBatchNorm(3, dtype=torch.float64), nn.BatchNorm1d(3,
                                                                          dtype=torch.float64)
    for module in (ours, theirs):
        nn.init.uniform_(module.weight, 0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(xa).square().sum().backward()
    theirs(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Real process groups: scenarios
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BnCase:
    world: int            # ranks in the process group (2: ranks 0 and 1, 3: all)
    sizes: tuple          # batch size per rank
    sample_shape: tuple   # (C, *spatial)
    dtype: str = "float64"
    channels_last: bool = False
    momentum: float | None = 0.1
    affine: bool = True
    steps: int = 2        # training steps (running statistics evolve), then one eval call

    def module(self, module_cls, weight, bias, dtype, **kwargs):
        """A batch-norm module of this case with the given affine parameters."""
        module = module_cls(self.sample_shape[0], momentum=self.momentum, affine=self.affine,
                            dtype=dtype, **kwargs)
        if self.affine:
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(weight))
                module.bias.copy_(torch.from_numpy(bias))
        return module

    def data(self, name):
        """Per step: the global batch and upstream gradient; and the affine parameters."""
        rng = _rng(name)
        n, n_channels = sum(self.sizes), self.sample_shape[0]
        steps = [(1.5 + 2 * rng.normal(size=(n,) + self.sample_shape),
                  rng.normal(size=(n,) + self.sample_shape)) for _ in range(self.steps)]
        return steps, rng.uniform(0.5, 1.5, n_channels), rng.normal(size=n_channels)


@dataclass(frozen=True)
class CeCase:
    world: int            # ranks in the process group (2: ranks 0 and 1, 3: all)
    widths: tuple         # classes per rank
    n_rows: int
    reduction: str = "mean"
    weighted: bool = False
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    dtype: str = "float64"
    softcap: float | None = None

    def data(self, name):
        rng = _rng(name)
        n_classes = sum(self.widths)
        logits = 3 * rng.normal(size=(self.n_rows, n_classes))
        target = rng.integers(0, n_classes, self.n_rows)
        target[::3] = -100
        weight = rng.uniform(0.5, 2.0, n_classes) if self.weighted else None
        return logits, target, weight


BN_CASES = {
    "nchw_uneven": BnCase(2, (3, 5), (3, 4, 3)),
    "nhwc_uneven": BnCase(2, (2, 4), (4, 3, 2), channels_last=True),
    "nchw_float32": BnCase(2, (4, 3), (5, 6, 6), dtype="float32"),
    "rows_empty_rank": BnCase(3, (4, 0, 3), (5,), momentum=None),
    "ncl_uneven_no_affine": BnCase(3, (1, 2, 6), (3, 7), affine=False),
}
CE_CASES = {
    "two_shards_mean": CeCase(2, (4, 7), 6),
    "two_shards_smooth_weighted_sum": CeCase(2, (9, 2), 5, reduction="sum", weighted=True,
                                             label_smoothing=0.1),
    "three_shards_none_weighted": CeCase(3, (5, 1, 4), 7, reduction="none", weighted=True),
    "three_shards_smooth_zloss_float32": CeCase(3, (2, 6, 3), 8, label_smoothing=0.2,
                                                z_loss=1e-3, dtype="float32"),
    "three_shards_softcap_weighted_none": CeCase(3, (3, 5, 2), 6, reduction="none",
                                                 weighted=True, label_smoothing=0.1,
                                                 softcap=2.0),
}


def _rng(name):
    """Generator seeded by the scenario name, identically in every process."""
    return np.random.default_rng(zlib.crc32(name.encode()))


def _edges(sizes):
    return np.cumsum((0,) + tuple(sizes))


# --------------------------------------------------------------------------------------------
# Real process groups: what each rank runs (in its own spawned process)
# --------------------------------------------------------------------------------------------
def _bn_rank(name, case, rank, group, counter):
    steps, weight, bias = case.data(name)
    dtype = getattr(torch, case.dtype)
    lo, hi = _edges(case.sizes)[rank:rank + 2]
    module = case.module(fgd.SyncBatchNorm, weight, bias, dtype, process_group=group)
    collectives = []
    for x_all, dy_all in steps:
        x = torch.tensor(x_all[lo:hi], dtype=dtype)
        if case.channels_last:
            x = x.to(memory_format=torch.channels_last)
        x.requires_grad_()
        module.zero_grad()
        counter.take()
        y = module(x)
        collectives.append(counter.take())
        y.backward(torch.tensor(dy_all[lo:hi], dtype=dtype))
        collectives.append(counter.take())
    module.eval()
    y_eval = module(x.detach())
    collectives.append(counter.take())
    layout_kept = not case.channels_last or (
        y.is_contiguous(memory_format=torch.channels_last)
        and x.grad.is_contiguous(memory_format=torch.channels_last))
    return {f"{name}.y": y.detach().numpy(), f"{name}.dx": x.grad.numpy(),
            f"{name}.dweight": module.weight.grad.numpy() if case.affine else np.zeros(0),
            f"{name}.dbias": module.bias.grad.numpy() if case.affine else np.zeros(0),
            f"{name}.running_mean": module.running_mean.numpy(),
            f"{name}.running_var": module.running_var.numpy(),
            f"{name}.batches": module.num_batches_tracked.numpy(),
            f"{name}.y_eval": y_eval.detach().numpy(),
            f"{name}.collectives": np.array(collectives), f"{name}.layout_kept": layout_kept}


def _ce_rank(name, case, rank, group, counter):
    logits, target, weight = case.data(name)
    lo, hi = _edges(case.widths)[rank:rank + 2]
    shard = torch.tensor(logits[:, lo:hi], dtype=getattr(torch, case.dtype), requires_grad=True)
    counter.take()
    loss = fgd.vocab_parallel_softmax_cross_entropy(
        shard, torch.from_numpy(target), group,
        weight=None if weight is None else torch.from_numpy(weight), reduction=case.reduction,
        label_smoothing=case.label_smoothing, z_loss=case.z_loss, softcap=case.softcap)
    forward = counter.take()
    loss.sum().backward()
    return {f"{name}.loss": loss.detach().numpy(), f"{name}.grad": shard.grad.numpy(),
            f"{name}.collectives": np.array([forward, counter.take()])}


def _rank_main(rank, port, out_dir):
    """Entry point of one spawned rank: run its scenarios, save the results."""
    import numba
    try:
        numba.set_num_threads(1)
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        pair = dist.new_group([0, 1])  # collective over the world: every rank creates it
        groups = {2: pair, WORLD: None}  # None: the default (whole world) group
        results = {}
        with fgd.CollectiveCounter() as counter:
            for cases, run in ((BN_CASES, _bn_rank), (CE_CASES, _ce_rank)):
                for name, case in cases.items():
                    if rank < case.world:
                        results.update(run(name, case, rank, groups[case.world], counter))
        np.savez(f"{out_dir}/rank{rank}.npz", **results)
        dist.destroy_process_group()
    except BaseException:
        with open(f"{out_dir}/rank{rank}.error", "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _warm_kernels():
    """Compile (or load) the kernels the ranks use once here, not concurrently in every rank."""
    for dtype in (np.float32, np.float64):
        x = np.ones((3, 2, 2), dtype)
        count, mean, m2 = fgd.bn_partial_stats(x)
        _, mean, invstd = fgd.bn_forward_from_stats(x, count, mean, m2)
        sums = fgd.bn_backward_reduce(x, x, mean, invstd)
        fgd.bn_backward_elementwise(x, x, mean, invstd, None, *sums, count)
        logits, target = np.ones((2, 3), dtype), np.zeros(2, np.int64)
        for softcap in (None, 1.0):
            stats = fgd.ce_shard_stats(logits, target, 0, 3, softcap=softcap,
                                       shift=fgd.ce_shard_max(logits, softcap=softcap))
            fgd.ce_shard_grad(logits, target, 0, stats.row_max, 3, softcap=softcap)


def _run_world(out_dir):
    """Spawn the WORLD ranks, wait at most JOIN_TIMEOUT_S, return each rank's results."""
    port = _free_port()
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_rank_main, args=(rank, port, str(out_dir)))
             for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = [(out_dir / f"rank{r}.error").read_text() for r in range(WORLD)
              if (out_dir / f"rank{r}.error").exists()]
    if hung or errors or any(p.exitcode != 0 for p in procs):
        pytest.fail(f"hung ranks {hung}, exit codes {[p.exitcode for p in procs]}\n"
                    + "\n".join(errors))
    return [dict(np.load(out_dir / f"rank{r}.npz")) for r in range(WORLD)]


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    """``get(n)``: the results of the first n ranks (the world is started once per module)."""
    outcome = []

    def get(n_ranks):
        if not outcome:
            _warm_kernels()
            try:
                outcome.append(_run_world(tmp_path_factory.mktemp("world")))
            except BaseException as exc:  # pytest.fail: report the same failure for each test
                outcome.append(exc)
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0][:n_ranks]
    return get


# --------------------------------------------------------------------------------------------
# Real process groups: the tests
# --------------------------------------------------------------------------------------------
def _batch_norm_reference(name, case):
    """nn.BatchNorm on the concatenated batch (float64): last step's outputs and gradients."""
    steps, weight, bias = case.data(name)
    module_cls = nn.BatchNorm2d if len(case.sample_shape) == 3 else nn.BatchNorm1d
    module = case.module(module_cls, weight, bias, torch.float64)
    for x_all, dy_all in steps:
        x = torch.tensor(x_all, dtype=getattr(torch, case.dtype)).double().requires_grad_()
        module.zero_grad()
        y = module(x)
        y.backward(torch.tensor(dy_all, dtype=getattr(torch, case.dtype)).double())
    module.eval()
    no_grad = torch.zeros(0, dtype=torch.float64)
    return dict(y=y.detach(), dx=x.grad,
                dweight=module.weight.grad if case.affine else no_grad,
                dbias=module.bias.grad if case.affine else no_grad,
                running_mean=module.running_mean, running_var=module.running_var,
                y_eval=module(x.detach()).detach(), batches=module.num_batches_tracked)


@pytest.mark.slow
@pytest.mark.parametrize("name", BN_CASES)
def test_sync_batch_norm_equals_batch_norm_on_concatenated_batch(name, world_results):
    case = BN_CASES[name]
    ranks = world_results(case.world)
    want = _batch_norm_reference(name, case)
    tol = 1e-6 if case.dtype == "float64" else 1e-4
    for key in ("y", "dx", "y_eval"):
        got = np.concatenate([r[f"{name}.{key}"] for r in ranks])
        np.testing.assert_allclose(got, want[key].numpy(), rtol=tol, atol=tol, err_msg=key)
    for key in ("dweight", "dbias"):  # each rank holds its part; DDP would add them
        got = sum(r[f"{name}.{key}"].astype(np.float64) for r in ranks)
        np.testing.assert_allclose(got, want[key].numpy(), rtol=tol, atol=tol, err_msg=key)
    for r in ranks:
        for key in ("running_mean", "running_var"):
            np.testing.assert_allclose(r[f"{name}.{key}"], want[key].numpy(), rtol=tol, atol=tol,
                                       err_msg=key)
        assert int(r[f"{name}.batches"]) == int(want["batches"]) == case.steps
        assert bool(r[f"{name}.layout_kept"])
    if case.dtype == "float64":  # identical statistics on every rank: identical buffers
        for r in ranks[1:]:
            assert np.array_equal(r[f"{name}.running_var"], ranks[0][f"{name}.running_var"])


@pytest.mark.slow
@pytest.mark.parametrize("name", BN_CASES)
def test_sync_batch_norm_one_collective_per_direction_none_in_eval(name, world_results):
    case = BN_CASES[name]
    for r in world_results(case.world):
        assert list(r[f"{name}.collectives"]) == [1, 1] * case.steps + [0]


@pytest.mark.slow
@pytest.mark.parametrize("name", CE_CASES)
def test_vocab_parallel_cross_entropy_equals_full_cross_entropy(name, world_results):
    case = CE_CASES[name]
    ranks = world_results(case.world)
    logits, target, weight = case.data(name)
    logits = logits.astype(case.dtype).astype(np.float64)
    loss, grad, _ = reference.softmax_cross_entropy(
        logits, target, weight=weight, reduction=case.reduction,
        label_smoothing=case.label_smoothing, z_loss=case.z_loss, softcap=case.softcap)
    tol = 1e-10 if case.dtype == "float64" else 1e-5
    for r in ranks:
        np.testing.assert_allclose(r[f"{name}.loss"], loss, rtol=tol, atol=tol)
        assert list(r[f"{name}.collectives"]) == [2, 0]
    got = np.concatenate([r[f"{name}.grad"] for r in ranks], axis=1)
    np.testing.assert_allclose(got, grad, rtol=tol, atol=tol)
    if case.weighted:
        if case.softcap is not None:
            logits = case.softcap * np.tanh(logits / case.softcap)
        weighted_loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(target),
                                        weight=torch.from_numpy(weight), reduction=case.reduction,
                                        label_smoothing=case.label_smoothing)
        np.testing.assert_allclose(ranks[0][f"{name}.loss"], weighted_loss.numpy(), rtol=tol)
