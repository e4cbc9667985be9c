"""The benchmark engine behind ``python -m fusedgrad bench`` and the ``bench/`` pytest suite.

Every case times one operation, forward + backward unless said otherwise, three ways on
identical inputs:

- ``fusedgrad``: the public API (``fg.softmax_cross_entropy``, ``fg.batch_norm_forward`` +
  ``fg.batch_norm_backward``), host arrays on the CPU, Numba device arrays on the GPU;
- ``torch``: ``F.cross_entropy(...).backward()`` / ``nn.BatchNorm*d`` forward + ``.backward()``
  (PyTorch CPU with as many threads as Numba uses, or PyTorch CUDA), when torch is installed;
- ``reference``: the float64 NumPy oracle ``fusedgrad.reference`` (CPU only). Where the full input
  would take too long (more than ``REFERENCE_ELEMENT_BUDGET`` elements) it runs on the leading
  rows (samples) only and its time is scaled linearly to the full size; the printed table and the
  JSON record say so.

Timing: one warm-up call per implementation (compilation, allocator), then the implementations
are timed in alternation, round by round, so that a noisy moment on a shared machine hits them
alike: each gets at least ``repeats`` timed calls and more until it has spent ``min_seconds`` (at
most ``max_repeats``), each call between two device synchronisations on the GPU; the minimum and
the median are reported. Every timed call directly follows an untimed call of the same
implementation, so each one meets the caches as its own previous call left them, whichever
implementation ran before. (Without that, the order decided who found the shared inputs in
the cache: on a CPU whose last-level cache holds a whole mid-sized case, such as the 480 MiB one
the 2026-11-29 figures were measured on, an implementation timed right after the float64
reference read its inputs from memory, while the one after it found them cached.)

Memory roofline: the bytes an operation must move at least, divided by the copy bandwidth
measured in the same run (a parallel copy of a buffer far larger than the last-level cache,
counting the bytes read and the bytes written; a device-to-device copy on the GPU):

- cross-entropy forward + backward: logits read once + gradient written once, 2 * N * C * itemsize;
- batch norm training forward + backward: five passes over x's size (forward reads x and writes
  y; backward reads x and dy and writes dx); eval forward: two (read x, write y).

The model-level case times a training step (forward + backward, no optimiser) of a small CNN with
``BatchNorm2d`` and a cross-entropy loss, once with PyTorch's modules and once converted with
``fusedgrad.torch.convert_model`` plus ``fusedgrad.torch.CrossEntropyLoss``; see
:func:`_fused_op_share` for how the share of time in the fused operations is measured. On the CPU
it is timed twice: in a fresh process, as a training script runs it (the headline), and in the
benchmark's own process after the other cases, whose large arrays leave the heap in a state that
spares both models most page faults (see :func:`run_case_in_fresh_process`).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import gc
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numba
import numpy as np
from numba import njit, prange

import fusedgrad
from fusedgrad import reference

#: above this many input elements the float64 NumPy reference runs on the leading rows only.
REFERENCE_ELEMENT_BUDGET = 1 << 22
#: copy-bandwidth buffers: far larger than the last-level cache of the machines we target.
HOST_COPY_BYTES = 256 << 20
DEVICE_COPY_BYTES = 2 << 30
#: elements per parallel chunk of the copy kernel (fixed, so the work split is the same for
#: any thread count; 256 KiB of float32, enough to amortise the scheduling).
_COPY_CHUNK = 1 << 16

IMPLEMENTATIONS = ("fusedgrad", "torch", "reference")


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: input shape ``full``, or ``quick`` (default: the same) with --quick.

    ``op`` is "cross_entropy", "batch_norm_train", "batch_norm_eval" or "model"; ``layout`` names
    where the channels are ("NC", "NCHW", "NHWC") or, for the model case, its input layout;
    ``default`` cases run when no ``--cases`` are named (the others are small smoke cases);
    ``dtype`` is the floating dtype of the input; ``fuse_relu``: the model case converts with
    ``convert_model(..., fuse_relu=True)``.
    """

    name: str
    op: str
    layout: str
    full: tuple
    quick: tuple | None = None
    dtype: str = "float32"
    default: bool = True
    fuse_relu: bool = False

    def shape(self, quick: bool) -> tuple:
        return self.quick if quick and self.quick is not None else self.full

    @property
    def channel_axis(self) -> int:
        return -1 if self.layout == "NHWC" else 1


CPU_CASES = (
    Case("ce_vocab128k", "cross_entropy", "NC", (1024, 128256), (256, 128256)),
    Case("ce_vocab32k", "cross_entropy", "NC", (4096, 32000), (1024, 32000)),
    Case("ce_classes1k", "cross_entropy", "NC", (8192, 1000), (4096, 1000)),
    Case("ce_classes10", "cross_entropy", "NC", (65536, 10), (16384, 10)),
    Case("bn_nchw", "batch_norm_train", "NCHW", (64, 256, 28, 28), (16, 256, 28, 28)),
    Case("bn_many_channels", "batch_norm_train", "NCHW", (32, 2048, 7, 7), (8, 2048, 7, 7)),
    Case("bn_nc", "batch_norm_train", "NC", (4096, 1024), (1024, 1024)),
    Case("bn_nhwc", "batch_norm_train", "NHWC", (64, 28, 28, 256), (16, 28, 28, 256)),
    Case("bn_eval_nchw", "batch_norm_eval", "NCHW", (64, 256, 28, 28), (16, 256, 28, 28)),
    Case("model_cnn", "model", "NCHW", (64, 3, 32, 32), (16, 3, 32, 32)),
    Case("model_cnn_fuse_relu", "model", "NCHW", (64, 3, 32, 32), (16, 3, 32, 32),
         fuse_relu=True),
    # Smoke cases: only when named with --cases (tests, the CUDA simulator).
    Case("ce_small", "cross_entropy", "NC", (8, 40), default=False),
    Case("bn_small", "batch_norm_train", "NCHW", (2, 4, 3, 3), default=False),
    Case("model_small", "model", "NCHW", (4, 3, 8, 8), default=False),
    Case("model_small_fuse_relu", "model", "NCHW", (4, 3, 8, 8), default=False, fuse_relu=True),
)

