"""The benchmark engine behind ``python -m fusedgrad bench`` and the ``bench/`` pytest suite.

Every case times one operation, forward + backward unless said otherwise, in every
implementation of :mod:`fusedgrad._bench_peers` (fusedgrad, PyTorch eager, ``torch.compile``,
JAX jit, the NumPy reference) on identical inputs.

Timing: one warm-up call per implementation (compilation, allocator; an implementation whose
warm-up fails is dropped with a note), then the implementations are timed in alternation,
round by round, so that a noisy moment on a shared machine hits them alike: each gets at least
``repeats`` timed calls and more until it has spent ``min_seconds`` (at most ``max_repeats``),
each call between two device synchronisations on the GPU. Every timed call directly follows
untimed calls of the same implementation, for at least ``settle_seconds``, so each one meets the
caches as its own previous call left them and the cores free of the implementation before it:
thread pools keep spinning for a while after their work ends (measured here, 2026-12-04: right
after a JAX call a 2.5 ms fusedgrad kernel took 4.0 ms, and 2.6 ms after 20 ms of its own
calls; PyTorch's times moved by under 0.3 ms either way). Reported: the median time, and per peer the
speed-up of fusedgrad as the median over the rounds of (peer time / fusedgrad time) in the same
round, where a slow moment cancels (:func:`paired_speedup`); "vs best peer" is the smallest of
those.

Allocator states (CPU): how a peer's time depends on the process's heap. With glibc's default
settings, a freed output larger than the mmap threshold goes back to the operating system, and
the next call's new output takes a page fault (a zeroed page) per 4 KiB on first write; PyTorch
eager pays that on every call. With ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``
freed memory stays in the heap and is reused without faults, as under a caching allocator
(jemalloc, tcmalloc). ``bench`` measures every case in both: in this process (the state its
environment sets) and in a child process started with the other state's environment.

Memory roofline: the bytes an operation must move at least, divided by the host's memory
bandwidth measured in the same process, before and after the cases: the best of the copy
probes (:data:`HOST_PROBES`: ``np.copyto`` and a parallel scale, one read per write), each
counting the bytes read and written, over buffers twice the size of the last-level cache:

- cross-entropy forward + backward: logits read once + gradient written once, 2 * N * C * itemsize;
- batch norm training forward + backward: five passes over x's size (forward reads x and writes
  y; backward reads x and dy and writes dx); eval forward: two (read x, write y).

A case whose working set fits in the last-level cache can run above 100% of that roofline (its
passes after the first find data in cache); the output says so for each such case.

The model-level case times a training step (forward + backward, no optimiser) of a small CNN with
``BatchNorm2d`` and a cross-entropy loss, once with PyTorch's modules and once converted with
``fusedgrad.torch.convert_model`` plus ``fusedgrad.torch.CrossEntropyLoss``, on the CPU in a
fresh process (:func:`run_case_in_fresh_process`), as a training script runs it.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import numba
import numpy as np
from numba import njit, prange

import fusedgrad
from fusedgrad._bench_peers import (LABELS, PEERS, Device, build_runners,
                                     match_torch_threads)
from fusedgrad._bench_report import Table


# --------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark case: input shape ``full``, or ``quick`` (default: the same) with --quick.

    ``op`` is "cross_entropy", "batch_norm_train", "batch_norm_eval", "linear_cross_entropy"
    (shape (N, d, C): input (N, d), weight (C, d)) or "model"; ``layout`` names where the
    channels are ("NC", "NCHW", "NHWC"), for the model case its input layout ("NDC": linear +
    cross-entropy);
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
    Case("lce_vocab32k", "linear_cross_entropy", "NDC", (2048, 1024, 32000),
         (512, 1024, 32000)),
    # Smoke cases: only when named with --cases (tests, the CUDA simulator).
    Case("ce_small", "cross_entropy", "NC", (8, 40), default=False),
    Case("bn_small", "batch_norm_train", "NCHW", (2, 4, 3, 3), default=False),
    Case("model_small", "model", "NCHW", (4, 3, 8, 8), default=False),
    Case("model_small_fuse_relu", "model", "NCHW", (4, 3, 8, 8), default=False, fuse_relu=True),
    Case("lce_small", "linear_cross_entropy", "NDC", (64, 32, 500), default=False),
)

# The GPU cases are large enough to saturate an H100/H200-class device (issue 4 asks for
# N x C >= 256M elements for cross-entropy). They run in the order of issue 13's goals (its
# float32 and bfloat16 cases first), so that a run cut short by a lent GPU's time limit has
# measured the goals before the extras (float16, eval, the model, linear + CE).
CUDA_CASES = (
    Case("ce_vocab64k", "cross_entropy", "NC", (4096, 65536), (1024, 65536)),
    Case("ce_vocab64k_bf16", "cross_entropy", "NC", (4096, 65536), (1024, 65536),
         dtype="bfloat16"),
    Case("ce_vocab128k", "cross_entropy", "NC", (2048, 128256), (512, 128256)),
    Case("ce_vocab128k_bf16", "cross_entropy", "NC", (2048, 128256), (512, 128256),
         dtype="bfloat16"),
    Case("ce_classes1k", "cross_entropy", "NC", (262144, 1000), (65536, 1000)),
    Case("bn_nchw", "batch_norm_train", "NCHW", (256, 256, 56, 56), (64, 256, 56, 56)),
    Case("bn_nchw_bf16", "batch_norm_train", "NCHW", (256, 256, 56, 56), (64, 256, 56, 56),
         dtype="bfloat16"),
    Case("bn_nhwc", "batch_norm_train", "NHWC", (256, 56, 56, 256), (64, 56, 56, 256)),
    Case("bn_nhwc_bf16", "batch_norm_train", "NHWC", (256, 56, 56, 256), (64, 56, 56, 256),
         dtype="bfloat16"),
    Case("bn_many_channels", "batch_norm_train", "NCHW",
         (256, 2048, 14, 14), (64, 2048, 14, 14)),
    Case("bn_many_channels_bf16", "batch_norm_train", "NCHW",
         (256, 2048, 14, 14), (64, 2048, 14, 14), dtype="bfloat16"),
    Case("bn_nc", "batch_norm_train", "NC", (262144, 1024), (65536, 1024)),
    Case("bn_nc_bf16", "batch_norm_train", "NC", (262144, 1024), (65536, 1024),
         dtype="bfloat16"),
    Case("bn_eval_nchw", "batch_norm_eval", "NCHW", (256, 256, 56, 56), (64, 256, 56, 56)),
    Case("model_cnn", "model", "NCHW", (256, 3, 64, 64), (64, 3, 64, 64)),
    # an LM head: 4096 tokens, hidden size 4096, Llama 3's vocabulary
    Case("lce_vocab128k", "linear_cross_entropy", "NDC", (4096, 4096, 128256),
         (1024, 4096, 128256)),
    Case("ce_vocab64k_f16", "cross_entropy", "NC", (4096, 65536), (1024, 65536),
         dtype="float16"),
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
#: (passes the roofline counts, x-sized arrays in the working set) per operation.
_PASSES_AND_ARRAYS = {"cross_entropy": (2, 2), "batch_norm_train": (5, 4),
                      "batch_norm_eval": (2, 2)}


def roofline_bytes(case: Case, shape: tuple) -> int | None:
    """Bytes the operation must move at least (see the module docstring); None for the model."""
    if case.op not in _PASSES_AND_ARRAYS:
        return None
    return _PASSES_AND_ARRAYS[case.op][0] * math.prod(shape) * _ITEMSIZE[case.dtype]


def working_set_bytes(case: Case, shape: tuple) -> int | None:
    """Bytes of the input-sized arrays one call touches (inputs and outputs); None for the
    model. When they fit in the last-level cache, passes after the first may hit it."""
    if case.op not in _PASSES_AND_ARRAYS:
        return None
    return _PASSES_AND_ARRAYS[case.op][1] * math.prod(shape) * _ITEMSIZE[case.dtype]


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when a real GPU is usable (not the simulator), else "cpu"."""
    if device != "auto":
        return device
    from fusedgrad._device import cuda_available, simulator_enabled
    return "cuda" if cuda_available() and not simulator_enabled() else "cpu"


