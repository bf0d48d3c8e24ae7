"""Non-blocking stdlib sockets driven by trio's low-level readiness waits.

Why not ``trio.socket``: every ``send``/``recv`` there is a scheduler checkpoint even when the kernel could
answer at once. The harness must cost far less than the relay it measures, so these helpers try the syscall
first and only park the task when the kernel says ``EAGAIN``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import trio

#: 64 KiB: large enough for a burst of chunks; recv(256 KiB) costs ~28 µs here (the allocation is fresh pages
#: each time) against ~4 µs for 64 KiB, which would make the harness slower than what it measures.
READ_SIZE = 64 * 1024


def tune(sock: socket.socket) -> None:
    """Make a connected socket non-blocking and disable Nagle so small SSE chunks leave at once."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def recv(sock: socket.socket, size: int = READ_SIZE) -> bytes:
    """Read what the kernel holds (b"" at EOF), waiting only when nothing is there yet."""
    while True:
        try:
            return sock.recv(size)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)


async def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """Write all of ``data``, waiting for buffer space only when the kernel's send buffer is full."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


def try_send(sock: socket.socket, data: bytes | memoryview) -> int:
    """One non-blocking send; returns bytes written (0 when the buffer is full). Raises OSError on reset."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return 0


def listen(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A non-blocking listening socket; port 0 picks a free one (read it back with getsockname)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def close(sock: socket.socket) -> None:
    """Close a socket that no other task is waiting on."""
    try:
        sock.close()
    except OSError:
        pass


def raise_fd_limit() -> None:
    """Lift the soft open-files limit to the hard one: 1,024 streams need 1,024+ sockets per process."""
    try:
        import resource

        _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ImportError, ValueError, OSError):
        pass


async def accept_forever(listener: socket.socket, nursery: trio.Nursery,
                         handler: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Accept every connection waiting each time the listener is readable; each runs ``handler(conn, *args)``."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        while True:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                break
            tune(conn)
            nursery.start_soon(handler, conn, *args)


Serve = Callable[..., Awaitable[None]]  # serve(listener, upstream_port, task_status=...)


def front_main(prog: str, description: str, serve: Serve, argv: list[str] | None = None) -> None:
    """The command line of a server placed in front of the mock (``bench.pipe``, ``bench.stack``): it listens,
    prints ``READY <port>`` and serves until interrupted."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--upstream-ca", default="", help="the upstream is HTTPS, with this CA (bench.tls_front)")
    args = parser.parse_args(argv)
    sock = listen(args.host, args.port)
    tls = {"ca_file": args.upstream_ca} if args.upstream_ca else {}

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve, **tls), sock, args.upstream_port)
            print(f"READY {port}", flush=True)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)
