"""Keep-alive upstream connections, built on httpcore's connection layer.

httpcore's AsyncConnectionPool re-scans all of its connections, quadratically, whenever a request starts or
ends; at a few hundred concurrent streams that bookkeeping cost more CPU than relaying the streams did. This
pool does the same job in constant time: a stack of idle connections per origin (the most recently used is
reused first, so the rest can expire), and a semaphore for the connection limit. It holds httpcore's
HTTP/1.1 connections directly: httpcore's AsyncHTTPConnection wrapper only adds, per request, a lock (a trip
through trio's scheduler) and protocol negotiation that relay, speaking HTTP/1.1 only, never needs. httpcore
still does everything on the wire: HTTP/1.1 framing, connection state, keep-alive expiry.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpcore
import trio

from relay.transport import Backend, SocketStream, TLSStream

OriginKey = tuple[bytes, bytes, int]
BACKEND = Backend()


class _Unshared:
    """Stands in for a lock nobody else can hold."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc_info: object) -> None:
        return None


class HTTP11Connection(httpcore.AsyncHTTP11Connection):
    """httpcore's HTTP/1.1 connection without its state lock. The lock guards a connection shared by
    concurrent requests; this pool hands each connection to one request at a time, so it never contends, yet
    each of its two acquisitions per request cost a trip through trio's scheduler (~100 us per request here)."""

    def __init__(self, origin: httpcore.Origin, stream: SocketStream | TLSStream, keepalive_expiry: float) -> None:
        super().__init__(origin=origin, stream=stream, keepalive_expiry=keepalive_expiry)
        self._state_lock = _Unshared()  # type: ignore[assignment]
        self.network = stream  # relay's own transport, whose read hook a request may set


class ConnectionPool:
    def __init__(self, ssl_context: ssl.SSLContext, max_connections: int, keepalive_expiry: float = 60.0) -> None:
        ssl_context.set_alpn_protocols(["http/1.1"])  # what httpcore's own connection offers without HTTP/2
        self._ssl = ssl_context
        self._keepalive = keepalive_expiry
        self._limit = max_connections
        self._slots: trio.Semaphore | None = None  # made on first use, inside trio
        self._idle: dict[OriginKey, list[HTTP11Connection]] = {}

    @asynccontextmanager
    async def stream(self, method: str, url: str, *, headers: list[tuple[bytes, bytes]], content: bytes | None,
                     extensions: dict[str, Any]) -> AsyncIterator[httpcore.Response]:
        """One request on a pooled connection; the response body is read inside the block.

        Besides httpcore's ``timeout``, ``extensions`` may carry ``before_read``: an async callable run whenever
        the connection is about to read the network for this request (the stream pump writes what the last
        read produced then). The pool installs it on the connection for this request only and clears it before
        the connection goes back to the pool, as httpcore scopes its ``trace`` extension to one request."""
        if content is not None:
            headers = [*headers, (b"content-length", b"%d" % len(content))]
        request = httpcore.Request(method, url, headers=headers, content=content, extensions=extensions)
        if request.url.scheme not in (b"http", b"https"):
            raise httpcore.UnsupportedProtocol(f"unsupported URL scheme {request.url.scheme.decode('ascii', 'replace')!r}")
        timeouts = extensions.get("timeout", {})
        if self._slots is None:
            self._slots = trio.Semaphore(self._limit)
        try:
            self._slots.acquire_nowait()  # the usual case: no cancel scope, no trip through the scheduler
        except trio.WouldBlock:  # full (or others already waiting: they go first)
            with trio.move_on_after(timeouts.get("pool") or float("inf")) as waiting:
                await self._slots.acquire()
            if waiting.cancelled_caught:
                raise httpcore.PoolTimeout(f"no free connection within {timeouts['pool']}s") from None
        try:
            origin = request.url.origin
            key = (origin.scheme, origin.host, origin.port)
            connection = await self._checkout(key, origin, timeouts.get("connect"))
            connection.network.before_read = extensions.get("before_read")
            try:
                response = await connection.handle_async_request(request)
            except BaseException:
                connection.network.before_read = None
                with trio.CancelScope(shield=True):
                    await connection.aclose()
                raise
            try:
                yield response
            finally:
                connection.network.before_read = None  # the hook belongs to this request, not the connection
                with trio.CancelScope(shield=True):
                    await response.aclose()  # a body read to its end leaves the connection idle; else closed
                if connection.is_idle():
                    self._idle.setdefault(key, []).append(connection)
        finally:
            self._slots.release()

    async def _checkout(self, key: OriginKey, origin: httpcore.Origin,
                        timeout: float | None) -> HTTP11Connection:
        stack = self._idle.get(key)
        while stack:
            connection = stack.pop()
            try:
                if connection.is_available() and not connection.has_expired():  # expired: also closed by the server
                    return connection
            except Exception:  # a connection that cannot even be asked is not worth keeping
                pass
            with trio.CancelScope(shield=True):
                await connection.aclose()
        host = origin.host.decode("ascii")
        plain = await BACKEND.connect_tcp(host, origin.port, timeout=timeout)
        stream = await plain.start_tls(self._ssl, server_hostname=host, timeout=timeout) if origin.scheme == b"https" else plain
        return HTTP11Connection(origin, stream, self._keepalive)

    async def aclose(self) -> None:
        for stack in self._idle.values():
            for connection in stack:
                await connection.aclose()
        self._idle.clear()
