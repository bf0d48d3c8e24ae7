"""What the console's overview shows live: the last hour in ten-second steps and the latest requests, in memory.

Bounded whatever the traffic: ``STEPS`` slots of a few counters and one small TTFB histogram each, and a ring of
``RECENT`` requests whose client-chosen strings are cut to ``printable`` length. About 150 KB at most, per process.
Each process (a worker, an instance) keeps its own and publishes an ``export`` of it through the store every few
seconds; the console on any of them shows ``merged``: the whole gateway. Pure: the clock is passed in, so it is
tested without sleeping.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from relay.log import printable

STEP = 10  # seconds per slot
STEPS = 360  # one hour
RECENT = 100  # requests kept for the table
EXPORT_VERSION = 1  # the shape of ``Live.export``: another shape is left out of a merge, never misread
# TTFB histogram: bucket i holds values up to 1 ms * 1.25**i (so a quantile is good to 25 %), the last one the rest.
TTFB_BOUNDS = tuple(0.001 * 1.25 ** i for i in range(48))


# One of this process's requests, as ``Live.request_done`` got it: (seq, now, key, model, target, status, stream,
# ttfb, duration, input_tokens, output_tokens, cost_micros).
_Done = tuple[int, float, str, str, str, int, "bool | None", "float | None", float, "int | None", "int | None", int]


@dataclass
class _Slot:
    index: int = -1  # which STEP-long span of time this slot holds now (epoch seconds // STEP)
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    cost_micros: int = 0
    streams: int = 0  # the most streams seen open during the span
    ttfb: list[int] = field(default_factory=list)  # counts per TTFB_BOUNDS bucket; empty until one is seen

    def reset(self, index: int) -> None:
        self.index, self.requests, self.errors, self.tokens, self.cost_micros, self.streams = index, 0, 0, 0, 0, 0
        self.ttfb = []


def quantile_bucket(counts: list[int], q: float) -> int | None:
    """Which bucket of a histogram holds its q-th value (None with no values). Shared with the console's
    reading of the /metrics histograms."""
    total = sum(counts)
    if not total:
        return None
    rank, running = math.ceil(q * total), 0
    for i, count in enumerate(counts):
        running += count
        if running >= rank:
            return i
    return None


def _quantile(counts: list[int], q: float) -> float | None:
    """The upper bound of the bucket holding the q-th value, in ms (the last bound for the overflow bucket)."""
    i = quantile_bucket(counts, q)
    return None if i is None else round(TTFB_BOUNDS[min(i, len(TTFB_BOUNDS) - 1)] * 1000, 1)


class Live:
    def __init__(self, name: str = "local") -> None:
        self.name = name  # this process's instance id: requests are told apart across instances by name and number
        self._slots = [_Slot() for _ in range(STEPS)]
        # this process's requests as ``_Done`` tuples (made into rows when read: ``rows``), others' as rows
        self.recent: deque[dict[str, Any] | _Done] = deque(maxlen=RECENT)
        self._seq = 0

    def _slot(self, now: float) -> _Slot:
        index = int(now // STEP)
        slot = self._slots[index % STEPS]
        if slot.index != index:
            slot.reset(index)
        return slot

    def streams(self, now: float, open_streams: int) -> None:
        """A sample of the open-stream gauge (taken as requests end and as the console polls)."""
        slot = self._slot(now)
        slot.streams = max(slot.streams, open_streams)

    def request_done(self, now: float, *, key: str, model: str, target: str, status: int, stream: bool | None,
                     ttfb: float | None, duration: float, input_tokens: int | None, output_tokens: int | None,
                     cost_micros: int, open_streams: int | None = None) -> None:
        """One answered request: ``now`` in epoch seconds, ``ttfb`` and ``duration`` in seconds. An error is any
        answer that is not a 2xx (status 0: the client left before any answer). ``open_streams``: a sample of the
        gauge taken with it (as ``streams``). Its row for the table is made when the table is read (at most
        ``RECENT`` rows, when the console asks), not once per request."""
        slot = self._slot(now)
        if open_streams is not None and open_streams > slot.streams:
            slot.streams = open_streams
        slot.requests += 1
        if not 200 <= status < 300:
            slot.errors += 1
        tokens = (input_tokens or 0) + (output_tokens or 0)
        slot.tokens += tokens
        slot.cost_micros += cost_micros
        if ttfb is not None:
            if not slot.ttfb:
                slot.ttfb = [0] * (len(TTFB_BOUNDS) + 1)
            slot.ttfb[bisect_left(TTFB_BOUNDS, ttfb)] += 1
        self._seq += 1
        self.recent.append((self._seq, now, key, model, target, status, stream, ttfb, duration, input_tokens,
                            output_tokens, cost_micros))

    def rows(self) -> list[dict[str, Any]]:
        """The latest requests as the table's rows, in the order they were kept."""
        return [entry if isinstance(entry, dict) else self._row(*entry) for entry in self.recent]

    def _row(self, seq: int, now: float, key: str, model: str, target: str, status: int, stream: bool | None,
             ttfb: float | None, duration: float, input_tokens: int | None, output_tokens: int | None,
             cost_micros: int) -> dict[str, Any]:
        return {
            "id": f"{self.name}-{seq}", "time": round(now, 3), "key": printable(key, 80), "model": printable(model),
            "target": printable(target), "status": status, "stream": stream,
            "ttfb_ms": None if ttfb is None else round(ttfb * 1000, 1), "duration_ms": round(duration * 1000, 1),
            "input_tokens": input_tokens, "output_tokens": output_tokens,
            "cost_usd": cost_micros / 1_000_000 if cost_micros else None}

    def _minute(self, last: int, elapsed: float) -> dict[str, Any]:
        """The headline figures: the last six slots (the one filling included), so a quiet second reads as the
        minute's rate, not as zero."""
        slots = [s for s in (self._slots[i % STEPS] for i in range(last - 5, last + 1)) if s.index > last - 6]
        span = 5 * STEP + elapsed
        requests = sum(s.requests for s in slots)
        ttfb = [sum(counts) for counts in zip(*(s.ttfb for s in slots if s.ttfb))]
        return {"requests_per_s": round(requests / span, 3), "tokens_per_s": round(sum(s.tokens for s in slots) / span, 2),
                "error_rate": round(sum(s.errors for s in slots) / requests, 4) if requests else None,
                "ttfb_p50_ms": _quantile(ttfb, 0.5), "ttfb_p99_ms": _quantile(ttfb, 0.99)}

    def snapshot(self, now: float) -> dict[str, Any]:
        """The hour's series, oldest first (per-second rates; the last slot is the one still filling, its rates
        over the seconds it has had), the last minute's figures, and the latest requests, newest first (each
        with an ``id``: the page marks the ones it has not shown yet)."""
        last = int(now // STEP)
        elapsed = max(1.0, now - last * STEP)
        rps: list[float] = []
        err: list[float | None] = []
        tps: list[float] = []
        cost: list[float] = []
        streams: list[int] = []
        p50: list[float | None] = []
        p99: list[float | None] = []
        for index in range(last - STEPS + 1, last + 1):
            slot = self._slots[index % STEPS]
            span = elapsed if index == last else STEP
            if slot.index != index:
                slot = _Slot()
            rps.append(round(slot.requests / span, 3))
            err.append(round(slot.errors / slot.requests, 4) if slot.requests else None)
            tps.append(round(slot.tokens / span, 2))
            cost.append(slot.cost_micros / 1_000_000)
            streams.append(slot.streams)
            p50.append(_quantile(slot.ttfb, 0.5))
            p99.append(_quantile(slot.ttfb, 0.99))
        return {"now": round(now, 3), "step": STEP, "last_minute": self._minute(last, elapsed),
                "series": {"requests_per_s": rps, "error_rate": err, "tokens_per_s": tps, "cost_usd": cost,
                           "streams_open": streams, "ttfb_p50_ms": p50, "ttfb_p99_ms": p99},
                "recent": sorted(self.rows(), key=lambda r: r["time"])[::-1]}

    def export(self, now: float, open_streams: int) -> dict[str, Any]:
        """What this process publishes for the other instances' consoles: its slots of the hour that saw
        anything, its latest requests and how many streams it has open now."""
        first = int(now // STEP) - STEPS + 1
        return {"v": EXPORT_VERSION, "slots": [[s.index, s.requests, s.errors, s.tokens, s.cost_micros, s.streams, s.ttfb]
                          for s in self._slots if s.index >= first and (s.requests or s.streams)],
                "recent": self.rows(), "streams_open": open_streams}

    def absorb(self, exported: Any) -> None:
        """Add another process's ``export`` into this one: counts and histograms add up, as do the streams each
        held open at its busiest in a step (so a merged step's streams is at most the gateway's busiest). An
        export of another shape (a relay of another version mid-upgrade, a damaged record) raises ValueError
        before anything is added."""
        try:
            if exported.get("v") != EXPORT_VERSION:
                raise ValueError(f"export version {exported.get('v')!r}")
            slots = [(int(i), int(r), int(e), int(t), int(c), int(st), [int(x) for x in (h or ())])
                     for i, r, e, t, c, st, h in exported["slots"]]
            recent = [r for r in exported["recent"] if isinstance(r, dict) and isinstance(r.get("time"), (int, float))]
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a live export: {exc}") from None
        for index, requests, errors, tokens, cost_micros, streams, ttfb in slots:
            slot = self._slots[index % STEPS]
            if slot.index > index:
                continue  # a step older than the one this slot holds now
            if slot.index != index:
                slot.reset(index)
            slot.requests += requests
            slot.errors += errors
            slot.tokens += tokens
            slot.cost_micros += cost_micros
            slot.streams += streams
            if len(ttfb) == len(TTFB_BOUNDS) + 1:
                slot.ttfb = [a + b for a, b in zip(slot.ttfb or [0] * len(ttfb), ttfb)]
        newest = sorted([*self.rows(), *recent], key=lambda r: r["time"])[-RECENT:]
        self.recent = deque(newest, maxlen=RECENT)


def merged(now: float, exports: list[Any]) -> tuple[Live, int, int]:
    """One view of several processes' exports (this one's included), how many streams they have open, and how
    many exports could not be read (left out, not fatal: one bad record must not blank every console)."""
    whole = Live("gateway")
    streams, unreadable = 0, 0
    for exported in exports:
        try:
            whole.absorb(exported)
            streams += int(exported.get("streams_open", 0))
        except (ValueError, TypeError):
            unreadable += 1
    return whole, streams, unreadable
