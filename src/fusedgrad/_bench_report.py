"""The benchmark's output: the printed tables (:class:`Table`) and the ``--plot`` figure.

Every cell that has a value per allocator state shows the first state's value and, in
parentheses, the second's (see ``fusedgrad._bench``: glibc's default, and freed memory kept);
the report names its states in ``report["state_labels"]``.
"""
from __future__ import annotations

import numpy as np

from fusedgrad._bench_peers import IMPLEMENTATIONS, LABELS, PEERS

#: Page faults per timed call above which the notes list a case's counts (a thousand 4 KiB
#: pages, 4 MB of fresh memory, cost a visible fraction of a millisecond).
FAULTS_WORTH_A_NOTE = 1000
#: Ratio between the best roofline probe before a process's cases and the best after it from
#: which the report warns that the memory bandwidth changed during the run. The 2-core AMD
#: EPYC of docs/performance.md flips between about 88 and about 47 GB/s within minutes (1.9x);
#: repeated probes in one state stay within about 10%.
BANDWIDTH_SHIFT = 1.25


def bandwidth_shift(probes: list):
    """(best before, best after) of a process's roofline probes, in GB/s, when one is at least
    BANDWIDTH_SHIFT times the other; None when they agree or one side is missing."""
    best = {}
    for probe in probes:
        if probe["roofline"]:
            best[probe["when"]] = max(best.get(probe["when"], 0.0), probe["GBps"])
    before, after = best.get("before"), best.get("after")
    if not before or not after or max(before, after) < BANDWIDTH_SHIFT * min(before, after):
        return None
    return before, after


def _ms(seconds) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}"