# --------------------------------------------------------------------------------------------
# Timing
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


def paired_speedup(baseline: Timing, candidate: Timing, scale: float = 1.0) -> float | None:
    """Median over the rounds both were timed in of baseline time * scale / candidate time.

    The implementations are timed in alternation, so sample i of each comes from the same
    round: a slow stretch of a shared machine slows both samples of a round alike and cancels
    in their ratio, which makes this steadier than a ratio of two medians or minima when the
    run-to-run spread is as large as the effect."""
    n = min(len(baseline.samples), len(candidate.samples))
    if n == 0:
        return None
    return statistics.median(scale * b / c
                             for b, c in zip(baseline.samples[:n], candidate.samples[:n]))


@dataclasses.dataclass(frozen=True)
class Settings:
    repeats: int
    min_seconds: float
    max_repeats: int
    #: Untimed calls of an implementation before each of its timed calls last at least this
    #: long (at least one call), so that the previous implementation's threads have gone quiet.
    settle_seconds: float = 0.0


FULL_SETTINGS = Settings(repeats=7, min_seconds=1.0, max_repeats=100, settle_seconds=0.02)
#: A GPU's times, each call between two synchronisations, vary little from call to call
#: (PyTorch's repeated within 2% between two H200 runs on 2026-11-29), and a lent GPU's minutes
#: are few: fewer seconds per implementation than on the CPU, no thread pools to let settle.
DEVICE_SETTINGS = Settings(repeats=10, min_seconds=0.25, max_repeats=50, settle_seconds=0.002)
SIMULATOR_SETTINGS = Settings(repeats=1, min_seconds=0.0, max_repeats=1)
QUICK_SETTINGS = Settings(repeats=3, min_seconds=0.2, max_repeats=30, settle_seconds=0.02)


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
                # untimed: the timed call finds the caches as this implementation left them,
                # and the cores no longer shared with the one before
                settle_start = time.perf_counter()
                fn()
                synchronize()
                while time.perf_counter() - settle_start < settings.settle_seconds:
                    fn()
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


