"""HTTP/1.1 towards clients: the connection loop, request bodies, answers, and the event-stream writer.

h11 parses requests; relay writes its answers itself (``relay.heads``: the bytes h11 would write) and keeps the
connection's state: whether it stays open (h11's rule: an HTTP/1.1 request without ``Connection: close``, and
relay's own wish), whether the answer went out whole. After each answer h11 starts over as a fresh parser, fed
what the client had already sent (a pipelined request), as the upstream pool does with its connections. relay's
own socket calls (``transport.ClientSocket``) move the bytes. One reader feeds h11 (``Connection.receive``),
whether it is waiting for a request or watching for a hang-up while a stream is out. One writer owns a streamed
response (``EventStream``): its head, every chunk frame and the terminator. Nothing here knows a wire format or a
route: the host (``server.Server``) answers requests.
"""

from __future__ import annotations

import ctypes
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Protocol

import h11
import trio

from relay import transport
from relay.auth import is_loopback
from relay.config import ServerConfig
from relay.errors import RelayError
from relay.formats.anthropic import request_id as new_request_id
from relay.headmemo import Headers, HeadMemo, RequestHead
from relay.heads import response_head
from relay.log import Exchange

log = logging.getLogger("relay.server")

SERVER_HEADER = (b"server", b"relay")


# The most one read of a request body's rest asks for (``Connection.read_rest``; less when the global body budget
# has less room): it takes what has arrived, its buffer cut to that (pages never written never become resident).
BODY_READ = 1024 * 1024


class ClientGone(Exception):
    pass


