"""pytest-benchmark suite: ``pytest bench --benchmark-only``.

Each case is timed for every implementation (fusedgrad, PyTorch eager, torch.compile, JAX jit
when installed, the float64 NumPy reference) on identical inputs built by
``fusedgrad._bench_peers`` (as for ``python -m fusedgrad bench``); the implementations of one
case share a benchmark group, so pytest-benchmark's table compares them side by side. PyTorch
runs with as many threads as Numba.

``FUSEDGRAD_BENCH_QUICK=1`` uses the smaller ``--quick`` shapes. Where the full input would take
the float64 reference too long, its benchmark is skipped (``python -m fusedgrad bench`` times it
on a row subset instead and says so).
"""
from __future__ import annotations

import os

import pytest

from fusedgrad import _bench, _bench_peers

QUICK = os.environ.get("FUSEDGRAD_BENCH_QUICK", "0") not in ("", "0")


@pytest.fixture(scope="session")
def device():
    """The CPU, with PyTorch's thread count matched to Numba's for the session (restored)."""
    cpu = _bench_peers.Device("cpu")
    previous = cpu.torch.get_num_threads() if cpu.torch is not None else None
    _bench_peers.match_torch_threads(cpu.torch)
    yield cpu
    if previous is not None:
        cpu.torch.set_num_threads(previous)


@pytest.fixture
def bench_case(benchmark, device):
    """Benchmark one implementation of one case after a warm-up call (compilation)."""

    def run(case, impl: str):
        runners = {r.impl: r for r in _bench_peers.build_runners(case, device, QUICK)}
        if impl not in runners:
            why = device.missing_peers(case.op).get(impl, "not available here")
            pytest.skip(f"{impl}: {why}")
        runner = runners[impl]
        if runner.scale != 1.0:
            pytest.skip("the float64 NumPy reference is too slow at this size; "
                        "python -m fusedgrad bench times it on a row subset")
        shape = case.shape(QUICK)
        benchmark.group = f"{case.name} {'x'.join(map(str, shape))}"
        benchmark.extra_info.update(op=case.op, layout=case.layout, shape=list(shape),
                                    bytes=_bench.roofline_bytes(case, shape))
        runner.fn()
        benchmark(runner.fn)

    return run
