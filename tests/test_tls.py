"""HTTPS upstreams: every hosted provider is reached this way, through relay's own TLS stream (relay/transport.py).
A self-signed CA made by openssl for the test; the provider trusts it with ``ca_file``."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from relay.config import ConfigError, parse
from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Recorded, Reply, completion, text_stream
from tests.client import roundtrip
from tests.test_watch import pulls, watcher  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test CA")

BODY = orjson.dumps({"model": "mock-model", "max_tokens": 64, "stream": True,
                     "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


def request(stream: bool = True) -> bytes:
    body = BODY if stream else BODY.replace(b'"stream":true', b'"stream":false')
    return (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: %b\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (RELAY_KEY.encode(), len(body), body))


def many_chunks(rec: Recorded) -> Reply:
    if not orjson.loads(rec.body).get("stream"):
        return completion({"role": "assistant", "content": "plain answer"})
    return text_stream(*[f"word{i} " for i in range(40)])


async def test_streams_and_reuses_one_tls_connection(nursery: trio.Nursery, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    upstream = MockUpstream(many_chunks, tls=server_context(cert, key))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url, f'ca_file = "{cert}"'))
    for _ in range(3):
        answer = await roundtrip(relay.port, request())
        assert answer.status == 200 and answer.complete, answer
        text = "".join(orjson.loads(line[6:])["delta"].get("text", "")
                       for line in answer.body.split(b"\n") if line.startswith(b"data: ") and b"text_delta" in line)
        assert text == "".join(f"word{i} " for i in range(40))
        assert answer.body.rstrip().endswith(b'data: {"type":"message_stop"}')
    answer = await roundtrip(relay.port, request(stream=False))
    assert answer.status == 200 and orjson.loads(answer.body)["content"][0]["text"] == "plain answer"
    assert upstream.accepted == 1  # one TLS handshake, then keep-alive
    assert upstream.requests[0].headers["authorization"].startswith("Bearer ")


async def test_a_paced_tls_stream_is_read_without_a_task_per_chunk(nursery: trio.Nursery, certificate: tuple[Path, Path],
                                                                    watcher: str, pulls: dict[Any, int]) -> None:
    """Chunks 10 ms apart over TLS, some larger than a record (several records in one socket read): with the
    server's watcher they are read, decrypted, translated and written in its task (``TLSStream.read_ready``);
    without it, by the stream's task the same way. The client gets every byte."""
    cert, key = certificate
    texts = [f"<{n}:" + ("z" * 40_000 if n % 5 == 2 else "") + ">" for n in range(30)]
    paced = text_stream(*texts)
    paced.pieces = [p for piece in paced.pieces for p in (0.01, piece)]  # the end right after [DONE]
    upstream = MockUpstream(lambda rec: paced, tls=server_context(cert, key))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url, f'ca_file = "{cert}"'))
    if watcher == "stream":
        relay.server.watch = None
    for _ in range(2):  # the second on the kept-alive connection
        answer = await roundtrip(relay.port, request(), timeout=20)
        assert answer.status == 200 and answer.complete, answer
        text = "".join(orjson.loads(line[6:])["delta"].get("text", "")
                       for line in answer.body.split(b"\n") if line.startswith(b"data: ") and b"text_delta" in line)
        assert text == "".join(texts)
        assert answer.body.rstrip().endswith(b'data: {"type":"message_stop"}')
    assert upstream.accepted == 1
    if watcher == "server":
        assert pulls.get(None, 0) >= 20 and pulls.get(True, 0) == 2, pulls
    else:
        assert not pulls


class _ClosingTLSUpstream:
    """A TLS server made of ``ssl.SSLObject`` by hand, so that it controls what shares a write: each answer is a
    paced stream with ``Connection: close``, whose last chunk, chunked terminator and close_notify go out in one
    write (so relay reads them in one)."""

    def __init__(self, context: ssl.SSLContext, framing: str) -> None:
        self.context = context
        self.framing = framing  # "chunked", or "close": the body ends where the connection does, with no [DONE]
        self.port = 0
        self.served = 0

    async def serve(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(self._answer, await listener.accept())

    async def _answer(self, sock: trio.SocketStream) -> None:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)

        async def flush() -> None:
            if outgoing.pending:
                await sock.send_all(outgoing.read())

        async def pull() -> None:
            await flush()
            incoming.write(await sock.receive_some(65536) or b"")

        async with sock:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await pull()
            await flush()
            request = b""
            while b"\r\n\r\n" not in request or not request.rstrip().endswith(b"}"):
                try:
                    request += tls.read(65536)
                except ssl.SSLWantReadError:
                    await pull()
            self.served += 1
            pieces = [p for p in text_stream(*[f"w{i} " for i in range(12)]).pieces if isinstance(p, bytes)]
            chunked = self.framing == "chunked"
            if not chunked:
                pieces = pieces[:-1]  # no [DONE]: the end of the connection is the end of the stream
            tls.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                      + (b"transfer-encoding: chunked\r\n\r\n" if chunked else b"\r\n"))
            for piece in pieces[:-1]:
                tls.write(b"%x\r\n%b\r\n" % (len(piece), piece) if chunked else piece)
                await flush()
                await trio.sleep(0.01)
            tls.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(pieces[-1]), pieces[-1]) if chunked else pieces[-1])
            try:
                tls.unwrap()  # the close_notify, into the same buffer as the end of the body
            except ssl.SSLWantReadError:
                pass
            await flush()
            await trio.sleep(3)  # TCP stays open: the close_notify is the only end


