"""Configuration: TOML -> frozen dataclasses, ``${VAR}`` expansion, errors that name the key and line.

The file format is relay's public contract (documented in the README). Unknown keys are errors, not
silently ignored, so a typo cannot quietly change behaviour.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
import ssl
import tomllib
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from relay import presets, pricing
from relay.heads import is_header_name

SYSTEM_TURNS = ("keep", "merge", "user")
# The content of an assistant turn that is only tool calls: null (OpenAI's own form; some Bedrock-backed servers
# refuse "") or "" (llama-cpp-python's server, LM Studio and older llama.cpp answer null with a 500/400).
TOOL_CALL_CONTENTS = ("null", "empty")
# How Claude's thinking settings reach the upstream: reasoning_effort (OpenAI Chat/Responses, Gemini's thinking
# level), thinking_type (thinking: {type}, DeepSeek/Kimi/GLM), enable_thinking (+thinking_budget, DashScope,
# SiliconFlow), reasoning_object (reasoning: {effort}, OpenRouter), thinking_budget/thinking_level (native Gemini).
REASONING_CONTROLS = ("none", "reasoning_effort", "thinking_type", "enable_thinking", "reasoning_object",
                      "thinking_budget", "thinking_level")
AUTH_STYLES = ("bearer", "api-key", "x-api-key", "x-goog-api-key", "none")
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
# How a client's output_config.format (structured output) reaches an OpenAI-style upstream: the schema as written
# (json_schema), narrowed to OpenAI's strict subset with strict: true (strict), or refused with a 400 (none).
STRUCTURED_OUTPUT = ("json_schema", "strict", "none")


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class ModelLimits:
    context_window: int | None = None
    max_output: int | None = None


@dataclass(frozen=True)
class Provider:
    name: str
    base_url: str
    format: str = "openai"
    api_keys: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    max_tokens_cap: int | None = None
    max_tokens_field: str = "max_tokens"
    auth: str = "bearer"
    connect_timeout: float = 10.0
    read_timeout: float = 300.0  # longest silence between two upstream reads
    first_byte_timeout: float = 300.0  # a stream that has not started by then is given up (and falls back)
    keepalive_start: float | None = None  # the server's keepalive_start, for this provider's streams
    max_connections: int = 1024  # concurrent upstream requests to this provider; more wait (up to connect_timeout)
    retries: int = 1  # extra attempts on the same provider for 429/5xx/connect failures, before falling back
    max_retry_wait: float = 5.0  # a Retry-After longer than this is passed to the client instead of waited out
    failure_threshold: int = 5  # consecutive failures that open the circuit
    cooldown: float = 30.0  # seconds an open circuit skips the provider before a probe
    # Quirks: data, not code paths.
    system_turns: str = "keep"
    tool_call_content: str = "null"  # see TOOL_CALL_CONTENTS
    reasoning_control: str = "none"
    reasoning_return: bool = False  # send thinking back as reasoning_content (DeepSeek thinking + tools)
    think_tags: bool = False  # split inline <think>...</think> out of content into thinking blocks
    stream_usage: bool = True  # send stream_options.include_usage
    pass_top_k: bool = False
    structured_output: str = "json_schema"
    prompt_cache_key: bool = False  # send Claude Code's session id as prompt_cache_key (OpenAI's cache routing)
    passthrough_models: bool = False  # any model name the client sends goes upstream unchanged
    # Context: the window and output limit of the provider's models, with per-model overrides.
    context_window: int | None = None
    discover_context: bool = False  # ask a local server (llama.cpp, vLLM, Ollama, LM Studio) for its window
    limits: dict[str, "ModelLimits"] = field(default_factory=dict)
    prices: dict[str, pricing.Price] = field(default_factory=dict)  # model (or glob) -> USD per million tokens
    # Presets and the URL's shape.
    preset: str | None = None
    query: tuple[tuple[str, str], ...] = ()  # appended to every upstream URL (Azure's api-version)
    ca_file: str | None = None  # PEM file of the CA(s) to trust for this provider instead of the system's
    explicit: frozenset[str] = frozenset()  # keys the provider block set itself; the rest came from a preset

    def url(self, path: str, model: str = "") -> str:
        """base_url (``{model}`` filled in: Azure deployment URLs) + the format's path + ``query``."""
        base = self.base_url.replace("{model}", quote(model, safe="")) if "{model}" in self.base_url else self.base_url
        url = base + path
        if self.query:
            url += ("&" if "?" in url else "?") + urlencode(self.query)
        return url

    def limits_for(self, model: str) -> "ModelLimits":
        """The known window and output cap of one model: per-model entry, else the provider's defaults."""
        own = self.limits.get(model)
        if own is None:  # the usual case, asked a few times per request: made once
            return self._default_limits
        return ModelLimits(
            own.context_window if own.context_window else self.context_window,
            own.max_output if own.max_output else self.max_tokens_cap,
        )

    @cached_property
    def _default_limits(self) -> "ModelLimits":
        """The provider's own window and cap (a frozen dataclass: ``cached_property`` keeps it beside the fields)."""
        return ModelLimits(self.context_window, self.max_tokens_cap)

    @property
    def api_key(self) -> str:
        return self.api_keys[0] if self.api_keys else ""


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8787
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()  # operators' keys: never client keys (they read /metrics)
    metrics_keys: tuple[str, ...] = ()  # keys that may read /metrics and nothing else (a Prometheus scraper)
    body_limit: int = 32 * 1024 * 1024
    body_memory: int = 256 * 1024 * 1024  # request-body bytes held across all connections; past it, 529
    header_timeout: float = 30.0  # time to deliver a whole request once it has started
    idle_timeout: float = 120.0  # keep-alive connection with no request
    max_header_bytes: int = 64 * 1024
    max_connections: int = 4096  # past this, new connections get 529 overloaded_error
    shutdown_grace: float = 30.0  # seconds open streams get to finish on SIGTERM/SIGINT
    usage_db: str | None = None  # SQLite file of per-key usage; None = the default path, "" = off
    max_messages: int = 100_000  # messages in one request; past this, 413 request_too_large
    max_tools: int = 2_000  # tools in one request
    # A stream's keep-alive: a ping after this many seconds without a write (0: no pings, no early start), and
    # message_start sent before the upstream's first byte once the request has waited keepalive_start seconds.
    keepalive: float = 10.0
    keepalive_start: float = 20.0
    affinity_sessions: int = 10_000  # Claude Code sessions kept on their upstream key and target (0: no affinity)
    # Memory recent large requests may hold, to read only what the next adds (relay.history, reckoned by
    # ``relay.history.weight``: ~64 MiB of Claude Code bodies); 0: off.
    history_memory: int = 256 * 1024 * 1024