# --------------------------------------------------------------------------------------------
# Memory bandwidth
# --------------------------------------------------------------------------------------------
#: Smallest probe buffer; the probes use twice the last-level cache when that is larger.
HOST_COPY_BYTES = 256 << 20
DEVICE_COPY_BYTES = 2 << 30


@njit(cache=True, parallel=True)
def _parallel_copy(src, dst):
    for i in prange(src.shape[0]):
        dst[i] = src[i]


@njit(cache=True, parallel=True)
def _parallel_scale(src, dst, factor):
    for i in prange(src.shape[0]):
        dst[i] = factor * src[i]


@njit(cache=True, parallel=True)
def _parallel_triad(dst, a, b, factor):
    for i in prange(dst.shape[0]):
        dst[i] = a[i] + factor * b[i]


@dataclasses.dataclass(frozen=True)
class Probe:
    """A bandwidth probe: ``arrays`` float32 buffers of one size (the first is written, the
    rest read), ``run(*buffers)`` one pass; its bytes are ``arrays`` times the buffer size.
    ``roofline``: whether it counts for the roofline (see :data:`HOST_PROBES`)."""

    name: str
    arrays: int
    run: Callable
    roofline: bool = True


#: The host probes. The roofline is the best of the copies, one read per write: the traffic of
#: the cross-entropy (logits in, gradient out) and of the batch-norm eval. Each writes with
#: ordinary stores, as fusedgrad's kernels do (a store first reads its cache line from memory),
#: so a written byte costs two transfers and a read byte one: the triad, two reads per write,
#: counts more bytes per transfer (here about 1.3 times the copies' figure), and the parallel
#: copy, which LLVM turns into ``memcpy``, uses glibc's non-temporal stores (no read of the
#: destination) above a size derived from the cache size (up to 1.5 times). Both are reported
#: beside the roofline, neither sets it: a kernel that reads as much as it writes through the
#: cache cannot reach them.
HOST_PROBES = (
    Probe("numpy copyto", 2, lambda dst, src: np.copyto(dst, src)),
    Probe("parallel scale", 2, lambda dst, src: _parallel_scale(src, dst, np.float32(1.5))),
    Probe("parallel triad", 3, lambda dst, a, b: _parallel_triad(dst, a, b, np.float32(1.5)),
          roofline=False),
    Probe("parallel memcpy", 2, lambda dst, src: _parallel_copy(src, dst), roofline=False),
)


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (Linux sysfs, else ``sysconf``), or None when unknown."""
    sizes = []
    folder = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(folder):
            if entry.startswith("index"):
                with open(os.path.join(folder, entry, "size")) as f:
                    text = f.read().strip()
                units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
                sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units
                             else int(text))
    except (OSError, ValueError, KeyError):
        pass
    if not sizes and hasattr(os, "sysconf"):
        for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
            try:
                sizes.append(int(os.sysconf(name)))
            except (ValueError, OSError):
                pass
    return max(sizes) if sizes and max(sizes) > 0 else None


def probe_buffer_bytes(quick: bool) -> int:
    """Bytes per probe buffer: twice the last-level cache (so no pass is served from it), at
    least ``HOST_COPY_BYTES``; half of that with --quick."""
    nbytes = max(HOST_COPY_BYTES, 2 * (last_level_cache_bytes() or 0))
    return nbytes // 2 if quick else nbytes


def host_bandwidth(nbytes: int, settings: Settings) -> dict:
    """Every host probe's bandwidth in bytes/s ((bytes read + bytes written) / best time), on
    buffers of ``nbytes`` written once beforehand (no page faults inside the timed calls)."""
    n = nbytes // 4
    buffers = [np.ones(n, np.float32) for _ in range(max(p.arrays for p in HOST_PROBES))]
    results = {}
    for probe in HOST_PROBES:
        args = buffers[:probe.arrays]
        timing = time_callable(lambda: probe.run(*args), settings)
        results[probe.name] = probe.arrays * n * 4 / timing.min_s
    del buffers
    gc.collect()
    return results


def device_copy_bandwidth(nbytes: int = DEVICE_COPY_BYTES,
                          settings: Settings = FULL_SETTINGS) -> float:
    """Device-to-device copy bandwidth of the current GPU in bytes/s (read + write bytes)."""
    from numba import cuda
    src = cuda.device_array(nbytes // 4, dtype=np.float32)
    dst = cuda.device_array_like(src)
    timing = time_callable(lambda: dst.copy_to_device(src), settings, cuda.synchronize)
    return 2 * nbytes / timing.min_s


def measure_bandwidth(device_name: str, quick: bool, settings: Settings) -> list:
    """``[{"probe", "GBps", "roofline"}]`` for this device (the device copy on the GPU)."""
    if device_name == "cuda":
        nbytes = DEVICE_COPY_BYTES // (8 if quick else 1)
        return [{"probe": "device-to-device copy", "roofline": True,
                 "GBps": device_copy_bandwidth(nbytes, settings) / 1e9}]
    measured = host_bandwidth(probe_buffer_bytes(quick), settings)
    return [{"probe": p.name, "roofline": p.roofline, "GBps": measured[p.name] / 1e9}
            for p in HOST_PROBES]


def run_tiny_parallel_kernel() -> None:
    """Run one small parallel Numba kernel, so that ``numba.threading_layer()`` is decided."""
    src = np.arange(1 << 16, dtype=np.float32)
    _parallel_copy(src, np.empty_like(src))


def kernel_cache_dir() -> str:
    """Where fusedgrad's compiled kernels are cached (``NUMBA_CACHE_DIR`` or beside the code)."""
    return _parallel_copy._cache.cache_path


