"""Cross-entropy and batch-norm kernel variants on a GPU, at issue 13's sizes: what each costs.

Run on a machine with an NVIDIA GPU (``bench/gpu_check.sh`` runs it as its ``variants`` step):

    PYTHONPATH=src python3 bench/gpu_variants.py [--rounds 20]

For each case (fused forward + backward, ``fg.softmax_cross_entropy`` on PyTorch CUDA tensors,
class-index targets) it times, interleaved round by round with CUDA events, median of rounds:

* ``rows``: the general kernel ``_ce_rows`` (what every launch used before the dense-row
  kernel), forced by making ``_arrays.dense_rows`` find no dense view;
* ``dense/W``: the dense-row kernel with W threads per row (``_threads_per_row`` replaced),
  for the widths worth comparing at that row length; the one the launcher picks is marked;
* ``torch``: PyTorch eager, ``F.cross_entropy`` forward + backward (a reference point; the
  full set of peers is ``python -m fusedgrad bench --device cuda``).

Batch norm (training forward + backward through ``fg.batch_norm_forward`` /
``fg.batch_norm_backward``; NCHW, channels-last, ``(N, C)``) runs :data:`BN_VARIANTS`: the
general kernels (``_partials``, ``_apply``) or the layout's own (spatial for NCHW, columns for
channels-last and ``(N, C)``), and the reductions' ``_ITEMS_PER_THREAD``; its
traffic is eight
x-sized transfers (statistics; normalise; the backward sums; dx), and ``torch`` is
``F.batch_norm`` forward + backward.

Beside each time: GB/s of the minimum traffic (cross-entropy: logits read once, gradient
written once; batch norm: the eight transfers), % of the device's copy bandwidth measured in
the same run (``torch`` copy of 1 GiB, read + write), and the prediction written down before
the first run (``PREDICTED_MS``, from that traffic at the H200's 3,842 GB/s measured on
2026-11-29 and each variant's known losses; docs/gpu.md).
Every variant's outputs are checked against the first variant's (on the GPU) before timing.

Then the bench's CNN training step (``model_cnn``, 256x3x64x64; PyTorch's model, the converted
one, and the converted one with BN+ReLU fused) split into host and device time
(:func:`model_step_rows`).

Last, issue 15's memory goal on the GPU: the peak device memory of one linear + cross-entropy
forward + backward beyond its inputs and returned gradients, as a fraction of the logits that
the fused forms never hold (:func:`lce_memory_rows`), for fusedgrad, the unfused composite and
Liger-Kernel's fused loss.
"""
from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import fusedgrad as fg
from fusedgrad.cuda import _arrays
from fusedgrad.cuda import batch_norm as bn
from fusedgrad.cuda import cross_entropy as ce

#: (rows, classes, dtype, the widths to compare)
CASES = [
    (4096, 65536, torch.float32, (256, 512, 1024)),
    (4096, 65536, torch.bfloat16, (256, 512, 1024)),
    (2048, 128256, torch.float32, (256, 512, 1024)),
    (2048, 128256, torch.bfloat16, (512, 1024)),
    (262144, 1000, torch.float32, (32, 64)),
]

#: Predicted ms on the H200 before any run, per (case, variant): the traffic at 3,842 GB/s
#: and (dense) 75% of it for one 1024-thread block per SM that stalls at each row's
#: reductions, 70-80% for rows whose pass-2 re-read falls out of the 50 MB L2 (the rows in
#: flight hold more than that at 128256 float32 classes); ``rows`` from the 2026-11-29 bench.
PREDICTED_MS = {
    ("4096x65536 float32", "rows"): 4.07, ("4096x65536 float32", "dense"): 0.75,
    ("4096x65536 bfloat16", "rows"): 3.71, ("4096x65536 bfloat16", "dense"): 0.40,
    ("2048x128256 float32", "rows"): 5.01, ("2048x128256 float32", "dense"): 0.80,
    ("2048x128256 bfloat16", "dense"): 0.40,
    ("262144x1000 float32", "rows"): 3.58, ("262144x1000 float32", "dense"): 0.75,
}


