"""Per-key limits as arithmetic: windows, counters, budgets and the decision to serve or refuse.

Pure (no I/O, no clock of its own): every function takes ``now`` (seconds since the epoch, wall time, because
instances sharing a store must agree on where a window starts). Windows are fixed and aligned (a minute window
starts at a multiple of its length; a day or month at UTC midnight or the 1st), so every instance names the same
window the same way and their counts add up in the store without coordination. Their lengths are configurable,
so tests use windows of a second or two instead of sleeping through real ones.

Counters are named ``<kind>:<window start>``: ``req`` (requests admitted) and ``tok`` (input + output tokens) in
the rate window, ``usd-day`` and ``usd-month`` (micro-dollars spent) in the day and the month.
"""

from __future__ import annotations

import calendar
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping

PERIODS = ("day", "month")
ADJECTIVE = {"day": "daily", "month": "monthly"}


@dataclass(frozen=True)
class Limits:
    """What one key may do; None = unlimited."""

    rpm: int | None = None
    tpm: int | None = None  # input + output tokens per rate window
    max_streams: int | None = None  # requests in flight at once
    budget: float | None = None  # USD per budget period
    budget_period: str = "month"

    @cached_property  # asked on every request of a virtual key; not a field, so never stored
    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.max_streams, self.budget))


@dataclass(frozen=True)
class Windows:
    """Window lengths in seconds. ``day``/``month`` None = the calendar's (UTC). Each period's last span is
    kept: a limited key's request asks for spans six times, nearly always the same ones (a month's costs a
    ``gmtime`` and two ``timegm``)."""

    rate: float = 60.0
    day: float | None = None
    month: float | None = None
    _last: dict[str, tuple[float, float]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def span(self, period: str, now: float) -> tuple[float, float]:
        """(start, end) of the window of ``period`` (``rate``, ``day`` or ``month``) holding ``now``."""
        last = self._last.get(period)
        if last is not None and last[0] <= now < last[1]:
            return last
        span = self._span(period, now)
        self._last[period] = span
        return span

    def _span(self, period: str, now: float) -> tuple[float, float]:
        length = self.rate if period == "rate" else getattr(self, period)
        if length:
            start = now - now % length
            return start, start + length
        if period == "day":
            start = now - now % 86400
            return start, start + 86400
        t = time.gmtime(now)
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return start, calendar.timegm((year, month, 1, 0, 0, 0))


def name(kind: str, start: float) -> str:
    return f"{kind}:{int(start)}"


def budget_counter(period: str, start: float) -> str:
    """Micro-dollars spent in the day or month starting at ``start``."""
    return name(f"usd-{period}", start)


@dataclass(frozen=True)
class Refusal:
    """Why a request is not served: the status, Anthropic's error type, a message, and when to come back."""

    status: int
    error_type: str
    message: str
    retry_after: float  # seconds from now
    resets_at: float  # seconds since the epoch

    @property
    def retry_after_header(self) -> str:
        return str(max(1, int(self.retry_after + 0.999)))  # whole seconds, rounded up, never 0


@dataclass(frozen=True)
class Charge:
    """Deltas to add to named counters, each kept until ``expires`` (the end of its window)."""

    deltas: dict[str, tuple[int, float]] = field(default_factory=dict)  # name -> (delta, expires at)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def check(key: str, limits: Limits, counts: Mapping[str, int], streams: int, now: float,
          windows: Windows) -> Refusal | None:
    """None to serve, else the refusal. ``counts``: the counters of this key (all instances, as last known);
    ``streams``: its requests in flight now. A budget is checked before the rates: a spent budget will not
    free up in a minute, so its answer is the truer one."""
    if limits.budget is not None:
        start, end = windows.span(limits.budget_period, now)
        spent = counts.get(budget_counter(limits.budget_period, start), 0)
        if spent >= round(limits.budget * 1_000_000):
            return Refusal(402, "billing_error",
                           f"key {key!r} has spent its {ADJECTIVE[limits.budget_period]} budget of ${limits.budget:.2f} "
                           f"(${spent / 1_000_000:.2f}); it resets at {_iso(end)}", end - now, end)
    start, end = windows.span("rate", now)
    per = "minute" if windows.rate == 60 else f"{windows.rate:g}s"
    if limits.rpm is not None and counts.get(name("req", start), 0) >= limits.rpm:
        return Refusal(429, "rate_limit_error", f"key {key!r} is over its limit of {limits.rpm} requests per {per}",
                       end - now, end)
    if limits.tpm is not None and counts.get(name("tok", start), 0) >= limits.tpm:
        return Refusal(429, "rate_limit_error", f"key {key!r} is over its limit of {limits.tpm} tokens per {per}",
                       end - now, end)
    if limits.max_streams is not None and streams >= limits.max_streams:
        return Refusal(429, "rate_limit_error",
                       f"key {key!r} has {streams} requests in flight (its limit is {limits.max_streams})", 1.0, now + 1)
    return None


