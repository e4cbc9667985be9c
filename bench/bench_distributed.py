"""SyncBatchNorm on gloo ranks: fusedgrad vs PyTorch's SyncBatchNorm algorithm, on the CPU.

Run: ``python bench/bench_distributed.py`` (2 ranks, NCHW 32 x 256 x 28 x 28 float32 per rank,
forward + backward). Options: ``--ranks``, ``--shape``, ``--iters``, ``--threads`` (per rank),
``--json PATH``.

What is compared
----------------
``torch.nn.SyncBatchNorm`` refuses CPU tensors in torch 2.13 ("SyncBatchNorm expected input
tensor to be on GPU ..."), and five of the ops its autograd Function uses have no CPU kernel
(``torch.batch_norm_stats``, ``batch_norm_gather_stats_with_counts``, ``batch_norm_elemt``,
``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``). The baseline is therefore
PyTorch's own ``torch.nn.modules._functions.SyncBatchNorm`` Function (its algorithm and its
collectives: all_gather of [mean, invstd, count] in forward, all_reduce of the two sums in
backward) with those five ops supplied, in this process only, by the fastest CPU compositions of
PyTorch's CPU kernels found (each is one or two vectorised passes):

* stats: ``torch.batch_norm_update_stats`` (PyTorch's CPU batch-norm statistics kernel);
* elemt: ``torch.batch_norm`` in eval mode with the global mean / variance;
* backward_reduce: ``aten.native_batch_norm_backward`` with output mask (no dx, dweight,
  dbias), i.e. sum(dy) and sum(dy xhat) in one pass;
* backward_elemt: dx = a dy + b x + c per channel, as eval-mode ``torch.batch_norm`` (b x + c)
  plus one ``addcmul_`` (a dy);
* gather_stats_with_counts: the small (ranks x C) merge, written with tensor ops.

Both run on the same ranks, data and thread counts, alternating iteration by iteration. The
ranks run with ``OMP_WAIT_POLICY=PASSIVE`` by default (``--omp-wait-policy ACTIVE`` to change):
with several processes per machine, OpenMP worker threads that spin after each parallel region
(Numba's ``omp`` threading layer, PyTorch's OpenMP pool) take the cores the other ranks need;
measured here, this slowed both implementations' statistics passes several-fold. The
collectives each issues are counted by ``fusedgrad.distributed.CollectiveCounter``, which wraps
``torch.distributed``'s functions in the rank processes (both implementations call them through
that module).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.modules import _functions as torch_functions

# --------------------------------------------------------------------------------------------
# CPU versions of the CUDA-only ops used by torch's SyncBatchNorm Function (baseline only)
# --------------------------------------------------------------------------------------------
def _channel_view(vec, ndim):
    return vec.view((1, -1) + (1,) * (ndim - 2))


def _stats_cpu(input, eps):
    mean, var = torch.batch_norm_update_stats(input, None, None, 0.0)
    return mean, (var + eps).rsqrt()


def _gather_stats_with_counts_cpu(input, mean_all, invstd_all, running_mean, running_var,
                                  momentum, eps, counts):
    counts = counts.to(mean_all.dtype).view(-1, 1)
    total = counts.sum()
    mean = (counts * mean_all).sum(0) / total
    var_all = invstd_all.pow(-2) - eps
    var = (counts * (var_all + (mean_all - mean).square())).sum(0) / total
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
    if running_var is not None:
        running_var.mul_(1 - momentum).add_(var * (total / (total - 1)), alpha=momentum)
    return mean, (var + eps).rsqrt()


def _elemt_cpu(input, weight, bias, mean, invstd, eps):
    return torch.batch_norm(input, weight, bias, mean, invstd.pow(-2) - eps, False, 0.0, eps,
                            False)


def _backward_reduce_cpu(grad_output, input, mean, invstd, weight, input_g, weight_g, bias_g):
    _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
        grad_output, input, weight, None, None, mean, invstd, True, 0.0, [False, True, True])
    return sum_dy, sum_dy_xhat / invstd, sum_dy_xhat, sum_dy


def _backward_elemt_cpu(grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    # dx = w invstd (dy - sum_dy / n - (x - mean) invstd^2 sum_dy_xmu / n) = a dy + b x + c
    n = count.sum().to(mean.dtype)
    a = weight * invstd
    b = -a * invstd.square() * sum_dy_xmu / n
    c = -a * sum_dy / n - b * mean
    # Eval-mode batch norm with mean 0 and var + eps = 1 computes b x + c in one pass.
    unit_var = torch.full_like(mean, 1.0 - 1e-5)
    return torch.batch_norm(input, b, c, torch.zeros_like(mean), unit_var, False, 0.0, 1e-5,
                            False).addcmul_(grad_output, _channel_view(a, input.dim()))


def _install_cpu_ops():
    torch.batch_norm_stats = _stats_cpu
    torch.batch_norm_gather_stats_with_counts = _gather_stats_with_counts_cpu
    torch.batch_norm_elemt = _elemt_cpu
    torch.batch_norm_backward_reduce = _backward_reduce_cpu
    torch.batch_norm_backward_elemt = _backward_elemt_cpu


class _TorchSyncBatchNormCPU(nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm's training path (its Function) without its device check."""

    def forward(self, input):
        self.num_batches_tracked.add_(1)
        group = dist.group.WORLD
        return torch_functions.SyncBatchNorm.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
            self.momentum, group, dist.get_world_size(group))