@dataclass(frozen=True)
class StoreConfig:
    """``[store]``: where keys, limits and usage live (see relay.store)."""

    url: str = field(default="", repr=False)  # sqlite://PATH, redis://HOST:PORT/DB, rediss://...; "" = the default file
    refresh: float = 0.5  # seconds between two rounds with the store (keys, counters, usage)
    timeout: float = 2.0  # a store round that takes longer is given up (the store counts as down)
    buffer: int = 100_000  # usage rows held while the store is away
    rate_window: float = 60.0  # the "minute" of rpm and tpm, in seconds (tests shorten it)
    day_window: float | None = None  # a budget "day" in seconds; unset = the UTC calendar day
    month_window: float | None = None  # a budget "month" in seconds; unset = the UTC calendar month
    enabled: bool = True  # False when [server] usage_db = "" (no book, no virtual keys)
    # Environment variables a provider stored at run time may name in its api_key (glob patterns; none by default):
    # an admin may point a provider at a key kept in the environment, never read the rest of it.
    provider_env: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClientKey:
    """A client key, named for the usage book, optionally limited to some models (fnmatch patterns)."""

    key: str
    name: str
    models: tuple[str, ...] = ()


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    keys: tuple[ClientKey, ...] = ()
    providers: dict[str, Provider] = field(default_factory=dict)
    models: dict[str, tuple[str, ...]] = field(default_factory=dict)  # alias -> "provider/model" targets
    routes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    long_context_threshold: int = 60000  # estimated input tokens above which `long_context` serves Claude ids
    source: str = "<defaults>"
    stored: frozenset[str] = frozenset()  # providers added at run time, through the store (see with_stored)