def _ratio(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def _number(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _per_state(values: list, fmt) -> str:
    """``first (second)``, or one value when one state was measured."""
    cells = [fmt(v) for v in values]
    return cells[0] if len(cells) == 1 else f"{cells[0]} ({cells[1]})"


def _state_results(record: dict, states: list) -> list:
    return [record["states"].get(state, {}) for state in states]


def _timing(result: dict, impl: str):
    return result.get("timings", {}).get(impl)


class Table:
    """The printed result: bandwidth, the speed-up table, the times table, then the notes."""

    def __init__(self, out):
        self.out = out
        self.labels = {}

    def _label(self, state: str) -> str:
        return self.labels.get(state, state)

    def _print(self, text: str = "") -> None:
        print(text, file=self.out)

    @staticmethod
    def _line(cells, columns) -> str:
        return "  ".join(format(cell, f"{align}{width}")
                         for cell, (_, align, width) in zip(cells, columns)).rstrip()

    def _table(self, columns, rows) -> None:
        self._print(self._line([name for name, _, _ in columns], columns))
        self._print(self._line(["-" * width for _, _, width in columns], columns))
        for row in rows:
            self._print(self._line(row, columns))

    def render(self, report: dict) -> None:
        self.labels = report["state_labels"]
        states = report["states"]
        results = report["results"]
        which = " and, in parentheses, ".join(self._label(s) for s in states)
        self._print()
        self.bandwidth(report)
        self._print(f"\nspeed-up of fusedgrad = peer's time / fusedgrad's, median over paired "
                    f"rounds; {which}:")
        peers = [p for p in PEERS if any(p in r.get("timings", {}) for rec in results
                                         for r in rec["states"].values())]
        two = len(states) > 1
        width = 13 if two else 7
        columns = ([("case", "<", 19), ("shape", "<", 17), ("fusedgrad ms", ">", width)]
                   + [(LABELS[p], ">", max(width, len(LABELS[p]))) for p in peers]
                   + [("vs best peer", ">", max(width, 12)), ("GB/s", ">", 11 if two else 5),
                      ("% roof", ">", 9 if two else 6)])
        rows = []
        for record in results:
            per_state = _state_results(record, states)
            shape = "x".join(map(str, record["shape"]))
            if record["dtype"] != "float32":
                shape += f" {record['dtype']}"
            rows.append(
                [record["case"], shape,
                 _per_state([(_timing(r, "fusedgrad") or {}).get("median_s") for r in per_state],
                            _ms)]
                + [_per_state([r.get("speedup", {}).get(p) for r in per_state], _ratio)
                   for p in peers]
                + [_per_state([r.get("speedup_vs_best_peer") for r in per_state], _ratio),
                   _per_state([r.get("GBps") for r in per_state],
                              lambda v: _number(v, ".1f")),
                   _per_state([r.get("roofline_pct") for r in per_state],
                              lambda v: _number(v, ".0f"))])
        self._table(columns, rows)
        self.times(results, states)
        self.notes(report)

    def bandwidth(self, report: dict) -> None:
        """Per state: the roofline's bandwidth, and every probe before / after the cases."""
        for state in report["states"]:
            measured = report["bandwidth"][state]
            by_probe = {}
            for probe in measured["probes"]:
                by_probe.setdefault((probe["probe"], probe["roofline"]), []).append(probe["GBps"])
            probes = ", ".join(f"{name} {'/'.join(f'{v:.1f}' for v in values)}"
                               + ("" if counts else " (not a roofline)")
                               for (name, counts), values in by_probe.items())
            self._print(f"memory bandwidth, {self._label(state)}: {measured['GBps']:.1f} GB/s "
                        f"({measured['best_probe']}, the best copy: one read per write); probes "
                        f"before/after, GB/s of bytes read + written: {probes}")
            shift = bandwidth_shift(measured["probes"])
            if shift:
                self._print(f"warning: the memory bandwidth changed during the cases of "
                            f"{self._label(state)} (best copy {shift[0]:.1f} GB/s before, "
                            f"{shift[1]:.1f} after): a memory-bound case's time and % roof "
                            f"depend on when it ran")
        for state in report["states"]:
            if state in report.get("state_environments", {}):
                self._print(f"{self._label(state)}: {report['state_environments'][state]}")

    def times(self, results: list, states: list) -> None:
        impls = [i for i in IMPLEMENTATIONS if any(i in r.get("timings", {}) for rec in results
                                                   for r in rec["states"].values())]
        width = 13 if len(states) > 1 else 7
        self._print("\nmedian times, ms (* NumPy on a row subset, scaled to the full size):")
        columns = [("case", "<", 19)] + [(LABELS[i], ">", max(width, len(LABELS[i])))
                                         for i in impls]
        rows = []
        for record in results:
            per_state = _state_results(record, states)
            row = [record["case"]]
            for impl in impls:
                timings = [_timing(r, impl) for r in per_state]
                scaled = any(t and t["scale"] != 1.0 for t in timings)
                cell = _per_state([t["median_s"] if t else None for t in timings], _ms)
                if all(t is None for t in timings[1:]) and len(timings) > 1:
                    cell = _ms(timings[0]["median_s"] if timings[0] else None)
                row.append(cell + ("*" if scaled else ""))
            rows.append(row)
        self._table(columns, rows)

    def notes(self, report: dict) -> None:
        results, states = report["results"], report["states"]
        self._print()
        for record in results:
            for state, result in record["states"].items():
                if "error" in result:
                    self._print(f"! {record['case']} failed ({self._label(state)}): "
                                f"{result['error']}")
        cases_by_note = {}
        for record in results:
            for note in record["notes"]:
                cases_by_note.setdefault(note, []).append(record["case"])
        for note, cases in cases_by_note.items():
            self._print(f"* {', '.join(cases)}: {note}")
        for record in results:
            if record["op"] == "model":
                self.model_lines(record, states)
                continue
            for state, result in record["states"].items():
                faults = {impl: t.get("minor_faults_per_call")
                          for impl, t in result.get("timings", {}).items()}
                if any((f or 0) >= FAULTS_WORTH_A_NOTE for f in faults.values()):
                    counts = ", ".join(f"{LABELS[i]} {f:.0f}" for i, f in faults.items()
                                       if f is not None)
                    self._print(f"* {record['case']}, {self._label(state)}: page "
                                f"faults per call: {counts}")
        self.cache_lines(report)
        self._print("* vs best peer: the smallest of the speed-ups over the peers; GB/s and "
                    "% roof: fusedgrad's bytes moved (the roofline's passes) / its median time, "
                    "and the roofline time at the best probe's bandwidth / its median time")

    def cache_lines(self, report: dict) -> None:
        """Every case above 100% of the roofline, with whether its data fit in the cache."""
        cache = report["machine"].get("last_level_cache_bytes")
        for record in report["results"]:
            above = [s for s, r in record["states"].items() if (r.get("roofline_pct") or 0) > 100]
            if not above:
                continue
            working = record["working_set_bytes"]
            if cache and working <= cache:
                why = (f"its working set ({working / 2**20:.0f} MiB) fits in the "
                       f"{cache / 2**20:.0f} MiB last-level cache, so passes after the first "
                       "read data from cache")
            else:
                why = (f"its working set ({working / 2**20:.0f} MiB) is larger than the "
                       "last-level cache: part of it stayed in cache between passes")
            self._print(f"* {record['case']}: above 100% of the roofline: {why}")

    def model_lines(self, record: dict, states: list) -> None:
        name = record["case"]
        for state in states:
            result = record["states"].get(state, {})
            torch_timing = _timing(result, "torch")
            fused = _timing(result, "fusedgrad")
            if not (torch_timing and fused):
                continue
            share = result.get("fused_op_share") or {}
            share_text = (f"; share of the step in batch norm + loss: fusedgrad "
                          f"{100 * share['fusedgrad']:.0f}%, PyTorch {100 * share['torch']:.0f}%"
                          if share else "")
            faults = (f"; page faults per step: fusedgrad {fused['minor_faults_per_call']:.0f}, "
                      f"PyTorch {torch_timing['minor_faults_per_call']:.0f}"
                      if fused.get("minor_faults_per_call") is not None
                      and torch_timing.get("minor_faults_per_call") is not None else "")
            self._print(f"* {name} ({self._label(state)}, fresh process): step "
                        f"{_ms(fused['median_s'])} ms vs PyTorch {_ms(torch_timing['median_s'])}"
                        f" ms, {result['speedup']['torch']:.2f}x over {fused['repeats']} paired "
                        f"rounds{faults}{share_text}")


def write_plot(report: dict, path: str) -> None:
    """A PNG: per allocator state, one bar per peer per case, the speed-up of fusedgrad over
    that peer (log scale; above the line at 1, fusedgrad is faster)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    results = report["results"]
    states = report["states"]
    peers = [p for p in PEERS if any(p in r.get("speedup", {}) for rec in results
                                     for r in rec["states"].values())]
    names = [r["case"] for r in results]
    positions = np.arange(len(results))
    fig = Figure(figsize=(max(7.0, 1.0 * len(results) + 2), 3.6 * len(states) + 0.6))
    FigureCanvasAgg(fig)  # render off-screen without touching pyplot's global state (as demo.py)
    axes = fig.subplots(len(states), 1, squeeze=False)[:, 0]
    width = 0.8 / max(1, len(peers))
    for ax, state in zip(axes, states):
        for k, peer in enumerate(peers):
            values = [rec["states"].get(state, {}).get("speedup", {}).get(peer) or np.nan
                      for rec in results]
            ax.bar(positions + (k - (len(peers) - 1) / 2) * width, values, width=width,
                   label=f"vs {LABELS[peer]}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        times = FuncFormatter(lambda value, _: f"{value:g}x")
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(times)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xticks(positions, names, rotation=30, ha="right")
        ax.set_ylabel("speed-up of fusedgrad (x)")
        bandwidth = report["bandwidth"][state]["GBps"]
        label = report["state_labels"].get(state, state)
        ax.set_title(f"{label}; memory bandwidth {bandwidth:.1f} GB/s", fontsize=9)
        ax.legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"fusedgrad on {machine['device']} ({machine['cpu']}), "
                 f"{machine['numba_threads']} threads, {machine['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
