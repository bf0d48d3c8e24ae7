"""The library floor: h11 on the client side and relay's httpcore pool on the upstream side, nothing else.

Each request is read with h11, sent upstream as it came through relay's own connection pool (httpcore's
HTTP/1.1 connection on relay's transport, its body read by relay's reader), and the upstream's body is copied
back as it arrives, framed as relay frames it. No JSON, no routing, no translation, no client watcher, no access log: what is left is the
cost of the libraries the design card fixes (trio, h11, httpcore) used the way relay uses them. The bench
runs it as the ``stack`` path beside ``pipe`` (bytes only) and ``relay``, so relay's figures can be split
into what the stack costs and what relay's own work costs. It speaks OpenAI on both sides (the same requests
and answers as the direct path).

Run: ``python -m bench.stack --upstream-port 8000``; it prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import socket
import ssl

import h11
import trio

from bench import _net
from relay.pool import ConnectionPool
from relay.transport import receive_some, send_all

TIMEOUTS = {"timeout": {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": 10.0}}
HEAD = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def _exchange(client: socket.socket, conn: h11.Connection, pool: ConnectionPool, origin: str,
                    request: h11.Request) -> None:
    parts = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await receive_some(client, _net.READ_SIZE, False))
        elif isinstance(event, h11.Data):
            parts.append(event.data)
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise OSError("client went away")
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
    async with pool.stream("POST", origin + request.target.decode(), headers=headers, content=b"".join(parts),
                           extensions=TIMEOUTS) as response:
        await send_all(client, conn.send(h11.Response(status_code=response.status, headers=HEAD)) or b"")
        reader = response.reader
        while not reader.done:
            chunk = reader.feed(await response.receive())
            if reader.error is not None:
                raise OSError(str(reader.error))
            if chunk:
                await send_all(client, b"%x\r\n%b\r\n" % (len(chunk), chunk))
    await send_all(client, conn.send(h11.EndOfMessage()) or b"")


async def _serve_connection(client: socket.socket, pool: ConnectionPool, origin: str) -> None:
    conn = h11.Connection(h11.SERVER)
    more = True
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await receive_some(client, _net.READ_SIZE, more)
                more = len(data) == _net.READ_SIZE
                conn.receive_data(data)
                continue
            if not isinstance(event, h11.Request):
                return
            await _exchange(client, conn, pool, origin, event)
            conn.start_next_cycle()
    except (OSError, h11.ProtocolError, trio.BrokenResourceError):
        pass
    finally:
        _net.close(client)


async def serve(listener: socket.socket, upstream_port: int, ca_file: str = "",
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """``ca_file``: the upstream is HTTPS (``bench.tls_front``), with this CA."""
    pool = ConnectionPool(ssl.create_default_context(cafile=ca_file or None), 65536)
    origin = f"{'https' if ca_file else 'http'}://127.0.0.1:{upstream_port}"
    async with trio.open_nursery() as nursery:
        task_status.started(listener.getsockname()[1])
        await _net.accept_forever(listener, nursery, _serve_connection, pool, origin)


def main(argv: list[str] | None = None) -> None:
    _net.front_main("python -m bench.stack", __doc__.splitlines()[0], serve, argv)


if __name__ == "__main__":
    main()
