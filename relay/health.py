"""Per-provider health: upstream key rotation with cool-downs, and a circuit breaker.

Pure state with the clock passed in, so it is tested without sleeping. The server asks it which key to use
and whether a provider is worth trying, and tells it how each attempt went (``attempt_failed`` is the one
place that says what a failure counts as).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.config import Provider

AUTH_COOLDOWN = 300.0  # a key the upstream refused (401/403) is probably revoked: rest it long
RATE_COOLDOWN = 30.0  # a key that hit a rate limit, unless Retry-After says otherwise


@dataclass
class ProviderHealth:
    keys: tuple[str, ...]
    failure_threshold: int = 5
    cooldown: float = 30.0
    _next: int = 0
    _resting: dict[str, float] = field(default_factory=dict)  # key -> time it may be used again
    _failures: int = 0
    _open_until: float = 0.0
    _probing: bool = False
    last_error: tuple[int, float] | None = None  # (status, when) of the last failed attempt, for the console

    def pick_key(self, now: float, prefer: str | None = None) -> str:
        """``prefer`` (the key a session used last) if it is one of these and not resting; else round robin
        over keys that are not resting; if all rest, the one that wakes first."""
        if not self.keys:
            return ""
        if prefer is not None and self._resting.get(prefer, 0.0) <= now and prefer in self.keys:
            return prefer
        for _ in range(len(self.keys)):
            key = self.keys[self._next % len(self.keys)]
            self._next += 1
            if self._resting.get(key, 0.0) <= now:
                return key
        return min(self.keys, key=lambda k: self._resting.get(k, 0.0))

    @property
    def resting(self) -> bool:
        """Some key rests: ``pick_key`` needs the time (with none resting, any time picks the same key)."""
        return bool(self._resting)

    def key_refused(self, key: str, status: int, now: float, retry_after: float | None = None) -> None:
        if status in (401, 403):
            self._resting[key] = now + AUTH_COOLDOWN
        elif status == 429:
            self._resting[key] = now + (retry_after if retry_after is not None else RATE_COOLDOWN)

    def has_fresh_key(self, now: float) -> bool:
        return any(self._resting.get(k, 0.0) <= now for k in self.keys)

    def available(self, now: float) -> bool:
        """Closed: yes. Open: no, until the cool-down ends; then one probe request is let through."""
        if self._failures < self.failure_threshold:
            return True
        if now < self._open_until or self._probing:
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._failures = 0
        self._probing = False

    def abandoned(self) -> None:
        """An attempt ended with no verdict on the provider (the client left, a 4xx): the probe slot is free."""
        self._probing = False

    def failed(self, now: float) -> None:
        self._failures += 1
        self._probing = False
        if self._failures >= self.failure_threshold:
            self._open_until = now + self.cooldown

    def attempt_failed(self, key: str, status: int, now: float, retry_after: float | None = None) -> None:
        """What one failed attempt says: a refused key (401/403/429) rests and says nothing about the provider,
        a 5xx counts against the circuit, anything else (a 4xx about the request) is no verdict."""
        self.last_error = (status, now)
        if status in (401, 403, 429):
            self.key_refused(key, status, now, retry_after)
            self.abandoned()
        elif status >= 500:
            self.failed(now)
        else:
            self.abandoned()

    def state(self, now: float) -> dict[str, object]:
        """What the console shows: the circuit, the keys resting (counted, never named) and the last failure."""
        circuit = "closed" if self._failures < self.failure_threshold else "open" if now < self._open_until else "half-open"
        return {"circuit": circuit, "failures": self._failures, "keys": len(self.keys),
                "keys_cooling": sum(1 for k in self.keys if self._resting.get(k, 0.0) > now),
                "last_error": None if self.last_error is None else
                {"status": self.last_error[0], "seconds_ago": round(now - self.last_error[1], 1)}}


class Healths:
    """The health of every provider, by name; a provider whose keys or thresholds changed (a reload) starts
    afresh, the others keep their circuit and cool-downs."""

    def __init__(self) -> None:
        self._by_name: dict[str, ProviderHealth] = {}

    def keep(self, names: set[str]) -> None:
        """Forget every provider but these (a reload removed or changed the others)."""
        self._by_name = {n: h for n, h in self._by_name.items() if n in names}

    def of(self, provider: Provider) -> ProviderHealth:
        health = self._by_name.get(provider.name)
        if health is None or (health.keys, health.failure_threshold, health.cooldown) != \
                (provider.api_keys, provider.failure_threshold, provider.cooldown):
            health = ProviderHealth(provider.api_keys, provider.failure_threshold, provider.cooldown)
            self._by_name[provider.name] = health
        return health
