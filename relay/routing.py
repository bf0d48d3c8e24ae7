"""Model id -> the upstream targets that can serve it (first is used; the rest are fallbacks)."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import Config, Provider
from relay.errors import RelayError


@dataclass(frozen=True)
class Target:
    provider: Provider
    model: str

    @property
    def label(self) -> str:
        return f"{self.provider.name}/{self.model}"


def _target(config: Config, spec: str) -> Target:
    provider, _, model = spec.partition("/")
    return Target(config.providers[provider], model)


def resolve(config: Config, model: str) -> list[Target]:
    """Resolution order: alias; provider/model; a provider's listed model; Claude tier route; default."""
    if model in config.models:
        return [_target(config, t) for t in config.models[model]]
    provider, sep, upstream_model = model.partition("/")
    if sep and upstream_model and provider in config.providers:
        return [Target(config.providers[provider], upstream_model)]
    for p in config.providers.values():
        if model in p.models:
            return [Target(p, model)]
    lowered = model.lower()
    if "claude" in lowered or lowered.startswith(("haiku", "sonnet", "opus")):
        for tier in ("haiku", "sonnet", "opus"):
            if tier in lowered and tier in config.routes:
                return [_target(config, t) for t in config.routes[tier]]
    if "default" in config.routes:
        return [_target(config, t) for t in config.routes["default"]]
    for p in config.providers.values():
        if p.passthrough_models:
            return [Target(p, model)]
    raise RelayError(404, f"model: {model!r} is not configured in relay (no alias, provider or route serves it)", "not_found_error")


def listed_models(config: Config) -> list[str]:
    """What GET /v1/models shows: aliases first, then every provider/model relay can route."""
    seen: dict[str, None] = {}
    for alias in config.models:
        seen[alias] = None
    for p in config.providers.values():
        for m in p.models:
            seen[f"{p.name}/{m}"] = None
    return list(seen)
