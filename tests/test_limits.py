"""relay.limits and relay.pricing: pure arithmetic, a clock passed in, no sleeping."""

from __future__ import annotations

import calendar

import pytest

from relay import pricing
from relay.limits import Limits, Meter, Windows, admitted, check, name, spent

T0 = calendar.timegm((2026, 3, 14, 12, 0, 30))  # 2026-03-14T12:00:30Z


def test_windows_are_aligned_so_every_instance_names_them_alike() -> None:
    w = Windows()
    assert w.span("rate", T0) == (T0 - 30, T0 + 30)
    assert w.span("day", T0) == (calendar.timegm((2026, 3, 14, 0, 0, 0)), calendar.timegm((2026, 3, 15, 0, 0, 0)))
    assert w.span("month", T0) == (calendar.timegm((2026, 3, 1, 0, 0, 0)), calendar.timegm((2026, 4, 1, 0, 0, 0)))
    december = calendar.timegm((2026, 12, 31, 23, 59, 59))
    assert w.span("month", december)[1] == calendar.timegm((2027, 1, 1, 0, 0, 0))
    short = Windows(rate=2.0, day=5.0, month=7.0)
    assert short.span("rate", 101.5) == (100.0, 102.0)
    assert short.span("day", 101.5) == (100.0, 105.0)
    assert short.span("month", 101.5) == (98.0, 105.0)


def test_a_kept_span_is_the_one_a_fresh_reckoning_gives_across_every_edge() -> None:
    """Each period's last span is kept; a time at its end, past it or before it (a wall clock stepped back)
    reckons again."""
    kept, short = Windows(), Windows(rate=2.0, day=5.0, month=7.0)
    april = calendar.timegm((2026, 4, 1, 0, 0, 0))
    times = [T0, T0 + 29.9, T0 + 30, T0 + 10, april - 0.001, april, april - 1, T0 - 86400, 99.0, 100.0, 101.99, 102.0]
    for now in times:
        for period in ("rate", "day", "month"):
            assert kept.span(period, now) == Windows().span(period, now), (period, now)
            assert short.span(period, now) == Windows(rate=2.0, day=5.0, month=7.0).span(period, now), (period, now)


def run(limits: Limits, meter: Meter, now: float, w: Windows, streams: int = 0):  # type: ignore[no-untyped-def]
    refusal = check("alice", limits, meter.counts("alice"), streams, now, w)
    if refusal is None:
        meter.add("alice", admitted(now, w))
    return refusal


def test_rpm_refuses_past_the_limit_with_the_seconds_until_the_window_frees() -> None:
    w, meter, limits = Windows(rate=10.0), Meter(), Limits(rpm=3)
    assert [run(limits, meter, 100.0 + i, w) for i in range(3)] == [None, None, None]
    refusal = run(limits, meter, 103.5, w)
    assert refusal is not None and (refusal.status, refusal.error_type) == (429, "rate_limit_error")
    assert refusal.retry_after == 6.5 and refusal.retry_after_header == "7" and refusal.resets_at == 110.0
    assert "3 requests per 10s" in refusal.message
    assert run(limits, meter, 110.0, w) is None  # the next window starts empty


def test_tpm_counts_input_plus_output_when_a_request_ends() -> None:
    w, meter, limits = Windows(rate=60.0), Meter(), Limits(tpm=100)
    assert run(limits, meter, T0, w) is None
    meter.add("alice", spent(limits, T0, w, tokens=60, micros=0))
    assert run(limits, meter, T0 + 1, w) is None  # 60 < 100: still admitted (and then it overspends)
    meter.add("alice", spent(limits, T0 + 1, w, tokens=60, micros=0))
    refusal = run(limits, meter, T0 + 2, w)
    assert refusal is not None and refusal.status == 429 and "100 tokens per minute" in refusal.message


def test_budget_is_a_402_billing_error_naming_the_budget_and_its_reset() -> None:
    w, meter = Windows(), Meter()
    limits = Limits(budget=1.0, budget_period="day")
    assert run(limits, meter, T0, w) is None
    meter.add("alice", spent(limits, T0, w, tokens=10, micros=999_999))
    assert run(limits, meter, T0, w) is None  # a micro-dollar left
    meter.add("alice", spent(limits, T0, w, tokens=10, micros=2))
    refusal = run(limits, meter, T0, w)
    assert refusal is not None and (refusal.status, refusal.error_type) == (402, "billing_error")
    assert "daily budget of $1.00" in refusal.message and "2026-03-15T00:00:00Z" in refusal.message
    assert refusal.retry_after == 12 * 3600 - 30
    assert run(limits, meter, calendar.timegm((2026, 3, 15, 0, 0, 0)), w) is None  # a new day


def test_spend_is_kept_for_both_periods_so_a_key_can_switch() -> None:
    w, meter = Windows(), Meter()
    meter.add("alice", spent(Limits(budget=5.0, budget_period="day"), T0, w, 0, 7_000_000))
    monthly = Limits(budget=10.0, budget_period="month")
    assert check("alice", monthly, meter.counts("alice"), 0, T0, w) is None  # $7 of $10 this month
    meter.add("alice", spent(monthly, T0, w, 0, 4_000_000))
    assert check("alice", monthly, meter.counts("alice"), 0, T0, w).status == 402  # type: ignore[union-attr]
    tomorrow = Limits(budget=5.0, budget_period="day")
    assert check("alice", tomorrow, meter.counts("alice"), 0, T0 + 86400, w) is None  # a new day, same month


def test_streams_limit() -> None:
    refusal = check("alice", Limits(max_streams=2), {}, 2, T0, Windows())
    assert refusal is not None and refusal.status == 429 and "2 requests in flight" in refusal.message
    assert check("alice", Limits(max_streams=2), {}, 1, T0, Windows()) is None


def test_meter_counts_what_was_pushed_until_the_store_answers_and_what_failed_to_push() -> None:
    w, meter = Windows(rate=10.0), Meter()
    meter.add("k", admitted(100.0, w))
    taken = meter.take()
    assert taken == {"k": {name("req", 100.0): (1, 110.0)}}
    assert meter.counts("k") == {name("req", 100.0): 1}  # still counted while the push is under way
    meter.add("k", admitted(101.0, w))
    meter.settle({"k": {name("req", 100.0): 5}}, 101.0)  # the store: 5 over every instance (ours included)
    assert meter.counts("k") == {name("req", 100.0): 6}  # + the one added after the push
    meter.restore(meter.take())  # a push that failed: pending again, counted once
    assert meter.counts("k") == {name("req", 100.0): 6}
    meter.settle({}, 110.0)  # the window is over: forgotten
    assert meter.counts("k") == {name("req", 100.0): 1}  # only the pending delta remains until pushed


def test_prices_and_costs() -> None:
    price = pricing.parse({"input": 0.56, "output": 1.68, "cache_read": 0.07})
    assert pricing.cost_micros(price, 1_000_000, 0) == 560_000
    assert pricing.cost_micros(price, input_tokens=1000, output_tokens=500, cache_read=2000, cache_write=100) == \
        round(1000 * 0.56 + 500 * 1.68 + 2000 * 0.07 + 100 * 0.56)
    assert pricing.cost_micros(None, 10**6, 10**6) == 0
    assert pricing.lookup({"llama-*": price}, "llama-3") is price and pricing.lookup({"x": price}, "y") is None
    for bad, why in (({"input": 1}, "output is required"), ({"input": -1, "output": 1}, ">= 0"),
                     ({"input": 1, "output": 1, "cached": 1}, "unknown price field")):
        with pytest.raises(ValueError, match=why):
            pricing.parse(bad)