ROUTE_NAMES = ("default", "haiku", "sonnet", "opus", "background", "think", "long_context", "web_search")

_SERVER_KEYS = {
    "host": str,
    "port": int,
    "api_keys": list,
    "admin_keys": list,
    "metrics_keys": list,
    "body_limit": int,
    "body_memory": int,
    "header_timeout": (int, float),
    "idle_timeout": (int, float),
    "max_header_bytes": int,
    "max_connections": int,
    "shutdown_grace": (int, float),
    "usage_db": str,
    "max_messages": int,
    "max_tools": int,
    "keepalive": (int, float),
    "keepalive_start": (int, float),
    "affinity_sessions": int,
    "history_memory": int,
}
_PROVIDER_KEYS: dict[str, Any] = {
    "preset": str,
    "query": dict,
    "format": str,
    "base_url": str,
    "ca_file": str,
    "api_key": (str, list),
    "models": list,
    "headers": dict,
    "max_tokens_cap": int,
    "max_tokens_field": str,
    "auth": str,
    "connect_timeout": (int, float),
    "read_timeout": (int, float),
    "first_byte_timeout": (int, float),
    "keepalive_start": (int, float),
    "max_connections": int,
    "retries": int,
    "max_retry_wait": (int, float),
    "failure_threshold": int,
    "cooldown": (int, float),
    "system_turns": str,
    "tool_call_content": str,
    "reasoning_control": str,
    "reasoning_return": bool,
    "think_tags": bool,
    "stream_usage": bool,
    "pass_top_k": bool,
    "structured_output": str,
    "prompt_cache_key": bool,
    "passthrough_models": bool,
    "context_window": int,
    "discover_context": bool,
    "limits": dict,
    "prices": dict,
}
_STORE_KEYS: dict[str, Any] = {
    "url": str,
    "refresh": (int, float),
    "timeout": (int, float),
    "buffer": int,
    "rate_window": (int, float),
    "day_window": (int, float),
    "month_window": (int, float),
    "provider_env": list,
}
_LIMIT_KEYS: dict[str, Any] = {"context_window": int, "max_output": int}
# The least each number of a provider (and of its limits entries) may be, and whether that least itself is allowed:
# a number past it would fail every request later (a negative timeout, no connection allowed), so it is refused
# at load, naming the key.
_AT_LEAST: dict[str, tuple[int, bool]] = {
    "connect_timeout": (0, False),
    "read_timeout": (0, False),
    "first_byte_timeout": (0, False),
    "max_retry_wait": (0, True),
    "cooldown": (0, True),
    "keepalive_start": (0, True),
    "max_connections": (1, True),
    "retries": (0, True),
    "failure_threshold": (1, True),
    "context_window": (1, True),
    "max_tokens_cap": (1, True),
    "max_output": (1, True),
}
# What a header value may not hold: a line break or NUL would end the header early (relay refuses to send it, so
# every request to the provider would fail).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HOST = re.compile(r"[A-Za-z0-9_.-]+")
_CHOICES: dict[str, tuple[str, ...]] = {
    "preset": tuple(presets.PRESETS),
    "system_turns": SYSTEM_TURNS,
    "tool_call_content": TOOL_CALL_CONTENTS,
    "reasoning_control": REASONING_CONTROLS,
    "auth": AUTH_STYLES,
    "max_tokens_field": MAX_TOKENS_FIELDS,
    "structured_output": STRUCTURED_OUTPUT,
}

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Source:
    """Finds the line of a key in the TOML text, so errors can point at it."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def line_of(self, table: str, key: str | None = None) -> int | None:
        current = ""
        header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")
        for number, line in enumerate(self.lines, 1):
            m = header.match(line)
            if m:
                current = m.group(1).replace('"', "").replace(" ", "")
                if key is None and current == table:
                    return number
                continue
            if key is not None and current == table:
                stripped = line.lstrip().replace('"', "")
                if stripped.startswith(key) and stripped[len(key) :].lstrip().startswith("="):
                    return number
        return None

    def error(self, table: str, key: str | None, message: str) -> ConfigError:
        where = f"{table}.{key}" if key else table
        line = self.line_of(table, key)
        at = f"{self.path}:{line}" if line else self.path
        return ConfigError(f"{at}: {where}: {message}")


def _expand(value: Any, src: _Source, table: str, key: str, env: dict[str, str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise src.error(table, key, f"environment variable {name} is not set (write ${{{name}:-}} to make it optional)")

        return _VAR.sub(sub, value)
    if isinstance(value, list):
        return [_expand(v, src, table, key, env) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, src, table, key, env) for k, v in value.items()}
    return value


def _check_keys(data: dict[str, Any], allowed: dict[str, Any], src: _Source, table: str,
                at_least: dict[str, tuple[int, bool]] | None = None) -> None:
    """Each key known and of its type; every list one of strings (each list of the format is: keys, model names);
    a number at least what ``at_least`` says. Messages name the key, never a list's items (they may be secrets)."""
    for key, value in data.items():
        if key not in allowed:
            raise src.error(table, key, f"unknown key (allowed: {', '.join(sorted(allowed))})")
        kind = allowed[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise src.error(table, key, f"expected {names}, got {type(value).__name__}")
        if isinstance(value, list):
            for n, item in enumerate(value, 1):
                if not isinstance(item, str):
                    raise src.error(table, key, f"expected a list of strings, item {n} is {type(item).__name__}")
        if at_least is not None and key in at_least and not isinstance(value, bool):
            least, allowed_itself = at_least[key]
            if not (value >= least if allowed_itself else value > least):  # (nan fails both)
                raise src.error(table, key, f"must be {'>=' if allowed_itself else '>'} {least}, got {value!r}")
        choices = _choices(key)
        if choices is not None and value not in choices:
            raise src.error(table, key, f"must be one of {', '.join(choices)}, got {value!r}")


def provider_choices() -> dict[str, tuple[str, ...]]:
    """Every provider key that takes one of a few values, with them (the console's selects)."""
    return {key: _choices(key) or () for key in ("format", *_CHOICES)}


def _choices(key: str) -> tuple[str, ...] | None:
    if key == "format":  # the registry is the one list of formats; imported late, as the formats import config
        from relay.formats.registry import FORMATS

        return tuple(FORMATS)
    return _CHOICES.get(key)


def _targets(value: Any, src: _Source, table: str, key: str) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v for v in items):
        raise src.error(table, key, "expected \"provider/model\" or a list of them")
    return tuple(items)


