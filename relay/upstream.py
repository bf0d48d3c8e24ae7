"""Upstream HTTP: one httpcore connection pool per provider, timeouts, and error mapping.

Knows no wire format: it sends bytes and yields bytes. A non-2xx answer is read (bounded) and raised as
the matching Anthropic error before any byte reaches the client.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpcore
import orjson

from relay import __version__
from relay.config import Config, Provider
from relay.context import window_from_server
from relay.errors import RelayError, from_upstream
from relay.health import ProviderHealth
from relay.pool import ConnectionPool

log = logging.getLogger("relay.upstream")

ERROR_BODY_LIMIT = 1024 * 1024
USER_AGENT = f"relay/{__version__}".encode()


@dataclass
class UpstreamResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    _response: httpcore.Response
    _chunks: AsyncIterator[bytes] | None = None

    @property
    def content_type(self) -> bytes:
        for k, v in self.headers:
            if k.lower() == b"content-type":
                return v.lower()
        return b""

    @property
    def network_stream(self) -> Any:
        """The connection's transport (relay.transport), for the pump's write-before-read hook."""
        return self._response.extensions.get("network_stream")

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; the same iterator every call, so a reader can stop and later drain the rest."""
        if self._chunks is None:
            self._chunks = self._response.stream.__aiter__()  # type: ignore[union-attr]
        return self._chunks

    async def read(self, limit: int) -> bytes:
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise RelayError(502, f"upstream response larger than {limit} bytes", "api_error")
            parts.append(chunk)
        return b"".join(parts)


def auth_headers(provider: Provider, key: str | None = None) -> list[tuple[bytes, bytes]]:
    key = provider.api_key if key is None else key
    if not key or provider.auth == "none":
        return []
    if provider.auth == "bearer":
        return [(b"authorization", b"Bearer " + key.encode())]
    return [(provider.auth.encode(), key.encode())]


def transport_error(provider: Provider, exc: Exception) -> RelayError:
    """Connection-level failures, worded for a person and without the URL's secrets."""
    name = provider.name
    if isinstance(exc, httpcore.ConnectTimeout):
        return RelayError(504, f"{name}: timed out connecting to the upstream after {provider.connect_timeout:g}s", "api_error")
    if isinstance(exc, httpcore.PoolTimeout):
        return RelayError(529, f"{name}: all {provider.max_connections} upstream connections are busy", "overloaded_error")
    if isinstance(exc, httpcore.ReadTimeout):
        return RelayError(504, f"{name}: the upstream sent nothing for {provider.read_timeout:g}s", "api_error")
    if isinstance(exc, httpcore.ConnectError):
        return RelayError(502, f"{name}: cannot connect to the upstream ({exc or 'connection refused'})", "api_error")
    if isinstance(exc, (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)):
        return RelayError(502, f"{name}: the upstream connection failed ({type(exc).__name__}: {exc or 'closed'})", "api_error")
    return RelayError(502, f"{name}: upstream request failed ({type(exc).__name__})", "api_error")


