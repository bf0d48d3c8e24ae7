"""httpcore's network layer for relay, on trio's low-level socket calls.

httpcore's own trio backend goes through trio.SocketStream: each read opens a cancel scope for its timeout
and first tries a recv that, on a paced stream, fails with EAGAIN; each write takes a conflict detector and
a checkpoint. Per upstream chunk that bookkeeping cost more than translating the chunk. This backend reads
with one wait and one recv (trying the recv first only when the last read filled the buffer), writes with a
plain send, and opens a cancel scope only when it really waits and has a timeout. TLS is the same socket
calls with a sans-I/O ``ssl.SSLObject`` in between.

The response body does not pass through httpcore: relay's pool reads it with ``read`` and takes it apart
itself (``relay.reader``), so these reads deliver raw bytes.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import httpcore
import trio

READ_SIZE = 64 * 1024  # what httpcore asks for per read; TLS reads the socket in the same steps


async def _wait(wait: Callable[[Any], Awaitable[None]], sock: Any, timeout: float | None,
                too_slow: type[Exception]) -> None:
    if timeout is None:
        await wait(sock)
        return
    with trio.move_on_after(timeout) as scope:
        await wait(sock)
    if scope.cancelled_caught:
        raise too_slow(f"no progress within {timeout:g}s")


async def receive_some(sock: Any, max_bytes: int, try_first: bool, timeout: float | None = None) -> bytes:
    """One read from a non-blocking socket (stdlib or trio): a ``read`` straight away when ``try_first``
    (the last read filled its buffer, so more is likely waiting), else a wait for readability first (no
    EAGAIN round trip on a paced stream). Raises OSError when the peer is gone, httpcore.ReadTimeout."""
    fd = sock.fileno()
    if try_first:
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            pass
    while True:
        await _wait(trio.lowlevel.wait_readable, sock, timeout, httpcore.ReadTimeout)
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:  # woken without data (it happens): wait again
            pass


def send_now(sock: Any, data: bytes) -> bytes:
    """One write that never waits; returns what the socket's buffer did not take. Raises OSError."""
    try:
        sent = os.write(sock.fileno(), data)
    except BlockingIOError:
        return data
    return data[sent:] if sent < len(data) else b""


async def send_all(sock: Any, data: bytes | memoryview, timeout: float | None = None) -> None:
    """Write to a non-blocking socket (stdlib or trio), waiting only when its buffer is full. Raises OSError
    when the peer is gone, httpcore.WriteTimeout."""
    fd = sock.fileno()
    view = memoryview(data)
    while True:
        try:
            sent = os.write(fd, view)
        except BlockingIOError:
            sent = 0
        if sent == len(view):
            return
        view = view[sent:]
        await _wait(trio.lowlevel.wait_writable, sock, timeout, httpcore.WriteTimeout)


async def send_parts(sock: Any, parts: tuple[bytes, ...], timeout: float | None = None) -> None:
    """``send_all`` of the parts one after another, in one system call when the socket's buffer takes them (a
    request's head and its body, without joining them into a copy of the body)."""
    try:
        sent = os.writev(sock.fileno(), parts)
    except BlockingIOError:
        sent = 0
    for part in parts:
        if sent >= len(part):
            sent -= len(part)
            continue
        await send_all(sock, memoryview(part)[sent:] if sent else part, timeout)
        sent = 0


class SocketStream(httpcore.AsyncNetworkStream):
    """A plain TCP connection. Owns the socket (non-blocking, TCP_NODELAY)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._more = False  # the last read filled its buffer: the next one tries recv before waiting

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            data = await receive_some(self._sock, max_bytes, self._more, timeout)
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from None
        self._more = len(data) == max_bytes
        return data

    def waitable(self) -> socket.socket | None:
        """The socket to wait on before ``read_ready``, when one wait and one read will do (the last read did not
        fill its buffer): a caller that awaits trio's ``wait_readable`` itself saves the coroutines between."""
        return None if self._more else self._sock

    held_back = False  # (TLSStream's: nothing is ever held where no socket event would bring it)

    def read_ready(self, max_bytes: int) -> bytes | None:
        """``read`` for a socket trio has just found readable: None when it was not after all."""
        data = _read_now(self._sock, max_bytes)
        if data is not None:
            self._more = len(data) == max_bytes
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            await send_all(self._sock, buffer, timeout)
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from None

    async def write_parts(self, parts: tuple[bytes, ...], timeout: float | None = None) -> None:
        try:
            await send_parts(self._sock, parts, timeout)
        except OSError as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from None

    async def aclose(self) -> None:
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> TLSStream:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = TLSStream(self._sock, ssl_context.wrap_bio(incoming, outgoing, server_hostname=server_hostname),
                        incoming, outgoing)
        try:
            await tls.handshake(timeout)
        except BaseException:  # cancelled too (the client left): the socket must not wait for the GC
            await self.aclose()
            raise
        return tls

    def get_extra_info(self, info: str) -> Any:
        return _extra(self._sock, info)