#: Batch norm training forward + backward: (shape as fusedgrad sees it, dtype, channel axis).
BN_CASES = [
    ((256, 256, 56, 56), torch.float32, 1),
    ((256, 256, 56, 56), torch.bfloat16, 1),
    ((256, 2048, 14, 14), torch.float32, 1),
    ((256, 56, 56, 256), torch.float32, -1),
    ((262144, 1024), torch.float32, 1),
]
#: (kernels, ``_ITEMS_PER_THREAD`` of the reductions): the general ``_partials`` and
#: ``_apply`` (the kernels measured on 2026-11-29, now with the fused per-channel launches of
#: both variants: 3 + 3 launches where there were 5 + 6), and the layout's own (the default: spatial
#: for NCHW, columns for channels-last and (N, C)) with the reductions' blocks as long as
#: before and 4 and 16 times longer (each block ends in a float64 Chan tree).
BN_VARIANTS = [("general", 16), ("layout", 16), ("layout", 64), ("layout", 256)]

#: Batch norm predictions, ms (docs/gpu.md; the 2026-11-29 general times are for the
#: float32 NCHW cases): ``_partials`` spends about 42 instructions per
#: element where a 4-byte read at the roofline leaves 35; ``_apply`` issues 6-7 load
#: instructions per element (five coefficients reloaded behind the possible aliasing of its
#: output), about 1.4 ms of load issue in the 256x256x56x56 forward where its bytes take
#: 0.43 ms. The spatial kernels spend 4-7 instructions and 1-3 load instructions per element.
#: Eight transfers at 3,842 GB/s: 1.71 ms (256x256x56x56 float32), 0.86 ms (bfloat16, and
#: 256x2048x14x14 float32), 2.24 ms at 262144x1024; the rest is guessed for the per-block trees
#: and the small kernels.
PREDICTED_MS.update({
    ("256x256x56x56 float32", "general/16"): 8.89, ("256x256x56x56 float32", "layout/16"): 3.0,
    ("256x256x56x56 float32", "layout/64"): 2.5, ("256x256x56x56 float32", "layout/256"): 2.4,
    ("256x256x56x56 bfloat16", "layout/16"): 2.0,
    ("256x256x56x56 bfloat16", "layout/64"): 1.6,
    ("256x256x56x56 bfloat16", "layout/256"): 1.6,
    ("256x2048x14x14 float32", "general/16"): 4.77,
    ("256x2048x14x14 float32", "layout/16"): 1.6,
    ("256x2048x14x14 float32", "layout/64"): 1.4,
    ("256x2048x14x14 float32", "layout/256"): 1.4,
    ("256x56x56x256 float32 NHWC", "general/16"): 6.52,
    ("256x56x56x256 float32 NHWC", "layout/16"): 2.6,
    ("256x56x56x256 float32 NHWC", "layout/64"): 2.4,
    ("256x56x56x256 float32 NHWC", "layout/256"): 2.4,
    ("262144x1024 float32", "general/16"): 8.63,
    ("262144x1024 float32", "layout/16"): 3.3,
    ("262144x1024 float32", "layout/64"): 3.0,
    ("262144x1024 float32", "layout/256"): 3.0,
})