def parse(text: str, path: str = "<config>", env: dict[str, str] | None = None) -> Config:
    env = dict(os.environ) if env is None else env
    src = _Source(path, text)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None

    for key in data:
        if key not in ("server", "store", "providers", "models", "routes", "keys"):
            raise src.error(key, None, "unknown section (allowed: server, store, providers, models, routes, keys)")

    raw_server = data.get("server", {})
    _check_keys(raw_server, _SERVER_KEYS, src, "server")
    raw_server = {k: _expand(v, src, "server", k, env) for k, v in raw_server.items()}
    key_lists: dict[str, Any] = {name: tuple(str(k) for k in raw_server.pop(name, []) if k)
                                 for name in ("api_keys", "admin_keys", "metrics_keys")}
    server = ServerConfig(**key_lists, **raw_server)
    if not 0 <= server.port <= 65535:
        raise src.error("server", "port", "must be 0..65535")
    for name in ("keepalive", "keepalive_start"):
        if getattr(server, name) < 0:
            raise src.error("server", name, "must be >= 0 seconds (keepalive = 0 turns pings off)")
    if server.affinity_sessions < 0:
        raise src.error("server", "affinity_sessions", "must be >= 0 (0 turns session affinity off)")
    if server.history_memory < 0:
        raise src.error("server", "history_memory", "must be >= 0 bytes (0 turns the history's reuse off)")

    providers: dict[str, Provider] = {}
    for name, raw in data.get("providers", {}).items():
        providers[name] = _provider(name, raw, src, env)

    def check_target(target: str, table: str, key: str) -> None:
        provider, sep, model = target.partition("/")
        if not sep or not model:
            raise src.error(table, key, f"{target!r} is not of the form provider/model")
        if provider not in providers:
            raise src.error(table, key, f"unknown provider {provider!r} (configured: {', '.join(providers) or 'none'})")

    models: dict[str, tuple[str, ...]] = {}
    for alias, value in data.get("models", {}).items():
        targets = _targets(value, src, "models", alias)
        for t in targets:
            check_target(t, "models", alias)
        models[alias] = targets

    routes: dict[str, tuple[str, ...]] = {}
    raw_routes = dict(data.get("routes", {}))
    threshold = raw_routes.pop("long_context_threshold", 60000)
    if not isinstance(threshold, int) or isinstance(threshold, bool) or threshold < 1:
        raise src.error("routes", "long_context_threshold", "expected a positive int (estimated input tokens)")
    for route, value in raw_routes.items():
        if route not in ROUTE_NAMES:
            raise src.error("routes", route, f"unknown route (allowed: {', '.join(ROUTE_NAMES)})")
        targets = _targets(value, src, "routes", route)
        for t in targets:
            check_target(t, "routes", route)
        routes[route] = targets

    client_keys: list[ClientKey] = [ClientKey(k, f"key{n}") for n, k in enumerate(server.api_keys, 1)]
    raw_keys = data.get("keys", [])
    if not isinstance(raw_keys, list):
        raise src.error("keys", None, "write each key as a [[keys]] table")
    for n, entry in enumerate(raw_keys, 1):
        _check_keys(entry, {"key": str, "name": str, "models": list}, src, "keys")
        entry = {k: _expand(v, src, "keys", k, env) for k, v in entry.items()}
        if not entry.get("key"):
            raise src.error("keys", "key", f"[[keys]] entry {n} has no key")
        client_keys.append(ClientKey(entry["key"], entry.get("name") or f"scoped{n}", tuple(entry.get("models", []))))
    for name in ("admin_keys", "metrics_keys"):
        if any(k.key in getattr(server, name) for k in client_keys):
            raise src.error("server", name, "holds a client key too; give operators keys of their own")
    return Config(server=server, store=_store(data.get("store", {}), server, src, env), keys=tuple(client_keys),
                  providers=providers, models=models, routes=routes, long_context_threshold=threshold, source=path)


