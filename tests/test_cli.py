"""The command line (``python -m fusedgrad {bench,demo,info}``) and the benchmark engine."""
from __future__ import annotations

import io
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time
import types

import numba
import numpy as np
import pytest

import background
import fusedgrad
from fusedgrad import _bench, _bench_peers, _bench_report
from fusedgrad.__main__ import main

SMOKE_CASES = ["ce_small", "bn_small", "model_small"]
RECORD_FIELDS = {"case", "op", "layout", "shape", "dtype", "device", "bytes",
                 "working_set_bytes", "notes", "states"}
STATE_FIELDS = {"timings", "speedup", "notes", "best_peer", "speedup_vs_best_peer",
                "roofline_s", "GBps", "roofline_pct"}


def run_cli(*args, env=None, timeout=120):
    """Run ``python -m fusedgrad ARGS`` in a fresh process (its own threads, nothing leaks)."""
    return subprocess.run([sys.executable, "-m", "fusedgrad", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def field(output: str, name: str) -> str:
    """The value printed after ``name:`` by ``info``."""
    for line in output.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name!r} line in:\n{output}")


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------
def test_info_prints_versions_threads_layer_gpu_and_cache(tmp_path):
    cache = tmp_path / "kernel_cache"
    result = run_cli("info", env={"NUMBA_CACHE_DIR": str(cache), "NUMBA_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert field(out, "fusedgrad") == fusedgrad.__version__
    assert field(out, "numpy") == __import__("numpy").__version__
    assert field(out, "numba") == numba.__version__
    for name in ("python", "llvmlite", "numba-cuda", "torch"):
        assert field(out, name)
    assert field(out, "threads").startswith("2 ")
    assert "NUMBA_NUM_THREADS=2" in field(out, "threads")
    assert field(out, "threading layer") in {"tbb", "omp", "workqueue"}
    assert field(out, "cuda available") in {"yes", "no"}
    assert field(out, "gpu")
    assert field(out, "cache directory").startswith(str(cache))


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------
#: One quick run of the smoke cases on the CPU with --json and --plot, in both allocator states,
#: in this run's own state (glibc's default); read by the tests marked with it.
QUICK_BENCH = background.Run(
    "bench-quick",
    lambda folder: [sys.executable, "-m", "fusedgrad", "bench", "--quick", "--device", "cpu",
                    "--cases", ",".join(SMOKE_CASES), "--json", f"{folder}/report.json",
                    "--plot", f"{folder}/speedups.png"],
    env=_bench.environment_for("default"), timeout=900)


@pytest.fixture
def quick_report():
    folder = pathlib.Path(QUICK_BENCH.folder)
    return QUICK_BENCH.result(), folder / "report.json", folder / "speedups.png"


@QUICK_BENCH.mark
def test_bench_quick_runs_and_prints_aligned_tables(quick_report):
    result, _, _ = quick_report
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    for state in ("glibc default", "freed memory kept"):
        assert any(line.startswith(f"memory bandwidth, {state}: ") and "GB/s" in line
                   for line in lines)
    headers = [i for i, line in enumerate(lines) if line.startswith("case ")]
    assert len(headers) == 2  # speed-ups, then times
    for header in headers:
        table = lines[header:header + 2 + len(SMOKE_CASES)]
        assert [row.split()[0] for row in table[2:]] == SMOKE_CASES
        # Every row, like the header, ends with the right-aligned last column: same length.
        assert len({len(row) for row in table}) == 1, "\n".join(table)
    speedups = lines[headers[0]]
    for column in ("fusedgrad ms", "PyTorch eager", "torch.compile", "vs best peer", "% roof"):
        assert column in speedups
    for case in SMOKE_CASES:
        assert f"running {case}" in result.stderr
        assert result.stderr.count(f"running {case} ") == 2  # once per allocator state


@QUICK_BENCH.mark
def test_bench_json_has_both_allocator_states_every_peer_and_the_roofline(quick_report):
    result, json_path, _ = quick_report
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(json_path.read_text())
    assert set(report) == {"machine", "states", "state_labels", "state_environments",
                           "bandwidth", "copy_bandwidth_GBps", "results", "interrupted"}
    assert report["states"] == ["default", "no_faults"] and report["interrupted"] is False
    machine = report["machine"]
    assert machine["numba_threads"] >= 1 and machine["versions"]["numba"] == numba.__version__
    for state in report["states"]:
        bandwidth = report["bandwidth"][state]
        probes = bandwidth["probes"]
        assert sorted(p["probe"] for p in probes) == sorted(
            2 * [p.name for p in _bench.HOST_PROBES])
        assert bandwidth["GBps"] == max(p["GBps"] for p in probes if p["roofline"]) > 0
        assert [p["roofline"] for p in probes if p["probe"] == "parallel memcpy"] == [False] * 2
    assert report["copy_bandwidth_GBps"] == report["bandwidth"]["default"]["GBps"]
    assert [r["case"] for r in report["results"]] == SMOKE_CASES
    torch_installed = _bench_peers.import_torch() is not None
    for record in report["results"]:
        assert RECORD_FIELDS <= set(record), record
        assert record["device"] == "cpu"
        assert set(record["states"]) == {"default", "no_faults"}
        for state, outcome in record["states"].items():
            assert "error" not in outcome, outcome["error"]
            assert STATE_FIELDS <= set(outcome), outcome
            fused = outcome["timings"]["fusedgrad"]
            assert 0 < fused["min_s"] <= fused["median_s"]
            assert fused["repeats"] >= _bench.QUICK_SETTINGS.repeats
            assert fused["minor_faults_per_call"] >= 0
            peers = {p: x for p, x in outcome["speedup"].items() if p in _bench_peers.PEERS}
            if torch_installed:
                assert "torch" in peers
            if peers:
                assert outcome["speedup_vs_best_peer"] == min(peers.values())
                assert peers[outcome["best_peer"]] == outcome["speedup_vs_best_peer"]
            # The NumPy reference is timed once, in this process's state.
            assert ("reference" in outcome["timings"]) == (
                state == "default" and record["op"] != "model")
    ce, bn, model = report["results"]
    assert ce["bytes"] == 2 * 8 * 40 * 4 and bn["bytes"] == 5 * 2 * 4 * 3 * 3 * 4
    assert ce["working_set_bytes"] == 2 * 8 * 40 * 4 and bn["working_set_bytes"] == 4 * 72 * 4
    for state, outcome in ce["states"].items():
        assert outcome["roofline_pct"] == pytest.approx(
            100 * ce["bytes"] / (report["bandwidth"][state]["GBps"] * 1e9)
            / outcome["timings"]["fusedgrad"]["median_s"])
    if torch_installed:
        assert "torch_compile" in ce["states"]["default"]["speedup"]
    if _bench_peers.import_jax() is None:
        assert "jax not compared: JAX not installed (pip install jax)" in ce["notes"]
    assert model["bytes"] is None
    if torch_installed:
        for outcome in model["states"].values():
            assert set(outcome["timings"]) == {"fusedgrad", "torch"}
            assert outcome["speedup"]["torch"] > 0
            assert all(0 < share < 1 for share in outcome["fused_op_share"].values())
        assert "model_small (glibc default, fresh process): step" in result.stdout
        assert "model_small (freed memory kept, fresh process): step" in result.stdout


@QUICK_BENCH.mark
def test_bench_plot_is_a_png(quick_report):
    result, _, png_path = quick_report
    assert result.returncode == 0, result.stdout + result.stderr
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--device", "gpu"], "invalid choice"),
    (["bench", "--cases", "no_such_case"], "unknown case(s) no_such_case"),
    (["bench", "--cases", ","], "expected one or more case names"),
    (["bench", "--json", "/no/such/folder/report.json"], "does not exist"),
    (["bench", "--plot", "/no/such/folder/plot.png"], "does not exist"),
    (["bench", "--allocator", "jemalloc"], "invalid choice"),
    (["bench", "--repeats", "3"], "unrecognized arguments"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_json_to_a_directory_exits_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--json", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.skipif(fusedgrad.cuda_available(), reason="a GPU (or the simulator) is available")
def test_bench_on_cuda_without_a_gpu_exits_1(capsys):
    assert main(["bench", "--device", "cuda", "--cases", "ce_small"]) == 1
    assert "no usable CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_list_cases_names_every_case_of_the_device(capsys, device):
    assert main(["bench", "--device", device, "--list-cases"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == [case.name for case in _bench.cases_for(device)]


def test_demo_arguments_are_forwarded(monkeypatch):
    seen = []
    fake_demo = types.ModuleType("fusedgrad.demo")
    fake_demo.main = lambda argv: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "fusedgrad.demo", fake_demo)
    assert main(["demo", "--plot", "curves.png", "--epochs", "3"]) == 7
    assert seen == [["--plot", "curves.png", "--epochs", "3"]]


# --------------------------------------------------------------------------------------------
# The engine's pieces
# --------------------------------------------------------------------------------------------
def test_roofline_bytes_count_the_passes_the_issues_define():
    by_name = {case.name: case for case in _bench.CPU_CASES}
    ce, bn, bn_eval = by_name["ce_vocab128k"], by_name["bn_nchw"], by_name["bn_eval_nchw"]
    assert _bench.roofline_bytes(ce, (1024, 128256)) == 2 * 1024 * 128256 * 4
    assert _bench.roofline_bytes(bn, (64, 256, 28, 28)) == 5 * 64 * 256 * 28 * 28 * 4
    assert _bench.roofline_bytes(bn_eval, (64, 256, 28, 28)) == 2 * 64 * 256 * 28 * 28 * 4
    assert _bench.roofline_bytes(by_name["model_cnn"], (64, 3, 32, 32)) is None
    # x, y, dy and dx: four input-sized arrays in training; x and y in eval.
    assert _bench.working_set_bytes(bn, (64, 256, 28, 28)) == 4 * 64 * 256 * 28 * 28 * 4
    assert _bench.working_set_bytes(bn_eval, (64, 256, 28, 28)) == 2 * 64 * 256 * 28 * 28 * 4


def test_allocator_states_and_their_environments():
    base = {"PATH": "/bin", "MALLOC_MMAP_MAX_": "0"}
    assert _bench.allocator_state(base) == "default"  # one of the two settings is not enough
    no_faults = _bench.environment_for("no_faults", base)
    assert _bench.allocator_state(no_faults) == "no_faults"
    assert no_faults["PATH"] == "/bin"
    default = _bench.environment_for("default", no_faults)
    assert _bench.allocator_state(default) == "default"
    assert not set(_bench.NO_FAULT_ENV) & set(default)


def test_bandwidth_probes_count_read_and_written_bytes():
    settings = _bench.Settings(repeats=1, min_seconds=0.0, max_repeats=1)
    measured = _bench.host_bandwidth(1 << 20, settings)
    assert set(measured) == {p.name for p in _bench.HOST_PROBES}
    assert all(v > 0 for v in measured.values())
    dst, a, b = (np.full(5, v, np.float32) for v in (0.0, 1.0, 2.0))
    _bench._parallel_triad(dst, a, b, np.float32(1.5))
    np.testing.assert_array_equal(dst, 4.0)
    roofline = {p.name for p in _bench.HOST_PROBES if p.roofline}
    assert roofline == {"numpy copyto", "parallel scale"}  # the copies, one read per write
    cache = _bench.last_level_cache_bytes()
    assert cache is None or cache > 0
    assert _bench.probe_buffer_bytes(False) >= max(_bench.HOST_COPY_BYTES, 2 * (cache or 0))


def test_fuse_relu_model_case_converts_with_fused_relus():
    torch = pytest.importorskip("torch")
    import fusedgrad.torch as fgt
    by_name = {case.name: case for case in _bench.CPU_CASES}
    assert by_name["model_cnn_fuse_relu"].fuse_relu and not by_name["model_cnn"].fuse_relu
    rng = np.random.default_rng(0)
    for fuse_relu, expected in ((False, fgt.BatchNorm2d), (True, fgt.BatchNormReLU2d)):
        (baseline, _), (converted, _), x, _ = _bench_peers.model_pair(torch, (2, 3, 8, 8), "cpu",
                                                                      rng, fuse_relu)
        norms = [type(m) for m in converted.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert norms == [expected] * 3
        torch.testing.assert_close(converted(x), baseline(x), rtol=1e-5, atol=1e-5)


def test_issue_shapes_are_the_full_size_cases():
    shapes = {case.name: case.shape(quick=False) for case in _bench.standard_cases(
        "cpu", "cross_entropy", "batch_norm_train", "batch_norm_eval")}
    assert shapes == {
        "ce_vocab128k": (1024, 128256), "ce_vocab32k": (4096, 32000),
        "ce_classes1k": (8192, 1000), "ce_classes10": (65536, 10),
        "bn_nchw": (64, 256, 28, 28), "bn_many_channels": (32, 2048, 7, 7),
        "bn_nc": (4096, 1024), "bn_nhwc": (64, 28, 28, 256), "bn_eval_nchw": (64, 256, 28, 28)}


def test_time_callable_warms_up_then_repeats_until_enough_time():
    calls = []
    settings = _bench.Settings(repeats=4, min_seconds=0.0, max_repeats=10)
    timing = _bench.time_callable(lambda: calls.append(1), settings)
    assert len(calls) == 1 + 2 * 4 and timing.repeats == 4  # warm-up, then untimed + timed
    assert 0 <= timing.min_s <= timing.median_s
    calls.clear()
    capped = _bench.Settings(repeats=2, min_seconds=60.0, max_repeats=6)
    assert _bench.time_callable(lambda: calls.append(1), capped).repeats == 6


def test_time_interleaved_alternates_until_each_has_enough():
    calls = []
    settings = _bench.Settings(repeats=3, min_seconds=0.0, max_repeats=10)

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    timings = _bench.time_interleaved({"slow": slow, "fast": lambda: calls.append("fast")},
                                      settings)
    # A warm-up round, then three rounds in which each runs untimed, then timed.
    assert calls == ["slow", "fast"] + ["slow", "slow", "fast", "fast"] * 3
    assert timings["slow"].min_s >= 0.002 > timings["fast"].median_s
    calls.clear()
    by_time = _bench.Settings(repeats=1, min_seconds=0.01, max_repeats=50)
    timings = _bench.time_interleaved({"slow": slow, "fast": lambda: calls.append("fast")},
                                      by_time)
    # The slow one stops after about 5 calls (0.01 s); the fast one runs on to max_repeats.
    assert timings["slow"].repeats < 10 and timings["fast"].repeats == 50
    assert calls[:6] == ["slow", "fast", "slow", "slow", "fast", "fast"]


def test_each_timed_call_follows_untimed_calls_for_the_settle_time(monkeypatch):
    # A simulated clock in which every call takes exactly 3 ms: the counts below follow from the
    # settle logic alone, not from how the machine schedules sleeps (a loaded CI runner once
    # slept long enough to cut a run to 4 calls).
    clock = [0.0]
    monkeypatch.setattr(_bench, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []
    settings = _bench.Settings(repeats=2, min_seconds=0.0, max_repeats=2, settle_seconds=0.01)

    def tick(name):
        calls.append(name)
        clock[0] += 0.003

    timings = _bench.time_interleaved({"a": lambda: tick("a"), "b": lambda: tick("b")},
                                      settings)
    assert timings["a"].repeats == timings["b"].repeats == 2
    assert timings["a"].samples == pytest.approx([0.003, 0.003])
    assert timings["b"].samples == pytest.approx([0.003, 0.003])
    # Per round and implementation: untimed calls until 0.01 s have passed (4 of 3 ms), then the
    # timed one, in runs that never mix the implementations.
    runs = [(name, len(list(group))) for name, group in itertools.groupby(calls[2:])]
    assert calls[:2] == ["a", "b"] and runs == [("a", 5), ("b", 5), ("a", 5), ("b", 5)]


def test_header_names_numpys_blas_kernels_and_warns_when_they_are_forced(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    machine = _bench.machine_info()
    header = _bench.machine_header(machine)
    assert machine["OPENBLAS_CORETYPE"] == "Haswell"
    assert "warning: OPENBLAS_CORETYPE=Haswell" in header
    # threadpoolctl (a dependency of scikit-learn, in the test extra) reads the loaded BLAS
    assert machine["numpy_blas"] and f"NumPy's BLAS: {machine['numpy_blas']}" in header
    monkeypatch.delenv("OPENBLAS_CORETYPE")
    assert "OPENBLAS_CORETYPE" not in _bench.machine_header(_bench.machine_info())


def test_paired_speedup_is_the_median_of_per_round_ratios():
    torch_timing = _bench.Timing(1.0, 2.0, 4, [2.0, 4.0, 1.0, 9.0])
    fused = _bench.Timing(1.0, 1.0, 3, [1.0, 1.0, 2.0])
    # Rounds 1-3 only (fusedgrad stopped earlier): ratios 2, 4, 0.5 -> median 2.
    assert _bench.paired_speedup(torch_timing, fused) == 2.0
    assert _bench.paired_speedup(torch_timing, fused, scale=3.0) == 6.0  # a row subset, scaled
    assert _bench.paired_speedup(torch_timing, _bench.Timing(1.0, 1.0, 0, [])) is None


def test_a_peer_whose_first_call_fails_is_dropped_with_a_note():
    def broken():
        raise RuntimeError("no compiler\nsecond line")

    runners = [_bench_peers.Runner("fusedgrad", lambda: None),
               _bench_peers.Runner("torch_compile", broken)]
    working, notes = _bench._warm_up(runners, lambda: None)
    assert [r.impl for r in working] == ["fusedgrad"]
    assert notes == ["torch_compile not timed: its first call failed (RuntimeError: no compiler)"]
    with pytest.raises(RuntimeError):  # fusedgrad itself failing is the case's error
        _bench._warm_up([_bench_peers.Runner("fusedgrad", broken)], lambda: None)


def test_warm_up_records_each_first_call_and_the_progress_line_shows_it():
    seconds = {}
    runners = [_bench_peers.Runner("fusedgrad", lambda: time.sleep(0.01)),
               _bench_peers.Runner("torch", lambda: None)]
    _bench._warm_up(runners, lambda: None, seconds)
    assert seconds["fusedgrad"] >= 0.01 and seconds["torch"] < seconds["fusedgrad"]
    result = {"timings": {"fusedgrad": {"median_s": 0.002}, "torch": {"median_s": 0.005}},
              "speedup": {"torch": 2.5}, "notes": [], "warmup_s": {"fusedgrad": 12.0}}
    line = _bench.case_summary(result)
    assert line == ("  fusedgrad 2.000 ms [first call 12.0 s]; PyTorch eager 5.000 ms (2.50x)")
    failed = {"timings": {}, "speedup": {}, "notes": [], "error": "fresh process: boom"}
    assert _bench.case_summary(failed) == "  error: fresh process: boom"


def test_timed_calls_count_the_pages_they_touch_for_the_first_time():
    import mmap
    pages = 64

    def touch_new_pages():
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as fresh:  # anonymous: no page mapped yet
            for offset in range(0, pages * mmap.PAGESIZE, mmap.PAGESIZE):
                fresh[offset] = 1

    settings = _bench.Settings(repeats=3, min_seconds=0.0, max_repeats=3)
    timings = _bench.time_interleaved({"touch": touch_new_pages, "idle": lambda: None},
                                      settings)
    assert timings["touch"].faults >= pages
    assert timings["idle"].faults < pages


def test_reference_runs_on_a_row_subset_only_above_the_budget():
    small = _bench_peers.reference_runner((64, 100), lambda rows: rows)
    assert small.scale == 1.0 and small.note == "" and small.fn() == 64
    budget_rows = _bench_peers.REFERENCE_ELEMENT_BUDGET // 128256
    big = _bench_peers.reference_runner((1024, 128256), lambda rows: rows)
    assert big.fn() == budget_rows and big.scale == 1024 / budget_rows
    assert f"{budget_rows} of 1024 rows" in big.note


def test_select_cases_defaults_to_the_standard_cases():
    assert _bench.select_cases("cpu") == [c for c in _bench.CPU_CASES if c.default]
    assert [c.name for c in _bench.select_cases("cuda", ["ce_small"])] == ["ce_small"]
    with pytest.raises(ValueError, match="unknown case"):
        _bench.select_cases("cpu", ["ce_vocab64k_f16"])


def _synthetic_report(roofline_pct, working_set, cache):
    outcome = {"timings": {"fusedgrad": {"min_s": 1e-3, "median_s": 1e-3, "repeats": 7,
                                         "scale": 1.0, "minor_faults_per_call": 0}},
               "speedup": {}, "notes": [], "best_peer": None, "speedup_vs_best_peer": None,
               "roofline_s": 1e-3, "GBps": 10.0, "roofline_pct": roofline_pct}
    return {"machine": {"last_level_cache_bytes": cache}, "states": ["default"],
            "state_labels": {"default": "glibc default"}, "state_environments": {},
            "bandwidth": {"default": {"GBps": 20.0, "best_probe": "parallel scale",
                                      "probes": [{"probe": "parallel scale", "when": "before",
                                                  "GBps": 20.0, "roofline": True}]}},
            "results": [{"case": "bn_x", "op": "batch_norm_train", "layout": "NCHW",
                         "shape": [2, 3], "dtype": "float32", "device": "cpu", "bytes": 10,
                         "working_set_bytes": working_set, "notes": [],
                         "states": {"default": outcome}}]}


@pytest.mark.parametrize("working_set, says", [
    (50 << 20, "fits in the 480 MiB last-level cache"),
    (900 << 20, "is larger than the last-level cache")])
def test_table_says_why_a_case_is_above_the_roofline(working_set, says):
    out = io.StringIO()
    _bench_report.Table(out).render(_synthetic_report(130.0, working_set, 480 << 20))
    assert f"bn_x: above 100% of the roofline: its working set" in out.getvalue()
    assert says in out.getvalue()
    out = io.StringIO()
    _bench_report.Table(out).render(_synthetic_report(90.0, working_set, 480 << 20))
    assert "above 100%" not in out.getvalue()


@pytest.mark.parametrize("after, warns", [(48.3, True), (85.2, False)])
def test_report_warns_when_the_bandwidth_changed_during_the_cases(after, warns):
    report = _synthetic_report(90.0, 1 << 20, 32 << 20)
    probes = report["bandwidth"]["default"]["probes"]
    probes[0]["GBps"] = 88.8
    probes += [{"probe": "parallel scale", "when": "after", "GBps": after, "roofline": True},
               {"probe": "parallel triad", "when": "after", "GBps": 120.0, "roofline": False}]
    out = io.StringIO()
    _bench_report.Table(out).render(report)
    warning = f"warning: the memory bandwidth changed during the cases of glibc default " \
              f"(best copy 88.8 GB/s before, {after:.1f} after)"
    assert (warning in out.getvalue()) == warns
    probes.pop(0)  # no probe before: nothing to compare
    assert _bench_report.bandwidth_shift(probes) is None


#: The CUDA path of the benchmark in the simulator (without a GPU), in a subprocess.
SIMULATED_BENCH = background.Run(
    "bench-simulator",
    lambda folder: [sys.executable, "-m", "fusedgrad", "bench", "--device", "cuda", "--quick",
                    "--cases", "ce_small,bn_small", "--json", f"{folder}/cuda.json"],
    env={"NUMBA_ENABLE_CUDASIM": "1"}, timeout=480)


@pytest.mark.skipif(fusedgrad.cuda_available(), reason="a real GPU runs gpu_check.sh instead")
@SIMULATED_BENCH.mark
def test_bench_cuda_path_runs_in_the_simulator():
    pytest.importorskip("numba.cuda")
    json_path = pathlib.Path(SIMULATED_BENCH.folder) / "cuda.json"
    result = SIMULATED_BENCH.result()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device-to-device copy" in result.stdout
    report = json.loads(json_path.read_text())
    assert report["machine"]["gpu"]["name"].startswith("Numba CUDA simulator")
    assert report["states"] == ["device"]
    for record in report["results"]:
        outcome = record["states"]["device"]
        assert record["device"] == "cuda" and "error" not in outcome
        assert outcome["timings"]["fusedgrad"]["min_s"] > 0
        assert "reference" not in outcome["timings"] and "jax" not in outcome["timings"]
        assert "NumPy reference not timed: it runs on the CPU only" in record["notes"]


def test_default_run_without_torch_skips_the_model_case(monkeypatch):
    """PyTorch is optional for ``bench``: the default run then skips the model-level case and
    succeeds, instead of reporting it as a failure."""
    smoke = [c for c in _bench.cases_for("cpu") if c.name in ("ce_small", "model_small")]
    monkeypatch.setattr(_bench_peers, "import_torch", lambda: None)
    monkeypatch.setattr(_bench, "select_cases", lambda device, names=None: smoke)
    out = io.StringIO()
    report = _bench.run("cpu", quick=True, allocator="current", out=out, progress=io.StringIO())
    assert [r["case"] for r in report["results"]] == ["ce_small"]
    (outcome,) = report["results"][0]["states"].values()
    assert "error" not in outcome and "torch" not in outcome["timings"]
    assert "torch not compared: PyTorch not installed" in report["results"][0]["notes"]
    assert "skipping model_small: the model-level case needs PyTorch" in out.getvalue()


def test_an_interrupted_run_reports_the_cases_it_finished(monkeypatch):
    """SIGINT (gpu_check.sh's time limit) between cases: the tables and the report cover the
    cases measured so far, the other allocator state is not started, and the report says so."""
    smoke = [c for c in _bench.cases_for("cpu") if c.name in ("ce_small", "bn_small")]
    monkeypatch.setattr(_bench, "select_cases", lambda device, names=None: smoke)
    measured = _bench.run_case

    def interrupt_the_second(case, *args, **kwargs):
        if case.name == "bn_small":
            raise KeyboardInterrupt
        return measured(case, *args, **kwargs)

    monkeypatch.setattr(_bench, "run_case", interrupt_the_second)
    out, progress = io.StringIO(), io.StringIO()
    report = _bench.run("cpu", quick=True, allocator="both", out=out, progress=progress)
    assert report["interrupted"] and len(report["states"]) == 1
    assert [r["case"] for r in report["results"]] == ["ce_small"]
    assert "interrupted: reporting the 1 of 2 cases measured" in progress.getvalue()
    assert "ce_small" in out.getvalue() and "bn_small" not in out.getvalue()


def test_liger_peer_gets_its_own_copy_of_the_logits():
    """Liger-Kernel's cross-entropy writes its gradient over its input, and on the GPU every
    implementation shares one logits tensor: the Liger runner must work on a copy. Checked on
    the CPU with a stand-in module that overwrites its input the same way."""
    torch = pytest.importorskip("torch")

    class OverwritingCrossEntropy(torch.nn.Module):
        def forward(self, logits, target):
            loss = torch.nn.functional.cross_entropy(logits, target)
            logits.data.zero_()  # where Liger's kernel stores the gradient
            return loss

    device = _bench_peers.Device("cpu")
    device.liger = types.SimpleNamespace(LigerCrossEntropyLoss=OverwritingCrossEntropy)
    case = _bench.select_cases("cpu", ["ce_small"])[0]
    runners = {r.impl: r for r in _bench_peers.build_runners(case, device, quick=True)}
    loss_before, _ = runners["fusedgrad"].fn()
    runners["liger"].fn()
    runners["liger"].fn()
    loss_after, _ = runners["fusedgrad"].fn()
    assert float(loss_before) != pytest.approx(np.log(case.shape(True)[1]))  # not all zeros
    assert float(loss_before) == float(loss_after)


def test_gpu_peers_missing_without_a_gpu_say_why():
    """Without CUDA the GPU-only peer is reported missing with PyTorch's reason, for the
    operations Liger-Kernel covers, and not mentioned for the others."""
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    device = _bench_peers.Device("cuda")
    assert device.liger is None
    for op in _bench_peers.LIGER_OPS:
        assert device.missing_peers(op)["liger"] == "this PyTorch build has no CUDA"
    assert "liger" not in device.missing_peers("batch_norm_train")
