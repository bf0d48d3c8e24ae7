"""The floor: a byte pipe on relay's own socket layer, with no HTTP, no JSON and no translation.

Each client connection gets its own upstream connection and bytes are copied both ways as they arrive,
with the same read and write calls relay uses (``relay.transport.receive_some`` / ``send_all``) under the
same trio scheduler. Whatever this costs per chunk, relay cannot go below it in Python on trio; the bench
runs it as the ``pipe`` path beside ``relay`` so that relay's figures can be read against the floor of
the stack as well as against a direct connection.

Run: ``python -m bench.pipe --upstream-port 8000``; it prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import socket

import trio

from bench import _net
from relay.transport import receive_some, send_all


async def _copy(src: socket.socket, dst: socket.socket, done: trio.CancelScope) -> None:
    more = True  # the first read of a new connection usually finds its request already there
    try:
        while True:
            data = await receive_some(src, _net.READ_SIZE, more)
            if not data:
                break
            more = len(data) == _net.READ_SIZE
            await send_all(dst, data)
    except OSError:
        pass
    done.cancel()  # either side gone: the pair is finished


async def _connect(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        await trio.lowlevel.wait_writable(sock)
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            sock.close()
            raise OSError(error, "connect failed") from None
    _net.tune(sock)
    return sock


async def _pair(client: socket.socket, upstream_port: int) -> None:
    try:
        upstream = await _connect(upstream_port)
    except OSError:
        _net.close(client)
        return
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_copy, client, upstream, nursery.cancel_scope)
            nursery.start_soon(_copy, upstream, client, nursery.cancel_scope)
    finally:
        _net.close(client)
        _net.close(upstream)


async def serve(listener: socket.socket, upstream_port: int,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started(listener.getsockname()[1])
        await _net.accept_forever(listener, nursery, _pair, upstream_port)


def main(argv: list[str] | None = None) -> None:
    _net.front_main("python -m bench.pipe", __doc__.splitlines()[0], serve, argv)


if __name__ == "__main__":
    main()
