"""Command line: ``python -m fusedgrad {bench,demo,info}`` (also the ``fusedgrad`` script).

    python -m fusedgrad bench [--quick] [--device auto|cpu|cuda] [--json PATH] [--plot PATH]
                              [--cases NAME[,NAME...]] [--allocator both|current]
    python -m fusedgrad demo [demo options...]   # forwarded to fusedgrad.demo.main
    python -m fusedgrad info

Exit status: 0 on success, 1 when a benchmark case failed, the benchmark was interrupted
(SIGINT: it then reports the cases it finished) or ``--device cuda`` finds no GPU, 2 for bad
arguments (argparse's convention), checked before anything is measured.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from fusedgrad._cli import check_output_path


def _parsers() -> tuple:
    """The top-level parser and the ``bench`` sub-parser (whose errors name it)."""
    parser = argparse.ArgumentParser(
        prog="python -m fusedgrad",
        description="fusedgrad: fused softmax cross-entropy and batch norm kernels.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{bench,demo,info}")

    bench = commands.add_parser(
        "bench", help="time fusedgrad against PyTorch, torch.compile, JAX and NumPy",
        description="Time fusedgrad against every peer installed (PyTorch eager, "
                    "torch.compile, JAX jit) and the float64 NumPy reference, per case: median "
                    "times, the speed-up over each peer and over the best one (median of "
                    "paired rounds), GB/s and the percentage of the memory roofline at the "
                    "bandwidth measured in the same run. On the CPU every case is measured "
                    "with glibc's default allocator settings and with freed memory kept "
                    "(no page faults for new outputs), the second in a child process.")
    bench.add_argument("--quick", action="store_true",
                       help="smaller shapes and fewer repeats (about a minute)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to run: cuda needs a GPU; auto picks cuda when one is usable "
                            "(default: auto)")
    bench.add_argument("--json", metavar="PATH",
                       help="write the machine, the copy bandwidth and one record per case "
                            "(times, speed-ups, GB/s, %% of roofline) as JSON")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of the speed-ups")
    bench.add_argument("--cases", metavar="NAME[,NAME...]", type=_comma_list,
                       help="run only these cases (default: all the device's standard cases); "
                            "the names are listed in the output and by --list-cases")
    bench.add_argument("--list-cases", action="store_true",
                       help="print the case names of the chosen device and exit")
    bench.add_argument("--allocator", choices=("both", "current"), default="both",
                       help="CPU: measure in both allocator states (default), or only in the "
                            "one this process's environment sets")

    commands.add_parser("demo", add_help=False,
                        help="train a small MLP with batch norm on scikit-learn's digits "
                             "(options: python -m fusedgrad demo --help)")
    commands.add_parser("info", help="versions, threads, threading layer, GPU, cache directory")
    return parser, bench


def _comma_list(text: str) -> list:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more case names separated by commas")
    return names


def _run_bench(parser, args) -> int:
    from fusedgrad import _bench
    from fusedgrad._device import cuda_available

    check_output_path(parser, "--json", args.json)
    check_output_path(parser, "--plot", args.plot)
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked now so that no measurement is wasted)
        except ImportError:
            parser.error("--plot needs matplotlib: pip install 'fusedgrad[bench]'")
    from fusedgrad import _bench_report
    device = _bench.resolve_device(args.device)
    if args.list_cases:
        for case in _bench.cases_for(device):
            standard = "" if case.default else "  (smoke case, only with --cases)"
            shape = "x".join(map(str, case.shape(args.quick)))
            print(f"{case.name:<18} {case.op:<17} {case.layout:<5} {shape}{standard}")
        return 0
    try:
        _bench.select_cases(device, args.cases)
    except ValueError as exc:
        parser.error(f"--cases: {exc}")
    if device == "cuda" and not cuda_available():
        print("error: --device cuda: no usable CUDA GPU found (fusedgrad.cuda_available() is "
              "False: no NVIDIA driver/GPU, or numba-cuda is not installed: "
              "pip install 'fusedgrad[cuda]')", file=sys.stderr)
        return 1

    report = _bench.run(device, quick=args.quick, case_names=args.cases,
                        allocator=args.allocator)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        _bench_report.write_plot(report, args.plot)
        print(f"wrote {args.plot}")
    failed = [r["case"] for r in report["results"]
              if any("error" in result for result in r["states"].values())]
    if failed:
        print(f"error: {len(failed)} case(s) failed: {', '.join(failed)}", file=sys.stderr)
    if report["interrupted"]:
        print("error: interrupted: the cases after the last one reported were not measured",
              file=sys.stderr)
    return 1 if failed or report["interrupted"] else 0


def _run_info() -> int:
    from fusedgrad import _bench

    machine = _bench.machine_info()
    versions = machine["versions"]
    gpu = machine["gpu"]
    lines = [("fusedgrad", versions["fusedgrad"])]
    lines += [(name, version or "not installed")
              for name, version in versions.items() if name != "fusedgrad"]
    lines += [
        ("cpu", f"{machine['cpu']} ({machine['cpu_count']} cores)"),
        ("threads", f"{machine['numba_threads']} (numba.get_num_threads(); NUMBA_NUM_THREADS="
                    f"{machine['NUMBA_NUM_THREADS'] or 'unset'})"),
        ("threading layer", machine["threading_layer"]),
        ("cuda available", "yes" if gpu["available"] else "no"),
        ("gpu", gpu["name"] or "none"),
        ("cache directory", f"{machine['cache_dir']} (NUMBA_CACHE_DIR="
                            f"{machine['NUMBA_CACHE_DIR'] or 'unset'})"),
    ]
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name + ':':<{width + 1}} {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, bench_parser = _parsers()
    if argv and argv[0] == "demo":
        # The demo parses its own options (--plot, --epochs, ...), help included.
        return importlib.import_module("fusedgrad.demo").main(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "bench":
        return _run_bench(bench_parser, args)
    return _run_info()


if __name__ == "__main__":
    sys.exit(main())