def admitted(now: float, windows: Windows) -> Charge:
    """What admitting one request adds: one to the rate window's request count."""
    start, end = windows.span("rate", now)
    return Charge({name("req", start): (1, end)})


def spent(limits: Limits, now: float, windows: Windows, tokens: int, micros: int) -> Charge:
    """What a finished request adds: its tokens to the rate window (counted when it ends, in the window it
    ends in) and its cost to the budget's period."""
    deltas: dict[str, tuple[int, float]] = {}
    if tokens:
        start, end = windows.span("rate", now)
        deltas[name("tok", start)] = (tokens, end)
    if micros:
        for period in PERIODS:  # both, so a key's period can change without losing what it spent
            start, end = windows.span(period, now)
            deltas[budget_counter(period, start)] = (micros, end)
    return Charge(deltas)


class Meter:
    """One instance's view of its keys' counters: the totals the store last reported (every instance's
    requests), plus what this instance added since its last push. Exactly what a slow or absent store leaves:
    the last known totals, still growing with local traffic, so limits keep holding on this instance."""

    def __init__(self) -> None:
        self.base: dict[str, dict[str, int]] = {}  # key -> counter -> total in the store, as last read
        self.pending: dict[str, dict[str, tuple[int, float]]] = {}  # key -> counter -> (delta, expires)
        self.expiry: dict[str, dict[str, float]] = {}

    def counts(self, key: str) -> dict[str, int]:
        out = dict(self.base.get(key, {}))
        for counter, (delta, _) in self.pending.get(key, {}).items():
            out[counter] = out.get(counter, 0) + delta
        return out

    def add(self, key: str, charge: Charge) -> None:
        mine = self.pending.setdefault(key, {})
        for counter, (delta, expires) in charge.deltas.items():
            old = mine.get(counter, (0, expires))[0]
            mine[counter] = (old + delta, expires)

    def take(self) -> dict[str, dict[str, tuple[int, float]]]:
        """The deltas to push; they stay counted in ``base`` until the store's answer replaces it."""
        taken, self.pending = self.pending, {}
        for key, counters in taken.items():
            base = self.base.setdefault(key, {})
            ends = self.expiry.setdefault(key, {})
            for counter, (delta, expires) in counters.items():
                base[counter] = base.get(counter, 0) + delta
                ends[counter] = expires
        return taken

    def restore(self, taken: Mapping[str, Mapping[str, tuple[int, float]]]) -> None:
        """A push that failed: its deltas are pending again (and still counted locally, once)."""
        for key, counters in taken.items():
            base = self.base.get(key, {})
            for counter, (delta, _) in counters.items():
                base[counter] = base.get(counter, 0) - delta
            self.add(key, Charge(dict(counters)))

    def settle(self, totals: Mapping[str, Mapping[str, int]], now: float) -> None:
        """The store's totals after a push (they include what was taken); drop counters whose window ended."""
        for key, counters in totals.items():
            base = self.base.setdefault(key, {})
            base.update(counters)
        for key, ends in list(self.expiry.items()):
            for counter, expires in list(ends.items()):
                if expires <= now:
                    del ends[counter]
                    self.base.get(key, {}).pop(counter, None)
