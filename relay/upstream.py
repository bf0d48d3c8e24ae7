"""Upstream HTTP: one connection pool per provider, every upstream timeout, and error mapping.

Knows no wire format: it sends bytes and yields the body's bytes or its SSE events (taken apart in one pass by
``relay.reader``; which one is the translator's choice). A non-2xx answer is read (bounded) and raised as
the matching Anthropic error before any byte reaches the client. httpcore stops here: every httpcore error
is mapped to a RelayError in this module, so the rest of relay never imports it.
"""

from __future__ import annotations

import math
import ssl
from typing import Any

import httpcore
import orjson
import trio

from relay import __version__
from relay.config import Config, Provider
from relay.errors import RelayError, from_upstream
from relay.pool import ConnectionPool, Response
from relay.reader import BodyReader
from relay.sse import Event

ERROR_BODY_LIMIT = 1024 * 1024
DESCRIPTION_LIMIT = 4 * 1024 * 1024  # a server's self-description (/models, /props) larger than this is ignored
USER_AGENT = f"relay/{__version__}".encode()


# What a broken or silent upstream connection raises while a body is read; mapped to RelayError here only.
BROKEN = (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError)


def timeouts(provider: Provider, read: float | None, write: float | None = None) -> dict[str, float | None]:
    """httpcore's per-request timeouts. ``read=None``: the caller times silences itself (``Deadlines``)."""
    return {"connect": provider.connect_timeout, "read": read,
            "write": provider.read_timeout if write is None else write, "pool": provider.connect_timeout}


class Deadlines:
    """The clocks of one upstream answer: a stream must start within first_byte_timeout, and its head within
    read_timeout; after that no silence between two chunks may last longer than read_timeout. The first is a
    cancel scope around the request; the pump lifts it at the first chunk (or, when the first chunk came with the
    head, before its first wait: an answer over without one never moves the deadline, ~12k instructions) and
    times the gaps itself with one timer per stream (``last_read`` + ``idle``), far cheaper than a cancel scope
    around every read."""

    __slots__ = ("provider", "idle", "first_wait", "first_byte", "last_read", "_waiting", "_unlifted")

    def __init__(self, provider: Provider, stream: bool) -> None:
        self.provider = provider
        self.idle = provider.read_timeout
        self.first_wait = min(provider.first_byte_timeout, provider.read_timeout)
        self.last_read = now = trio.current_time()  # (also when the request went out, for ``Server._pump``)
        self.first_byte = trio.CancelScope(deadline=now + self.first_wait if stream else math.inf)
        self._waiting = stream
        self._unlifted = False  # met, but still the scope's deadline: ``lift`` before anything waits

    def heard(self, now: float | None = None, lift: bool = True) -> None:
        """A chunk arrived (``now``: the clock read already, if it was): the first-byte deadline is met, and the
        silence starts again from now. ``lift=False``: the caller calls ``lift`` before its next wait."""
        self.last_read = trio.current_time() if now is None else now
        if self._waiting:
            self._waiting = False
            if lift:
                self.first_byte.deadline = math.inf
            else:
                self._unlifted = True

    def lift(self) -> None:
        """The first-byte deadline met (``heard(lift=False)``) leaves the scope before a wait it could cut."""
        if self._unlifted:
            self._unlifted = False
            self.first_byte.deadline = math.inf

    def missed_first_byte(self) -> RelayError:
        name, wait = self.provider.name, self.first_wait
        if self.provider.read_timeout < self.provider.first_byte_timeout:
            return RelayError(504, f"{name}: the upstream sent nothing for {wait:g}s", "api_error")
        return RelayError(504, f"{name}: no first byte within {wait:g}s", "api_error")


class UpstreamBroke(RelayError):
    """A stream's connection failed after its head: the pump ends the stream with this error."""


def stalled(label: str) -> UpstreamBroke:
    """A stream that went silent for longer than read_timeout after it started."""
    return UpstreamBroke(504, f"{label}: the upstream stopped sending mid-stream (read timeout)", "api_error")


def midstream_error(label: str, exc: Exception) -> UpstreamBroke:
    if isinstance(exc, httpcore.ReadTimeout):
        return stalled(label)
    return UpstreamBroke(502, f"{label}: the upstream connection broke mid-stream ({type(exc).__name__})", "api_error")


def _broken_framing(reader: BodyReader) -> httpcore.RemoteProtocolError:
    """A body that broke its framing, as httpcore raised it when h11 read bodies (the same words follow)."""
    return httpcore.RemoteProtocolError(str(reader.error))


