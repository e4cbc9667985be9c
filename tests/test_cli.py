"""The command line (``python -m fusedgrad {bench,demo,info}``) and the benchmark engine."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import types

import numba
import numpy as np
import pytest

import fusedgrad
from fusedgrad import _bench
from fusedgrad.__main__ import main

SMOKE_CASES = ["ce_small", "bn_small", "model_small"]
RECORD_FIELDS = {"case", "op", "layout", "shape", "dtype", "device", "timings", "notes",
                 "speedup_vs_torch", "speedup_vs_reference", "bytes", "roofline_s", "GBps",
                 "roofline_pct", "speedup_at_roofline"}


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
@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    """One quick run of the smoke cases on the CPU with --json and --plot (shared by tests)."""
    folder = tmp_path_factory.mktemp("bench")
    json_path, png_path = folder / "report.json", folder / "speedups.png"
    result = run_cli("bench", "--quick", "--device", "cpu", "--cases", ",".join(SMOKE_CASES),
                     "--json", str(json_path), "--plot", str(png_path), timeout=240)
    return result, json_path, png_path


def test_bench_quick_runs_and_prints_an_aligned_table(quick_report):
    result, _, _ = quick_report
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("copy bandwidth:") and "GB/s" in line for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("case "))
    table = lines[header:header + 2 + len(SMOKE_CASES)]
    assert [row.split()[0] for row in table[2:]] == SMOKE_CASES
    assert [f"running {case}" in result.stderr for case in SMOKE_CASES] == [True] * 3
    # Every row, like the header, ends with the right-aligned last column: same length.
    assert len({len(row) for row in table}) == 1, "\n".join(table)


def test_bench_json_has_machine_bandwidth_and_result_records(quick_report):
    result, json_path, _ = quick_report
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(json_path.read_text())
    assert set(report) == {"machine", "copy_bandwidth_GBps", "copy_bandwidth_samples_GBps",
                           "results"}
    assert report["copy_bandwidth_GBps"] == max(report["copy_bandwidth_samples_GBps"]) > 0
    machine = report["machine"]
    assert machine["numba_threads"] >= 1 and machine["versions"]["numba"] == numba.__version__
    assert [r["case"] for r in report["results"]] == SMOKE_CASES
    for record in report["results"]:
        assert RECORD_FIELDS <= set(record), record
        assert "error" not in record, record["error"]
        assert record["device"] == "cpu"
        fused = record["timings"]["fusedgrad"]
        assert 0 < fused["min_s"] <= fused["median_s"]
        assert fused["repeats"] >= _bench.QUICK_SETTINGS.repeats
        assert fused["minor_faults_per_call"] >= 0
    ce, bn, model = report["results"]
    assert ce["bytes"] == 2 * 8 * 40 * 4 and bn["bytes"] == 5 * 2 * 4 * 3 * 3 * 4
    assert ce["roofline_pct"] == pytest.approx(
        100 * ce["bytes"] / (report["copy_bandwidth_GBps"] * 1e9) / ce["timings"]["fusedgrad"]
        ["min_s"])
    assert ce["speedup_vs_reference"] == pytest.approx(
        ce["timings"]["reference"]["min_s"] / ce["timings"]["fusedgrad"]["min_s"])
    if "torch" in bn["timings"]:
        assert bn["speedup_at_roofline"] == pytest.approx(
            bn["timings"]["torch"]["min_s"] / bn["roofline_s"])
    assert model["bytes"] is None and model["speedup_vs_reference"] is None
    assert model["speedup_at_roofline"] is None
    if "torch" in model["timings"]:
        assert model["speedup_vs_torch"] > 0 and model["paired_speedup_vs_torch"] > 0
        assert set(model["fused_op_share"]) == {"fusedgrad", "torch"}
        assert all(0 < share < 1 for share in model["fused_op_share"].values())
        # Timed in a fresh process (the headline), then again in the benchmark's own.
        assert model["process"] == "fresh"
        again = model["in_bench_process"]
        assert "error" not in again
        assert set(again["timings"]) == {"fusedgrad", "torch"}
        assert again["speedup_vs_torch"] == pytest.approx(
            again["timings"]["torch"]["min_s"] / again["timings"]["fusedgrad"]["min_s"])
        assert again["paired_speedup_vs_torch"] > 0
        assert all(t["minor_faults_per_call"] >= 0 for t in again["timings"].values())
        assert "model_small in a fresh process: median over" in result.stdout
        assert "model_small in the benchmark process, after the other cases" in result.stdout


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


def test_fuse_relu_model_case_converts_with_fused_relus():
    torch = pytest.importorskip("torch")
    import fusedgrad.torch as fgt
    by_name = {case.name: case for case in _bench.CPU_CASES}
    assert by_name["model_cnn_fuse_relu"].fuse_relu and not by_name["model_cnn"].fuse_relu
    rng = np.random.default_rng(0)
    for fuse_relu, expected in ((False, fgt.BatchNorm2d), (True, fgt.BatchNormReLU2d)):
        (baseline, _), (converted, _), x, _ = _bench._model_pair(torch, (2, 3, 8, 8), "cpu",
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


def test_paired_speedup_is_the_median_of_per_round_ratios():
    torch_timing = _bench.Timing(1.0, 2.0, 4, [2.0, 4.0, 1.0, 9.0])
    fused = _bench.Timing(1.0, 1.0, 3, [1.0, 1.0, 2.0])
    # Rounds 1-3 only (fusedgrad stopped earlier): ratios 2, 4, 0.5 -> median 2.
    assert _bench.paired_speedup(torch_timing, fused) == 2.0
    assert _bench.paired_speedup(torch_timing, _bench.Timing(1.0, 1.0, 0, [])) is None


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
    small = _bench._reference_runner((64, 100), lambda rows: rows)
    assert small.scale == 1.0 and small.note == "" and small.fn() == 64
    budget_rows = _bench.REFERENCE_ELEMENT_BUDGET // 128256
    big = _bench._reference_runner((1024, 128256), lambda rows: rows)
    assert big.fn() == budget_rows and big.scale == 1024 / budget_rows
    assert f"{budget_rows} of 1024 rows" in big.note


def test_select_cases_defaults_to_the_standard_cases():
    assert _bench.select_cases("cpu") == [c for c in _bench.CPU_CASES if c.default]
    assert [c.name for c in _bench.select_cases("cuda", ["ce_small"])] == ["ce_small"]
    with pytest.raises(ValueError, match="unknown case"):
        _bench.select_cases("cpu", ["ce_vocab64k_f16"])


@pytest.mark.skipif(fusedgrad.cuda_available(), reason="a real GPU runs gpu_check.sh instead")
def test_bench_cuda_path_runs_in_the_simulator(tmp_path):
    pytest.importorskip("numba.cuda")
    json_path = tmp_path / "cuda.json"
    result = run_cli("bench", "--device", "cuda", "--quick", "--cases", "ce_small,bn_small",
                     "--json", str(json_path), env={"NUMBA_ENABLE_CUDASIM": "1"}, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "device-to-device copy" in result.stdout
    report = json.loads(json_path.read_text())
    assert report["machine"]["gpu"]["name"].startswith("Numba CUDA simulator")
    for record in report["results"]:
        assert record["device"] == "cuda" and "error" not in record
        assert record["timings"]["fusedgrad"]["min_s"] > 0
        assert "reference" not in record["timings"]
        assert "NumPy reference not timed: it runs on the CPU only" in record["notes"]


def test_default_run_without_torch_skips_the_model_case(monkeypatch):
    """PyTorch is optional for ``bench``: the default run then skips the model-level case and
    succeeds, instead of reporting it as a failure."""
    smoke = [c for c in _bench.cases_for("cpu") if c.name in ("ce_small", "model_small")]
    monkeypatch.setattr(_bench, "import_torch", lambda: None)
    monkeypatch.setattr(_bench, "select_cases", lambda device, names=None: smoke)
    out = io.StringIO()
    report = _bench.run("cpu", quick=True, out=out, progress=io.StringIO())
    assert [r["case"] for r in report["results"]] == ["ce_small"]
    assert "error" not in report["results"][0]
    assert "skipping model_small: the model-level case needs PyTorch" in out.getvalue()