def copy_bandwidth_gbs(rounds: int) -> float:
    """Best read + write GB/s of a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    best = 0.0
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        best = max(best, 2 * src.nbytes / (start.elapsed_time(stop) * 1e6))
    return best


def with_variant(variant: str, call):
    """Run ``call()`` with the launch form ``variant`` ("rows", "dense/W" or "dense")."""
    saved = ce._arrays.dense_rows, ce._threads_per_row
    try:
        if variant == "rows":
            ce._arrays.dense_rows = lambda arr3: None
        elif variant.startswith("dense/"):
            width = int(variant.split("/")[1])
            ce._threads_per_row = lambda n_classes, n_spatial: width
        return call()
    finally:
        ce._arrays.dense_rows, ce._threads_per_row = saved


def is_16bit(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


class _Interface:
    """An object exposing a given ``__cuda_array_interface__`` (to reinterpret a buffer)."""

    def __init__(self, desc):
        self.__cuda_array_interface__ = desc


def device_values(device_array) -> torch.Tensor:
    """A result as a float32 PyTorch tensor on the GPU (bfloat16 results are raw ``V2`` device
    arrays: read as int16, then viewed as bfloat16); small ones (a scalar loss) through the
    host."""
    if device_array.size < (1 << 20):
        values = np.asarray(device_array.copy_to_host())
        if values.dtype.kind == "V":
            values = (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return torch.tensor(values.astype(np.float32), device="cuda")
    desc = dict(device_array.__cuda_array_interface__)
    if desc["typestr"].endswith("V2"):
        desc["typestr"] = "<i2"
        return torch.as_tensor(_Interface(desc), device="cuda").view(torch.bfloat16).float()
    return torch.as_tensor(device_array, device="cuda").float()


def max_abs_difference(a, b) -> float:
    return float((device_values(a) - device_values(b)).abs().max())


def time_ms(call) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def time_interleaved(calls, rounds):
    """Median ms of each call over ``rounds`` rounds, the order rotated every round (after
    one warm-up call each, which also compiles)."""
    for call in calls.values():
        call()
    samples = {key: [] for key in calls}
    order = list(calls)
    for r in range(rounds):
        for key in order[r % len(order):] + order[:r % len(order)]:
            samples[key].append(time_ms(calls[key]))
    return {key: statistics.median(values) for key, values in samples.items()}


def cross_entropy_rows(rounds, bandwidth):
    """Table rows ``(case, variant, ms, GB/s, % copy, predicted)`` and whether a check failed."""
    rows_out = []
    failed = False
    for n, c, dtype, widths in CASES:
        name = f"{n}x{c} {str(dtype).split('.')[1]}"
        logits = torch.randn(n, c, device="cuda", dtype=dtype) * 2
        target = torch.randint(0, c, (n,), device="cuda")
        picked = ce._threads_per_row(c, 1)
        variants = ["rows"] + [f"dense/{w}" for w in widths]

        def run_fg(variant):
            return with_variant(variant, lambda: fg.softmax_cross_entropy(logits, target))

        def run_torch():
            F.cross_entropy(logits.detach().requires_grad_(), target).backward()

        reference_loss, reference_grad = run_fg("rows")
        for variant in variants[1:]:
            loss, grad = run_fg(variant)
            loss_err = max_abs_difference(loss, reference_loss)
            grad_err = max_abs_difference(grad, reference_grad)
            print(f"CE {name} {variant}: |loss - rows| {loss_err:.2e}, "
                  f"max |grad - rows| {grad_err:.2e}")
            failed |= not (loss_err < 1e-4 and grad_err < (1e-2 if is_16bit(dtype) else 1e-5))
        calls = {v: (lambda v=v: run_fg(v)) for v in variants}
        calls["torch"] = run_torch
        medians = time_interleaved(calls, rounds)
        traffic = 2 * logits.numel() * logits.element_size()
        for key, ms in medians.items():
            gbs = traffic / (ms * 1e6)
            family = "dense" if key.startswith("dense") else key
            label = key + (" (picked)" if key == f"dense/{picked}" else "")
            rows_out.append((f"CE {name}", label, ms, gbs, 100 * gbs / bandwidth,
                             PREDICTED_MS.get((name, family))))
        del logits
        torch.cuda.empty_cache()
        fg.empty_cache()
    return rows_out, failed


def with_bn_variant(variant, call):
    """Run ``call()`` with the batch-norm variant ``(kernels, items per thread)``: "general"
    makes ``_kernel_family`` answer GENERAL, so ``_partials`` and ``_apply`` run."""
    kernels, items = variant
    saved = bn._kernel_family, bn._ITEMS_PER_THREAD
    try:
        bn._ITEMS_PER_THREAD = items
        if kernels == "general":
            bn._kernel_family = lambda arrays: (bn.GENERAL, None)
        return call()
    finally:
        bn._kernel_family, bn._ITEMS_PER_THREAD = saved


def batch_norm_rows(rounds, bandwidth):
    """Batch norm training forward + backward per variant; as :func:`cross_entropy_rows`."""
    rows_out = []
    failed = False
    for shape, dtype, axis in BN_CASES:
        name = (f"{'x'.join(map(str, shape))} {str(dtype).split('.')[1]}"
                + (" NHWC" if axis == -1 else ""))
        x = torch.randn(shape, device="cuda", dtype=dtype) * 2 + 1
        dy = torch.randn_like(x)
        weight = torch.rand(shape[axis], device="cuda") + 0.5
        bias = torch.randn(shape[axis], device="cuda")
        # PyTorch takes channels-last as an NCHW view of the NHWC memory
        to_torch = (lambda t: t.permute(0, 3, 1, 2)) if axis == -1 else (lambda t: t)

        def run_fg(variant):
            def step():
                y, mean, invstd = fg.batch_norm_forward(x, weight, bias, channel_axis=axis)
                dx, _, _ = fg.batch_norm_backward(dy, x, mean, invstd, weight,
                                                  channel_axis=axis)
                return y, dx
            return with_bn_variant(variant, step)

        def run_torch():
            xt = to_torch(x).detach().requires_grad_()
            wt, bt = weight.detach().requires_grad_(), bias.detach().requires_grad_()
            F.batch_norm(xt, None, None, wt, bt, training=True).backward(to_torch(dy))

        reference = run_fg(BN_VARIANTS[0])
        for variant in BN_VARIANTS[1:]:
            errors = [max_abs_difference(a, r) for a, r in zip(run_fg(variant), reference)]
            print(f"BN {name} {variant}: max |y - general| {errors[0]:.2e}, "
                  f"max |dx - general| {errors[1]:.2e}")
            failed |= max(errors) > (5e-2 if is_16bit(dtype) else 1e-4)
        calls = {f"{form}/{items}": (lambda v=(form, items): run_fg(v))
                 for form, items in BN_VARIANTS}
        calls["torch"] = run_torch
        medians = time_interleaved(calls, rounds)
        traffic = 8 * x.numel() * x.element_size()
        for key, ms in medians.items():
            gbs = traffic / (ms * 1e6)
            rows_out.append((f"BN {name}", key, ms, gbs, 100 * gbs / bandwidth,
                             PREDICTED_MS.get((name, key))))
        del x, dy
        torch.cuda.empty_cache()
        fg.empty_cache()
    return rows_out, failed


#: The bench's ``model_cnn`` case: the converted CNN's training step against PyTorch's.
MODEL_SHAPE = (256, 3, 64, 64)


def model_step_rows(steps):
    """The model step split into host and device time: rows ``(model, host issue ms, step ms,
    launches)``. "host issue": the wall time of one step's Python and launches, timed from an
    idle device without waiting for the device at its end (when it comes close to the step's
    time, the host, not the GPU, sets the pace: launch overhead, or a synchronisation inside
    the step); "step": the same with the wait, median of ``steps``; "launches": the device's
    kernels and copies per step (PyTorch's profiler, which sees Numba's launches too)."""
    from torch.profiler import ProfilerActivity, profile

    from fusedgrad import _bench_peers

    rng = np.random.default_rng(0)
    rows = []
    for name, fuse_relu in (("torch", False), ("fusedgrad", False),
                            ("fusedgrad, BN+ReLU fused", True)):
        baseline, converted, x, y = _bench_peers.model_pair(torch, MODEL_SHAPE, "cuda", rng,
                                                            fuse_relu)
        model, loss_fn = baseline if name == "torch" else converted

        def step():
            model.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()

        for _ in range(3):
            step()
        host, total = [], []
        for _ in range(steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            host.append(time.perf_counter() - start)
            torch.cuda.synchronize()
            total.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        launches = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
        rows.append((name, 1e3 * statistics.median(host), 1e3 * statistics.median(total),
                     launches))
        del model, x, y
    return rows


#: The bench's ``lce_vocab128k`` (tokens, hidden size, vocabulary): issue 15's GPU sizes.
LCE_SHAPE = (4096, 4096, 128256)


class _LeasedBytes:
    """The bytes of fusedgrad's device arrays alive now, and their peak: its pool allocates with
    the driver (``cuMemAlloc``), outside PyTorch's allocator and its statistics, so the leases
    of ``_arrays.empty`` are counted as they are made and as their finalizers run."""

    def __init__(self):
        self.now = self.peak = 0

    def pointer(self, original, context, pointer, nbytes, finalizer):
        self.now += nbytes
        self.peak = max(self.peak, self.now)
        return original(context, pointer, nbytes,
                        finalizer=functools.partial(self._released, finalizer, nbytes))

    def _released(self, finalizer, nbytes):
        self.now -= nbytes
        finalizer()


def lce_memory_rows():
    """Rows ``(implementation, dtype, extra MB, extra / logits)``: the peak device memory of one
    forward + backward beyond what was allocated before it (the inputs) and the gradients it
    returns, PyTorch's allocator's peak plus fusedgrad's own (:class:`_LeasedBytes`; an upper
    bound, as the two peaks may fall at different moments)."""
    import fusedgrad.torch as fgt
    from fusedgrad import _bench_peers

    n, d, c = LCE_SHAPE
    liger = _bench_peers.import_liger()
    implementations = {
        "fusedgrad": lambda x, w, t: fgt.linear_cross_entropy(x, w, t),
        "torch": lambda x, w, t: F.cross_entropy(F.linear(x, w), t),
    }
    if liger is not None:
        liger_loss = liger.LigerFusedLinearCrossEntropyLoss()
        implementations["liger"] = lambda x, w, t: liger_loss(w, x, t)
    leased = _LeasedBytes()
    original_pointer = _arrays.MemoryPointer
    _arrays.MemoryPointer = functools.partial(leased.pointer, original_pointer)
    rows = []
    try:
        for dtype in (torch.float32, torch.bfloat16):
            generator = torch.Generator(device="cuda").manual_seed(0)
            x = torch.randn(n, d, device="cuda", dtype=dtype, generator=generator)
            w = torch.randn(c, d, device="cuda", dtype=dtype, generator=generator) / d ** 0.5
            t = torch.randint(0, c, (n,), device="cuda", generator=generator)
            logits_bytes = n * c * x.element_size()
            for name, loss_of in implementations.items():
                xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
                loss_of(xr, wr, t).backward()  # compiles; the pool then holds its buffers
                xr.grad = wr.grad = None
                fg.empty_cache()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                leased.now = leased.peak = 0
                loss_of(xr, wr, t).backward()
                torch.cuda.synchronize()
                returned = xr.grad.nbytes + wr.grad.nbytes
                extra = torch.cuda.max_memory_allocated() - before + leased.peak - returned
                rows.append((name, str(dtype).replace("torch.", ""), extra / 1e6,
                             extra / logits_bytes))
                del xr, wr
    finally:
        _arrays.MemoryPointer = original_pointer
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth_gbs(10)
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth:.0f} GB/s")
    ce_rows, ce_failed = cross_entropy_rows(args.rounds, bandwidth)
    bn_rows, bn_failed = batch_norm_rows(args.rounds, bandwidth)
    print()
    print(f"{'case':28} {'variant':18} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'predicted':>9}")
    for name, label, ms, gbs, pct, predicted in ce_rows + bn_rows:
        pred = f"{predicted:.2f}" if predicted is not None else "-"
        print(f"{name:28} {label:18} {ms:8.3f} {gbs:7.0f} {pct:7.0f} {pred:>9}")
    # The kernel table above is the run's main result: what follows may fail on its own.
    extras_failed = False
    try:
        step_rows = model_step_rows(args.rounds)
        print()
        print(f"model step {'x'.join(map(str, MODEL_SHAPE))}: {'model':26} "
              f"{'host issue ms':>13} {'step ms':>8} {'launches':>8}")
        for name, host_ms, step_ms, launches in step_rows:
            print(f"{'':23} {name:26} {host_ms:13.2f} {step_ms:8.2f} {launches:8d}")
    except Exception as exc:  # noqa: BLE001 - reported, and the exit status says so
        print(f"model step failed: {type(exc).__name__}: {exc}")
        extras_failed = True
    try:
        memory_rows = lce_memory_rows()
        print()
        print(f"linear + CE {'x'.join(map(str, LCE_SHAPE))}, peak memory beyond inputs and "
              "gradients (goal: fusedgrad <= 1/8 of the logits):")
        for name, dtype, extra_mb, share in memory_rows:
            print(f"{'':23} {name:10} {dtype:9} {extra_mb:10.0f} MB {share:6.3f} x logits")
    except Exception as exc:  # noqa: BLE001
        print(f"linear + CE memory failed: {type(exc).__name__}: {exc}")
        extras_failed = True
    return 1 if ce_failed or bn_failed or extras_failed else 0


if __name__ == "__main__":
    sys.exit(main())