class Connection:
    """One client connection: an h11 state machine and the socket it reads and writes."""

    def __init__(self, stream: trio.SocketStream, max_header_bytes: int, memo: HeadMemo | None = None) -> None:
        self.stream = transport.ClientSocket(stream)
        self.max_header_bytes = max_header_bytes
        self.memo = memo or HeadMemo()
        self._fresh: bytes | None = b""  # what the fresh parser was given, while it came in one piece (else None)
        self.after_head: bytes | None = None  # a head the memo answered: what came after it (h11 saw none of it)
        self.held = 0  # bytes received while a response is out (a pipelined next request), bounded
        self.folded = False  # the request head being read uses obsolete line folding
        self._tail = b""  # the last bytes of the head read so far, for a fold or a head end split across reads
        try:
            self.peer_loopback = is_loopback(stream.socket.getpeername()[0])
        except (OSError, IndexError, TypeError):  # a peer already gone, or a socket without an address
            self.peer_loopback = False
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_header_bytes)
        self.http11 = True  # the request being answered is HTTP/1.1 (an HTTP/1.0 client gets no chunked framing)
        self.client_keeps = True  # the request lets the connection stay open (HTTP/1.1, no Connection: close)
        self.keep_alive = True  # ... and relay does too: the connection may carry another request after this answer
        self.responded = False  # an answer's head went out (a second one would be a bug)
        self.answered = False  # the answer went out whole: the connection may carry another request
        self.answering = False  # the request is in: what the client sends now is a pipelined next one
        self.head_scope: trio.CancelScope | None = None  # the idle wait, until a request's first bytes arrive
        self.head_timeout = 0.0
        self.headers: Headers = []  # the request being answered's headers, listed once (``begin``)

    async def receive(self) -> bytes:
        """The one read of the client socket: what arrives goes to h11 (during a stream, that is a pipelined
        next request, kept for later). b"" when the client has gone."""
        try:
            data = await self.stream.receive_some(transport.READ_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        return self._took(data)

    def receive_now(self) -> bytes | None:
        """``receive`` without a wait, for the server's stream watcher (``relay.watch``), woken when the socket is
        readable: None when nothing has come after all."""
        data = self.stream.receive_now(transport.READ_SIZE)
        return data if data is None else self._took(data)

    def _took(self, data: bytes) -> bytes:
        """What one read brought (b"": the client has gone), kept for h11."""
        if self.answering:  # the request is in: this is only read to notice the client leaving
            self.held += len(data)
            if self.held > self.max_header_bytes:
                log.info("closing a connection that sent %d bytes while its answer was streaming", self.held)
                return b""  # as if gone: the response is cancelled and the connection closed
        elif self.h11.their_state is h11.IDLE:
            self._scan_head(data)
            self._fresh = data if self._fresh == b"" else None
        self.h11.receive_data(data)
        return data

    async def read_rest(self, length: int, received: int, take: Callable[[bytes], None],
                        room: Callable[[], int]) -> None:
        """The rest of a Content-Length body of ``length`` bytes (``received`` of them taken from h11, which holds
        nothing more), read past h11 and handed to ``take`` read by read. Not a byte beyond the body is read: what
        follows is a pipelined request, for the fresh parser that takes over from h11 here (h11 still expects the
        body it did not see). A body cut short fails as h11 fails it. Each read takes what has arrived, up to
        ``BODY_READ``: a large body that is already here comes in one or two reads, with no join of 64 KiB
        pieces (bench/README.md, session 7). A read never asks for more than ``room()`` (what the global body
        budget has left, at least a byte): many connections together hold no more than the budget."""
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        self._fresh = b""  # (it holds nothing: what follows the body is read into it later, in one piece or more)
        left = length - received
        while left:
            data = await self.stream.receive_some(min(left, BODY_READ, max(room(), 1)))
            if not data:
                raise h11.RemoteProtocolError("peer closed connection without sending complete message body "
                                              f"(received {length - left} bytes, expected {length})")
            left -= len(data)
            take(data)

    def _scan_head(self, data: bytes) -> None:
        """Obsolete line folding (a header line starting with a space or tab) is refused, not unfolded as h11
        does: a front proxy that reads ``Transfer-Encoding:\\r\\n chunked`` otherwise frames the body
        differently from relay (request smuggling)."""
        window = self._tail + data
        end = window.find(b"\r\n\r\n")
        head = window if end < 0 else window[:end + 2]
        if head.find(b"\n ") >= 0 or head.find(b"\n\t") >= 0:  # find: `in` first tries the needle as an int
            self.folded = True
        self._tail = window[-3:] if end < 0 else b""

    def begin(self, request: RequestHead) -> None:
        """A request has come (its headers are kept for the host): whether its answer may keep the connection
        open is h11's rule (HTTP/1.1, and no ``Connection: close``), which relay, writing the answer itself, now
        applies."""
        headers = request.headers
        self.http11 = keeps = request.http_version == b"1.1"
        for name, value in headers:  # (a loop: a generator in any() cost ~3k instructions per request)
            if name == b"connection" and b"close" in (v.strip() for v in value.lower().split(b",")):
                keeps = False
        self.keep_alive = self.client_keeps = keeps
        self.responded = self.answered = False
        self.headers = headers

    def head(self, status: int, headers: Headers, content_length: int | None, close: bool = False) -> bytes:
        """The answer's head (``content_length`` None: a stream); ``close``: relay closes the connection after it."""
        if self.responded:
            raise RuntimeError("a second answer to one request")
        self.responded = True
        if close:
            self.keep_alive = False
        return response_head(status, reason(status).encode(), headers, content_length, http11=self.http11,
                             keep_alive=self.client_keeps, close=close)

    def next_cycle(self) -> bool:
        """Ready for the next request on this connection (the last answer went out whole, and the connection stays
        open); True when a pipelined one is already here (it is scanned now, as it was received before this cycle
        began). h11 starts over as a fresh parser, given what the client sent after its last request, unless it
        is one already: the parser ``read_body`` started after the body, given what followed it, and nothing
        since (a fresh parser costs ~15k instructions). Not when what it holds is unknown (``_fresh`` None: the
        client had also closed): then it starts over, and what it holds is scanned for folding as always."""
        if self.held or self._fresh is None or self.h11.their_state is not h11.IDLE:
            pipelined, closed = self.h11.trailing_data
            self.restart(pipelined, closed)
        else:
            pipelined = self._fresh
        self.held = 0
        self.answering = self.folded = False
        self._tail = b""
        if pipelined:
            self._scan_head(pipelined)
        return bool(pipelined)

    def restart(self, received: bytes, closed: bool) -> None:
        """h11 starts over as a fresh parser, given what was received past the last request it parsed."""
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        self._fresh = None if closed else received
        if received:
            self.h11.receive_data(received)
        if closed:
            self.h11.receive_data(b"")

    async def next_event(self) -> Any:
        """The next request's head (a ``RequestHead``), or h11's event that says there is none (ConnectionClosed).
        A head that came whole in one read is first looked up in the memo (``relay.headmemo``); a head h11
        parsed is remembered there."""
        begun = False  # a read brought some of the head: if more is to come, header_timeout is its clock now
        while True:
            whole = b""
            fresh = self._fresh
            if fresh:  # the fresh parser holds one read's bytes: they may start with a whole head
                self._fresh = None
                end = fresh.find(b"\r\n\r\n")
                if end >= 0:
                    whole = fresh[:end + 4]
                    found = self.memo.find(whole)
                    if found is not None:  # h11 is not asked (it holds the bytes, but is restarted after the body)
                        self.after_head = fresh[end + 4:]
                        return found
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                if type(event) is not h11.Request:
                    return event
                request = RequestHead.of(event)
                if whole and not self.folded:
                    self.memo.remember(whole, request)
                return request
            if begun and self.head_scope is not None:  # (a head whole in one read never moves the deadline)
                self._idle_ended()
            begun = bool(await self.receive())

    def _idle_ended(self) -> None:
        """A request has started arriving: it now has header_timeout to finish, not the idle allowance."""
        scope, self.head_scope = self.head_scope, None
        if scope is not None:
            scope.deadline = min(scope.deadline, trio.current_time() + self.head_timeout)

    async def send(self, *events: Any) -> None:
        data = b"".join(self.h11.send(e) or b"" for e in events)
        if data:
            await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone() from exc


def response_headers(content_type: bytes, request_id: str, extra: Headers | None = None) -> Headers:
    return [(b"content-type", content_type), (b"request-id", request_id.encode()), SERVER_HEADER, *(extra or [])]


async def send_body(conn: Connection, ex: Exchange, status: int, body: bytes, *, content_type: bytes = b"application/json",
                    head_only: bool = False, extra: Headers | None = None, close: bool = False) -> None:
    """A whole answer with a content-length (HEAD gets the head alone)."""
    ex.status = status
    head = conn.head(status, response_headers(content_type, ex.request_id, extra), len(body), close)
    await conn.send_bytes(head if head_only or ex.method == "HEAD" else head + body)
    conn.answered = True


async def send_error(conn: Connection, ex: Exchange, err: RelayError, *, close: bool = False,
                     head_only: bool = False) -> None:
    ex.add_note(f"error={err.error_type}")
    if err.status >= 500:
        log.warning("%s %s -> %d %s: %s", ex.method, ex.path, err.status, err.error_type, err.message)
    await send_body(conn, ex, err.status, err.body(ex.request_id), extra=err.headers, close=close, head_only=head_only)


class EventStream:
    """The writer of one ``text/event-stream`` response: it alone sends the head, the chunk frames and the
    terminator, each framed here (chunked; an HTTP/1.0 client gets its body unframed, and the connection closes
    after it): the hot path of every stream."""

    __slots__ = ("conn", "ex", "chunked")

    def __init__(self, conn: Connection, ex: Exchange) -> None:
        self.conn = conn
        self.ex = ex
        self.chunked = conn.http11

    @property
    def started(self) -> bool:
        return self.ex.status != 0

    def _head(self) -> bytes:
        ex = self.ex
        ex.status = 200
        ex.ttfb = ex.ttfb or time.perf_counter()
        headers = response_headers(b"text/event-stream; charset=utf-8", ex.request_id, [(b"cache-control", b"no-cache")])
        return self.conn.head(200, headers, None)

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%b\r\n" % (len(data), data) if self.chunked and data else data

    def finish_now(self, data: bytes) -> bytes:
        """A whole answer known before anything was written: head, events and terminator in one write, made
        without waiting. Returns what the socket did not take at once (the caller sends it, watched:
        ``send_rest``)."""
        whole = self._head() + self._frame(data) + (b"0\r\n\r\n" if self.chunked else b"")
        try:
            rest = transport.send_now(self.conn.stream.socket, whole)
        except OSError as exc:
            raise ClientGone() from exc
        self.conn.answered = not rest
        return rest

    async def send_rest(self, rest: bytes) -> None:
        """What ``finish_now`` could not write at once."""
        await self.conn.send_bytes(rest)
        self.conn.answered = True

    async def write(self, data: bytes) -> None:
        """Send events; the first call sends the head with them."""
        if not data:
            return
        if self.ex.status == 0:
            await self.conn.send_bytes(self._head() + self._frame(data))
            return
        rest = self.write_now(data)
        if rest:
            await self.conn.send_bytes(rest)

    def write_now(self, data: bytes) -> bytes | None:
        """The per-chunk step of every stream, made without a coroutine or a wait: one frame, one write. Returns
        what the socket's buffer did not take (b"": all of it, nearly always; the rest goes out with ``write``'s
        wait), or None when the head is not out yet (``write`` sends it)."""
        if self.ex.status == 0:
            return None
        try:
            return transport.send_now(self.conn.stream.socket, self._frame(data))
        except OSError as exc:
            raise ClientGone() from exc

    async def end(self) -> None:
        if self.chunked:
            await self.conn.send_bytes(b"0\r\n\r\n")
        self.conn.answered = True


class BodyBudget:
    """Request-body bytes held across all connections at once: one large body per connection, many
    connections, is bounded as a whole (each body alone is bounded by ``body_limit``). It also decides when the
    C heap is trimmed (``run``)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.given = 0  # body bytes answered since the last trim
        self.read = 0  # body bytes read so far: ``run`` tells a quiet spell by how little this moves
        self._due = trio.Event()  # set once ``given`` reaches TRIM_AFTER

    def take(self, size: int) -> None:
        if self.held + size > self.limit:
            raise RelayError(529, "relay is holding as many request bodies as it may; retry shortly", "overloaded_error",
                             [(b"retry-after", b"1")])
        self.held += size
        self.read += size

    def room(self) -> int:
        return self.limit - self.held

    def give(self, size: int) -> None:
        self.held -= size
        self.given += size
        if self.given >= TRIM_AFTER:
            self._due.set()

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Trims the heap once TRIM_AFTER bytes of bodies were answered, when less than TRIM_QUIET_BYTES of bodies
        then arrive in TRIM_QUIET, or TRIM_LATEST after it was due whatever arrives. Not at once: the next large
        body would fault every page of its parse back in. At 1 MiB bodies back to back, a trim every 8 MiB cost a
        quarter of relay's CPU and the request after it ~4 ms (bench/README.md, session 14). While large bodies keep
        coming the heap reuses what they free; when they stop (small ones may go on), it goes back."""
        task_status.started()
        while True:
            await self._due.wait()
            latest = trio.current_time() + TRIM_LATEST
            seen = self.read
            await trio.sleep(TRIM_QUIET)
            while self.read - seen >= TRIM_QUIET_BYTES and trio.current_time() < latest:
                seen = self.read
                await trio.sleep(TRIM_QUIET)
            self._due = trio.Event()
            self.given = 0
            trim_heap()


# Body bytes answered between heap trims, and the quiet that must follow them. A trim after 8 MB of reads were
# freed takes 0.03-0.6 ms (measured: 64 KiB blocks beside 200k live small objects); on a heap left fragmented by
# 100 MB of them, ~13 ms.
TRIM_AFTER = 8 * 1024 * 1024
TRIM_QUIET = 0.1  # seconds in which...
TRIM_QUIET_BYTES = 1024 * 1024  # ...less than this many body bytes arrive is quiet
TRIM_LATEST = 2.0  # seconds after a trim is due: trimmed then, quiet or not


def _trimmer() -> Callable[[int], object] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc
    except (OSError, AttributeError):
        return None


_malloc_trim = _trimmer()


def trim_heap() -> None:
    """Give freed heap pages back to the system. A large body arrives as many 64 KiB reads, which the C heap
    keeps after they are freed (glibc returns only its top): a few large bodies would otherwise leave
    relay's resident size at its peak for good."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def framing_error(headers: Headers) -> str | None:
    """What is wrong with how a request says its body is framed, if anything. Both Content-Length and
    Transfer-Encoding (RFC 9112 6.1) mean a proxy in front may have framed it otherwise: refused."""
    chunked = length = False
    for name, _ in headers:
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            length = True
    if chunked and length:
        return "a request may not carry both Content-Length and Transfer-Encoding"
    return None


def has_body(headers: Headers) -> bool:
    for name, value in headers:
        if name == b"transfer-encoding" or (name == b"content-length" and value.strip() not in (b"", b"0")):
            return True
    return False


async def read_body(conn: Connection, headers: Headers, limit: int, budget: BodyBudget, timeout: float) -> bytes:
    """The whole body, counted against the request's limit and the global budget as it arrives (the budget is
    given back by the caller once the request is answered, or here if reading fails). A body already received
    with its head (the usual small request) is taken from h11 without a timer; one still coming must arrive within
    ``timeout`` (trio.TooSlowError). The rest of a Content-Length body is read past h11 (``Connection.read_rest``):
    h11 would copy each read into its buffer and out again as an event, for bytes it has nothing to judge in."""
    length = None
    for name, value in headers:
        if name == b"content-length":  # one, digits only: h11 has checked (and both framings were refused)
            length = int(value)
            if length > limit:
                raise RelayError(413, f"request body is {length} bytes; the limit is {limit}", "request_too_large")
    parts: list[bytes] = []
    size = 0

    def take(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise RelayError(413, f"request body exceeds the limit of {limit} bytes", "request_too_large")
        budget.take(len(data))
        parts.append(data)

    def ended(event: Any) -> bool:
        if isinstance(event, h11.Data):
            take(event.data)
        elif isinstance(event, h11.EndOfMessage):
            return True
        elif isinstance(event, h11.ConnectionClosed):
            raise ClientGone()
        return False

    try:
        received, closed = b"", False
        from_memo = conn.after_head is not None  # the memo's head: h11 has not seen the request (and a head is
        if conn.after_head is not None:  # only remembered with a Content-Length or no body at all, and no Expect)
            received, conn.after_head = conn.after_head, None
            length = length or 0
        elif length is not None:
            received, closed = conn.h11.trailing_data
        if length is not None and len(received) >= length:  # the whole body came with its head (the usual small
            take(received[:length])  # request): taken as it is, not as h11's Data and EndOfMessage (~20k instructions)
            conn.restart(received[length:], closed)  # (a pipelined request after it, if any)
            conn.answering = True
            return parts[0]
        if from_memo:
            if received:
                take(received)
        else:
            event = conn.h11.next_event()
            while event is not h11.NEED_DATA:
                if ended(event):
                    conn.answering = True
                    return b"".join(parts)
                event = conn.h11.next_event()
        with trio.fail_after(timeout):  # the rest is still to come (no wait before this: the clock is read here)
            if not from_memo and conn.h11.client_is_waiting_for_100_continue:  # the head was admitted: now the
                await conn.send(h11.InformationalResponse(status_code=100, headers=[]))  # client may send it
            if length is not None:
                await conn.read_rest(length, size, take, budget.room)
            else:
                while not ended(await conn.next_event()):
                    pass
        conn.answering = True
        return b"".join(parts)
    except BaseException:
        budget.give(sum(len(p) for p in parts))
        raise


async def send_raw(stream: trio.SocketStream | transport.ClientSocket, err: RelayError) -> None:
    """An error answer written outside h11 (its state is spent, or no h11 connection exists yet); closes."""
    body = err.body()
    head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nrequest-id: %b\r\n"
            b"server: relay\r\nconnection: close\r\n\r\n"
            % (err.status, reason(err.status).encode(), len(body), new_request_id().encode()))
    try:
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def protocol_error(exc: h11.RemoteProtocolError, max_header_bytes: int) -> RelayError:
    """A request h11 cannot parse, as the 400/431 the client gets."""
    status = exc.error_status_hint or 400
    if status >= 500:  # e.g. an unsupported Transfer-Encoding: the client's request is at fault, not relay
        status = 400
    if status == 431:
        message = f"request head larger than {max_header_bytes} bytes"
    else:  # h11 quotes the bytes it refused as Python reprs: bytearray(b'...')
        message = "malformed HTTP request: " + re.sub(r"bytearray\(b(['\"])(.*?)\1\)", r"\2", str(exc))
    return RelayError(status, message, "request_too_large" if status == 413 else "invalid_request_error")


def head_size(request: RequestHead) -> int:
    """The request head's size as sent, near enough: line, headers, line ends."""
    size = len(request.target) + 16
    for name, value in request.headers:
        size += len(name) + len(value) + 4
    return size