# The GPU cases are large enough to saturate an H100/H200-class device (issue 4 asks for
# N x C >= 256M elements for cross-entropy).
CUDA_CASES = (
    Case("ce_vocab64k", "cross_entropy", "NC", (4096, 65536), (1024, 65536)),
    Case("ce_vocab64k_f16", "cross_entropy", "NC", (4096, 65536), (1024, 65536),
         dtype="float16"),
    Case("ce_vocab64k_bf16", "cross_entropy", "NC", (4096, 65536), (1024, 65536),
         dtype="bfloat16"),
    Case("ce_vocab128k", "cross_entropy", "NC", (2048, 128256), (512, 128256)),
    Case("ce_classes1k", "cross_entropy", "NC", (262144, 1000), (65536, 1000)),
    Case("bn_nchw", "batch_norm_train", "NCHW", (256, 256, 56, 56), (64, 256, 56, 56)),
    Case("bn_many_channels", "batch_norm_train", "NCHW",
         (256, 2048, 14, 14), (64, 2048, 14, 14)),
    Case("bn_nc", "batch_norm_train", "NC", (262144, 1024), (65536, 1024)),
    Case("bn_nhwc", "batch_norm_train", "NHWC", (256, 56, 56, 256), (64, 56, 56, 256)),
    Case("bn_eval_nchw", "batch_norm_eval", "NCHW", (256, 256, 56, 56), (64, 256, 56, 56)),
    Case("model_cnn", "model", "NCHW", (256, 3, 64, 64), (64, 3, 64, 64)),
) + tuple(case for case in CPU_CASES if not case.default)  # the same smoke cases


def cases_for(device: str) -> tuple:
    """The case table for ``device`` ("cpu" or "cuda")."""
    return CUDA_CASES if device == "cuda" else CPU_CASES


def standard_cases(device: str, *ops: str) -> list:
    """The device's standard (non-smoke) cases of the given operations."""
    return [c for c in cases_for(device) if c.default and c.op in ops]


def select_cases(device: str, names=None) -> list:
    """The default cases of ``device``, or exactly the ``names`` given (ValueError if unknown)."""
    table = cases_for(device)
    if not names:
        return [c for c in table if c.default]
    by_name = {c.name: c for c in table}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown case(s) {', '.join(unknown)} for device {device!r}; "
                         f"expected some of: {', '.join(by_name)}")
    return [by_name[n] for n in names]


_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def roofline_bytes(case: Case, shape: tuple) -> int | None:
    """Bytes the operation must move at least (see the module docstring); None for the model."""
    size = math.prod(shape) * _ITEMSIZE[case.dtype]
    passes = {"cross_entropy": 2, "batch_norm_train": 5, "batch_norm_eval": 2}.get(case.op)
    return None if passes is None else passes * size


# --------------------------------------------------------------------------------------------
# Optional dependencies and devices
# --------------------------------------------------------------------------------------------
def import_torch():
    """``torch``, or None when it is not installed (the comparison is then skipped)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def match_torch_threads(torch) -> None:
    """Give PyTorch as many intra-op threads as Numba uses, so the comparison is like for like."""
    if torch is not None:
        torch.set_num_threads(numba.get_num_threads())


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a real GPU is usable (not the simulator), else "cpu"."""
    if device != "auto":
        return device
    from fusedgrad._device import cuda_available, simulator_enabled
    return "cuda" if cuda_available() and not simulator_enabled() else "cpu"


class Device:
    """Puts a case's inputs where it runs and synchronises around each timed call.

    ``torch_device`` is where the PyTorch comparison runs ("cpu" or "cuda"), or None when
    PyTorch is missing or, on the GPU, has no CUDA.
    """

    def __init__(self, name: str):
        self.name = name
        self.torch = import_torch()
        self._cuda = None
        if name == "cuda":
            from numba import cuda
            self._cuda = cuda
        usable = self.torch is not None and (name == "cpu" or self.torch.cuda.is_available())
        self.torch_device = name if usable else None

    def inputs(self, host: np.ndarray, dtype: str | None = None) -> tuple:
        """``host`` as ``dtype`` on this device: (array for fusedgrad, tensor for torch or None).

        Both share one buffer, so the implementations read identical data: on the CPU a NumPy
        array and a zero-copy tensor of it; on the GPU one CUDA tensor, which fusedgrad takes
        through ``__cuda_array_interface__`` (the only way to give it bfloat16, which NumPy
        lacks), or a Numba device array when PyTorch has no CUDA.
        """
        dtype = dtype or host.dtype.name
        if self.name == "cuda" and self.torch_device is not None:
            tensor = self.torch.from_numpy(host).to("cuda").to(getattr(self.torch, dtype))
            return tensor, tensor
        if dtype == "bfloat16":
            raise TypeError("bfloat16 inputs need PyTorch with CUDA (NumPy has no bfloat16)")
        array = host.astype(dtype, copy=False)
        if self._cuda is not None:
            return self._cuda.to_device(array), None
        return array, (None if self.torch is None else self.torch.from_numpy(array))

    def synchronize(self) -> None:
        # numba's synchronize waits for the whole (primary) context, PyTorch's streams included.
        if self._cuda is not None:
            self._cuda.synchronize()