def _provider(name: str, raw: Any, src: _Source, env: dict[str, str]) -> Provider:
    """One ``[providers.NAME]`` table, checked: from the config file, or stored at run time (``stored_provider``)."""
    table = f"providers.{name}"
    if not isinstance(raw, dict):
        raise src.error("providers", name, "expected a table")
    _check_keys(raw, _PROVIDER_KEYS, src, table, _AT_LEAST)
    raw = {k: _expand(v, src, table, k, env) for k, v in raw.items()}
    explicit = frozenset(raw)
    preset = raw.pop("preset", None)
    raw = presets.apply(preset, raw) if preset else presets.format_defaults(raw)
    if "base_url" not in raw:
        needs = presets.PRESETS[preset].needs if preset else ""
        raise src.error(table, None, "base_url is required" + (f" with preset {preset!r}: {needs}" if needs else ""))
    query = _scalars(raw.pop("query", {}), src, table, "query")
    api_key = raw.pop("api_key", ())
    api_keys = tuple(k for k in ([api_key] if isinstance(api_key, str) else api_key) if k)
    for key in api_keys:  # it is sent in a header; the key itself is never shown
        if problem := _header_value_problem(key):
            raise src.error(table, "api_key", "a key " + problem)
    headers = _scalars(raw.pop("headers", {}), src, table, "headers")
    for header, value in headers:
        if not is_header_name(header):
            raise src.error(table, "headers", f"{header[:64]!r} is not an HTTP header name (letters, digits and"
                                              " !#$%&'*+-.^_`|~ only)")
        if problem := _header_value_problem(value):  # the value is not shown: it may be a key (Authorization)
            raise src.error(table, "headers", f"the value of {header!r} {problem}")
    served = tuple(str(m) for m in raw.pop("models", []))
    raw["base_url"] = raw["base_url"].rstrip("/")
    if problem := _url_problem(raw["base_url"]):
        raise src.error(table, "base_url", problem)
    limits: dict[str, ModelLimits] = {}
    for model_name, entry in raw.pop("limits", {}).items():
        if not isinstance(entry, dict):
            raise src.error(table, "limits", f"{model_name!r}: expected {{ context_window = N, max_output = N }}")
        _check_keys(entry, _LIMIT_KEYS, src, f"{table}.limits.{model_name}", _AT_LEAST)
        limits[model_name] = ModelLimits(entry.get("context_window"), entry.get("max_output"))
    raw["limits"] = limits
    prices: dict[str, pricing.Price] = {}
    for model_name, entry in raw.pop("prices", {}).items():
        try:
            if not isinstance(entry, dict):
                raise ValueError("expected { input = USD, output = USD, cache_read = USD, cache_write = USD }"
                                 " per million tokens")
            prices[model_name] = pricing.parse(entry)
        except ValueError as exc:
            raise src.error(table, "prices", f"{model_name!r}: {exc}") from None
    raw["prices"] = prices
    if "ca_file" in raw:
        raw["ca_file"] = _ca_file(raw["ca_file"], src, table)
    return Provider(name=name, api_keys=api_keys, headers=headers, models=served, preset=preset,
                    query=query, explicit=explicit, **raw)