# --------------------------------------------------------------------------------------------
# Allocator states
# --------------------------------------------------------------------------------------------
#: glibc settings under which freed memory stays in the heap and is reused without page faults.
NO_FAULT_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
STATES = ("default", "no_faults")
STATE_LABELS = {"default": "glibc default", "no_faults": "freed memory kept",
                "device": "GPU memory"}
STATE_ENVIRONMENTS = {
    "default": "no MALLOC_ variables: a freed large output goes back to the OS, and a new one "
               "takes a page fault per 4 KiB on first write",
    "no_faults": " ".join(f"{k}={v}" for k, v in NO_FAULT_ENV.items())
                 + ": freed memory stays in the heap and is reused without page faults, as "
                   "under a caching allocator"}


def allocator_state(environ=None) -> str:
    """The allocator state an environment sets: "no_faults" or "default"."""
    environ = os.environ if environ is None else environ
    return ("no_faults" if all(environ.get(k) == v for k, v in NO_FAULT_ENV.items())
            else "default")


def environment_for(state: str, environ=None) -> dict:
    """A copy of ``environ`` (default: this process's) that starts a process in ``state``."""
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if k not in NO_FAULT_ENV}
    if state == "no_faults":
        env.update(NO_FAULT_ENV)
    return env


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
    """Versions of fusedgrad, Python and the libraries it runs on or is compared with (None
    when not installed)."""
    import llvmlite
    versions = {"fusedgrad": fusedgrad.__version__, "python": platform.python_version(),
                "numpy": np.__version__, "numba": numba.__version__,
                "llvmlite": llvmlite.__version__}
    from importlib import metadata
    for dist in ("numba-cuda", "torch", "jax"):
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