# --------------------------------------------------------------------------------------------
# Timing and bandwidth
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Timing:
    min_s: float
    median_s: float
    repeats: int
    samples: list = dataclasses.field(default_factory=list, repr=False)
    #: Median minor page faults per timed call (None where the OS does not count them).
    faults: float | None = None


def minor_faults() -> int | None:
    """This process's minor page faults so far (all threads): pages the OS had to map, and
    zero, on first touch. None where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def paired_speedup(baseline: Timing, candidate: Timing) -> float | None:
    """Median over the rounds both were timed in of baseline time / candidate time.

    The implementations are timed in alternation, so sample i of each comes from the same
    round: a slow stretch of a shared machine slows both samples of a round alike and cancels
    in their ratio, which makes this steadier than a ratio of two minima when the run-to-run
    spread is as large as the effect (the model-level case)."""
    n = min(len(baseline.samples), len(candidate.samples))
    if n == 0:
        return None
    return statistics.median(b / c for b, c in zip(baseline.samples[:n], candidate.samples[:n]))


@dataclasses.dataclass(frozen=True)
class Settings:
    repeats: int
    min_seconds: float
    max_repeats: int


FULL_SETTINGS = Settings(repeats=7, min_seconds=1.0, max_repeats=100)
QUICK_SETTINGS = Settings(repeats=3, min_seconds=0.2, max_repeats=30)


def time_interleaved(fns: dict, settings: Settings,
                     synchronize: Callable[[], None] = lambda: None) -> dict:
    """Warm each of ``fns`` (name -> callable) up once, then time them in alternation (see the
    module docstring); returns name -> :class:`Timing`."""
    for fn in fns.values():
        fn()
        synchronize()
    times = {name: [] for name in fns}
    faults = {name: [] for name in fns}

    def wants_more(samples):
        return len(samples) < settings.repeats or (
            sum(samples) < settings.min_seconds and len(samples) < settings.max_repeats)

    while any(wants_more(samples) for samples in times.values()):
        for name, fn in fns.items():
            if wants_more(times[name]):
                fn()  # untimed: the timed call finds the caches as this implementation left them
                synchronize()
                faults_before = minor_faults()
                start = time.perf_counter()
                fn()
                synchronize()
                times[name].append(time.perf_counter() - start)
                if faults_before is not None:
                    faults[name].append(minor_faults() - faults_before)
    return {name: Timing(min(samples), statistics.median(samples), len(samples), samples,
                         statistics.median(faults[name]) if faults[name] else None)
            for name, samples in times.items()}


def time_callable(fn: Callable[[], object], settings: Settings,
                  synchronize: Callable[[], None] = lambda: None) -> Timing:
    """:func:`time_interleaved` of a single callable."""
    return time_interleaved({"fn": fn}, settings, synchronize)["fn"]


@njit(cache=True, parallel=True)
def _parallel_copy(src, dst, chunk):
    """dst[:] = src[:] in fixed chunks, one chunk per parallel iteration (1-D float32)."""
    n = src.size
    for c in prange((n + chunk - 1) // chunk):
        for i in range(c * chunk, min((c + 1) * chunk, n)):
            dst[i] = src[i]


def host_copy_bandwidth(nbytes: int = HOST_COPY_BYTES,
                        settings: Settings = FULL_SETTINGS) -> float:
    """Copy bandwidth of the host in bytes/s: (bytes read + bytes written) / best copy time."""
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    timing = time_callable(lambda: _parallel_copy(src, dst, _COPY_CHUNK), settings)
    return 2 * src.nbytes / timing.min_s


def device_copy_bandwidth(nbytes: int = DEVICE_COPY_BYTES,
                          settings: Settings = FULL_SETTINGS) -> float:
    """Device-to-device copy bandwidth of the current GPU in bytes/s (read + write bytes)."""
    from numba import cuda
    src = cuda.device_array(nbytes // 4, dtype=np.float32)
    dst = cuda.device_array_like(src)
    timing = time_callable(lambda: dst.copy_to_device(src), settings, cuda.synchronize)
    return 2 * nbytes / timing.min_s


def run_tiny_parallel_kernel() -> None:
    """Run one small parallel Numba kernel, so that ``numba.threading_layer()`` is decided."""
    src = np.arange(4 * _COPY_CHUNK, dtype=np.float32)
    _parallel_copy(src, np.empty_like(src), _COPY_CHUNK)


def kernel_cache_dir() -> str:
    """Where fusedgrad's compiled kernels are cached (``NUMBA_CACHE_DIR`` or beside the code)."""
    return _parallel_copy._cache.cache_path