def _scalars(value: dict[str, Any], src: _Source, table: str, key: str) -> tuple[tuple[str, str], ...]:
    """``query`` and ``headers``: names to strings, numbers or booleans (written as TOML does: true/false)."""
    pairs = []
    for name, item in value.items():
        if isinstance(item, bool):
            item = "true" if item else "false"
        elif not isinstance(item, (str, int, float)):
            raise src.error(table, key, f"{name[:64]!r}: expected a string, number or boolean, got"
                                        f" {type(item).__name__}")
        pairs.append((name, str(item)))
    return tuple(pairs)


def _header_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be sent as an HTTP header value, worded without showing it."""
    if _CONTROL.search(value):
        return "holds a line break, NUL or other control character"
    if value != value.strip(" \t"):
        return "starts or ends with a space"
    return None


PROVIDER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
STORED_ONLY_FILE = ("ca_file",)  # a path on one machine means nothing to the other instances sharing the store


def stored_provider(name: str, table: Any, env: dict[str, str], allowed: tuple[str, ...] = (),
                    unset_ok: bool = False) -> Provider:
    """A provider added at run time (the admin API, the console), checked exactly as a ``[providers.NAME]`` table of
    the config file is. Only its ``api_key`` may name environment variables, and only those ``[store]
    provider_env`` allows, filled in from each instance's own environment: a stored provider can use a key the
    store never holds, and an admin cannot make relay send (or echo in an error) anything else it was started
    with. ``unset_ok``: an allowed variable unset on this instance still passes (another may have it)."""
    src = _Source(f"<store: provider {name!r}>", "")
    if not isinstance(name, str) or not PROVIDER_NAME.match(name):
        raise ConfigError(f"provider name {str(name)[:80]!r}: use 1-64 letters, digits, '_', '.' or '-', "
                          "starting with a letter or digit ('/' separates a provider from its model)")
    table_name = f"providers.{name}"
    if isinstance(table, dict):
        for key in STORED_ONLY_FILE:
            if key in table:
                raise src.error(table_name, key, "only a config file's providers may name a local file")
        for key, value in table.items():
            names = _variables(value)
            if names and key != "api_key":
                raise src.error(table_name, key, "only api_key may name an environment variable in a stored provider")
            for var in names:
                if not any(fnmatch.fnmatchcase(var, pattern) for pattern in allowed):
                    raise src.error(table_name, key, f"${{{var}}}: a stored provider may read only the variables "
                                    f"[store] provider_env allows ({', '.join(allowed) or 'none'})")
    usable = {k: v for k, v in env.items() if any(fnmatch.fnmatchcase(k, p) for p in allowed)}
    if unset_ok and isinstance(table, dict):
        usable |= {var: "" for var in _variables(table.get("api_key")) if var not in usable}
    return _provider(name, table, src, usable)


def _variables(value: Any) -> list[str]:
    """The ``${VAR}`` names anywhere in a value (strings in lists and tables included)."""
    if isinstance(value, str):
        return [m.group(1) for m in _VAR.finditer(value)]
    if isinstance(value, list):
        return [n for v in value for n in _variables(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _variables(v)]
    return []


def with_stored(config: Config, tables: dict[str, Any], env: dict[str, str]) -> tuple[Config, dict[str, str]]:
    """``config`` (the file's, nothing stored in it yet) plus the providers stored at run time, and why any stored
    one was left out (a name the file already uses, or a table this instance cannot use, e.g. its ``${VAR}`` unset
    here)."""
    providers = dict(config.providers)
    stored: list[str] = []
    problems: dict[str, str] = {}
    for name in sorted(tables):
        if name in config.providers:
            problems[name] = f"the config file has a provider named {name!r}; it wins"
            continue
        try:
            providers[name] = stored_provider(name, tables[name], env, config.store.provider_env)
        except ConfigError as exc:
            problems[name] = str(exc)
            continue
        stored.append(name)
    return replace(config, providers=providers, stored=frozenset(stored)), problems


def _store(raw: Any, server: ServerConfig, src: _Source, env: dict[str, str]) -> StoreConfig:
    """``[store]``, checked now, so a bad url stops `relay check` and startup rather than the first request.
    Without a url, the old ``[server] usage_db`` names the SQLite file (``""``: no store at all)."""
    if not isinstance(raw, dict):
        raise src.error("store", None, "expected a table")
    _check_keys(raw, _STORE_KEYS, src, "store")
    raw = {k: _expand(v, src, "store", k, env) for k, v in raw.items()}
    if "provider_env" in raw:
        if not all(raw["provider_env"]):  # (_check_keys made each a string)
            raise src.error("store", "provider_env", "expected a list of variable names or glob patterns")
        raw["provider_env"] = tuple(raw["provider_env"])
    url = raw.get("url", "")
    if not url and server.usage_db is not None:
        if server.usage_db == "":
            return StoreConfig(**{**raw, "url": "", "enabled": False})
        url = "sqlite://" + server.usage_db
    if url:
        problem = store_url_problem(url)
        if problem:
            from relay.store import masked

            raise src.error("store", "url", f"{masked(url)!r}: {problem}")
    for name in ("refresh", "timeout", "rate_window", "day_window", "month_window", "buffer"):
        if name in raw and raw[name] <= 0:
            raise src.error("store", name, "must be > 0")
    return StoreConfig(**{**raw, "url": url})


def store_url_problem(url: str) -> str | None:
    if url.startswith("sqlite://"):
        return None if url[len("sqlite://"):] else "no file: write sqlite:///path/to/relay.sqlite3"
    if url.startswith(("redis://", "rediss://")):
        from relay.store import redis_url_problem

        return redis_url_problem(url)
    return "expected sqlite:///PATH, redis://HOST:PORT/DB or rediss://HOST:PORT/DB"


def load(path: str | None, env: dict[str, str] | None = None) -> Config:
    """Load the config file, or with none, serve from OPENAI_BASE_URL/OPENAI_API_KEY with model names passed through."""
    env = dict(os.environ) if env is None else env
    path = path or env.get("RELAY_CONFIG")
    if not path:
        return default_config(env)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    return parse(text, path, env)


def default_config(env: dict[str, str]) -> Config:
    """No config file: one provider from OPENAI_BASE_URL / OPENAI_API_KEY; RELAY_DEFAULT_MODEL serves Claude ids,
    RELAY_MAX_OUTPUT_TOKENS and RELAY_CONTEXT_WINDOW give the model's limits. A server on this machine is taken for
    a local one (llama.cpp, llama-cpp-python, vLLM, LM Studio): its window is asked for, and tool-call turns carry
    "" instead of null, which those servers refuse."""
    key = env.get("OPENAI_API_KEY", "")
    base_url = env.get("OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/")
    if problem := _url_problem(base_url):
        raise ConfigError(f"OPENAI_BASE_URL: {problem}")
    limits = {name: _env_int(env, name) for name in ("RELAY_MAX_OUTPUT_TOKENS", "RELAY_CONTEXT_WINDOW")}
    local = loopback(urlsplit(base_url).hostname or "")
    provider = Provider(
        name="openai",
        base_url=base_url,
        api_keys=(key,) if key else (),
        passthrough_models=True,
        max_tokens_cap=limits["RELAY_MAX_OUTPUT_TOKENS"],
        context_window=limits["RELAY_CONTEXT_WINDOW"],
        discover_context=local and limits["RELAY_CONTEXT_WINDOW"] is None,
        tool_call_content="empty" if local else "null",
    )
    # Claude Code asks for Claude ids (claude-sonnet-..., claude-haiku-...): RELAY_DEFAULT_MODEL says what serves them
    default_model = env.get("RELAY_DEFAULT_MODEL", "")
    routes: dict[str, tuple[str, ...]] = {"default": (f"openai/{default_model}",)} if default_model else {}
    # The startup line shows this: say what is missing, not just where the settings would come from.
    source = (f"<environment: OPENAI_BASE_URL={provider.base_url}, "
              f"OPENAI_API_KEY {'set' if key else 'NOT SET'}, "
              f"RELAY_DEFAULT_MODEL={default_model or 'not set (Claude ids go upstream unchanged)'}"
              + "".join(f", {k}={v}" for k, v in limits.items() if v is not None) + ">")
    return Config(providers={"openai": provider}, routes=routes, source=source)


def _env_int(env: dict[str, str], name: str) -> int | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{name}: expected a positive number of tokens, got {value!r}")
    return int(value)


def _url_problem(url: str) -> str | None:
    """Why a base_url cannot work, caught at load so `relay check` says it instead of every request failing."""
    shown = repr(url[:200]) + ("..." if len(url) > 200 else "")
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return f"{shown} holds a space or a control character"
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. a bracketed host that is not an IPv6 address
        return f"{shown}: {exc}"
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        hint = f" (e.g. http://{url})" if "://" not in url else ""
        return f"{shown} needs to start with http:// or https://{hint}"
    host = parts.hostname or ""
    if host.startswith("[") or ":" in host:  # an IPv6 address (urlsplit drops the brackets)
        try:
            ipaddress.IPv6Address(host.strip("[]").split("%", 1)[0])
        except ValueError:
            return f"{shown}: {host!r} is not an IPv6 address"
    elif not _HOST.fullmatch(host):
        return (f"{shown}: the host {host!r} is not a host name (letters, digits, '.', '-', '_'; an international"
                " name in its xn-- form)" if host else f"{shown} has no host")
    try:
        parts.port
    except ValueError:
        return f"{shown}: the port is not a number 0..65535"
    return None


def loopback(host: str) -> bool:
    """A host name or address of this machine only."""
    host = host.lower().strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _ca_file(path: str, src: Any, table: str) -> str:
    """Checked now, so a wrong path or a file that is not PEM stops `relay check`, not the first request."""
    path = os.path.expanduser(path)
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise src.error(table, "ca_file", f"no such file: {path}") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise src.error(table, "ca_file", f"cannot load {path} as PEM certificates ({exc})") from None
    return path
