"""What to do after an attempt on an upstream failed: retry the same provider, fall back to the next target,
or give the client the error.

A pure decision (the clock and the jitter are passed in), so every branch is tested without sleeping; the
server carries it out. ``health.py`` keeps the state it reads (which keys rest, whether a circuit is open).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from relay.config import Provider
from relay.errors import RelayError
from relay.health import ProviderHealth

RETRYABLE = frozenset({408, 429, 500, 502, 503, 504, 529})
KEY_REFUSED = frozenset({401, 403, 429})


@dataclass(frozen=True)
class Retry:
    wait: float  # seconds before the next attempt on the same provider


@dataclass(frozen=True)
class FallBack:
    pass


@dataclass(frozen=True)
class Raise:
    exhausted: bool  # False: the error is the client's to see; True: worth another try, but none is left


Step = Retry | FallBack | Raise
FALL_BACK = FallBack()
RAISE = Raise(exhausted=False)
EXHAUSTED = Raise(exhausted=True)


def retry_after(err: RelayError) -> float | None:
    """The upstream's Retry-After in seconds (the numeric form), if it sent one."""
    for name, value in err.headers:
        if name == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return None
    return None


def next_step(error: RelayError, attempt: int, provider: Provider, health: ProviderHealth, now: float, *,
              last: bool = False, jitter: Callable[[float, float], float] = random.uniform) -> Step:
    """After failure number ``attempt`` (1 = the first) on ``provider``, none of whose bytes reached the client.

    Retryable: the statuses in RETRYABLE, and a refused key while another key is fresh (then at once); an
    empty answer is tried elsewhere but not again here. Waits
    back off exponentially with jitter unless the upstream said Retry-After; a wait longer than the provider's
    max_retry_wait, or retries used up, falls back to the next target (``last``: there is none, so raise)."""
    if error.empty:  # a 200 with nothing in it (a 400 or 502 by then): the same request gets the same empty
        return EXHAUSTED if last else FALL_BACK  # answer, so no retry here, but another target may serve it
    rotated = error.status in KEY_REFUSED and health.has_fresh_key(now)
    if error.status not in RETRYABLE and not rotated:
        return RAISE
    after = retry_after(error)
    wait = 0.0 if rotated else min(after if after is not None else 0.25 * 2 ** attempt * jitter(0.5, 1.0), 1e9)
    if attempt <= provider.retries and wait <= provider.max_retry_wait:
        return Retry(wait)
    return EXHAUSTED if last else FALL_BACK