# --------------------------------------------------------------------------------------------
# Machine description (shared with ``python -m fusedgrad info``)
# --------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_versions() -> dict:
    """Versions of fusedgrad, Python and the libraries it runs on (None when not installed)."""
    import llvmlite
    versions = {"fusedgrad": fusedgrad.__version__, "python": platform.python_version(),
                "numpy": np.__version__, "numba": numba.__version__,
                "llvmlite": llvmlite.__version__}
    from importlib import metadata
    for dist in ("numba-cuda", "torch"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def gpu_description() -> dict:
    """Whether a usable GPU is present, and its name (the simulator is reported as such)."""
    from fusedgrad._device import cuda_available, simulator_enabled
    available = cuda_available()
    name = None
    if available:
        if simulator_enabled():
            name = "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
        else:
            from numba import cuda
            name = cuda.get_current_device().name
            name = name.decode() if isinstance(name, bytes) else str(name)
    return {"available": available, "name": name}


def machine_info(device: str = "cpu") -> dict:
    """Everything needed to interpret a benchmark: CPU, threads, versions, GPU, cache, date."""
    run_tiny_parallel_kernel()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
        "threading_layer": numba.threading_layer(),
        "versions": package_versions(),
        "gpu": gpu_description(),
        "cache_dir": kernel_cache_dir(),
        "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device,
    }


# --------------------------------------------------------------------------------------------
# Runners: what each implementation calls, on identical inputs
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Runner:
    """One implementation of a case: ``fn`` runs it once; its time is multiplied by ``scale``
    (the reference on a row subset) and ``note`` says why when ``scale != 1``."""

    impl: str
    fn: Callable[[], object]
    scale: float = 1.0
    note: str = ""
    #: Model cases: measures the share of this model's step spent in batch norm + the loss
    #: (see :func:`_fused_op_share`), given the timing settings.
    fused_op_share: Callable[[Settings], float] | None = None


def _reference_rows(shape: tuple) -> int:
    """How many leading rows (samples) the NumPy reference runs on, within the element budget."""
    per_row = math.prod(shape[1:])
    return max(2, min(shape[0], REFERENCE_ELEMENT_BUDGET // per_row))


def _reference_runner(shape: tuple, run_rows: Callable[[int], object]) -> Runner:
    rows = _reference_rows(shape)
    if rows == shape[0]:
        return Runner("reference", lambda: run_rows(rows))
    return Runner("reference", lambda: run_rows(rows), scale=shape[0] / rows,
                  note=f"NumPy reference timed on {rows} of {shape[0]} rows, "
                       "scaled linearly to the full size")


def _cross_entropy_runners(case: Case, shape: tuple, device: Device, rng) -> list:
    n, classes = shape
    logits, logits_t = device.inputs(rng.standard_normal(shape, dtype=np.float32), case.dtype)
    target, target_t = device.inputs(rng.integers(0, classes, size=n, dtype=np.int64))
    runners = [Runner("fusedgrad", lambda: fusedgrad.softmax_cross_entropy(logits, target))]
    if device.torch_device is not None:
        cross_entropy = device.torch.nn.functional.cross_entropy
        logits_leaf = logits_t.detach().requires_grad_()

        def torch_step():
            logits_leaf.grad = None
            cross_entropy(logits_leaf, target_t).backward()

        runners.append(Runner("torch", torch_step))
    if device.name == "cpu":
        runners.append(_reference_runner(
            shape, lambda rows: reference.softmax_cross_entropy(logits[:rows], target[:rows])))
    return runners


def _torch_batch_norm(torch, case: Case, channels: int, weight, bias, ndim: int, on: str):
    """A torch ``BatchNorm1d``/``2d`` with the case's affine parameters, on device ``on``."""
    cls = torch.nn.BatchNorm1d if ndim in (2, 3) else torch.nn.BatchNorm2d
    module = cls(channels).to(on, getattr(torch, case.dtype))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(weight))
        module.bias.copy_(torch.from_numpy(bias))
    return module.train(case.op == "batch_norm_train")


def _as_torch_layout(tensor, case: Case):
    """NHWC storage seen as a logical NCHW tensor in PyTorch's ``channels_last`` format."""
    return tensor.permute(0, 3, 1, 2) if case.layout == "NHWC" else tensor


def _batch_norm_runners(case: Case, shape: tuple, device: Device, rng) -> list:
    axis = case.channel_axis
    channels = shape[axis]
    x, x_t = device.inputs(rng.standard_normal(shape, dtype=np.float32), case.dtype)
    dy, dy_t = device.inputs(rng.standard_normal(shape, dtype=np.float32), case.dtype)
    weight = rng.uniform(0.5, 1.5, channels).astype(np.float32)
    bias = rng.uniform(-0.5, 0.5, channels).astype(np.float32)
    w_d, b_d, rm_d, rv_d = (device.inputs(a, case.dtype)[0] for a in (
        weight, bias, np.zeros(channels, np.float32), np.ones(channels, np.float32)))
    training = case.op == "batch_norm_train"

    if training:
        def fused():
            _, mean, invstd = fusedgrad.batch_norm_forward(
                x, w_d, b_d, rm_d, rv_d, training=True, channel_axis=axis)
            return fusedgrad.batch_norm_backward(dy, x, mean, invstd, w_d, training=True,
                                                 channel_axis=axis)
    else:
        def fused():
            return fusedgrad.batch_norm_forward(x, w_d, b_d, rm_d, rv_d, training=False,
                                                channel_axis=axis)
    runners = [Runner("fusedgrad", fused)]

    if device.torch_device is not None:
        torch = device.torch
        module = _torch_batch_norm(torch, case, channels, weight, bias, len(shape),
                                   device.torch_device)
        x_leaf = _as_torch_layout(x_t, case).detach().requires_grad_(training)
        dy_view = _as_torch_layout(dy_t, case)

        if training:
            def torch_step():
                x_leaf.grad = module.weight.grad = module.bias.grad = None
                module(x_leaf).backward(dy_view)
        else:
            def torch_step():
                with torch.no_grad():
                    return module(x_leaf)
        runners.append(Runner("torch", torch_step))

    if device.name == "cpu":
        def run_reference(rows):
            ref_rm, ref_rv = np.zeros(channels), np.ones(channels)
            y, mean, invstd, _ = reference.batch_norm_forward(
                x[:rows], weight, bias, ref_rm, ref_rv, training=training, channel_axis=axis)
            if training:
                reference.batch_norm_backward(dy[:rows], x[:rows], mean, invstd, weight,
                                              training=True, channel_axis=axis)
            return y
        runners.append(_reference_runner(shape, run_reference))
    return runners


def small_cnn(torch, in_channels: int = 3, classes: int = 10):
    """conv-BN-ReLU x 3 (32, 64, 128 channels, the last two with stride 2), average pool, linear.

    A CIFAR-style network whose batch-norm layers see NCHW activations of the usual sizes.
    """
    nn = torch.nn

    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(in_channels, 32, 1), *block(32, 64, 2), *block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, classes))