@pytest.mark.parametrize("framing", ["chunked", "close"])
async def test_a_paced_tls_stream_whose_upstream_closes_after_it_ends_cleanly(
        nursery: trio.Nursery, certificate: tuple[Path, Path], watcher: str, framing: str) -> None:
    """After a close_notify ``SSLObject.read`` says b"" for ever rather than raising: read as the end, once (a
    first draft looped on it in the watcher's step, and the whole server froze). A body that ends with its
    connection ends at once: the end came with the last bytes, and no socket event will say it again."""
    cert, key = certificate
    upstream = _ClosingTLSUpstream(server_context(cert, key), framing)
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(f"https://127.0.0.1:{upstream.port}/v1", f'ca_file = "{cert}"'))
    if watcher == "stream":
        relay.server.watch = None
    for _ in range(2):
        with trio.fail_after(10):
            answer = await roundtrip(relay.port, request(), timeout=10)
        assert answer.status == 200 and answer.complete, answer
        assert b"w11 " in answer.body and answer.body.rstrip().endswith(b'data: {"type":"message_stop"}'), answer.body[-300:]
        assert answer.elapsed < 2, answer.elapsed  # not after the server's wait before it closes TCP
    assert upstream.served == 2


async def test_an_untrusted_certificate_is_a_clear_502(nursery: trio.Nursery, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    upstream = MockUpstream(many_chunks, tls=server_context(cert, key))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url, "retries = 0"))  # the system CAs only
    answer = await roundtrip(relay.port, request())
    assert answer.status == 502
    error = orjson.loads(answer.body)["error"]
    assert error["type"] == "api_error" and "certificate verify failed" in error["message"], error
    assert not upstream.requests


def test_ca_file_is_checked_when_the_config_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca_file: no such file"):
        parse(relay_config("https://x/v1", f'ca_file = "{tmp_path / "missing.pem"}"'), "t.toml", env={})
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(ConfigError, match="ca_file: cannot load"):
        parse(relay_config("https://x/v1", f'ca_file = "{bad}"'), "t.toml", env={})


async def test_bodies_bigger_than_many_tls_records_both_ways(nursery: trio.Nursery,
                                                             certificate: tuple[Path, Path]) -> None:
    """A TLS record holds 16 KiB: a 1.5 MB request and a 3 MB answer cross the memory buffers in many."""
    cert, key = certificate
    big = "y" * 3_000_000

    def answer(rec: Recorded) -> Reply:
        assert len(rec.body) > 1_500_000
        return completion({"role": "assistant", "content": big})

    upstream = MockUpstream(answer, tls=server_context(cert, key))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url, f'ca_file = "{cert}"'))
    body = orjson.dumps({"model": "mock-model", "max_tokens": 64,
                         "messages": [{"role": "user", "content": "z" * 1_500_000}]})
    raw = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: %b\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n%b" % (RELAY_KEY.encode(), len(body), body))
    reply = await roundtrip(relay.port, raw, timeout=30)
    assert reply.status == 200
    assert orjson.loads(reply.body)["content"][0]["text"] == big


async def test_a_tls_stream_cut_midway_ends_with_an_error_event(nursery: trio.Nursery,
                                                                 certificate: tuple[Path, Path]) -> None:
    """The upstream drops the connection with no close_notify and no chunked terminator: a cut, not an end."""
    cert, key = certificate
    cut = text_stream("before the cut ")
    cut.pieces = cut.pieces[:2]  # the role chunk and the text, then nothing
    cut.cut = True
    upstream = MockUpstream(lambda rec: cut, tls=server_context(cert, key))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url, f'ca_file = "{cert}"'))
    answer = await roundtrip(relay.port, request())
    assert answer.status == 200 and answer.complete, answer
    assert b"before the cut" in answer.body
    assert b"event: error" in answer.body and b"message_stop" not in answer.body


async def test_a_server_that_speaks_no_tls_fails_the_handshake_clearly(nursery: trio.Nursery) -> None:
    upstream = MockUpstream(many_chunks)  # plain HTTP, reached with https://
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url.replace("http://", "https://"), "retries = 0"))
    answer = await roundtrip(relay.port, request())
    assert answer.status == 502
    error = orjson.loads(answer.body)["error"]
    assert "TLS handshake failed" in error["message"], error


async def test_a_silent_server_times_the_handshake_out(nursery: trio.Nursery) -> None:
    """Accepts the connection and never answers the ClientHello: connect_timeout covers the handshake."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    accepted: list[trio.SocketStream] = []

    async def hold() -> None:
        while True:
            accepted.append(await listener.accept())

    nursery.start_soon(hold)
    relay = await start_relay(nursery, relay_config(f"https://127.0.0.1:{port}/v1", "connect_timeout = 0.5\nretries = 0"))
    with trio.fail_after(10):
        answer = await roundtrip(relay.port, request())
    assert answer.status == 504
    assert "timed out connecting to the upstream after 0.5s" in orjson.loads(answer.body)["error"]["message"]
    assert accepted


async def test_a_client_hanging_up_closes_the_tls_connection_and_the_next_request_gets_a_new_one(
        nursery: trio.Nursery, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    slow = text_stream(*[f"w{i} " for i in range(20)])
    slow.pieces = [p for piece in slow.pieces for p in (piece, 0.02)]
    upstream = MockUpstream(lambda rec: slow, tls=server_context(cert, key))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url, f'ca_file = "{cert}"'))
    first = await roundtrip(relay.port, request(), stop_after_first_data=True)
    assert first.status == 200 and not first.complete
    second = await roundtrip(relay.port, request())
    assert second.status == 200 and second.complete and b"w19 " in second.body
    assert upstream.accepted == 2  # the abandoned stream's connection was closed, not pooled half-read
