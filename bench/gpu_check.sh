#!/usr/bin/env bash
# GPU check (issues 4 and 13), on a machine with an NVIDIA GPU and the packages already
# installed (numba, numba-cuda, torch with CUDA, pytest; no network). Runs from the source tree
# with PYTHONPATH=src. Steps, in the order they run (GPU_CHECK_STEPS below picks some, and
# GPU_CHECK_SECONDS is the deadline they share; all of them take more than one 10-minute call):
#   0. versions: nvidia-smi, the versions of Python, NumPy, Numba, numba-cuda and PyTorch, and
#      `fusedgrad info`;
#   1. scale_check: a correctness check at benchmark scale against PyTorch CUDA, with bitwise
#      reproducibility (two runs give the same bytes); it also compiles the main kernels;
#   2. bench: python -m fusedgrad bench --device cuda --json: fusedgrad vs PyTorch eager,
#      torch.compile and Liger-Kernel at issue 13's sizes (its goals first), and the device's
#      measured copy bandwidth; each case's times are printed as it ends;
#   3. variants: bench/gpu_variants.py, the kernel variants (cross-entropy: the general row
#      kernel and the dense-row kernel at several widths; batch norm: the general kernels and
#      the layout ones, with three reduction block lengths) and PyTorch eager at issue 13's
#      sizes, each against the time predicted before the run, and the CNN training step split
#      into host and device time;
#   4. tests: the CUDA tests for real (no simulator): test_cuda_cross_entropy.py,
#      test_cuda_batch_norm.py, test_cuda_arrays.py (the device buffer pool), and the PyTorch
#      drop-ins on CUDA tensors (test_torch.py's CUDA tests: the functional forms, and the
#      converted CNN trained beside PyTorch's). test_cuda_ptx.py is left to CI, which compiles
#      the same signatures without a GPU;
#   5. ncu: Nsight Compute (when `ncu` is on the PATH, --clock-control none): DRAM throughput,
#      occupancy, registers and issued instructions of every kernel one cross-entropy call and
#      one batch-norm forward + backward launch (issue 13's profile).
# Wheels the image lacks (NumPy below 2.5 for numba-cuda, liger-kernel) are installed first
# from .whl/ when that folder exists (carry it; see docs/gpu.md).
# Usage: bench/gpu_check.sh [OUT_DIR]   (default: $OUT if set, else results/gpu)
# Everything goes to OUT_DIR; the exit status is non-zero if any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

out_dir="${1:-${OUT:-results/gpu}}"
mkdir -p "$out_dir"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export NUMBA_ENABLE_CUDASIM=0
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$(mktemp -d)/numba_cache}"
export PYTHONUNBUFFERED=1
status=0
# The machine's Python is python3 (there may be no `python`).
python=${PYTHON:-python3}

# GPU_CHECK_STEPS: the steps to run, comma-separated, in this order (default: all of them,
# most needed first: versions,scale_check,bench,variants,tests,ncu). GPU_CHECK_SECONDS (default
# 540: 9 minutes of a device call's 10) is the whole run's deadline: each step gets at most its
# own limit and what is left before the deadline, and a step with under 20 s left is skipped.
# The bench takes what the deadline leaves it (stopped with SIGINT, it reports the cases it
# finished: they run in the order of issue 13's goals). A lent GPU's 15 minutes hold one full
# call and a short one on the same warm machine: first the defaults, then
# GPU_CHECK_STEPS=variants,tests,ncu GPU_CHECK_SECONDS=<what is left> (docs/gpu.md).
steps=",${GPU_CHECK_STEPS:-versions,scale_check,bench,variants,tests,ncu},"
deadline=${GPU_CHECK_SECONDS:-540}
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT_DIR/NAME.txt
    local name="$1" limit="$2"
    shift 2
    case "$steps" in *",$name,"*) ;; *) return 0 ;; esac
    local left=$((deadline - SECONDS))
    if [ "$left" -lt 20 ]; then
        echo "$name: skipped, ${left} s left before the ${deadline} s deadline" \
            | tee -a "$out_dir/summary.txt"
        return 0
    fi
    [ "$limit" -le "$left" ] || limit=$left
    local start=$SECONDS
    # SIGINT first (the bench then reports what it measured), SIGKILL 30 s later
    timeout -s INT -k 30 "$limit" "$@" >"$out_dir/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" \
        | tee -a "$out_dir/summary.txt"
    tail -n 5 "$out_dir/$name.txt"
    [ "$rc" -eq 0 ] || status=1
}

if [ -d .whl ]; then
    "$python" -m pip install -q --no-deps --no-index --find-links .whl "numpy<2.5" \
        >> "$out_dir/summary.txt" 2>&1 || status=1
    "$python" -m pip install -q --no-deps --no-index --find-links .whl liger-kernel \
        >> "$out_dir/summary.txt" 2>&1 \
        || echo "liger-kernel: no wheel in .whl" >> "$out_dir/summary.txt"
