"""Keep-alive upstream connections, built on httpcore's connection layer.

httpcore's AsyncConnectionPool re-scans all of its connections, quadratically, whenever a request starts or
ends; at a few hundred concurrent streams that bookkeeping cost more CPU than relaying the streams did. This
pool does the same job in constant time: a stack of idle connections per origin (the most recently used is
reused first, so the rest can expire), and a semaphore for the connection limit. It holds httpcore's
HTTP/1.1 connections directly: httpcore's AsyncHTTPConnection wrapper only adds, per request, a lock (a trip
through trio's scheduler) and protocol negotiation that relay, speaking HTTP/1.1 only, never needs. relay writes
the request itself (``relay.heads``: its head and body in one write, without httpcore's request model or h11's
validation of headers relay built); h11, through httpcore's connection, reads the response head; the body is
relay's to read (``Response``, ``relay.reader``), and the connection comes back to the pool only when that body
ended cleanly.
"""

from __future__ import annotations

import ssl
import time
from typing import Any

import h11
import httpcore
import trio
from httpcore._async.http11 import HTTPConnectionState

from relay.heads import HeadError, request_head
from relay.reader import BodyReader, framing, keeps_alive
from relay.transport import READ_SIZE, Backend, SocketStream, TLSStream

OriginKey = tuple[bytes, bytes, int]
BACKEND = Backend()
_END = h11.EndOfMessage()
URL_CACHE = 256  # parsed URLs kept per pool (a provider's paths are few: one per model at most)


_SENT: dict[bytes, h11.Request] = {}


