"""Turning phases into figures: per-case aggregates, relay/direct ratios, the issue's targets, a table,
the JSON file under ``bench/results/`` and (when matplotlib is importable) a PNG chart.

All rounds of a case are pooled: rates are total requests over total measured seconds, percentiles are taken
over every request of every round. Latencies are reported in milliseconds.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from bench.procs import STACK_ROOT
from bench.store_path import format_results as store_path_results
from bench.translator import format_results

if TYPE_CHECKING:
    from bench.runner import Phase, Plan

KIB = 1024
DIRECT, RELAY, RELAY2, PIPE, STACK = "direct", "relay", "relay-2w", "pipe", "stack"
STACK_FILED = "stack@filed"  #: ``stack`` as it was when issue 17 was filed (``bench.procs.ISSUE17_FLOOR``)
#: Figures whose relay/direct ratio is computed: (key, label).
RATIO_KEYS = (("rps", "req/s"), ("eps", "events/s"), ("ttfb_p50", "TTFB p50"), ("ttfb_p99", "TTFB p99"),
              ("total_p50", "total p50"), ("total_p99", "total p99"))


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (NaN for no values): no interpolation between two real requests."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(pct / 100 * len(ordered)) - 1))]


def _wall(p: Phase) -> float:
    return max(1e-9, p.tally.finished - p.tally.started)


def _aggregate(phases: list[Phase], pace: float) -> dict[str, Any]:
    ok = sum(p.tally.ok for p in phases)
    wall = sum(_wall(p) for p in phases)
    ttfb = [x for p in phases for x in p.tally.ttfb]
    total = [x for p in phases for x in p.tally.total]
    gaps = [x for p in phases for x in p.tally.max_gap]
    kinds: dict[str, int] = defaultdict(int)
    for p in phases:
        for kind, n in p.tally.error_kinds.items():
            kinds[kind] += n
    chunks = sum(p.tally.ok * p.chunks_per_stream for p in phases)
    relay_cpu = sum(p.relay_cpu for p in phases)
    level = phases[0].level
    peak = max(p.relay_rss_peak for p in phases)
    idle = max(p.relay_rss_idle for p in phases)
    stats: dict[str, Any] = {
        "requests": ok,
        "errors": sum(p.tally.errors for p in phases),
        "error_kinds": dict(kinds),
        "seconds": wall,
        "rps": ok / wall,
        "eps": sum(p.tally.events for p in phases) / wall,
        "ttfb_p50": percentile(ttfb, 50) * 1e3,
        "ttfb_p99": percentile(ttfb, 99) * 1e3,
        "total_p50": percentile(total, 50) * 1e3,
        "total_p99": percentile(total, 99) * 1e3,
        "gap_p99": percentile(gaps, 99) * 1e3,
        "gap_max": max(gaps, default=math.nan) * 1e3,
        "stalled": sum(1 for g in gaps if g > 2 * pace),
        "harness_cores": sum(p.harness_cpu * _wall(p) for p in phases) / wall,
        "machine_busy_cores": sum(p.machine_busy * _wall(p) for p in phases) / wall,
    }
    if peak:
        stats |= {
            "relay_cpu_s": relay_cpu,
            "relay_cpu_us_per_chunk": relay_cpu / chunks * 1e6 if chunks else math.nan,
            "relay_cpu_us_per_request": relay_cpu / ok * 1e6 if ok else math.nan,
            "relay_rss_peak": peak,
            "relay_rss_idle": idle,
            "rss_per_stream": (peak - idle) / level if idle else math.nan,
        }
    return stats


def summarise(phases: list[Phase], plan: Plan, translator: dict[str, Any] | None, notes: list[str],
              store_path: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything the table, the JSON file and the chart need."""
    groups: dict[tuple[str, str], dict[str, list[Phase]]] = defaultdict(lambda: defaultdict(list))
    for p in phases:
        groups[(p.scenario, p.case)][p.path].append(p)
    cases = []
    for (scenario, case), by_path in groups.items():
        paths = {path: _aggregate(ps, plan.pace) for path, ps in by_path.items()}
        ratios: dict[str, dict[str, Any]] = {}
        direct = paths.get(DIRECT)
        for path, stats in paths.items():
            if path == DIRECT or direct is None:
                continue
            r = {key: _ratio(stats[key], direct[key]) for key, _ in RATIO_KEYS}
            r["added_ttfb_p50_ms"] = stats["ttfb_p50"] - direct["ttfb_p50"]
            r["added_ttfb_p99_ms"] = stats["ttfb_p99"] - direct["ttfb_p99"]
            ratios[path] = r
        if scenario == "store":
            ratios = _store_ratios(paths)
        if RELAY in paths and RELAY2 in paths:
            ratios[RELAY2]["rps_vs_1_worker"] = _ratio(paths[RELAY2]["rps"], paths[RELAY]["rps"])
        level = next(iter(by_path.values()))[0].level
        cases.append({"scenario": scenario, "case": case, "level": level, "paths": paths, "ratios": ratios})
    summary: dict[str, Any] = {
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "python": platform.python_version(),
            "cpus": os.cpu_count() or 1,
            "plan": dict(vars(plan)),
            "stack_root": os.environ.get(STACK_ROOT) or None,  # stack from another checkout, if so
        },
        "notes": notes,
        "cases": cases,
        "translator": translator,
        "store_path": store_path,
        "phases": [_phase_row(p) for p in phases],
    }
    summary["targets"] = _targets(summary, plan)
    return summary


