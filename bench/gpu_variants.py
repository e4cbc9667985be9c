"""Cross-entropy kernel variants on a GPU, at issue 13's sizes: what each launch form costs.

Run on a machine with an NVIDIA GPU (``bench/gpu_check.sh`` runs it as its ``variants`` step):

    PYTHONPATH=src python3 bench/gpu_variants.py [--rounds 20]

For each case (fused forward + backward, ``fg.softmax_cross_entropy`` on PyTorch CUDA tensors,
class-index targets) it times, interleaved round by round with CUDA events, median of rounds:

* ``rows``: the general kernel ``_ce_rows`` (what every launch used before the dense-row
  kernel), forced by making ``cross_entropy._dense_rows`` find no dense view;
* ``dense/W``: the dense-row kernel with W threads per row (``_threads_per_row`` replaced),
  for the widths worth comparing at that row length; the one the launcher picks is marked;
* ``torch``: PyTorch eager, ``F.cross_entropy`` forward + backward (a reference point; the
  full set of peers is ``python -m fusedgrad bench --device cuda``).

Beside each time: GB/s of the minimum traffic (logits read once, gradient written once), % of
the device's copy bandwidth measured in the same run (``torch`` copy of 1 GiB, read + write),
and the prediction written down before the first run (``PREDICTED_MS``, from that traffic at
the H200's 3,842 GB/s measured on 2026-11-29 and the launch form's known losses; docs/gpu.md).
Every variant's loss and gradient are checked against the ``rows`` variant's before timing.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import numpy as np
import torch
import torch.nn.functional as F

import fusedgrad as fg
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
    saved = ce._dense_rows, ce._threads_per_row
    try:
        if variant == "rows":
            ce._dense_rows = lambda arr3: None
        elif variant.startswith("dense/"):
            width = int(variant.split("/")[1])
            ce._threads_per_row = lambda n_classes, n_spatial: width
        return call()
    finally:
        ce._dense_rows, ce._threads_per_row = saved


def c_is_16bit(dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16)


def host_values(device_array) -> np.ndarray:
    """A result on the host in float64 (bfloat16 results are raw ``V2`` device arrays)."""
    values = np.asarray(device_array.copy_to_host())
    if values.dtype.kind == "V":
        values = (values.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float64)


def time_ms(call) -> float:
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    bandwidth = copy_bandwidth_gbs(10)
    print(f"device: {torch.cuda.get_device_name()}; copy bandwidth {bandwidth:.0f} GB/s")
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

        reference_loss, reference_grad = (host_values(a) for a in run_fg("rows"))
        for variant in variants[1:]:
            loss, grad = (host_values(a) for a in run_fg(variant))
            loss_err = float(abs(loss - reference_loss))
            grad_err = float(np.abs(grad - reference_grad).max())
            print(f"{name} {variant}: |loss - rows| {loss_err:.2e}, "
                  f"max |grad - rows| {grad_err:.2e}")
            failed |= not (loss_err < 1e-4 and grad_err < (1e-2 if c_is_16bit(dtype) else 1e-5))
        calls = {v: (lambda v=v: run_fg(v)) for v in variants}
        calls["torch"] = run_torch
        for call in calls.values():  # compile and warm every variant
            call()
        samples = {key: [] for key in calls}
        order = list(calls)
        for r in range(args.rounds):
            for key in order[r % len(order):] + order[:r % len(order)]:
                samples[key].append(time_ms(calls[key]))
        traffic = 2 * logits.numel() * logits.element_size()
        for key in order:
            ms = statistics.median(samples[key])
            gbs = traffic / (ms * 1e6)
            family = "dense" if key.startswith("dense") else key
            predicted = PREDICTED_MS.get((name, family))
            label = key + (" (picked)" if key == f"dense/{picked}" else "")
            rows_out.append((name, label, ms, gbs, 100 * gbs / bandwidth, predicted))
        del logits
        torch.cuda.empty_cache()
        fg.empty_cache()

    print()
    print(f"{'case':22} {'variant':18} {'ms':>8} {'GB/s':>7} {'% copy':>7} {'predicted':>9}")
    for name, label, ms, gbs, pct, predicted in rows_out:
        pred = f"{predicted:.2f}" if predicted is not None else "-"
        print(f"{name:22} {label:18} {ms:8.3f} {gbs:7.0f} {pct:7.0f} {pred:>9}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
