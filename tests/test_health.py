"""relay.health: key rotation, cool-downs and the circuit breaker, with the clock passed in (no sleeping)."""

from __future__ import annotations

from relay.config import Provider
from relay.health import AUTH_COOLDOWN, RATE_COOLDOWN, Healths, ProviderHealth


def test_keys_rotate_round_robin() -> None:
    h = ProviderHealth(("a", "b", "c"))
    assert [h.pick_key(0.0) for _ in range(4)] == ["a", "b", "c", "a"]
    assert ProviderHealth(()).pick_key(0.0) == ""


def test_a_refused_key_rests_then_comes_back() -> None:
    h = ProviderHealth(("a", "b"))
    h.key_refused("a", 401, now=0.0)
    assert [h.pick_key(1.0) for _ in range(3)] == ["b", "b", "b"]
    assert h.has_fresh_key(1.0)
    assert "a" in {h.pick_key(AUTH_COOLDOWN) for _ in range(2)}


def test_rate_limits_rest_as_long_as_retry_after_says() -> None:
    h = ProviderHealth(("a",))
    h.key_refused("a", 429, now=10.0, retry_after=2.0)
    assert not h.has_fresh_key(11.0) and h.has_fresh_key(12.0)
    h.key_refused("a", 429, now=20.0)
    assert not h.has_fresh_key(20.0 + RATE_COOLDOWN - 0.1) and h.has_fresh_key(20.0 + RATE_COOLDOWN)


def test_when_every_key_rests_the_one_that_wakes_first_is_used() -> None:
    h = ProviderHealth(("a", "b"))
    h.key_refused("a", 429, now=0.0, retry_after=50.0)
    h.key_refused("b", 429, now=0.0, retry_after=5.0)
    assert h.pick_key(1.0) == "b" and not h.has_fresh_key(1.0)


def test_the_circuit_opens_after_the_threshold_and_lets_one_probe_through() -> None:
    h = ProviderHealth(("k",), failure_threshold=2, cooldown=30.0)
    h.failed(0.0)
    assert h.available(0.0)
    h.failed(1.0)
    assert not h.available(1.0) and not h.available(30.9)
    assert h.available(31.0)  # the probe
    assert not h.available(31.0)  # only one at a time
    h.failed(32.0)  # the probe failed: open again
    assert not h.available(32.0) and h.available(62.0)
    h.succeeded()
    assert h.available(62.0) and h.available(62.0)  # closed


def test_an_abandoned_probe_frees_the_slot() -> None:
    h = ProviderHealth(("k",), failure_threshold=1, cooldown=1.0)
    h.failed(0.0)
    assert h.available(1.0) and not h.available(1.0)
    h.abandoned()  # the client hung up mid-probe: no verdict, but the next request may probe
    assert h.available(1.0)


def test_what_a_failed_attempt_counts_as() -> None:
    h = ProviderHealth(("a", "b"), failure_threshold=1)
    h.attempt_failed("a", 429, now=0.0, retry_after=3.0)  # a key's problem, not the provider's
    assert h.available(0.0) and h.pick_key(0.0) == "b" and not h._resting.get("b")
    h.attempt_failed("b", 400, now=0.0)  # the request's problem: no verdict
    assert h.available(0.0) and h.has_fresh_key(0.0)
    h.attempt_failed("b", 503, now=0.0)  # the provider's
    assert not h.available(0.0)


def test_the_registry_starts_afresh_when_a_provider_keys_change() -> None:
    healths = Healths()
    p = Provider("p", "http://127.0.0.1:1/v1", api_keys=("a",), failure_threshold=1)
    first = healths.of(p)
    assert healths.of(p) is first
    first.failed(0.0)
    rekeyed = Provider("p", "http://127.0.0.1:1/v1", api_keys=("b",), failure_threshold=1)
    assert healths.of(rekeyed) is not first and healths.of(rekeyed).available(0.0)