STORES, VKEY = ("sqlite", "redis"), "+vkey"


def _store_ratios(paths: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The store scenario compares within one relay: a limited virtual key against the config key (what the
    limits cost), and the config key against relay without a store (what booking usage costs)."""
    ratios = {}
    for store in STORES:
        for path, base in ((store + VKEY, store), (store, RELAY)):
            if path in paths and base in paths:
                ratios[path] = {"rps": _ratio(paths[path]["rps"], paths[base]["rps"]), "vs": base,
                                "added_ttfb_p50_ms": paths[path]["ttfb_p50"] - paths[base]["ttfb_p50"],
                                "added_cpu_us": paths[path].get("relay_cpu_us_per_request", math.nan)
                                - paths[base].get("relay_cpu_us_per_request", math.nan)}
    return ratios


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _phase_row(p: Phase) -> dict[str, Any]:
    t = p.tally
    wall = _wall(p)
    return {
        "scenario": p.scenario, "case": p.case, "level": p.level, "path": p.path, "round": p.round,
        "requests": t.ok, "errors": t.errors, "error_kinds": t.error_kinds, "seconds": wall, "rps": t.ok / wall,
        "ttfb_p50": percentile(t.ttfb, 50) * 1e3, "ttfb_p99": percentile(t.ttfb, 99) * 1e3,
        "relay_cpu_s": p.relay_cpu, "relay_rss_peak": p.relay_rss_peak,
        "harness_cores": p.harness_cpu, "machine_busy_cores": p.machine_busy, "other_load_cores": p.other_load,
    }


def _case(summary: dict[str, Any], scenario: str, case: str) -> dict[str, Any] | None:
    return next((c for c in summary["cases"] if c["scenario"] == scenario and c["case"] == case), None)


def _targets(summary: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and met / not met / not measured (None)."""
    out: list[dict[str, Any]] = []

    def add(name: str, figure: float | None, limit: str, met: bool | None) -> None:
        out.append({"target": name, "figure": figure, "limit": limit, "met": met})

    body = _case(summary, "bodies", "100 KiB")
    r = body["ratios"].get(RELAY) if body else None
    add("TTFB added, c=1, 100 KiB Claude Code body, p50 (ms)", r and r["added_ttfb_p50_ms"], "< 1",
        r and r["added_ttfb_p50_ms"] < 1)
    add("TTFB added, c=1, 100 KiB Claude Code body, p99 (ms)", r and r["added_ttfb_p99_ms"], "< 3",
        r and r["added_ttfb_p99_ms"] < 3)
    r = body["ratios"].get(STACK) if body else None
    if r:
        for pct in ("p50", "p99"):
            add(f"TTFB added, 100 KiB, {pct}, by the library floor (bench.stack)", r[f"added_ttfb_{pct}_ms"], REFERENCE, None)
    burst = _case(summary, "burst", "c=10")
    r = burst["ratios"].get(RELAY) if burst else None
    add("burst c=10: relay req/s / direct req/s", r and r["rps"], ">= 0.25", r and r["rps"] >= 0.25)
    for path, name in ((RELAY2, "relay --workers 2"), (PIPE, "the floor (bench.pipe)"),
                       (STACK, "the library floor (bench.stack)")):
        r = burst["ratios"].get(path) if burst else None
        if r:
            add(f"burst c=10: {name} req/s / direct req/s", r["rps"], REFERENCE, None)

    paced = [c for c in summary["cases"] if c["scenario"] == "paced" and RELAY in c["paths"]]
    if paced:
        add("paced: most concurrent streams with no gap > 2x pace (one worker)", _clean_level(paced, RELAY), ">= 512",
            _clean_level(paced, RELAY) >= 512)
        for path, name in ((RELAY2, "relay --workers 2"), (PIPE, "the floor (bench.pipe), one process"),
                           (STACK, "the libraries (bench.stack), one process")):
            if all(path in c["paths"] for c in paced):
                add(f"paced: most streams with no gap > 2x pace, {name}", _clean_level(paced, path), REFERENCE, None)
        top = max(paced, key=lambda c: c["level"])
        add(f"paced: errors at c={top['level']}", top["paths"][RELAY]["errors"], "0 at c=1024",
            top["paths"][RELAY]["errors"] == 0 if top["level"] >= 1024 else None)
        # Per *open* stream: at a level where streams failed fewer were open, so use the highest clean level.
        no_errors = [c for c in paced if c["paths"][RELAY]["errors"] == 0]
        at = max(no_errors, key=lambda c: c["level"]) if no_errors else top
        per = at["paths"][RELAY].get("rss_per_stream", math.nan)
        add(f"paced: relay RSS per open stream at c={at['level']} (KiB)", per / KIB, "< 64", per / KIB < 64)
    else:
        add("paced: most concurrent streams with no gap > 2x pace (one worker)", None, ">= 512", None)
    for store in STORES:
        one, ten = _case(summary, "store", "c=1"), _case(summary, "store", "c=10")
        r = one["ratios"].get(store + VKEY) if one else None
        if r:
            add(f"store ({store}): TTFB p50 a limited virtual key adds over a config key, c=1 (ms)",
                r["added_ttfb_p50_ms"], "< 0.3", r["added_ttfb_p50_ms"] < 0.3)
        r = ten["ratios"].get(store + VKEY) if ten else None
        if r:
            add(f"store ({store}): req/s a limited virtual key loses against a config key, c=10 (%)",
                (1 - r["rps"]) * 100, "< 10", (1 - r["rps"]) * 100 < 10)
        r = one["ratios"].get(store) if one else None
        if r:
            add(f"store ({store}): TTFB p50 a config key's booking adds over no store, c=1 (ms)",
                r["added_ttfb_p50_ms"], REFERENCE, None)
    if summary.get("store_path"):
        add("store: request-path CPU a limited virtual key adds, in process (admit + finish, ms)",
            summary["store_path"]["added_us"] / 1e3, REFERENCE, None)
    _issue17_targets(summary, add)
    t = summary.get("translator") or {}
    figure = t.get("min_per_event_feed")
    add("translator alone: chunks/s on one core (slowest stream, one event per feed)", figure, ">= 200,000",
        figure >= 200_000 if figure else None)
    for c in summary["cases"]:
        if c["scenario"] == "burst" and RELAY2 in c["ratios"]:
            x = c["ratios"][RELAY2]["rps_vs_1_worker"]
            if c["level"] == 1:  # one request in flight at a time: a second worker has nothing to do
                add(f"--workers 2 vs 1, burst {c['case']} (one request at a time): req/s ratio", x, REFERENCE, None)
            else:
                add(f"--workers 2 vs 1, burst {c['case']}: req/s ratio", x, "> 1 (scales with cores)", x > 1)
    return out


REFERENCE = "reference"  #: a figure shown beside the targets to read them by, not a target itself


def _issue17_targets(summary: dict[str, Any], add: Callable[[str, float | None, str, bool | None], None]) -> None:
    """Issue 17's: relay's own work against the libraries alone and against a direct connection, each read within
    this run (the 100 KiB one is above, the translator's and the workers' below)."""
    big = _case(summary, "bodies", "1024 KiB")
    r = big["ratios"].get(RELAY) if big else None
    add("TTFB added, c=1, 1 MiB Claude Code body, p50 (ms)", r and r["added_ttfb_p50_ms"], "< 4",
        r and r["added_ttfb_p50_ms"] < 4)
    cold = _case(summary, "bodies", "1024 KiB cold")
    r = cold["ratios"].get(RELAY) if cold else None
    add("the same, each request a conversation's first (nothing to reuse), p50 (ms)", r and r["added_ttfb_p50_ms"],
        REFERENCE, None)
    burst = _case(summary, "burst", "c=10")
    paths = burst["paths"] if burst else {}
    for floor, name, limit in ((STACK_FILED, "stack@filed's (the floor when issue 17 was filed)", "<= 1"),
                               (STACK, "bench.stack's (today's floor, on relay's faster pool)", REFERENCE)):
        x = _ratio(paths[RELAY]["relay_cpu_us_per_request"], paths[floor]["relay_cpu_us_per_request"]) \
            if RELAY in paths and floor in paths else None
        add(f"burst c=10: relay CPU per request / {name}", x, limit,
            None if x is None or math.isnan(x) or limit == REFERENCE else x <= 1)
    wide = _case(summary, "paced", "c=256")
    paths = wide["paths"] if wide else {}
    stalled, met = None, None
    if RELAY in paths and DIRECT in paths:
        stalled = paths[RELAY]["stalled"] + paths[RELAY]["errors"]
        held = paths[DIRECT]["stalled"] == 0 and paths[DIRECT]["errors"] == 0  # else the host could not hold them
        met = stalled == 0 if held else None
    add("paced c=256: relay streams with a gap > 2x pace (where direct has none)", stalled, "0", met)
    starts = _case(summary, "paced", "c=128")
    r = starts["ratios"].get(RELAY) if starts else None
    add("paced c=128: TTFB added by simultaneous starts, p50 (ms)", r and r["added_ttfb_p50_ms"], "< 20",
        r and r["added_ttfb_p50_ms"] < 20)


def _clean_level(paced: list[dict[str, Any]], path: str) -> int:
    """The highest concurrency at which no stream of ``path`` stalled or failed (0 if none)."""
    return max((c["level"] for c in paced if path in c["paths"]
                and c["paths"][path]["stalled"] == 0 and c["paths"][path]["errors"] == 0), default=0)


# -- the table ----------------------------------------------------------------------------------------------------


_FORMATS: dict[str, Callable[[Any], str]] = {
    "int": "{:,.0f}".format,
    "ms": "{:.2f}".format,
    "us": "{:.1f}".format,
    "x": "{:.2f}x".format,
    "mib": lambda v: f"{v / KIB / KIB:.1f}M",
    "kib": lambda v: f"{v / KIB:.1f}K",
}


def _fmt(value: Any, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return _FORMATS[kind](value)


#: Columns per scenario: (header, stats key, format, ratio shown).
_COMMON = [("req/s", "rps", "int"), ("events/s", "eps", "int"), ("TTFB p50", "ttfb_p50", "ms"),
           ("TTFB p99", "ttfb_p99", "ms"), ("total p50", "total_p50", "ms"), ("total p99", "total_p99", "ms"),
           ("errors", "errors", "int"), ("relay RSS", "relay_rss_peak", "mib")]
_COLUMNS = {
    "burst": _COMMON + [("CPU us/req", "relay_cpu_us_per_request", "us")],
    "bodies": _COMMON + [("CPU us/req", "relay_cpu_us_per_request", "us")],
    "paced": _COMMON + [("gap p99", "gap_p99", "ms"), ("stalled", "stalled", "int"),
                        ("CPU us/chunk", "relay_cpu_us_per_chunk", "us"), ("RSS/stream", "rss_per_stream", "kib")],
    "store": _COMMON + [("CPU us/req", "relay_cpu_us_per_request", "us")],
}
_TITLES = {
    "burst": "burst: 50-chunk streams, no delay (latencies in ms)",
    "bodies": "bodies: Claude Code-shaped requests at concurrency 1, 10-chunk answers (ms)",
    "paced": "paced: 64 chunks of 16 bytes, 20 ms apart; stalled = streams with a gap > 40 ms (ms)",
    "store": "store: 10-chunk answers; relay without a store, then each store with a config key and a limited "
             "virtual key (+vkey) (ms)",
}


def render(summary: dict[str, Any]) -> str:
    """The table printed at the end of a run, one block per scenario, with a ratio line under relay."""
    lines: list[str] = []
    for scenario, columns in _COLUMNS.items():
        cases = [c for c in summary["cases"] if c["scenario"] == scenario]
        if not cases:
            continue
        if scenario == "paced":
            pace = summary["meta"]["plan"]["pace"] * 1e3
            title = _TITLES[scenario].replace("20 ms", f"{pace:.0f} ms").replace("40 ms", f"{2 * pace:.0f} ms")
        else:
            title = _TITLES[scenario]
        widths = [max(11, len(h) + 2) for h, _, _ in columns]
        header = [f"{'case':<16}", f"{'path':<12}"] + [f"{h:>{w}}" for (h, _, _), w in zip(columns, widths, strict=True)]
        lines += ["", title, "".join(header), "-" * len("".join(header))]
        for c in cases:
            label = c["case"]
            for path, stats in c["paths"].items():
                row = [f"{label:<16}", f"{path:<12}"] + [
                    f"{_fmt(stats.get(k), f):>{w}}" for (_, k, f), w in zip(columns, widths, strict=True)]
                lines.append("".join(row))
                label = ""
                ratio = c["ratios"].get(path)
                if ratio and scenario == "store":
                    lines.append(f"{'':<16}{'  vs ' + ratio['vs']:<12}  req/s {_fmt(ratio['rps'], 'x')}, TTFB p50 "
                                 f"{ratio['added_ttfb_p50_ms']:+.3f} ms, CPU {ratio['added_cpu_us']:+.0f} us/req")
                elif ratio:
                    cells = [f"{_fmt(ratio.get(k), 'x') if k in ratio else '':>{w}}"
                             for (_, k, _), w in zip(columns, widths, strict=True)]
                    lines.append("".join([f"{'':<16}", f"{'  /direct':<12}"] + cells))
            if scenario == "bodies" and RELAY in c["ratios"]:
                r = c["ratios"][RELAY]
                lines.append(f"{'':<16}{'  added':<12}  TTFB p50 +{r['added_ttfb_p50_ms']:.2f} ms, "
                             f"p99 +{r['added_ttfb_p99_ms']:.2f} ms")
    harness = [c["paths"][DIRECT]["harness_cores"] for c in summary["cases"] if DIRECT in c["paths"]]
    other = [p["other_load_cores"] for p in summary["phases"]]
    if harness:
        lines += ["", f"harness (mock + load processes) used up to {max(harness):.2f} cores on the direct path."]
    if other and max(other) > 0.2:
        lines.append(f"other programs used {sum(other) / len(other):.2f} cores on average, up to {max(other):.2f} "
                     f"in a phase, of {summary['meta']['cpus']}: the figures are noisy.")
    if summary.get("translator"):
        lines += ["", format_results(summary["translator"])]
    if summary.get("store_path"):
        lines += ["", store_path_results(summary["store_path"])]
    lines += ["", "targets (issues 4, 15 and 17):"]
    for t in summary["targets"]:
        verdict = "for reference" if t["limit"] == REFERENCE else {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        figure = t["figure"]
        shown = "-" if figure is None or (isinstance(figure, float) and math.isnan(figure)) else (
            f"{figure:,.2f}" if isinstance(figure, float) else f"{figure:,}")
        want = "" if t["limit"] == REFERENCE else f" (want {t['limit']})"
        lines.append(f"  {t['target']:<84} {shown:>12}{want}: {verdict}")
    for note in summary["notes"]:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


# -- files ---------------------------------------------------------------------------------------------------------


def write(summary: dict[str, Any], results_dir: Path, smoke: bool) -> Path:
    """``bench-<time>[-smoke].json`` and, when matplotlib is importable, a PNG of the same name."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = time.strftime("bench-%Y%m%d-%H%M%S") + ("-smoke" if smoke else "")
    path = results_dir / f"{stem}.json"
    path.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))  # NaN is written as null
    chart = draw(summary, results_dir / f"{stem}.png")
    print(chart)
    return path


def _num(value: Any) -> float:
    """A plottable number: results re-read from JSON carry null where a figure was NaN."""
    return math.nan if value is None else float(value)


def draw(summary: dict[str, Any], path: Path) -> str:
    """Latency and throughput against concurrency (and TTFB against body size); returns a one-line status."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "chart: skipped (matplotlib is not installed; `pip install matplotlib` into .venv to get one)"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = [
        (axes[0][0], "burst", "rps", "burst: req/s", "concurrency"),
        (axes[0][1], "burst", "ttfb_p99", "burst: TTFB p50 (solid) / p99 (dashed), ms", "concurrency"),
        (axes[1][0], "paced", "gap_p99", "paced: longest gap between reads, p99, ms (grey: 2x pace)", "concurrency"),
        (axes[1][1], "bodies", "ttfb_p99", "bodies: TTFB p50 (solid) / p99 (dashed), ms", "body KiB"),
    ]
    for ax, scenario, key, title, xlabel in panels:
        cases = sorted((c for c in summary["cases"] if c["scenario"] == scenario and not c["case"].endswith(("unicode", "cold"))),
                       key=lambda c: c["level"])  # (the unicode and cold bodies are rows of the table, not points)
        if not cases:
            ax.set_visible(False)
            continue
        xs = [c["level"] / (KIB if scenario == "bodies" else 1) for c in cases]
        for route in (DIRECT, RELAY, RELAY2, PIPE, STACK, STACK_FILED):
            ys = [_num(c["paths"].get(route, {}).get(key)) for c in cases]
            if all(math.isnan(y) for y in ys):
                continue
            line = ax.plot(xs, ys, marker="o", label=route, linestyle="--" if key.endswith("p99") else "-")[0]
            if key.endswith("p99"):
                p50 = [_num(c["paths"].get(route, {}).get(key.replace("p99", "p50"))) for c in cases]
                ax.plot(xs, p50, marker="o", color=line.get_color())
        if scenario == "paced":
            ax.axhline(2 * summary["meta"]["plan"]["pace"] * 1e3, color="grey", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_xscale("log")  # levels grow geometrically; figures span orders of magnitude
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return f"chart: {path}"