def _training_step(model, loss_fn, x, y):
    def step():
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
    return step


def _model_pair(torch, shape: tuple, on: str, rng, fuse_relu: bool = False):
    """(baseline model + loss, converted model + loss, input, target), same initial weights."""
    import fusedgrad.torch as fgt
    torch.manual_seed(0)
    baseline = small_cnn(torch, in_channels=shape[1]).to(on)
    converted = fgt.convert_model(copy.deepcopy(baseline), fuse_relu=fuse_relu)
    x = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).to(on)
    y = torch.from_numpy(rng.integers(0, 10, size=shape[0], dtype=np.int64)).to(on)
    return ((baseline, torch.nn.CrossEntropyLoss()), (converted, fgt.CrossEntropyLoss()), x, y)


def _model_runners(case: Case, shape: tuple, device: Device, rng) -> list:
    if device.torch_device is None:
        raise RuntimeError("the model-level case needs PyTorch"
                           + (" with CUDA" if device.name == "cuda" else ""))
    (baseline, base_loss), (converted, fused_loss), x, y = _model_pair(
        device.torch, shape, device.torch_device, rng, case.fuse_relu)

    def runner(impl, model, loss_fn):
        def share(settings):
            return _fused_op_share(model, loss_fn, x, y, device, settings)
        return Runner(impl, _training_step(model, loss_fn, x, y), fused_op_share=share)
    return [runner("fusedgrad", converted, fused_loss), runner("torch", baseline, base_loss)]


class _ModuleTimer:
    """Accumulates the wall time spent inside some modules' forward and backward.

    Forward: between a forward pre-hook and a forward hook. Backward: between a full backward
    pre-hook (the gradient of the module's output is ready) and a full backward hook (the
    gradients of its inputs are computed). In a sequential model the autograd engine runs only
    that module's nodes in between, so the interval is the module's own backward time.
    """

    def __init__(self, modules, synchronize):
        self.seconds = 0.0
        self._synchronize = synchronize
        self._started = {}
        self._handles = []
        for module in modules:
            self._handles += [module.register_forward_pre_hook(self._start),
                              module.register_forward_hook(self._stop),
                              module.register_full_backward_pre_hook(self._start),
                              module.register_full_backward_hook(self._stop)]

    def _start(self, module, *_):
        self._synchronize()
        self._started[id(module)] = time.perf_counter()

    def _stop(self, module, *_):
        self._synchronize()
        self.seconds += time.perf_counter() - self._started.pop(id(module))

    def remove(self):
        for handle in self._handles:
            handle.remove()


def _fused_op_share(model, loss_fn, x, y, device: Device, settings: Settings) -> float:
    """Fraction of a forward + backward step spent in batch norm and the loss.

    Measured in separate, instrumented steps (hooks add a little overhead, so the step times
    reported elsewhere come from uninstrumented runs): the time inside the batch-norm modules
    and the loss module (see :class:`_ModuleTimer`) over the whole step's time, both summed
    over the same steps.
    """
    # fusedgrad.torch's batch-norm modules subclass PyTorch's, so this finds both kinds.
    norms = [m for m in model.modules()
             if isinstance(m, device.torch.nn.modules.batchnorm._BatchNorm)]
    timer = _ModuleTimer(norms + [loss_fn], device.synchronize)
    step = _training_step(model, loss_fn, x, y)
    try:
        step()
        timer.seconds = 0.0
        total = 0.0
        for _ in range(settings.repeats):
            device.synchronize()
            start = time.perf_counter()
            step()
            device.synchronize()
            total += time.perf_counter() - start
    finally:
        timer.remove()
    return timer.seconds / total


# --------------------------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------------------------
_RUNNER_BUILDERS = {"cross_entropy": _cross_entropy_runners,
                    "batch_norm_train": _batch_norm_runners,
                    "batch_norm_eval": _batch_norm_runners,
                    "model": _model_runners}


def build_runners(case: Case, device: Device, quick: bool, seed: int = 0) -> list:
    """The runners of ``case`` at its full or quick size, on identical seeded inputs."""
    rng = np.random.default_rng(seed)
    return _RUNNER_BUILDERS[case.op](case, case.shape(quick), device, rng)


def _empty_record(case: Case, quick: bool, device_name: str) -> dict:
    return {"case": case.name, "op": case.op, "layout": case.layout,
            "shape": list(case.shape(quick)), "dtype": case.dtype, "device": device_name,
            "timings": {}, "notes": []}


