"""Model id -> the upstream targets that can serve it (first is used; the rest are fallbacks)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

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


def scenario(config: Config, model: str, req: dict[str, Any] | None, estimate: int) -> str | None:
    """Which scenario route serves a Claude id: long context, web search, background work, thinking."""
    routes = config.routes
    if req is None:
        return None
    if "long_context" in routes and estimate > config.long_context_threshold:
        return "long_context"
    if "web_search" in routes and any(
        isinstance(t, dict) and str(t.get("type", "")).startswith("web_search") for t in req.get("tools") or []
    ):
        return "web_search"
    if "background" in routes and "haiku" in model.lower():
        return "background"
    thinking = req.get("thinking")
    if "think" in routes and isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive"):
        return "think"
    return None


def resolve(config: Config, model: str, req: dict[str, Any] | None = None, estimate: int = 0) -> list[Target]:
    """Resolution order: alias; provider/model; a provider's listed model; any other non-Claude name on a
    provider with passthrough_models; for Claude ids a scenario route (long_context, web_search, background,
    think), then the tier route; default."""
    if model in config.models:
        return [_target(config, t) for t in config.models[model]]
    provider, sep, upstream_model = model.partition("/")
    if sep and upstream_model and provider in config.providers:
        return [Target(config.providers[provider], upstream_model)]
    for p in config.providers.values():
        if model in p.models:
            return [Target(p, model)]
    lowered = model.lower()
    claude_id = "claude" in lowered or lowered.startswith(("haiku", "sonnet", "opus"))
    if not claude_id:
        for p in config.providers.values():
            if p.passthrough_models:  # any other name goes to the upstream as the client wrote it
                return [Target(p, model)]
    if claude_id:
        route = scenario(config, model, req, estimate)
        if route is not None:
            return [_target(config, t) for t in config.routes[route]]
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


def configured_names(config: Config) -> set[str]:
    """Every model name the config itself writes down (aliases, provider/model and bare upstream names): the
    names /metrics may label without a bound."""
    names = set(listed_models(config))
    for p in config.providers.values():
        names.update(p.models)
    return names


def named_targets(config: Config) -> frozenset[tuple[str, str]]:
    """Every (provider, upstream model) the config writes down: listed models, per-model limits, alias and route
    targets (with no config file, RELAY_DEFAULT_MODEL). Only these are worth asking a server about by name."""
    named = {(p.name, m) for p in config.providers.values() for m in (*p.models, *p.limits)}
    for spec in (s for specs in (*config.models.values(), *config.routes.values()) for s in specs):
        provider, _, model = spec.partition("/")
        named.add((provider, model))
    return frozenset(named)


MODEL_TAG = re.compile(r"^\s*<relay-model>\s*([^<\s]+)\s*</relay-model>\s*")


def take_model_tag(req: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """A sub-agent picks its model with ``<relay-model>provider/model</relay-model>`` at the start of its
    system prompt or first user message; the tag is removed before the upstream sees it."""
    system = req.get("system")
    if isinstance(system, str):
        m = MODEL_TAG.match(system)
        if m:
            return m.group(1), {**req, "system": system[m.end():]}
    elif isinstance(system, list):
        for i, block in enumerate(system):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                m = MODEL_TAG.match(block["text"])
                if m:
                    blocks = [*system[:i], {**block, "text": block["text"][m.end():]}, *system[i + 1:]]
                    return m.group(1), {**req, "system": blocks}
    messages = req.get("messages")
    if isinstance(messages, list):
        for n, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") != "user":
                continue
            content = message.get("content")
            if isinstance(content, str):
                m = MODEL_TAG.match(content)
                if m:
                    return m.group(1), _replace_message(req, n, {**message, "content": content[m.end():]})
            elif isinstance(content, list):
                for i, block in enumerate(content):
                    if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
                        m = MODEL_TAG.search(block["text"]) if "<relay-model>" in block["text"] else None
                        if m and not block["text"][: m.start()].strip():
                            new_block = {**block, "text": block["text"][m.end():]}
                            new_content = [*content[:i], new_block, *content[i + 1:]]
                            return m.group(1), _replace_message(req, n, {**message, "content": new_content})
            break  # only the first user message
    return None, req


def _replace_message(req: dict[str, Any], index: int, message: dict[str, Any]) -> dict[str, Any]:
    messages = list(req["messages"])
    messages[index] = message
    return {**req, "messages": messages}