class Upstreams:
    """The per-provider pools. Created once per server; closed on shutdown."""

    def __init__(self, config: Config) -> None:
        self._ssl = ssl.create_default_context()
        self._pools: dict[str, ConnectionPool] = {}
        self._windows: dict[tuple[str, str], int | None] = {}
        self._output_caps: dict[tuple[str, str], int] = {}  # what upstreams said when they refused max_tokens
        self._health: dict[str, ProviderHealth] = {}
        self.config = config

    def _pool(self, provider: Provider) -> ConnectionPool:
        pool = self._pools.get(provider.name)
        if pool is None:
            context = ssl.create_default_context(cafile=provider.ca_file) if provider.ca_file else self._ssl
            pool = ConnectionPool(context, provider.max_connections)
            self._pools[provider.name] = pool
        return pool

    @asynccontextmanager
    async def request(
        self,
        provider: Provider,
        path: str,
        body: bytes,
        *,
        stream: bool,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
        key: str | None = None,
        model: str = "",
        timed_reads: bool = True,
    ) -> AsyncIterator[UpstreamResponse]:
        """``timed_reads=False``: the caller times the silences itself (the stream pump does, far cheaper
        than a cancel scope per read)."""
        url = provider.url(path, model)
        headers = [
            (b"host", _host_header(url)),
            (b"content-type", b"application/json"),
            (b"accept", b"text/event-stream" if stream else b"application/json"),
            (b"user-agent", USER_AGENT),
            *auth_headers(provider, key),
            *((k.encode(), v.encode()) for k, v in provider.headers),
            *(extra_headers or []),
        ]
        timeouts = {
            "connect": provider.connect_timeout,
            "read": provider.read_timeout if timed_reads else None,
            "write": provider.read_timeout,
            "pool": provider.connect_timeout,
        }
        try:
            async with self._pool(provider).stream(
                "POST", url, headers=headers, content=body, extensions={"timeout": timeouts}
            ) as response:
                result = UpstreamResponse(response.status, list(response.headers), response)
                if response.status >= 300:
                    try:
                        data = await result.read(ERROR_BODY_LIMIT)
                    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError):
                        data = b""
                    retry_after = next((v.decode("latin-1") for k, v in result.headers if k.lower() == b"retry-after"), None)
                    raise from_upstream(response.status, data, provider.api_keys, retry_after, provider.name)
                yield result
        except httpcore.UnsupportedProtocol:
            raise RelayError(500, f"{provider.name}: base_url must start with http:// or https://", "api_error") from None
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError, httpcore.ProtocolError) as exc:
            raise transport_error(provider, exc) from None

    async def get_json(self, provider: Provider, url: str, body: bytes | None = None) -> Any:
        """A small GET (or POST with body) for a server's self-description; None on any failure."""
        headers = [(b"host", _host_header(url)), (b"accept", b"application/json"), (b"user-agent", USER_AGENT),
                   *auth_headers(provider)]
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        timeouts = {"connect": provider.connect_timeout, "read": 5.0, "write": 5.0, "pool": provider.connect_timeout}
        try:
            async with self._pool(provider).stream("POST" if body is not None else "GET", url, headers=headers,
                                                   content=body, extensions={"timeout": timeouts}) as response:
                if response.status != 200:
                    return None
                content = await response.aread()
            return orjson.loads(content)
        except Exception:  # a server that cannot describe itself simply has no known window
            return None

    def health_of(self, provider: Provider) -> ProviderHealth:
        health = self._health.get(provider.name)
        if health is None or health.keys != provider.api_keys:
            health = ProviderHealth(provider.api_keys, provider.failure_threshold, provider.cooldown)
            self._health[provider.name] = health
        return health

    def known_window(self, provider: Provider, model: str) -> int | None:
        return self._windows.get((provider.name, model))

    async def discover_window(self, provider: Provider, model: str) -> int | None:
        """Ask a local server how large its context is, once per model; the answer (or its absence) is kept."""
        key = (provider.name, model)
        if key in self._windows:
            return self._windows[key]
        base = provider.base_url
        root = base[: -len("/v1")] if base.endswith("/v1") else base
        probes: list[tuple[str, str, bytes | None]] = [
            ("models", base + "/models", None),
            ("props", root + "/props", None),
            ("lmstudio", root + "/api/v0/models/" + model, None),
            ("ollama", root + "/api/show", orjson.dumps({"model": model})),
        ]
        window = None
        for kind, url, body in probes:
            window = window_from_server(kind, await self.get_json(provider, url, body), model)
            if window:
                break
        self._windows[key] = window
        if window is None:  # once per model: the answer (none) is kept like a found one
            log.warning("%s/%s: could not learn the context window from %s (asked /models, /props, /api/v0/models, "
                        "/api/show); set context_window in [providers.%s] (or RELAY_CONTEXT_WINDOW with no config "
                        "file). Until then relay cannot fit max_tokens to it, and an overflowing request may run "
                        "until the server's window fills", provider.name, model, base, provider.name)
        return window

    def max_output(self, provider: Provider, model: str) -> int | None:
        """The output cap relay applies: the configured one, or the lower one an upstream stated in a refusal."""
        caps = [c for c in (provider.limits_for(model).max_output, self._output_caps.get((provider.name, model))) if c]
        return min(caps) if caps else None

    def learn_output_cap(self, provider: Provider, model: str, cap: int) -> bool:
        """Keep the cap an upstream stated (for this process); True when it is news, i.e. lower than the cap relay
        applied, so a retry with it can succeed. Never True twice for the same figure, so retries stay bounded."""
        known = self.max_output(provider, model)
        if known is not None and cap >= known:
            return False
        self._output_caps[(provider.name, model)] = cap
        log.info("%s/%s refused max_tokens and says it accepts at most %d: relay caps max_tokens there from now on "
                 "(until restart; max_tokens_cap or limits in the config make it permanent)", provider.name, model, cap)
        return True

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()


def _host_header(url: str) -> bytes:
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0].encode()