def _sent(method: bytes) -> h11.Request:
    """A request event that tells h11 a request of this method went out (relay wrote it itself): the method is
    all h11 reads from a request to frame its answer (HEAD and CONNECT answers have no body)."""
    event = _SENT.get(method)
    if event is None:
        event = _SENT[method] = h11.Request(method=method, target=b"/", headers=[(b"host", b"-")])
    return event


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

    async def send(self, method: bytes, head: bytes, body: bytes, timeouts: dict[str, float | None]
                   ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Write a request relay built (``relay.heads``), then read its answer's head with h11: (status, headers,
        http version). The body is left for relay's reader. Raises httpcore's errors."""
        if self._state not in (HTTPConnectionState.NEW, HTTPConnectionState.IDLE):
            raise httpcore.ConnectionNotAvailable()
        self._request_count += 1
        self._state = HTTPConnectionState.ACTIVE
        self._expire_at = None
        state = self._h11_state
        state.send(_sent(method))  # h11 now expects the answer to a request of this method
        state.send(_END)
        try:
            await self.network.write_parts((head, body) if body else (head,), timeouts.get("write"))
        except httpcore.WriteError:  # a server may refuse a request before reading it all, and still answer it
            pass
        timeout = timeouts.get("read")
        event: Any = h11.NEED_DATA  # (a fresh parser holds nothing: a first look would cost ~10k instructions)
        while True:
            if event is h11.NEED_DATA:
                data = await self.network.read(READ_SIZE, timeout)
                if not data and state.their_state is h11.SEND_RESPONSE:
                    raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
                state.receive_data(data)
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpcore.RemoteProtocolError(str(exc)) from exc
            if type(event) is h11.Response or (type(event) is h11.InformationalResponse and event.status_code == 101):
                return event.status_code, event.headers.raw_items(), b"HTTP/" + event.http_version
            # else NEED_DATA, or a 1xx before the answer (100 Continue, 103 Early Hints): read on

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

    __slots__ = ("status", "headers", "reader", "keep_alive", "connection", "key", "_first", "_network", "_timeout")

    def __init__(self, connection: HTTP11Connection, key: OriginKey, status: int, headers: list[tuple[bytes, bytes]],
                 http_version: bytes, method: bytes, timeout: float | None) -> None:
        self.status = status
        self.headers = headers
        self.reader = BodyReader(*framing(status, headers, method))
        self.keep_alive = keeps_alive(http_version, headers)
        first, closed = connection.leftover()
        self._first = ([b""] if closed else []) + ([first] if first else [])  # popped from the end
        self._network = connection.network
        self._timeout = timeout
        self.connection = connection  # the pool's, lent to this response until ``ConnectionPool.release``
        self.key = key

    @property
    def has_arrived(self) -> bool:
        """Bytes came with the head (or the peer closed right after it), not taken yet."""
        return bool(self._first)

    def arrived(self) -> list[bytes]:
        """What came with the head (b"" last when the peer had closed), taken without I/O; [] when nothing did."""
        first, self._first = self._first, []
        first.reverse()
        return first

    def waitable(self) -> Any:
        """The socket to wait on when the next bytes are one wait and one read away (nothing left from the head,
        no timeout, relay's own TCP or TLS stream; else None: ``receive``). Per paced chunk that saves the four
        coroutines between here and trio's wait, ~7k instructions of ~104k (bench/README.md, session 11), and it
        lets the server's watcher read the body (``StreamWatch.follow``)."""
        network = self._network
        if self._first or self._timeout is not None or type(network) not in (SocketStream, TLSStream):
            return None
        return network.waitable()  # type: ignore[union-attr]

    @property
    def held_back(self) -> bool:
        """After ``read_ready``: the next read needs no socket event (``TLSStream.held_back``)."""
        return self._network.held_back  # type: ignore[union-attr, no-any-return]  # (only after waitable)

    def read_ready(self) -> bytes | None:
        """The read after ``waitable``'s socket was found readable (None: it was not after all)."""
        return self._network.read_ready(READ_SIZE)  # type: ignore[union-attr]  # (only after waitable)

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


class Stream:
    """``ConnectionPool.stream``'s context: ``open`` on the way in, ``release`` on every way out. A class, not an
    ``asynccontextmanager``: the generator's machinery cost ~5k instructions per request."""

    __slots__ = ("_pool", "_args", "_response")

    def __init__(self, pool: ConnectionPool, method: str, url: str, headers: list[tuple[bytes, bytes]],
                 content: bytes | None, timeouts: dict[str, float | None]) -> None:
        self._pool = pool
        self._args = (method, url, headers, content, timeouts)
        self._response: Response | None = None

    async def __aenter__(self) -> Response:
        self._response = await self._pool.open(*self._args)
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        await self._pool.release(self._response)  # type: ignore[arg-type]  # set by __aenter__


class ConnectionPool:
    def __init__(self, ssl_context: ssl.SSLContext, max_connections: int, keepalive_expiry: float = 60.0) -> None:
        ssl_context.set_alpn_protocols(["http/1.1"])  # what httpcore's own connection offers without HTTP/2
        self._ssl = ssl_context
        self._keepalive = keepalive_expiry
        self._limit = max_connections
        self._slots: trio.Semaphore | None = None  # made on first use, inside trio
        self._idle: dict[OriginKey, list[HTTP11Connection]] = {}
        self._urls: dict[str, tuple[OriginKey, httpcore.Origin, bytes]] = {}
        self._closed = False  # closed by a reload: requests still running close their connection when they end

    def _parse(self, url: str) -> tuple[OriginKey, httpcore.Origin, bytes]:
        """(pool key, origin, request target) of a URL, parsed by httpcore once per URL."""
        parsed = self._urls.get(url)
        if parsed is None:
            u = httpcore.URL(url)
            if u.scheme not in (b"http", b"https"):
                raise httpcore.UnsupportedProtocol(f"unsupported URL scheme {u.scheme.decode('ascii', 'replace')!r}")
            origin = u.origin
            if len(self._urls) >= URL_CACHE:
                self._urls.clear()
            parsed = self._urls[url] = ((origin.scheme, origin.host, origin.port), origin, u.target)
        return parsed

    def stream(self, method: str, url: str, *, headers: list[tuple[bytes, bytes]], content: bytes | None,
               extensions: dict[str, Any]) -> Stream:
        """One request on a pooled connection, as ``async with pool.stream(...) as response``; the response body
        is read inside the block (``Response``). The connection goes back to the pool when the body was read to
        its clean end; anything else (a body cut short or left unread, a framing error, bytes after the end, a
        cancelled read) closes it."""
        return Stream(self, method, url, headers, content, extensions.get("timeout", {}))

    async def open(self, method: str, url: str, headers: list[tuple[bytes, bytes]], content: bytes | None,
                   timeouts: dict[str, float | None]) -> Response:
        """``stream``'s way in: the request sent on a connection that is now the response's, and its head read.
        Whatever happens next, the caller hands the response back with ``release`` (a ``finally``); a failure
        here has released everything already."""
        key, origin, target = self._parse(url)
        verb = method.encode("ascii")
        try:
            head = request_head(verb, target, headers, None if content is None else len(content))
        except HeadError as exc:
            raise httpcore.LocalProtocolError(str(exc)) from None
        slots = self._slots
        if slots is None:
            slots = self._slots = trio.Semaphore(self._limit)
        try:
            slots.acquire_nowait()  # the usual case: no cancel scope, no trip through the scheduler
        except trio.WouldBlock:  # full (or others already waiting: they go first)
            with trio.move_on_after(timeouts.get("pool") or float("inf")) as waiting:
                await slots.acquire()
            if waiting.cancelled_caught:
                raise httpcore.PoolTimeout(f"no free connection within {timeouts['pool']}s") from None
        try:
            connection = await self._checkout(key, origin, timeouts.get("connect"))
            try:
                status, response_headers, version = await connection.send(verb, head, content or b"", timeouts)
                return Response(connection, key, status, response_headers, version, verb, timeouts.get("read"))
            except BaseException:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
                raise
        except BaseException:
            slots.release()
            raise

    async def release(self, response: Response) -> None:
        """The end of a response ``open`` returned (however its block ended): its connection back to the pool if
        the body was read to its clean end, else closed; its slot free either way."""
        try:
            connection = response.connection
            if response.reusable and not self._closed:
                connection.reuse()
                self._idle.setdefault(response.key, []).append(connection)
            else:
                with trio.CancelScope(shield=True):
                    await connection.aclose()
        finally:
            self._slots.release()  # type: ignore[union-attr]  # made by ``open``

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