def run_case(case: Case, device: Device, quick: bool, settings: Settings) -> dict:
    """Time every implementation of ``case``; returns its record, without the ratios that need
    the copy bandwidth (see :func:`_add_ratios` and ``run``)."""
    record = _empty_record(case, quick, device.name)
    if case.op == "model":
        # A training step's time spreads widely from step to step (allocator page faults,
        # a shared machine): more rounds, and the paired ratio below.
        settings = dataclasses.replace(settings, min_seconds=3 * settings.min_seconds,
                                       max_repeats=3 * settings.max_repeats)
    try:
        runners = build_runners(case, device, quick)
        timings = time_interleaved({r.impl: r.fn for r in runners}, settings, device.synchronize)
        if "fusedgrad" in timings and "torch" in timings:
            record["paired_speedup_vs_torch"] = paired_speedup(timings["torch"],
                                                               timings["fusedgrad"])
        for runner in runners:
            timing = timings[runner.impl]
            record["timings"][runner.impl] = {
                "min_s": timing.min_s * runner.scale, "median_s": timing.median_s * runner.scale,
                "repeats": timing.repeats, "scale": runner.scale,
                "minor_faults_per_call": timing.faults}
            if runner.note:
                record["notes"].append(runner.note)
        if case.op == "model":
            record["fused_op_share"] = {r.impl: r.fused_op_share(settings) for r in runners}
        record["notes"] += _missing_comparisons(case, device, record["timings"])
    except Exception as exc:  # one failing case must not hide the others' results
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        gc.collect()
    return record


def _run_case_in_child(case: Case, device_name: str, quick: bool, settings: Settings,
                       threads: int) -> dict:
    numba.set_num_threads(threads)
    device = Device(device_name)
    match_torch_threads(device.torch)
    return run_case(case, device, quick, settings)


def run_case_in_fresh_process(case: Case, device_name: str, quick: bool,
                              settings: Settings) -> dict:
    """:func:`run_case` in a new interpreter (spawned: it inherits the environment and the
    thread count, no memory).

    Why the model case runs there: a training step allocates and frees its activations and
    gradients every step, and how much that costs depends on the state of the process's heap,
    not on the model. A process that has allocated and freed the kernel cases' 100-500 MB
    arrays has raised glibc's mmap and trim thresholds, so the step's frees stay in the heap and
    its allocations come back already mapped; a process that only trains this model returns that
    memory to the OS and takes page faults on it every step. The second is the state of a
    training script, so it is the headline figure; :func:`run` also reports the first.
    """
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(_run_case_in_child, case, device_name, quick, settings,
                               numba.get_num_threads()).result()
        except Exception as exc:  # the child died (run_case reports its own failures)
            return dict(_empty_record(case, quick, device_name),
                        error=f"fresh process: {type(exc).__name__}: {exc}")


def _missing_comparisons(case: Case, device: Device, timings: dict) -> list:
    """Notes that say why an implementation was not timed."""
    notes = []
    if "torch" not in timings:
        notes.append("PyTorch not compared: " + ("not installed" if device.torch is None
                                                 else "this PyTorch build has no CUDA"))
    if "reference" not in timings and case.op != "model":
        notes.append("NumPy reference not timed: it runs on the CPU only")
    return notes


def _summary(record: dict) -> dict:
    """The model-level figures of a second run of a case (see :func:`run`)."""
    summary = {key: record[key] for key in ("timings", "paired_speedup_vs_torch", "error")
               if key in record}
    summary["speedup_vs_torch"] = _speedup(record["timings"], "torch")
    return summary


def _speedup(timings: dict, other: str) -> float | None:
    """``other``'s best time / fusedgrad's, when both were timed."""
    fused = timings.get("fusedgrad")
    return timings[other]["min_s"] / fused["min_s"] if fused and other in timings else None


def _add_ratios(record: dict, nbytes: int | None, copy_bandwidth: float) -> None:
    """Speed-ups of fusedgrad over the others, its GB/s and its % of the memory roofline."""
    timings = record["timings"]
    fused = timings.get("fusedgrad")
    for other in ("torch", "reference"):
        record[f"speedup_vs_{other}"] = _speedup(timings, other)
    record["bytes"] = nbytes
    record["roofline_s"] = nbytes / copy_bandwidth if nbytes else None
    # The speed-up over PyTorch that a kernel running exactly at the roofline would show: a
    # goal above it can only be met with data that stays in cache between passes.
    torch_timing = timings.get("torch")
    record["speedup_at_roofline"] = (torch_timing["min_s"] / record["roofline_s"]
                                     if torch_timing and record["roofline_s"] else None)
    if fused and nbytes:
        record["GBps"] = nbytes / fused["min_s"] / 1e9
        record["roofline_pct"] = 100.0 * record["roofline_s"] / fused["min_s"]
    else:
        record["GBps"] = record["roofline_pct"] = None