# --------------------------------------------------------------------------------------------
# One rank
# --------------------------------------------------------------------------------------------
def _step(module, x, dy, counter):
    """One forward + backward: (seconds fwd, seconds bwd, collectives fwd, collectives bwd)."""
    x.grad = None
    dist.barrier()
    counter.take()
    t0 = time.perf_counter()
    y = module(x)
    t1 = time.perf_counter()
    forward = counter.take()
    y.backward(dy)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, forward, counter.take(), y.detach(), x.grad


def _rank(rank, args, port, result_path):
    import numba

    import fusedgrad.distributed as fgd

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.ranks, timeout=datetime.timedelta(seconds=300))
    _install_cpu_ops()
    gen = torch.Generator().manual_seed(rank)
    x = (2.0 + torch.randn(args.shape, generator=gen)).requires_grad_()
    dy = torch.randn(args.shape, generator=gen)
    channels = args.shape[1]
    modules = {"fusedgrad": fgd.SyncBatchNorm(channels),
               "torch (SyncBatchNorm Function, CPU ops)": _TorchSyncBatchNormCPU(channels)}
    times = {name: ([], []) for name in modules}
    counts, outputs = {}, {}
    with fgd.CollectiveCounter() as counter:
        for it in range(args.warmup + args.iters):
            for name, module in modules.items():
                fwd, bwd, n_fwd, n_bwd, y, dx = _step(module, x, dy, counter)
                counts[name] = (n_fwd, n_bwd)
                outputs[name] = (y, dx)
                if it >= args.warmup:
                    times[name][0].append(fwd)
                    times[name][1].append(bwd)
    (y_a, dx_a), (y_b, dx_b) = outputs.values()
    diff = max(float((y_a - y_b).abs().max()), float((dx_a - dx_b).abs().max()))
    # Every rank waits for the slowest one inside the collectives, so rank times agree closely;
    # gather them and report the slowest rank's median.
    local = torch.tensor([statistics.median(v) for name in modules for v in times[name]],
                         dtype=torch.float64)
    gathered = [torch.empty_like(local) for _ in range(args.ranks)]
    dist.all_gather(gathered, local)
    if rank == 0:
        slowest = torch.stack(gathered).max(0).values.tolist()
        report = {"ranks": args.ranks, "shape_per_rank": list(args.shape),
                  "threads_per_rank": args.threads, "iters": args.iters,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                  "max_abs_difference": diff, "results": {}}
        for i, name in enumerate(modules):
            fwd, bwd = slowest[2 * i], slowest[2 * i + 1]
            report["results"][name] = {"forward_ms": 1e3 * fwd, "backward_ms": 1e3 * bwd,
                                       "total_ms": 1e3 * (fwd + bwd),
                                       "collectives_forward": counts[name][0],
                                       "collectives_backward": counts[name][1]}
        with open(result_path, "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--shape", type=int, nargs="+", default=[32, 256, 28, 28])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int,
                        default=max(1, (os.cpu_count() or 1) // 2),
                        help="threads per rank (default: the cores shared out over 2 ranks)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE"],
                        help="OMP_WAIT_POLICY of the ranks (default PASSIVE: see the docstring)")
    parser.add_argument("--json", help="also write the report to this file")
    args = parser.parse_args(argv)
    # Inherited by the spawned ranks before they load any OpenMP runtime.
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    args.shape = tuple(args.shape)
    result_path = args.json or os.path.join(
        os.environ.get("TMPDIR", "/tmp"), f"bench_distributed_{os.getpid()}.json")
    mp.spawn(_rank, args=(args, _free_port(), result_path), nprocs=args.ranks, join=True)
    with open(result_path) as f:
        report = json.load(f)
    if not args.json:
        os.remove(result_path)
    print(f"SyncBatchNorm, {report['ranks']} gloo ranks, {report['shape_per_rank']} float32 per "
          f"rank, {report['threads_per_rank']} thread(s) per rank, OMP_WAIT_POLICY="
          f"{report['omp_wait_policy']}, median of {report['iters']} (slowest rank)")
    print(f"{'implementation':42s} {'fwd ms':>8s} {'bwd ms':>8s} {'total ms':>9s} "
          f"{'coll. fwd':>9s} {'coll. bwd':>9s}")
    for name, r in report["results"].items():
        print(f"{name:42s} {r['forward_ms']:8.2f} {r['backward_ms']:8.2f} {r['total_ms']:9.2f} "
              f"{r['collectives_forward']:9d} {r['collectives_backward']:9d}")
    ours, theirs = report["results"].values()
    print(f"speed-up (torch / fusedgrad): forward {theirs['forward_ms'] / ours['forward_ms']:.2f}x,"
          f" backward {theirs['backward_ms'] / ours['backward_ms']:.2f}x, total "
          f"{theirs['total_ms'] / ours['total_ms']:.2f}x; max |difference| of y and dx: "
          f"{report['max_abs_difference']:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