fi
# At most 8 files come back from the device machine: keep to 8.
step versions 60 bash -c 'nvidia-smi; "$0" -c "import sys, numpy, numba, torch
from importlib.metadata import version
print(sys.version)
print(\"numpy\", numpy.__version__, \"numba\", numba.__version__,
      \"numba-cuda\", version(\"numba-cuda\"), \"torch\", torch.__version__)"
"$0" -m fusedgrad info' "$python"
step scale_check 120 "$python" - <<'PY'
"""Benchmark-sized inputs: fusedgrad on the GPU vs PyTorch CUDA, and run-to-run bit equality."""
import json
import sys

import numpy as np
import torch
import torch.nn.functional as F
from numba import cuda

import fusedgrad as fg

results = []
rng = np.random.default_rng(0)


def bits(*arrays):
    return b"".join(np.asarray(a.copy_to_host()).tobytes() for a in arrays)


def record(name, errors, reproducible):
    entry = dict(case=name, reproducible=reproducible, **{k: float(v) for k, v in errors.items()})
    results.append(entry)
    print(entry)


for n, c, dtype in ((4096, 32000, np.float32), (4096, 32000, np.float16), (65536, 10, np.float32)):
    logits = (rng.standard_normal((n, c)) * 2).astype(dtype)
    target = rng.integers(0, c, size=n)
    d_logits, d_target = cuda.to_device(logits), cuda.to_device(target)
    runs = [fg.softmax_cross_entropy(d_logits, d_target, label_smoothing=0.1) for _ in range(2)]
    t_logits = torch.tensor(logits, device="cuda", dtype=torch.float32, requires_grad=True)
    t_loss = F.cross_entropy(t_logits, torch.tensor(target, device="cuda"), label_smoothing=0.1)
    t_loss.backward()
    loss, grad = runs[0]
    record(f"cross_entropy {n}x{c} {np.dtype(dtype).name}",
           dict(loss_abs_err=abs(float(loss.copy_to_host()) - t_loss.item()),
                grad_max_abs_err=np.abs(grad.copy_to_host().astype(np.float64)
                                        - t_logits.grad.cpu().numpy()).max()),
           bits(*runs[0]) == bits(*runs[1]))

# bfloat16 arrives as a PyTorch tensor (NumPy has no bfloat16); results come back as raw V2.
def bf16_values(device_array):
    bits = np.asarray(device_array.copy_to_host()).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32)


logits = torch.randn(4096, 32000, device="cuda", dtype=torch.bfloat16) * 2
target = torch.randint(0, 32000, (4096,), device="cuda")
runs = [fg.softmax_cross_entropy(logits, target) for _ in range(2)]
t_logits = logits.float().requires_grad_()
t_loss = F.cross_entropy(t_logits, target)
t_loss.backward()
record("cross_entropy 4096x32000 bfloat16",
       dict(loss_abs_err=abs(float(runs[0][0].copy_to_host()) - t_loss.item()),
            grad_max_abs_err=np.abs(bf16_values(runs[0][1]) - t_logits.grad.cpu().numpy()).max()),
       bits(*runs[0]) == bits(*runs[1]))

for shape, axis in (((64, 256, 28, 28), 1), ((64, 28, 28, 256), -1), ((4, 8, 512, 512), 1)):
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    d_x, d_dy = cuda.to_device(x), cuda.to_device(dy)
    runs = []
    for _ in range(2):
        y, mean, invstd = fg.batch_norm_forward(d_x, channel_axis=axis)
        dx, dweight, dbias = fg.batch_norm_backward(d_dy, d_x, mean, invstd, channel_axis=axis)
        runs.append((y, dx, dweight, dbias))
    t_x = torch.tensor(np.moveaxis(x, axis, 1), device="cuda", requires_grad=True)
    t_y = F.batch_norm(t_x, None, None, training=True)
    t_y.backward(torch.tensor(np.moveaxis(dy, axis, 1), device="cuda"))
    y, dx, _, _ = runs[0]
    record(f"batch_norm {shape} axis {axis}",
           dict(y_max_abs_err=np.abs(np.moveaxis(y.copy_to_host(), axis, 1)
                                     - t_y.detach().cpu().numpy()).max(),
                dx_max_abs_err=np.abs(np.moveaxis(dx.copy_to_host(), axis, 1)
                                      - t_x.grad.cpu().numpy()).max()),
           bits(*runs[0]) == bits(*runs[1]))

print(json.dumps(results, indent=2))
ok = all(r["reproducible"] for r in results) and all(
    v < 1e-3 for r in results for k, v in r.items() if k.endswith("_err"))
sys.exit(0 if ok else 1)
PY
# The bench takes what the deadline leaves (see step()); it prints each case as it ends.
step bench 3600 "$python" -m fusedgrad bench --device cuda --json "$out_dir/bench_cuda.json"
step variants 240 "$python" bench/gpu_variants.py --rounds 10
# Compiling the kernels for the GPU dominates the tests: spread them over processes when
# pytest-xdist is there (they share the Numba cache directory).
workers=$("$python" -c "import xdist" 2>/dev/null && echo "-n 8")
step tests 150 "$python" -m pytest -q -p no:cacheprovider -ra $workers \
    tests/test_cuda_cross_entropy.py tests/test_cuda_batch_norm.py tests/test_cuda_arrays.py \
    "tests/test_torch.py::test_cuda_tensors_match_cpu" \
    "tests/test_torch.py::test_converted_cnn_trains_like_torch[cuda]"
if command -v ncu >/dev/null 2>&1; then
    step ncu 100 ncu --clock-control none --section SpeedOfLight --section Occupancy \
        --section LaunchStats --section ComputeWorkloadAnalysis --launch-count 40 \
        "$python" - <<'PY'
"""One call of each kernel family at issue 13's sizes (after ncu's first launches, the JIT)."""
import numpy as np
import torch

import fusedgrad as fg

logits = torch.randn(4096, 65536, device="cuda")
target = torch.randint(0, 65536, (4096,), device="cuda")
fg.softmax_cross_entropy(logits, target)
x = torch.randn(256, 256, 56, 56, device="cuda")
dy = torch.randn_like(x)
_, mean, invstd = fg.batch_norm_forward(x)
fg.batch_norm_backward(dy, x, mean, invstd)
torch.cuda.synchronize()
PY
fi
echo "GPU check finished with status $status; results in $out_dir" | tee -a "$out_dir/summary.txt"
exit "$status"
