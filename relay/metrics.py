"""Prometheus text-format metrics, kept in process: counters, two latency histograms, and a gauge.

Every label takes its values from a bounded set, so no client can grow the series without end: the path is
the route relay matched (or ``other``), the provider comes from the config, and the model is one the config
names or one that was served, up to ``MODEL_SERIES`` of them (``other`` past that, and for names refused).
"""

from __future__ import annotations

import operator
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any


MODEL_SERIES = 200  # distinct served model names labelled beyond the configured ones
OTHER = "other"
STORE_GAUGES = {"relay_store_up": "1 when the last round with the store succeeded.",
                "relay_store_buffered_rows": "Usage rows held for the store (it is away, or between rounds).",
                "relay_store_instances": "Instances sharing the store, as last seen."}
# How workers' values of a gauge add up to the instance's: up only if every worker's store is up, rows held
# anywhere, the largest count of instances any worker saw.
GAUGE_SUMS: dict[str, Callable[[int, int], int]] = {"relay_store_up": min, "relay_store_buffered_rows": operator.add,
                                                    "relay_store_instances": max}
COUNTERS = ("requests", "tokens", "upstream_errors", "fallbacks", "cost", "refused")
HISTOGRAMS = ("duration", "ttfb")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    if not names:
        return ""
    parts = []
    for name, value in zip(names, values):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{name}="{escaped}"')
    return "{" + ",".join(parts) + "}"


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value
        self.n += 1

    def add(self, counts: list[int], total: float, n: int) -> None:
        self.counts = [a + b for a, b in zip(self.counts, counts)]
        self.total += total
        self.n += n