def run(device_name: str, *, quick: bool = False, case_names=None, out=sys.stdout,
        progress=sys.stderr) -> dict:
    """Run the benchmark, print one progress line per case to ``progress`` and the table to ``out``.

    The copy bandwidth is measured before and after the cases and the higher value is used
    (a noisy machine lowers a measurement, it never raises it), so the % of roofline is not
    flattered by a bad moment.

    Returns ``{"machine": {...}, "copy_bandwidth_GBps": float,
    "copy_bandwidth_samples_GBps": [before, after], "results": [record, ...]}``; each record has
    ``case, op, layout, shape, dtype, device, timings`` (per implementation: ``min_s, median_s,
    repeats, scale, minor_faults_per_call``, the last the median over the timed calls),
    ``speedup_vs_torch, speedup_vs_reference, bytes, roofline_s, GBps, roofline_pct,
    speedup_at_roofline, notes``, ``paired_speedup_vs_torch`` when PyTorch was timed
    (see :func:`paired_speedup`) and, when the case failed, ``error``; the model case adds
    ``fused_op_share`` (``{"fusedgrad": f, "torch": f}``). On the CPU the model case is timed
    in a fresh process (``"process": "fresh"``, see :func:`run_case_in_fresh_process`) and then
    again in this one, after the other cases, whose figures are under ``in_bench_process``
    (``timings``, ``speedup_vs_torch``, ``paired_speedup_vs_torch``).
    """
    cases = select_cases(device_name, case_names)
    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    device = Device(device_name)
    match_torch_threads(device.torch)
    machine = machine_info(device_name)
    print(_machine_header(machine), file=out, flush=True)
    if not case_names and device.torch_device is None:
        # PyTorch is optional: without it the default run skips the model-level case (naming
        # that case explicitly still reports the missing dependency as a failure).
        skipped = [c.name for c in cases if c.op == "model"]
        cases = [c for c in cases if c.op != "model"]
        if skipped:
            print(f"skipping {', '.join(skipped)}: the model-level case needs PyTorch"
                  + (" with CUDA" if device_name == "cuda" else " (pip install torch)"),
                  file=out, flush=True)
    if device_name == "cuda":
        def measure():
            return device_copy_bandwidth(DEVICE_COPY_BYTES // (8 if quick else 1), settings)
        what = "device-to-device copy"
    else:
        def measure():
            return host_copy_bandwidth(HOST_COPY_BYTES // (2 if quick else 1), settings)
        what = f"parallel copy, {numba.get_num_threads()} threads"
    samples = [measure()]
    results = []
    for case in cases:
        print(f"running {case.name} {'x'.join(map(str, case.shape(quick)))} ...", file=progress,
              flush=True)
        if case.op == "model" and device_name == "cpu":
            record = run_case_in_fresh_process(case, device_name, quick, settings)
            record["process"] = "fresh"
            record["in_bench_process"] = _summary(run_case(case, device, quick, settings))
        else:
            record = run_case(case, device, quick, settings)
        results.append(record)
    samples.append(measure())
    bandwidth = max(samples)
    for case, record in zip(cases, results):
        _add_ratios(record, roofline_bytes(case, case.shape(quick)), bandwidth)
    print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s ({what}, read + write bytes; best of "
          f"{', '.join(f'{s / 1e9:.1f}' for s in samples)} measured before and after the "
          "cases)\n", file=out)
    Table(out).render(results)
    return {"machine": machine, "copy_bandwidth_GBps": bandwidth / 1e9,
            "copy_bandwidth_samples_GBps": [s / 1e9 for s in samples], "results": results}


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _machine_header(machine: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    gpu = machine["gpu"]["name"] or "none"
    header = (f"fusedgrad benchmark, {machine['date']}\n"
              f"device: {machine['device']}; cpu: {machine['cpu']} ({machine['cpu_count']} "
              f"cores); numba threads: {machine['numba_threads']} "
              f"({machine['threading_layer']}); gpu: {gpu}\n{versions}")
    load = machine["load_average_1min"]
    if load is not None and load > 0.5 * machine["cpu_count"]:
        header += (f"\nwarning: load average {load:.1f} on {machine['cpu_count']} cores before "
                   "the run: other processes compete for the CPU, timings will be noisy")
    return header


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


#: Page faults per timed call above which the table's notes list a case's counts (a thousand
#: 4 KiB pages, 4 MB of fresh memory, cost a visible fraction of a millisecond).
FAULTS_WORTH_A_NOTE = 1000


def _faults_by_impl(record: dict) -> dict:
    return {impl: timing.get("minor_faults_per_call") for impl, timing in record["timings"].items()}


class Table:
    """The printed result table: one aligned row per case, then the notes.

    Times are the minimum over the repeats (median in parentheses), in milliseconds; speed-ups
    are ratios of minima; GB/s and % roofline are fusedgrad's.
    """

    COLUMNS = (("case", "<", 16), ("shape", "<", 18), ("fusedgrad ms", ">", 19),
               ("torch ms", ">", 19), ("numpy ms", ">", 19), ("vs torch", ">", 9),
               ("vs numpy", ">", 9), ("GB/s", ">", 7), ("% roof", ">", 7),
               ("x at roof", ">", 9))

    def __init__(self, out):
        self.out = out

    def _line(self, cells) -> str:
        return "  ".join(format(cell, f"{align}{width}")
                         for cell, (_, align, width) in zip(cells, self.COLUMNS)).rstrip()

    def render(self, results) -> None:
        print(self._line([name for name, _, _ in self.COLUMNS]), file=self.out)
        print(self._line(["-" * width for _, _, width in self.COLUMNS]), file=self.out)
        for record in results:
            self.row(record)
        self.footer(results)

    @staticmethod
    def _time_cell(timings: dict, impl: str, marker: str = "") -> str:
        if impl not in timings:
            return "-"
        t = timings[impl]
        return f"{_ms(t['min_s'])} ({_ms(t['median_s'])}){marker}"

    def row(self, record: dict) -> None:
        shape = "x".join(map(str, record["shape"]))
        if record["dtype"] != "float32":
            shape += f" {record['dtype']}"
        timings = record["timings"]
        scaled = timings.get("reference", {}).get("scale", 1.0) != 1.0
        cells = [record["case"], shape, self._time_cell(timings, "fusedgrad"),
                 self._time_cell(timings, "torch"),
                 self._time_cell(timings, "reference", "*" if scaled else ""),
                 _ratio(record["speedup_vs_torch"]), _ratio(record["speedup_vs_reference"]),
                 _number(record["GBps"], ".1f"), _number(record["roofline_pct"], ".0f"),
                 _ratio(record["speedup_at_roofline"])]
        print(self._line(cells), file=self.out)
        if "error" in record:
            print(f"  ! {record['case']} failed: {record['error']}", file=self.out)
        if record["op"] == "model":
            self.model_lines(record)
        share = record.get("fused_op_share")
        if share:
            print(f"  {record['case']}: share of step time in batch norm + loss: "
                  f"fusedgrad {100 * share['fusedgrad']:.0f}%, torch {100 * share['torch']:.0f}%",
                  file=self.out)

    def model_lines(self, record: dict) -> None:
        """The model case's paired ratio, page faults and, when timed twice, its second run."""
        name = record["case"]
        where = " in a fresh process" if record.get("process") == "fresh" else ""
        paired = record.get("paired_speedup_vs_torch")
        if paired:
            repeats = record["timings"]["fusedgrad"]["repeats"]
            print(f"  {name}{where}: median over {repeats} paired rounds of torch / fusedgrad "
                  f"step time: {paired:.2f}x{self._faults(record)}", file=self.out)
        again = record.get("in_bench_process")
        if again:
            if "error" in again:
                print(f"  ! {name} in the benchmark process failed: {again['error']}",
                      file=self.out)
            elif again.get("paired_speedup_vs_torch"):
                fused, torch_timing = again["timings"]["fusedgrad"], again["timings"]["torch"]
                print(f"  {name} in the benchmark process, after the other cases: fusedgrad "
                      f"{_ms(fused['min_s'])} ms, torch {_ms(torch_timing['min_s'])} ms, "
                      f"{_ratio(again['speedup_vs_torch'])}; paired "
                      f"{again['paired_speedup_vs_torch']:.2f}x{self._faults(again)}",
                      file=self.out)

    @staticmethod
    def _faults(record: dict) -> str:
        faults = _faults_by_impl(record)
        if faults.get("fusedgrad") is None or faults.get("torch") is None:
            return ""
        return (f"; page faults per step: fusedgrad {faults['fusedgrad']:.0f}, "
                f"torch {faults['torch']:.0f}")

    def footer(self, results) -> None:
        cases_by_note = {}
        for record in results:
            for note in record["notes"]:
                cases_by_note.setdefault(note, []).append(record["case"])
        notes = [f"{', '.join(cases)}: {note}" for note, cases in cases_by_note.items()]
        print("\ntimes: best of the repeats, median in parentheses; speed-ups compare best times; "
              "GB/s and % roof: fusedgrad's bytes moved / time, and the roofline time / its time; "
              "x at roof: torch's time / the roofline time, the speed-up over PyTorch at 100% "
              "of the roofline", file=self.out)
        if notes:
            print("* " + "\n* ".join(notes), file=self.out)
        for record in results:
            faults = _faults_by_impl(record)
            if record["op"] != "model" and any((f or 0) >= FAULTS_WORTH_A_NOTE
                                               for f in faults.values()):
                counts = ", ".join(f"{impl} {f:.0f}" for impl, f in faults.items()
                                   if f is not None)
                print(f"{record['case']}: page faults per timed call: {counts} (fresh pages "
                      "for new outputs, mapped and zeroed by the OS inside the timed call)",
                      file=self.out)
        in_cache = [r["case"] for r in results if (r["roofline_pct"] or 0) > 100]
        if in_cache:
            print(f"{', '.join(in_cache)}: above 100% of the roofline: part of the data stayed in "
                  "cache between passes (the roofline counts every pass at the memory copy "
                  "bandwidth)", file=self.out)
        if any(r["op"] == "model" for r in results):
            print("model: forward + backward step of a small CNN; fusedgrad = the same model "
                  "converted with fusedgrad.torch.convert_model + fusedgrad.torch.CrossEntropyLoss;"
                  " *_fuse_relu: converted with fuse_relu=True (batch norm and the ReLU after it "
                  "in one module, whose time the share then includes); share measured with "
                  "module hooks in separate instrumented steps; on the CPU timed in a fresh "
                  "process, as a training script runs, and again in this one after the other "
                  "cases", file=self.out)


def write_plot(report: dict, path: str) -> None:
    """A PNG bar chart of fusedgrad's speed-up over PyTorch and over NumPy, per case (log scale)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    results = [r for r in report["results"] if r["timings"].get("fusedgrad")]
    names = [r["case"] for r in results]
    positions = np.arange(len(results))
    fig = Figure(figsize=(max(6.0, 0.9 * len(results) + 2), 4.5))
    FigureCanvasAgg(fig)  # render off-screen without touching pyplot's global state (as demo.py)
    ax = fig.subplots()
    for offset, other, label in ((-0.2, "torch", "vs PyTorch"), (0.2, "reference", "vs NumPy")):
        values = [r[f"speedup_vs_{other}"] or np.nan for r in results]
        ax.bar(positions + offset, values, width=0.4, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(positions, names, rotation=30, ha="right")
    ax.set_ylabel("speed-up of fusedgrad (x, best times)")
    machine = report["machine"]
    ax.set_title(f"fusedgrad on {machine['device']}, {machine['numba_threads']} threads, "
                 f"copy bandwidth {report['copy_bandwidth_GBps']:.1f} GB/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
