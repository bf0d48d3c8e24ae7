"""A TLS front for the mock upstream: HTTPS in, the mock's plain bytes out, each read passed on as it comes.

Every hosted provider is HTTPS, and relay reads a TLS upstream through its own stream (``relay.transport``), so
``bench.callgrind --tls`` counts relay (or ``stack``) against this front. Each read from the mock (one chunk, for a
paced stream) goes out as one write, so the server under test decrypts one record per chunk, as from a real
provider. Its own cost is not counted: callgrind counts the server under test only.

Run: ``python -m bench.tls_front --upstream-port 8000 --cert cert.pem --key key.pem``; it prints ``READY <port>``.
A certificate for 127.0.0.1: ``make_certificate(folder)`` (with the openssl command).
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import ssl
import subprocess
from pathlib import Path

import trio

from bench import _net


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (also the CA a client trusts): (cert, key)."""
    cert, key = folder / "front-cert.pem", folder / "front-key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    return cert, key


async def _copy(source: trio.abc.ReceiveStream, sink: trio.abc.SendStream, done: trio.CancelScope) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    done.cancel()  # either side ending ends the connection


async def _connection(client: socket.socket, context: ssl.SSLContext, upstream_port: int) -> None:
    plain = trio.SocketStream(trio.socket.from_stdlib_socket(client))
    secure = trio.SSLStream(plain, context, server_side=True)
    try:
        upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
    except OSError:
        await plain.aclose()
        return
    async with upstream, secure:
        with trio.CancelScope() as done:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_copy, secure, upstream, done)
                nursery.start_soon(_copy, upstream, secure, done)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tls_front", description=__doc__.splitlines()[0])
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.cert, args.key)
    listener = _net.listen("127.0.0.1", 0)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            print(f"READY {listener.getsockname()[1]}", flush=True)
            await _net.accept_forever(listener, nursery, _connection, context, args.upstream_port)

    with contextlib.suppress(KeyboardInterrupt):
        trio.run(run)


if __name__ == "__main__":
    main()