class TLSStream(httpcore.AsyncNetworkStream):
    """TLS as a sans-I/O ``ssl.SSLObject`` between two memory buffers, moved by the same socket calls as plain
    TCP. trio.SSLStream (used before) took two trips through the scheduler and its locks per read: a TLS read
    cost twice a plain one (~160 against ~80 us per paced read here); now decryption is all it adds."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        self._sock = sock
        self._tls = tls
        self._in = incoming  # ciphertext from the network, waiting to be decrypted
        self._out = outgoing  # ciphertext the TLS layer produced, waiting to be sent
        self._more = False  # as SocketStream: the last socket read filled its buffer
        self._owed = b""  # ciphertext a read without waiting (``read_ready``) could not send at once
        self._ended = False  # a close_notify or the connection's end was decrypted: every read now says b""

    async def _receive(self, timeout: float | None) -> None:
        data = await receive_some(self._sock, READ_SIZE, self._more, timeout)
        self._more = len(data) == READ_SIZE
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()

    async def _send_pending(self, timeout: float | None) -> None:
        if self._owed:
            owed, self._owed = self._owed, b""
            await send_all(self._sock, owed, timeout)
        if self._out.pending:
            await send_all(self._sock, self._out.read(), timeout)

    def waitable(self) -> socket.socket | None:
        """As ``SocketStream.waitable``: the socket, when all that was received is decrypted and handed out (a
        read returns one record; others may wait in memory, where no socket wait would see them) and nothing is
        owed to the peer; never after the end (no socket event would bring the b"" that says so)."""
        if self._more or self._ended or self._in.pending or self._tls.pending() or self._owed or self._out.pending:
            return None
        return self._sock

    @property
    def held_back(self) -> bool:
        """Something waits that no socket event will bring: the end, decrypted with the last bytes (the next read
        says b"" at once), or bytes owed to the peer. A watcher reading this stream hands it back."""
        return self._ended or bool(self._owed)

    def read_ready(self, max_bytes: int) -> bytes | None:
        """``read`` for a socket trio or the watcher found readable: one socket read, then every record it
        completed (None: no whole record yet, or nothing came). What TLS has to answer (a post-handshake
        message) is written without waiting; what the socket does not take goes out before the next write.
        After a close_notify, ``SSLObject.read`` says b"" for ever rather than raising: that is the end too."""
        if self._ended:
            return b""
        raw = _read_now(self._sock, READ_SIZE)
        if raw is None:
            return None
        self._more = len(raw) == READ_SIZE
        if raw:
            self._in.write(raw)
        else:
            self._in.write_eof()
        parts = []
        try:
            while True:
                try:
                    data = self._tls.read(max_bytes)
                except ssl.SSLWantReadError:  # the rest of a record is still to come
                    break
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    data = b""
                if not data:  # the end: handed out after what came before it, if anything did
                    self._ended = True
                    break
                parts.append(data)
                if not self._in.pending and not self._tls.pending():  # nothing left to decrypt: a read now would
                    break  # only raise SSLWantReadError (an exception per chunk, ~20 % of the decryption's cost)
            if self._out.pending:
                self._owed += send_now(self._sock, self._out.read())
        except (ssl.SSLError, OSError) as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from None
        if parts:
            return b"".join(parts)
        return b"" if self._ended else None

    async def handshake(self, timeout: float | None) -> None:
        try:
            with trio.fail_after(float("inf") if timeout is None else timeout):
                while True:
                    try:
                        self._tls.do_handshake()
                        break
                    except ssl.SSLWantReadError:
                        await self._send_pending(None)
                        await self._receive(None)
                await self._send_pending(None)  # the client's last flight
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"TLS handshake took longer than {timeout:g}s") from None
        except (ssl.SSLError, OSError) as exc:  # a bad certificate, a peer that hung up or spoke no TLS
            raise httpcore.ConnectError(f"TLS handshake failed: {exc}") from None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            while True:
                try:
                    data = self._tls.read(max_bytes)
                    break
                except ssl.SSLWantReadError:  # no whole record buffered yet
                    await self._receive(timeout)
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or a bare EOF: HTTP framing
                    data = b""  # tells a complete body from a cut one, as trio's https_compatible did
                    break
            await self._send_pending(timeout)  # a post-handshake answer (a TLS 1.3 key update), rarely any
        except (ssl.SSLError, OSError) as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from None
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self.write_parts((buffer,), timeout)

    async def write_parts(self, parts: tuple[bytes, ...], timeout: float | None = None) -> None:
        try:
            for part in parts:
                if part:
                    self._tls.write(part)  # into memory: always whole
            await self._send_pending(timeout)
        except (ssl.SSLError, OSError) as exc:
            raise httpcore.WriteError(str(exc) or type(exc).__name__) from None

    async def aclose(self) -> None:
        if self._sock.fileno() < 0:
            return
        try:  # a courtesy close_notify if the socket takes it at once; never waits
            self._tls.unwrap()
        except ssl.SSLError:
            pass
        try:
            if self._out.pending:
                os.write(self._sock.fileno(), self._out.read())
        except OSError:
            pass
        trio.lowlevel.notify_closing(self._sock)
        self._sock.close()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS inside TLS (an HTTPS proxy) is not supported")

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._tls
        return _extra(self._sock, info)


def _read_now(sock: socket.socket, max_bytes: int) -> bytes | None:
    """One read of a socket found readable: None when it was not after all. Raises httpcore.ReadError."""
    try:
        return os.read(sock.fileno(), max_bytes)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise httpcore.ReadError(str(exc) or type(exc).__name__) from None


def _extra(sock: socket.socket, info: str) -> Any:
    if sock.fileno() < 0:
        return True if info == "is_readable" else None
    if info == "socket":
        return sock
    if info == "is_readable":  # httpcore asks before reusing an idle connection: readable = closed by the server
        poller = select.poll()  # not select(): it refuses descriptors past 1023
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    if info == "client_addr":
        return sock.getsockname()
    if info == "server_addr":
        return sock.getpeername()
    return None


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) socket that shares its port with other processes (SO_REUSEPORT): the
    supervisor holds one to keep the port, each worker listens on its own and the kernel spreads connections."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


class Backend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: Iterable[Any] | None = None) -> SocketStream:
        try:
            with trio.fail_after(float("inf") if timeout is None else timeout):
                stream = await trio.open_tcp_stream(host, port, local_address=local_address)  # happy eyeballs
        except trio.TooSlowError:
            raise httpcore.ConnectTimeout(f"no connection within {timeout:g}s") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
        sock = socket.socket(fileno=stream.socket.detach())  # trio set TCP_NODELAY
        sock.setblocking(False)
        for option in socket_options or ():
            sock.setsockopt(*option)
        return SocketStream(sock)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not supported")

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)


LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024


class ClientSocket:
    """A client connection, read and written without trio.SocketStream's per-call checkpoint (a trip through
    the scheduler for every read and write). Same shape as the parts of trio.SocketStream the server uses;
    a vanished peer reads as b"" and writes as trio.BrokenResourceError, as there."""

    __slots__ = ("stream", "socket", "_more")

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.socket = stream.socket
        self._more = True  # a new connection's request is usually already waiting

    async def receive_some(self, max_bytes: int) -> bytes:
        try:
            data = await receive_some(self.socket, max_bytes, self._more)
        except OSError:  # reset by the peer, or closed under us
            return b""
        self._more = len(data) == max_bytes
        return data

    def receive_now(self, max_bytes: int) -> bytes | None:
        """``receive_some`` without a wait, for a caller told the socket is readable: None when nothing has
        come after all."""
        try:
            return os.read(self.socket.fileno(), max_bytes)
        except BlockingIOError:
            return None
        except OSError:  # reset by the peer, or closed under us
            return b""

    async def send_all(self, data: bytes) -> None:
        try:
            await send_all(self.socket, data)
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def linger(self, seconds: float = LINGER_SECONDS, limit: int = LINGER_BYTES) -> None:
        """Close our side, then read and drop what the client is still sending (a body relay refused unread)
        for a moment: closing with unread bytes would make the kernel reset the connection, and the client
        would lose the answer it was just sent. Bounded in time and bytes: nothing is held."""
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            return
        dropped = 0
        with trio.move_on_after(seconds):
            while dropped < limit:
                data = await self.receive_some(READ_SIZE)
                if not data:
                    return
                dropped += len(data)