class Host(Protocol):
    """What the connection loop needs from the server it runs for."""

    draining: bool
    idle_waits: set[trio.CancelScope]  # cancelled by a drain: idle keep-alive connections close at once
    bodies: BodyBudget

    @property
    def limits(self) -> ServerConfig: ...

    def admit(self, conn: Connection, ex: Exchange, request: RequestHead) -> None:
        """Checks made on the head alone (route, key), before any body byte is read or held: raises the
        RelayError to answer with."""

    async def respond(self, conn: Connection, ex: Exchange, request: RequestHead, body: bytes) -> None: ...

    def done(self, ex: Exchange) -> None: ...


async def serve_connection(conn: Connection, host: Host) -> None:
    """Requests one after another on a keep-alive connection, until it closes, idles out, or the host drains."""
    limits = host.limits  # a reload applies to connections opened after it
    while True:
        # wait for the next request on a keep-alive connection, but not forever
        event: Any = None
        if host.draining:
            return
        with trio.move_on_after(limits.idle_timeout) as idle:
            host.idle_waits.add(idle)
            conn.head_scope, conn.head_timeout = idle, limits.header_timeout  # first byte: the head's clock starts
            try:
                event = await conn.next_event()
            except h11.RemoteProtocolError as exc:
                await send_raw(conn.stream, protocol_error(exc, limits.max_header_bytes))
                return
            finally:
                host.idle_waits.discard(idle)
                conn.head_scope = None
        if idle.cancelled_caught and conn.h11.trailing_data[0] and not host.draining:
            await send_raw(conn.stream, RelayError(408, f"request head not received within {limits.header_timeout:g}s",
                                                   "invalid_request_error"))
            return
        if type(event) is not RequestHead:
            return
        request = event
        headers = request.headers
        if head_size(request) > limits.max_header_bytes:  # h11 checks only heads still incomplete in a read
            await send_raw(conn.stream, RelayError(431, f"request head larger than {limits.max_header_bytes} bytes",
                                                   "invalid_request_error"))
            return
        refused = "obsolete line folding in the request head" if conn.folded else framing_error(headers)
        if refused:
            await send_raw(conn.stream, RelayError(400, refused, "invalid_request_error"))
            return
        conn.begin(request)
        ex = Exchange(request.method.decode("latin-1"), request.target.decode("latin-1"))
        refusal: RelayError | None = None
        try:
            host.admit(conn, ex, request)
        except RelayError as err:  # refused on its head: a body is never read (nor held), so the connection closes
            if has_body(headers):
                await send_error(conn, ex, err, close=True, head_only=ex.method == "HEAD")
                host.done(ex)
                await conn.stream.linger()
                return
            refusal = err  # answered once the (empty) body is read, keeping the connection
        try:
            body = await read_body(conn, headers, limits.body_limit, host.bodies, limits.header_timeout)
        except trio.TooSlowError:
            await send_error(conn, ex, RelayError(408, f"request not received within {limits.header_timeout:g}s",
                                                  "invalid_request_error"), close=True)
            return
        except h11.RemoteProtocolError as exc:
            await send_raw(conn.stream, protocol_error(exc, limits.max_header_bytes))
            return
        except RelayError as err:  # too large, or no room: the rest of the body is never read, so close
            await send_error(conn, ex, err, close=True)
            host.done(ex)
            await conn.stream.linger()
            return
        try:
            if refusal is not None:
                await send_error(conn, ex, refusal, head_only=ex.method == "HEAD")
            else:
                await host.respond(conn, ex, request, body)
        finally:
            host.bodies.give(len(body))
        host.done(ex)
        if not (conn.answered and conn.keep_alive):
            return
        if conn.next_cycle():  # answered without a read, so let other connections run first
            await trio.lowlevel.checkpoint()


_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
            413: "Payload Too Large", 429: "Too Many Requests", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
            529: "Overloaded"}


def reason(status: int) -> str:
    return _REASONS.get(status, "Error")