def numpy_blas() -> str | None:
    """The BLAS behind NumPy's ``matmul`` (linear + cross-entropy's products on the host) and
    the kernels it chose at load time, e.g. "openblas 0.3.31, SkylakeX kernels, 2 threads";
    None without threadpoolctl (not a dependency). OpenBLAS picks its kernels for the CPU it
    finds unless ``OPENBLAS_CORETYPE`` names others, and on AVX-512 machines the AVX2 ones
    ("Haswell") run its products at about half the speed."""
    try:
        import threadpoolctl
    except ImportError:
        return None
    blas = [library for library in threadpoolctl.threadpool_info()
            if library.get("user_api") == "blas"]
    # SciPy, when loaded (by scikit-learn, say), brings an OpenBLAS of its own: NumPy's is the
    # one in NumPy's wheel folder (numpy.libs), or the only one in other installs.
    blas.sort(key=lambda library: "numpy" not in library.get("filepath", ""))
    if not blas:
        return None
    library = blas[0]
    kernels = library.get("architecture")
    kernels = f", {kernels} kernels" if kernels else ""
    return (f"{library.get('internal_api')} {library.get('version')}{kernels}, "
            f"{library.get('num_threads')} threads")


def machine_info(device: str = "cpu") -> dict:
    """Everything needed to interpret a benchmark: CPU, threads, versions, GPU, cache, date."""
    run_tiny_parallel_kernel()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "last_level_cache_bytes": last_level_cache_bytes(),
        "numba_threads": numba.get_num_threads(),
        "NUMBA_NUM_THREADS": os.environ.get("NUMBA_NUM_THREADS"),
        "threading_layer": numba.threading_layer(),
        "versions": package_versions(),
        "numpy_blas": numpy_blas(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "gpu": gpu_description(),
        "cache_dir": kernel_cache_dir(),
        "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device,
    }


