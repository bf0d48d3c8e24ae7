"""Keep-alive upstream connections, built on httpcore's connection layer.

httpcore's AsyncConnectionPool re-scans all of its connections, quadratically, whenever a request starts or
ends; at a few hundred concurrent streams that bookkeeping cost more CPU than relaying the streams did. This
pool does the same job in constant time: a stack of idle connections per origin (the most recently used is
reused first, so the rest can expire), and a semaphore for the connection limit. It holds httpcore's
HTTP/1.1 connections directly: httpcore's AsyncHTTPConnection wrapper only adds, per request, a lock (a trip
through trio's scheduler) and protocol negotiation that relay, speaking HTTP/1.1 only, never needs. httpcore
sends the request and reads the response head; the body is relay's to read (``Response``, ``relay.reader``),
and the connection comes back to the pool only when that body ended cleanly.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import httpcore
import trio
from httpcore._async.http11 import HTTPConnectionState

from relay.reader import BodyReader, framing, keeps_alive
from relay.transport import READ_SIZE, Backend, SocketStream, TLSStream

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
        self.network = stream

    def leftover(self) -> tuple[bytes, bool]:
        """What the read that finished the response head held after it, and whether the peer had closed."""
        return self._h11_state.trailing_data

    def reuse(self) -> None:
        """Ready for the next request after relay read this one's body to its clean end (what httpcore does when
        h11 has read the body): h11 never saw the body, so it starts over as a fresh parser."""
        self._h11_state = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=self.MAX_INCOMPLETE_EVENT_SIZE)
        self._state = HTTPConnectionState.IDLE
        self._expire_at = time.monotonic() + self._keepalive_expiry if self._keepalive_expiry is not None else None


class Response:
    """A response whose head httpcore has read; its body is read by relay (``reader``) from ``receive``."""

    __slots__ = ("status", "headers", "reader", "keep_alive", "_first", "_network", "_timeout")

    def __init__(self, connection: HTTP11Connection, response: httpcore.Response, method: bytes,
                 timeout: float | None) -> None:
        self.status = response.status
        self.headers = response.headers
        self.reader = BodyReader(*framing(self.status, self.headers, method))
        self.keep_alive = keeps_alive(response.extensions.get("http_version", b"HTTP/1.1"), self.headers)
        first, closed = connection.leftover()
        self._first = ([b""] if closed else []) + ([first] if first else [])  # popped from the end
        self._network = connection.network
        self._timeout = timeout

    @property
    def has_arrived(self) -> bool:
        """Bytes came with the head (or the peer closed right after it), not taken yet."""
        return bool(self._first)

    def arrived(self) -> list[bytes]:
        """What came with the head (b"" last when the peer had closed), taken without I/O; [] when nothing did."""
        first, self._first = self._first, []
        first.reverse()
        return first

    async def receive(self) -> bytes:
        """The connection's next bytes (b"": it closed): first what came with the head, then one network read.
        Raises httpcore's ReadError / ReadTimeout."""
        if self._first:
            return self._first.pop()
        return await self._network.read(READ_SIZE, self._timeout)

    async def aread(self) -> bytes:
        """The whole body (a small answer); a framing error is httpcore's RemoteProtocolError, as h11's was."""
        reader = self.reader
        parts = []
        while not reader.done:
            parts.append(reader.feed(await self.receive()))
            if reader.error is not None:
                raise httpcore.RemoteProtocolError(str(reader.error))
        return b"".join(parts)

    @property
    def reusable(self) -> bool:
        return self.keep_alive and self.reader.clean


class ConnectionPool:
    def __init__(self, ssl_context: ssl.SSLContext, max_connections: int, keepalive_expiry: float = 60.0) -> None:
        ssl_context.set_alpn_protocols(["http/1.1"])  # what httpcore's own connection offers without HTTP/2
        self._ssl = ssl_context
        self._keepalive = keepalive_expiry
        self._limit = max_connections
        self._slots: trio.Semaphore | None = None  # made on first use, inside trio
        self._idle: dict[OriginKey, list[HTTP11Connection]] = {}
        self._closed = False  # closed by a reload: requests still running close their connection when they end

    @asynccontextmanager
    async def stream(self, method: str, url: str, *, headers: list[tuple[bytes, bytes]], content: bytes | None,
                     extensions: dict[str, Any]) -> AsyncIterator[Response]:
        """One request on a pooled connection; the response body is read inside the block (``Response``). The
        connection goes back to the pool when the body was read to its clean end; anything else (a body cut
        short or left unread, a framing error, bytes after the end, a cancelled read) closes it."""
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
            try:
                response = Response(connection, await connection.handle_async_request(request), request.method,
                                    timeouts.get("read"))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
                raise
            try:
                yield response
            finally:
                if response.reusable and not self._closed:
                    connection.reuse()
                    self._idle.setdefault(key, []).append(connection)
                else:
                    with trio.CancelScope(shield=True):
                        await connection.aclose()
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
        self._closed = True
        for stack in self._idle.values():
            for connection in stack:
                await connection.aclose()
        self._idle.clear()