class Metrics:
    def __init__(self, configured_models: Iterable[str] = ()) -> None:
        self.configured = frozenset(configured_models)
        self._served_models: set[str] = set()
        self.requests: dict[tuple[str, ...], int] = defaultdict(int)  # (path, provider, model, status)
        self.tokens: dict[tuple[str, ...], int] = defaultdict(int)  # (provider, direction)
        self.upstream_errors: dict[tuple[str, ...], int] = defaultdict(int)  # (provider, status)
        self.fallbacks: dict[tuple[str, ...], int] = defaultdict(int)  # (provider,)
        self.duration: dict[tuple[str, ...], Histogram] = defaultdict(Histogram)  # (provider,)
        self.ttfb: dict[tuple[str, ...], Histogram] = defaultdict(Histogram)
        self.open_streams = 0
        self.cache_hits: dict[tuple[str, ...], int] = defaultdict(int)  # (provider,): requests with cache reads
        self.cache_read: dict[tuple[str, ...], int] = defaultdict(int)  # (provider,): tokens read from the cache
        self.cost: dict[tuple[str, ...], int] = defaultdict(int)  # (provider,) -> micro-dollars, from its prices
        self.refused: dict[tuple[str, ...], int] = defaultdict(int)  # (reason,) -> requests relay's limits refused
        self.store: dict[str, int] = {}  # gauge name -> value (the store's state, set before each scrape)

    def model_label(self, model: str, served: bool) -> str:
        if model in self.configured or model in self._served_models:
            return model
        if served and len(self._served_models) < MODEL_SERIES and model.isprintable() and len(model) <= 100:
            self._served_models.add(model)
            return model
        return OTHER if model else ""

    def request_done(self, route: str, provider: str, model: str, status: int, duration: float,
                     ttfb: float | None, tokens_in: int | None, tokens_out: int | None, cache_read: int = 0) -> None:
        """``route``: the route relay matched, never the raw path; ``model``: as the client asked for it;
        ``cache_read``: of tokens_in, what the upstream read from its prompt cache."""
        model = self.model_label(model, 200 <= status < 300)
        self.requests[(route, provider, model, str(status))] += 1
        if provider:
            self.duration[(provider,)].observe(duration)
            if ttfb is not None:
                self.ttfb[(provider,)].observe(ttfb)
            if tokens_in:
                self.tokens[(provider, "input")] += tokens_in
            if tokens_out:
                self.tokens[(provider, "output")] += tokens_out
            if cache_read:
                self.cache_hits[(provider,)] += 1
                self.cache_read[(provider,)] += cache_read

    def upstream_failed(self, provider: str, status: int) -> None:
        self.upstream_errors[(provider, str(status))] += 1

    def fell_back(self, provider: str) -> None:
        self.fallbacks[(provider,)] += 1

    def snapshot(self) -> dict[str, Any]:
        """Every value, as JSON-ready data: what a worker publishes for the instance's scrape."""
        snap: dict[str, Any] = {name: [[list(k), v] for k, v in getattr(self, name).items()] for name in COUNTERS}
        for name in HISTOGRAMS:
            snap[name] = [[list(k), h.counts, h.total, h.n] for k, h in getattr(self, name).items()]
        snap["open_streams"] = self.open_streams
        snap["store"] = self.store
        return snap

    def absorb(self, snap: dict[str, Any], live: bool = True) -> None:
        """Add another worker's snapshot; a dead worker (``live`` false) adds its counters, not its gauges."""
        for name in COUNTERS:
            counter: dict[tuple[str, ...], int] = getattr(self, name)
            for key, value in snap.get(name, ()):
                counter[tuple(key)] += value
        for name in HISTOGRAMS:
            histograms: dict[tuple[str, ...], Histogram] = getattr(self, name)
            for key, counts, total, n in snap.get(name, ()):
                histograms[tuple(key)].add(counts, total, n)
        if live:
            self.open_streams += snap.get("open_streams", 0)
            for gauge, value in snap.get("store", {}).items():
                if gauge in GAUGE_SUMS:
                    self.store[gauge] = GAUGE_SUMS[gauge](self.store[gauge], value) if gauge in self.store else value

    def render(self) -> bytes:
        out: list[str] = []

        def counter(name: str, help_: str, names: tuple[str, ...], data: dict[tuple[str, ...], int]) -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} counter")
            for key, value in sorted(data.items()):
                out.append(f"{name}{_labels(names, key)} {value}")

        def histogram(name: str, help_: str, data: dict[tuple[str, ...], Histogram]) -> None:
            out.append(f"# HELP {name} {help_}\n# TYPE {name} histogram")
            for (provider,), h in sorted(data.items()):
                running = 0
                for bound, count in zip((*BUCKETS, float("inf")), h.counts):
                    running += count
                    le = "+Inf" if bound == float("inf") else repr(bound)
                    out.append(f'{name}_bucket{{provider="{provider}",le="{le}"}} {running}')
                out.append(f'{name}_sum{{provider="{provider}"}} {h.total}')
                out.append(f'{name}_count{{provider="{provider}"}} {h.n}')

        counter("relay_requests_total", "Requests answered, by path, provider, requested model and status.",
                ("path", "provider", "model", "status"), self.requests)
        counter("relay_tokens_total", "Tokens reported by upstreams.", ("provider", "direction"), self.tokens)
        counter("relay_upstream_errors_total", "Failed upstream attempts by status.", ("provider", "status"), self.upstream_errors)
        counter("relay_cache_hits_total", "Answers whose usage reported prompt-cache reads.", ("provider",),
                self.cache_hits)
        counter("relay_cache_read_tokens_total", "Input tokens the upstream read from its prompt cache.", ("provider",),
                self.cache_read)
        counter("relay_fallbacks_total", "Requests moved off a provider to the route's next target.", ("provider",), self.fallbacks)
        histogram("relay_request_duration_seconds", "Whole request time.", self.duration)
        histogram("relay_time_to_first_byte_seconds", "Time until the first byte went to the client.", self.ttfb)
        counter("relay_refused_total", "Requests refused by relay's own limits, budgets or key expiry.", ("reason",),
                self.refused)
        out.append("# HELP relay_cost_usd_total Spend computed from the configured prices.\n"
                   "# TYPE relay_cost_usd_total counter")
        for (provider,), micros in sorted(self.cost.items()):
            out.append(f'relay_cost_usd_total{_labels(("provider",), (provider,))} {micros / 1_000_000}')
        out.append("# HELP relay_open_streams Streams being relayed now.\n# TYPE relay_open_streams gauge")
        out.append(f"relay_open_streams {self.open_streams}")
        for gauge, value in sorted(self.store.items()):
            out.append(f"# HELP {gauge} {STORE_GAUGES[gauge]}\n# TYPE {gauge} gauge\n{gauge} {value}")
        return ("\n".join(out) + "\n").encode()