# --------------------------------------------------------------------------------------------
# Running one case in one allocator state
# --------------------------------------------------------------------------------------------
def _warm_up(runners: list, synchronize, seconds=None) -> tuple:
    """(runners whose first call worked, notes on the others). A peer that cannot run here
    (torch.compile without a working compiler, say) must not cost the other results.
    ``seconds``: a dict that receives each runner's first-call time (compilation included)."""
    working, notes = [], []
    for runner in runners:
        start = time.perf_counter()
        try:
            runner.fn()
            synchronize()
        except Exception as exc:
            if runner.impl == "fusedgrad":
                raise
            notes.append(f"{runner.impl} not timed: its first call failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        else:
            working.append(runner)
        finally:
            if seconds is not None:
                seconds[runner.impl] = time.perf_counter() - start
    return working, notes


def run_case(case: Case, device: Device, quick: bool, settings: Settings,
             skip=()) -> dict:
    """Time every implementation of ``case`` (but those in ``skip``) in this process.

    Returns ``{"timings": {impl: {min_s, median_s, repeats, scale, minor_faults_per_call}},
    "speedup": {impl: paired speed-up of fusedgrad over it}, "notes": [...],
    "warmup_s": {impl: its first call's seconds, compilation included}}``, with
    ``"fused_op_share"`` for the model case and ``"error"`` when the case failed.
    """
    result = {"timings": {}, "speedup": {}, "notes": [], "warmup_s": {}}
    if case.op == "model":
        # A training step's time spreads widely from step to step (allocator page faults,
        # a shared machine): more rounds, and the paired ratio.
        settings = dataclasses.replace(settings, min_seconds=3 * settings.min_seconds,
                                       max_repeats=3 * settings.max_repeats)
    try:
        runners = [r for r in build_runners(case, device, quick) if r.impl not in skip]
        runners, result["notes"] = _warm_up(runners, device.synchronize, result["warmup_s"])
        timings = time_interleaved({r.impl: r.fn for r in runners}, settings,
                                   device.synchronize)
        fused = timings["fusedgrad"]
        for runner in runners:
            timing = timings[runner.impl]
            result["timings"][runner.impl] = {
                "min_s": timing.min_s * runner.scale, "median_s": timing.median_s * runner.scale,
                "repeats": timing.repeats, "scale": runner.scale,
                "minor_faults_per_call": timing.faults}
            if runner.impl != "fusedgrad":
                result["speedup"][runner.impl] = paired_speedup(timing, fused, runner.scale)
            if runner.note:
                result["notes"].append(runner.note)
        if case.op == "model":
            result["fused_op_share"] = {r.impl: r.fused_op_share(settings.repeats)
                                        for r in runners}
    except Exception as exc:  # one failing case must not hide the others' results
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        gc.collect()
    return result


def _run_case_in_child(case: Case, device_name: str, quick: bool, settings: Settings,
                       threads: int, skip) -> dict:
    numba.set_num_threads(threads)
    device = Device(device_name)
    match_torch_threads(device.torch)
    return run_case(case, device, quick, settings, skip)


def run_case_in_fresh_process(case: Case, device_name: str, quick: bool,
                              settings: Settings, skip=()) -> dict:
    """:func:`run_case` in a new interpreter (spawned: it inherits the environment and the
    thread count, no memory).

    Why the model case runs there: a training step allocates and frees its activations and
    gradients every step, and how much that costs depends on the state of the process's heap,
    not on the model. A process that has allocated and freed the kernel cases' 100-500 MB
    arrays has raised glibc's mmap and trim thresholds (which spares later steps their page
    faults, whatever the environment says); a training script's process has not.
    """
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        try:
            return pool.submit(_run_case_in_child, case, device_name, quick, settings,
                               numba.get_num_threads(), tuple(skip)).result()
        except Exception as exc:  # the child died (run_case reports its own failures)
            return {"timings": {}, "speedup": {}, "notes": [],
                    "error": f"fresh process: {type(exc).__name__}: {exc}"}


def _add_roofline(result: dict, case: Case, shape: tuple, bandwidth_gbps: float) -> None:
    """Best peer, GB/s and % of the memory roofline of one state's result, in place."""
    peers = {p: s for p, s in result["speedup"].items() if p in PEERS and s is not None}
    best = min(peers, key=peers.get) if peers else None
    result["best_peer"] = best
    result["speedup_vs_best_peer"] = peers.get(best)
    nbytes = roofline_bytes(case, shape)
    fused = result["timings"].get("fusedgrad")
    result["roofline_s"] = nbytes / (bandwidth_gbps * 1e9) if nbytes else None
    if fused and nbytes:
        result["GBps"] = nbytes / fused["median_s"] / 1e9
        result["roofline_pct"] = 100.0 * result["roofline_s"] / fused["median_s"]
    else:
        result["GBps"] = result["roofline_pct"] = None


def case_summary(result: dict) -> str:
    """One progress line for a measured case: each implementation's median time, fusedgrad's
    paired speed-up over it and its first call's seconds. Printed as each case ends, so that a
    run stopped early (a lent GPU's time limit) still leaves the cases it finished."""
    parts = []
    for impl, timing in result["timings"].items():
        speedup = result["speedup"].get(impl)
        ratio = f" ({speedup:.2f}x)" if speedup is not None else ""
        first = result.get("warmup_s", {}).get(impl)
        warm = f" [first call {first:.1f} s]" if first is not None else ""
        parts.append(f"{LABELS.get(impl, impl)} {timing['median_s'] * 1e3:.3f} ms{ratio}{warm}")
    if "error" in result:
        parts.append(f"error: {result['error'][:200]}")
    return "  " + "; ".join(parts)


def measure_state(cases: list, device: Device, quick: bool, settings: Settings, *,
                  skip=(), progress=sys.stderr) -> dict:
    """Bandwidth and every case in this process's allocator state.

    Returns ``{"state": name, "bandwidth": {"GBps": best, "best_probe": name, "probes":
    [{"probe", "when", "GBps", "roofline"}, ...]}, "results": [one :func:`run_case` result
    per case, with best peer, GB/s and % roofline]}``; interrupted (SIGINT), the results of
    the first cases only. The probes run before and after the
    cases and the best one that counts for the roofline sets it: a busy moment lowers a probe,
    never raises it.
    """
    state = allocator_state() if device.name == "cpu" else "device"
    label = f" ({STATE_LABELS[state]})" if state in STATE_LABELS else ""
    probes = [dict(p, when="before") for p in measure_bandwidth(device.name, quick, settings)]
    results = []
    try:
        for case in cases:
            print(f"running {case.name} {'x'.join(map(str, case.shape(quick)))}{label} ...",
                  file=progress, flush=True)
            if case.op == "model" and device.name == "cpu":
                results.append(run_case_in_fresh_process(case, device.name, quick, settings,
                                                         skip))
            else:
                results.append(run_case(case, device, quick, settings, skip))
            print(case_summary(results[-1]), file=progress, flush=True)
    except KeyboardInterrupt:
        # SIGINT: Ctrl-C, or a time limit (gpu_check.sh stops the bench with ``timeout -s
        # INT`` when a lent GPU's minutes run out): report the cases measured so far.
        print(f"interrupted: reporting the {len(results)} of {len(cases)} cases measured",
              file=progress, flush=True)
    probes += [dict(p, when="after") for p in measure_bandwidth(device.name, quick, settings)]
    best = max((p for p in probes if p["roofline"]), key=lambda p: p["GBps"])
    for case, result in zip(cases, results):
        _add_roofline(result, case, case.shape(quick), best["GBps"])
    return {"state": state,
            "bandwidth": {"GBps": best["GBps"], "best_probe": best["probe"], "probes": probes},
            "results": results}


def measure_state_in_child(state: str, cases: list, quick: bool, *, progress=sys.stderr) -> dict:
    """:func:`measure_state` on the CPU in a new process started in allocator ``state`` (glibc
    reads its settings at process start), with this process's thread count; the NumPy
    reference is not timed again there. Its progress lines are passed on to ``progress``."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "state.json")
        command = [sys.executable, "-c", _CHILD_COMMAND, "--json", path,
                   "--cases", ",".join(c.name for c in cases),
                   "--threads", str(numba.get_num_threads())] + (["--quick"] if quick else [])
        with subprocess.Popen(command, env=environment_for(state), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) as child:
            tail = []
            for line in child.stderr:
                progress.write(line)
                progress.flush()
                tail = (tail + [line])[-20:]
        if child.returncode != 0:
            raise RuntimeError(f"the {STATE_LABELS[state]} run failed (exit "
                               f"{child.returncode}):\n{''.join(tail)}")
        with open(path) as f:
            return json.load(f)


#: The child's program: :func:`child_main` with the command line's arguments. (Not
#: ``python -m fusedgrad._bench``: the cases' classes would then live in ``__main__``, which
#: the model case's spawned process could not import.)
_CHILD_COMMAND = ("import sys; from fusedgrad._bench import child_main; "
                  "sys.exit(child_main(sys.argv[1:]))")


def child_main(argv) -> int:
    """One allocator state's measurements as JSON (the program of
    :func:`measure_state_in_child`)."""
    parser = argparse.ArgumentParser(prog="fusedgrad._bench.child_main")
    parser.add_argument("--json", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    numba.set_num_threads(args.threads)
    device = Device("cpu")
    match_torch_threads(device.torch)
    settings = QUICK_SETTINGS if args.quick else FULL_SETTINGS
    cases = select_cases("cpu", args.cases.split(","))
    measured = measure_state(cases, device, args.quick, settings, skip=("reference",))
    with open(args.json, "w") as f:
        json.dump(measured, f)
    return 0


# --------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------
def _case_record(case: Case, quick: bool, device: Device, states: dict) -> dict:
    """One case's record: what it is, its roofline and working set, and each state's result."""
    shape = case.shape(quick)
    notes = []
    for result in states.values():
        notes += [n for n in result["notes"] if n not in notes]
    missing = device.missing_peers(case.op)
    notes += [f"{peer} not compared: {why}" for peer, why in missing.items()
              if f"{peer} not compared: {why}" not in notes]
    if device.name != "cpu" and case.op not in ("model", "linear_cross_entropy"):
        notes.append("NumPy reference not timed: it runs on the CPU only")
    if case.op == "linear_cross_entropy":
        n, d, classes = shape
        flops = 6 * n * d * classes
        notes.append(f"three matrix products of {flops / 3e9:.0f} GFLOP each, no roofline; "
                     "fusedgrad is fusedgrad.torch.linear_cross_entropy, peers the unfused "
                     "F.cross_entropy(x @ W.T, t) (eager, compiled, JAX), PyTorch's chunked "
                     "F.linear_cross_entropy and, on the GPU, Liger-Kernel's fused linear "
                     "cross-entropy")
        for state, result in states.items():
            fused = result["timings"].get("fusedgrad")
            if fused:
                notes.append(f"fusedgrad at {flops / fused['median_s'] / 1e9:.0f} GFLOP/s "
                             f"({STATE_LABELS.get(state, state)})")
    return {"case": case.name, "op": case.op, "layout": case.layout, "shape": list(shape),
            "dtype": case.dtype, "device": device.name, "bytes": roofline_bytes(case, shape),
            "working_set_bytes": working_set_bytes(case, shape), "notes": notes,
            "states": states}


def run(device_name: str, *, quick: bool = False, case_names=None, allocator: str = "both",
        out=sys.stdout, progress=sys.stderr) -> dict:
    """Run the benchmark, print progress lines to ``progress`` and the tables to ``out``.

    ``allocator``: "both" measures the CPU cases in this process's allocator state and in the
    other one (a child process, see the module docstring); "current" only in this one. The GPU
    has one state.

    Returns ``{"machine": {...}, "states": [state, ...], "bandwidth": {state: {"GBps",
    "best_probe", "probes"}}, "copy_bandwidth_GBps": this process's best probe,
    "results": [record, ...]}``; each record has ``case, op, layout, shape, dtype, device,
    bytes, working_set_bytes, notes`` and ``states``: per state ``timings`` (per
    implementation: ``min_s, median_s, repeats, scale, minor_faults_per_call``), ``speedup``
    (per implementation: the median over paired rounds of its time / fusedgrad's),
    ``best_peer, speedup_vs_best_peer, roofline_s, GBps, roofline_pct``, ``fused_op_share``
    for the model case and ``error`` when the case failed there.
    """
    cases = select_cases(device_name, case_names)
    settings = QUICK_SETTINGS if quick else DEVICE_SETTINGS if device_name == "cuda" \
        else FULL_SETTINGS
    from fusedgrad._device import simulator_enabled
    if device_name == "cuda" and simulator_enabled():
        # The simulator runs a Python thread per GPU thread: its times say nothing about a
        # GPU, so one timed call per implementation checks that the path works.
        settings = SIMULATOR_SETTINGS
    device = Device(device_name)
    match_torch_threads(device.torch)
    machine = machine_info(device_name)
    print(machine_header(machine), file=out, flush=True)
    if not case_names and device.torch_device is None:
        # PyTorch is optional: without it the default run skips the model-level case (naming
        # that case explicitly still reports the missing dependency as a failure).
        skipped = [c.name for c in cases if c.op == "model"]
        cases = [c for c in cases if c.op != "model"]
        if skipped:
            print(f"skipping {', '.join(skipped)}: the model-level case needs PyTorch"
                  + (" with CUDA" if device_name == "cuda" else " (pip install torch)"),
                  file=out, flush=True)
    measured = [measure_state(cases, device, quick, settings, progress=progress)]
    interrupted = len(measured[0]["results"]) < len(cases)
    cases = cases[:len(measured[0]["results"])]
    if allocator == "both" and device_name == "cpu" and not interrupted:
        other = next(s for s in STATES if s != measured[0]["state"])
        measured.append(measure_state_in_child(other, cases, quick, progress=progress))
    results = [_case_record(case, quick, device,
                            {m["state"]: m["results"][i] for m in measured})
               for i, case in enumerate(cases)]
    report = {"machine": machine, "states": [m["state"] for m in measured],
              "state_labels": {m["state"]: STATE_LABELS.get(m["state"], m["state"])
                               for m in measured},
              "state_environments": {s: STATE_ENVIRONMENTS[s] for s in STATE_ENVIRONMENTS
                                     if s in [m["state"] for m in measured]},
              "bandwidth": {m["state"]: m["bandwidth"] for m in measured},
              "copy_bandwidth_GBps": measured[0]["bandwidth"]["GBps"], "results": results,
              "interrupted": interrupted}
    Table(out).render(report)
    return report


def machine_header(machine: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    gpu = machine["gpu"]["name"] or "none"
    cache = machine["last_level_cache_bytes"]
    cache = f", last-level cache {cache / 2**20:.0f} MiB" if cache else ""
    header = (f"fusedgrad benchmark, {machine['date']}\n"
              f"device: {machine['device']}; cpu: {machine['cpu']} ({machine['cpu_count']} "
              f"cores{cache}); numba threads: {machine['numba_threads']} "
              f"({machine['threading_layer']}); gpu: {gpu}\n{versions}")
    if machine.get("numpy_blas"):
        header += f"\nNumPy's BLAS: {machine['numpy_blas']}"
    if machine.get("OPENBLAS_CORETYPE"):
        header += (f"\nwarning: OPENBLAS_CORETYPE={machine['OPENBLAS_CORETYPE']} chooses "
                   "OpenBLAS's kernels instead of those for this CPU: linear + cross-entropy's "
                   "products run at those kernels' speed")
    load = machine["load_average_1min"]
    if load is not None and load > 0.5 * machine["cpu_count"]:
        header += (f"\nwarning: load average {load:.1f} on {machine['cpu_count']} cores before "
                   "the run: other processes compete for the CPU, timings will be noisy")
    return header
