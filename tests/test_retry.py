"""relay.retry.next_step: retry, fall back or raise after a failed attempt, decided with the clock and the jitter
passed in, so every branch is checked without a socket or a sleep."""

from __future__ import annotations

import pytest

from relay.config import Provider
from relay.errors import RelayError, as_anthropic_overflow, empty_stream
from relay.health import ProviderHealth
from relay.retry import EXHAUSTED, FALL_BACK, RAISE, RETRYABLE, Retry, next_step, retry_after

P = Provider("p", "http://127.0.0.1:1/v1", retries=2, max_retry_wait=5.0)
HALF = lambda low, high: 0.5  # noqa: E731  the jitter, fixed: waits are 0.25 * 2**attempt * 0.5


def err(status: int, after: str | None = None) -> RelayError:
    return RelayError(status, "p: no", headers=[(b"retry-after", after.encode())] if after else None)


@pytest.mark.parametrize("status", sorted(RETRYABLE))
def test_retryable_statuses_back_off_then_fall_back(status: int) -> None:
    health = ProviderHealth(())
    assert next_step(err(status), 1, P, health, 0.0, jitter=HALF) == Retry(0.25)
    assert next_step(err(status), 2, P, health, 0.0, jitter=HALF) == Retry(0.5)
    assert next_step(err(status), 3, P, health, 0.0, jitter=HALF) is FALL_BACK
    assert next_step(err(status), 3, P, health, 0.0, last=True, jitter=HALF) is EXHAUSTED


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
def test_the_clients_errors_are_raised_at_once(status: int) -> None:
    health = ProviderHealth(("k",))
    health.attempt_failed("k", status, 0.0)  # as the server records it first: the only key now rests on 401/403
    assert next_step(err(status), 1, P, health, 0.0) is RAISE


def test_retry_after_is_waited_when_short_and_passed_on_when_long() -> None:
    health = ProviderHealth(())
    assert next_step(err(503, "2"), 1, P, health, 0.0) == Retry(2.0)
    assert next_step(err(503, "60"), 1, P, health, 0.0) is FALL_BACK
    assert next_step(err(503, "60"), 1, P, health, 0.0, last=True) is EXHAUSTED
    assert retry_after(err(429, "soon")) is None and retry_after(err(429, "-3")) == 0.0


def test_a_refused_key_is_retried_at_once_while_another_key_is_fresh() -> None:
    health = ProviderHealth(("a", "b"))
    health.attempt_failed("a", 401, 0.0)
    assert next_step(err(401), 1, P, health, 0.0) == Retry(0.0)
    health.attempt_failed("b", 401, 0.0)
    assert next_step(err(401), 2, P, health, 0.0) is RAISE  # every key refused: the client must hear it


def test_an_empty_stream_is_tried_elsewhere_not_again() -> None:
    assert next_step(empty_stream("p/m"), 1, P, ProviderHealth(()), 0.0) is FALL_BACK
    assert next_step(empty_stream("p/m"), 1, P, ProviderHealth(()), 0.0, last=True) is EXHAUSTED
    # from a local server with no window known it is answered as a 400 (which Claude Code does not retry), still
    # tried elsewhere; from any other upstream it stays a 502
    assert as_anthropic_overflow(empty_stream("p/m"), 20000, None, None).status == 502
    answered = as_anthropic_overflow(empty_stream("p/m"), 20000, None, None, local=True)
    assert answered.status == 400 and "set context_window" in answered.message
    assert next_step(answered, 1, P, ProviderHealth(()), 0.0) is FALL_BACK
    assert next_step(answered, 1, P, ProviderHealth(()), 0.0, last=True) is EXHAUSTED


def test_no_retries_configured_falls_back_at_once() -> None:
    none = Provider("p", "http://127.0.0.1:1/v1", retries=0)
    assert next_step(err(502), 1, none, ProviderHealth(()), 0.0) is FALL_BACK