class UpstreamResponse:
    """An upstream's answer, its head read; the body is read here, one network read per call."""

    __slots__ = ("status", "headers", "label", "_response", "_reader")

    def __init__(self, response: Response, label: str = "") -> None:
        self.status = response.status
        self.headers = response.headers
        self.label = label  # provider/model, for the words of a mid-stream failure
        self._response = response
        self._reader = response.reader

    @property
    def content_type(self) -> bytes:
        for k, v in self.headers:
            if k.lower() == b"content-type":
                return v.lower()
        return b""

    @property
    def done(self) -> bool:
        """The body has ended."""
        return self._reader.done

    def arrived(self) -> bool:
        """Bytes came with the head (or the peer closed right after it): ``arrived_*`` has something to read."""
        return self._response.has_arrived

    def arrived_events(self) -> list[Event]:
        """The events in what came with the head (no I/O; framing errors raise at the next ``events``)."""
        out: list[Event] = []
        for data in self._response.arrived():
            out += self._reader.feed_events(data)
        return out

    def arrived_chunk(self) -> bytes:
        """The body bytes that came with the head, as ``arrived_events``."""
        return b"".join(self._reader.feed(data) for data in self._response.arrived())

    async def _receive(self) -> bytes:
        if self._reader.error is not None:  # what came before the break was handed out by the last call
            raise midstream_error(self.label, _broken_framing(self._reader))
        try:
            return await self._response.receive()
        except BROKEN as exc:
            raise midstream_error(self.label, exc) from None

    async def events(self) -> list[Event]:
        """The SSE events that the next read completes (relay.sse.SSEError for an oversized one). A connection
        that breaks, or a body that breaks its framing, raises UpstreamBroke (worded as mid-stream)."""
        sock = self._waitable()
        if sock is None:
            return self._reader.feed_events(await self._receive())
        while True:
            await trio.lowlevel.wait_readable(sock)  # (the one wait per paced chunk, with no coroutine between)
            data = self._read_ready()
            if data is not None:  # (None: woken without data, it happens; a read timer must not count it)
                return self._reader.feed_events(data)

    async def chunk(self) -> bytes:
        """The body bytes the next read brings, for a translator that reads bytes; errors as ``events``."""
        sock = self._waitable()
        if sock is None:
            return self._reader.feed(await self._receive())
        while True:
            await trio.lowlevel.wait_readable(sock)
            data = self._read_ready()
            if data is not None:
                return self._reader.feed(data)

    def _waitable(self) -> Any:
        return None if self._reader.error is not None else self._response.waitable()

    def followable(self) -> Any:
        """The socket a watcher may read this body from in its own task (``StreamWatch.follow``): a plain TCP
        connection with nothing left from the head, no timeout of its own and an unbroken framing; else None."""
        return self._waitable()

    @property
    def settled(self) -> bool:
        """After a read made by a watcher: the next read needs no socket event, so it is the stream's task's to
        make. The body broke its framing (the read raises), or the connection holds its end already (TLS)."""
        return self._reader.error is not None or self._response.held_back

    def events_ready(self) -> list[Event] | None:
        """``events`` for a socket found readable by a watcher: None when it was not after all."""
        if self._reader.error is not None:
            raise midstream_error(self.label, _broken_framing(self._reader))
        data = self._read_ready()
        return None if data is None else self._reader.feed_events(data)

    def chunk_ready(self) -> bytes | None:
        """``chunk`` for a socket found readable by a watcher, as ``events_ready``."""
        if self._reader.error is not None:
            raise midstream_error(self.label, _broken_framing(self._reader))
        data = self._read_ready()
        return None if data is None else self._reader.feed(data)

    def _read_ready(self) -> bytes | None:
        try:
            return self._response.read_ready()
        except BROKEN as exc:
            raise midstream_error(self.label, exc) from None

    async def read(self, limit: int) -> bytes:
        """The whole body (inside ``Upstreams.request``, which words a broken connection as a failed request)."""
        reader, response = self._reader, self._response
        parts: list[bytes] = []
        size = 0
        while not reader.done:
            chunk = reader.feed(await response.receive())
            if reader.error is not None:
                raise _broken_framing(reader)
            size += len(chunk)
            if size > limit:
                raise RelayError(502, f"upstream response larger than {limit} bytes", "api_error")
            parts.append(chunk)
        return b"".join(parts)

    async def drain(self, seconds: float, limit: int) -> None:
        """Read what is left of a finished stream (the [DONE] and the chunked terminator, usually read already),
        so the connection goes back to the pool instead of being closed; give up quickly if it is not."""
        reader = self._reader
        if reader.done or reader.error is not None:
            return
        with trio.move_on_after(seconds):
            size = 0
            try:
                while not reader.done and reader.error is None and size <= limit:
                    size += len(reader.feed(await self._response.receive()))
            except BROKEN:
                return  # the client already has its whole answer; this connection is simply not reused


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


class Request:
    """``Upstreams.request``'s context: the pool's ``open`` and ``release`` around the block, and every httpcore
    error worded as a RelayError. A class, not an ``asynccontextmanager`` (~5k instructions per request less)."""

    __slots__ = ("_pool", "_provider", "_args", "_label", "_response")

    def __init__(self, pool: ConnectionPool, provider: Provider, url: str, headers: list[tuple[bytes, bytes]],
                 body: bytes, timeouts: dict[str, float | None], label: str) -> None:
        self._pool = pool
        self._provider = provider
        self._args = (url, headers, body, timeouts)
        self._label = label  # provider/model, for the words of a mid-stream failure
        self._response: Response | None = None

    async def __aenter__(self) -> UpstreamResponse:
        provider = self._provider
        try:
            response = self._response = await self._pool.open("POST", *self._args)
            result = UpstreamResponse(response, self._label)
            if response.status >= 300:
                try:
                    try:
                        data = await result.read(ERROR_BODY_LIMIT)
                    except BROKEN:
                        data = b""
                    retry_after = next((v.decode("latin-1") for k, v in result.headers if k.lower() == b"retry-after"),
                                       None)
                    raise from_upstream(response.status, data, provider.api_keys, retry_after, provider.name)
                finally:
                    await self._pool.release(response)
            return result
        except Exception as exc:
            worded = _worded(provider, exc)
            if worded is exc:
                raise
            raise worded from None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        await self._pool.release(self._response)  # type: ignore[arg-type]  # set by __aenter__
        if isinstance(exc, Exception):
            worded = _worded(self._provider, exc)
            if worded is not exc:
                raise worded from None


def _worded(provider: Provider, exc: Exception) -> Exception:
    """An httpcore error as the RelayError relay answers with; any other exception as it is."""
    if isinstance(exc, httpcore.UnsupportedProtocol):
        return RelayError(500, f"{provider.name}: base_url must start with http:// or https://", "api_error")
    if isinstance(exc, (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError,
                        httpcore.ProtocolError)):
        return transport_error(provider, exc)
    return exc


class Upstreams:
    """The per-provider pools. Created once per server; closed on shutdown."""

    def __init__(self, config: Config) -> None:
        self._ssl = ssl.create_default_context()
        self._pools: dict[str, ConnectionPool] = {}
        self.config = config

    def _pool(self, provider: Provider) -> ConnectionPool:
        pool = self._pools.get(provider.name)
        if pool is None:
            context = ssl.create_default_context(cafile=provider.ca_file) if provider.ca_file else self._ssl
            pool = ConnectionPool(context, provider.max_connections)
            self._pools[provider.name] = pool
        return pool

    def request(
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
    ) -> Request:
        """One upstream request, as ``async with upstreams.request(...) as upstream`` (``UpstreamResponse``): a
        non-2xx answer raises its Anthropic error on the way in, and any httpcore error (on the way in or from a
        read inside the block) comes out as a RelayError. ``timed_reads=False``: the caller times the silences
        itself (the stream pump does, far cheaper than a cancel scope per read)."""
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
        return Request(self._pool(provider), provider, url, headers, body,
                       timeouts(provider, provider.read_timeout if timed_reads else None), f"{provider.name}/{model}")

    async def get_json(self, provider: Provider, url: str, body: bytes | None = None) -> Any:
        """A small GET (or POST with body) for a server's self-description; None on any failure."""
        headers = [(b"host", _host_header(url)), (b"accept", b"application/json"), (b"user-agent", USER_AGENT),
                   *auth_headers(provider)]
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        try:
            async with self._pool(provider).stream("POST" if body is not None else "GET", url, headers=headers,
                                                   content=body, extensions={"timeout": timeouts(provider, 5.0, 5.0)}) as response:
                if response.status != 200:
                    return None
                content = await UpstreamResponse(response).read(DESCRIPTION_LIMIT)
            return orjson.loads(content)
        except Exception:  # a server that cannot describe itself simply has no known window
            return None

    def inherit(self, old: "Upstreams") -> None:
        """Take over the pools of ``old`` (the config before a reload) for providers whose connections are made
        the same way, so a reload, or a provider added at run time, does not drop every warm connection."""
        for name in list(old._pools):
            before, now = old.config.providers.get(name), self.config.providers.get(name)
            if before and now and (before.ca_file, before.max_connections) == (now.ca_file, now.max_connections):
                self._pools[name] = old._pools.pop(name)

    @property
    def empty(self) -> bool:
        return not self._pools

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()
        self._pools.clear()


def _host_header(url: str) -> bytes:
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0].encode()
