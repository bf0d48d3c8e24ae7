"""relay's own socket layer end to end (relay/transport.py, relay/pool.py, relay/reader.py): upstream bytes cut
anywhere across reads, keep-alive reuse only after a body that ended cleanly, a client that stops reading (full
socket buffers), and bodies bigger than one read."""

from __future__ import annotations

import socket

import orjson
import pytest
import trio

from tests.conftest import RELAY_KEY, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Recorded, Reply, completion, text_stream
from tests.client import messages_body, request_bytes, roundtrip
from tests.robustness import relay_idle

WORDS = [f"w{i:03d} " for i in range(60)]


def chunked_sse(words: list[str]) -> bytes:
    events = [b'data: {"choices":[{"index":0,"delta":{"content":%b},"finish_reason":null}]}\n\n' % orjson.dumps(w)
              for w in words]
    events += [b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
               b'"usage":{"prompt_tokens":7,"completion_tokens":60}}\n\n', b"data: [DONE]\n\n"]
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    return head + b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


class CuttingUpstream(MockUpstream):
    """Answers every request on a connection with the same chunked stream, written in pieces of ``cuts``
    bytes with a pause between them, so relay reads it cut at those places."""

    def __init__(self, cuts: list[int], answer: bytes | None = None) -> None:
        super().__init__()
        self.cuts = cuts
        self.answer = chunked_sse(WORDS) if answer is None else answer

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    more = await stream.receive_some(65536)
                    if not more:
                        return
                    buf += more
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                while len(buf) < length:
                    buf += await stream.receive_some(65536)
                self.requests.append(Recorded("POST", "", {}, buf[:length]))
                buf = buf[length:]
                data = self.answer
                start, i = 0, 0
                while start < len(data):
                    size = self.cuts[i % len(self.cuts)]
                    await stream.send_all(data[start:start + size])
                    start += size
                    i += 1
                    await trio.sleep(0.001 if i % 4 == 0 else 0)  # mostly separate reads, in bounded time
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()


def stream_request(max_tokens: int = 64) -> bytes:
    body = orjson.dumps({"model": "mock-model", "max_tokens": max_tokens, "stream": True,
                         "messages": [{"role": "user", "content": "hi"}]})
    return (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: %b\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%b" % (RELAY_KEY.encode(), len(body), body))


def texts(body: bytes) -> str:
    return "".join(orjson.loads(line[6:])["delta"]["text"] for line in body.split(b"\n")
                   if line.startswith(b"data: ") and b'"text_delta"' in line)


@pytest.mark.parametrize("cuts", [[1], [7], [3, 250, 2, 61], [40, 1, 1, 900]], ids=["bytewise", "7", "mixed", "lumpy"])
async def test_upstream_bytes_cut_anywhere_arrive_whole(nursery: trio.Nursery, cuts: list[int]) -> None:
    upstream = CuttingUpstream(cuts)
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url))
    for _ in range(2):  # the second request reuses the connection
        await relay_idle(relay)  # the first stream's connection is back in the pool once its tail is read
        answer = await roundtrip(relay.port, stream_request(), timeout=30)
        assert answer.status == 200 and answer.complete, answer
        assert texts(answer.body) == "".join(WORDS)
        assert b'"output_tokens":60' in answer.body and answer.body.rstrip().endswith(b'{"type":"message_stop"}')
    assert upstream.accepted == 1


async def test_a_client_that_stops_reading_gets_every_byte_later(nursery: trio.Nursery) -> None:
    """relay writes without trio's stream layer: a full client socket must make it wait, not drop or reorder."""
    words = [f"{i:05d}" + "x" * 2000 for i in range(400)]  # ~800 KB of events, far more than socket buffers
    upstream = MockUpstream(lambda rec: text_stream(*words))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url))
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", relay.port))
    stream = trio.SocketStream(sock)
    await stream.send_all(stream_request(4096))
    await trio.sleep(0.5)  # relay fills the socket and must wait for room
    data = b""
    with trio.fail_after(20):
        while not data.endswith(b"0\r\n\r\n"):
            more = await stream.receive_some(65536)
            assert more, "relay closed the connection"
            data += more
    await stream.aclose()
    body = b""
    rest = data.partition(b"\r\n\r\n")[2]
    while rest:  # de-chunk
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        body += rest[:size]
        rest = rest[size + 2:]
    assert texts(body) == "".join(words)


async def test_bodies_bigger_than_one_read_both_ways(nursery: trio.Nursery) -> None:
    big = "y" * 3_000_000

    def answer(rec: Recorded) -> Reply:
        assert len(rec.body) > 1_000_000  # the request body relay forwarded whole
        return completion({"role": "assistant", "content": big})

    upstream = MockUpstream(answer)
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url))
    body = orjson.dumps({"model": "mock-model", "max_tokens": 64,
                         "messages": [{"role": "user", "content": "z" * 1_500_000}]})
    raw = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: %b\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n%b" % (RELAY_KEY.encode(), len(body), body))
    reply = await roundtrip(relay.port, raw, timeout=30)
    assert reply.status == 200
    assert orjson.loads(reply.body)["content"][0]["text"] == big


async def test_a_client_stuck_past_read_timeout_is_cut_off_cleanly(nursery: trio.Nursery) -> None:
    """Found in review: the idle-gap timer counted time blocked on a client that stopped reading as upstream
    silence, cancelled the write midway and appended a "read timeout" event to half a chunk. A stuck client
    is now simply disconnected: what it got is valid chunked framing up to the cut, and nothing blames the
    upstream."""
    words = [f"{i:05d}" + "x" * 2000 for i in range(3000)]  # ~6 MB: more than socket buffers can absorb (4 MB max)
    upstream = MockUpstream(lambda rec: text_stream(*words))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace("read_timeout = 5", "read_timeout = 1"))
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", relay.port))
    stream = trio.SocketStream(sock)
    await stream.send_all(stream_request(4096))
    await trio.sleep(2.5)  # longer than read_timeout without reading a byte
    data = b""
    with trio.fail_after(10):
        while True:
            more = await stream.receive_some(65536)
            if not more:
                break
            data += more
    await stream.aclose()
    assert not data.endswith(b"0\r\n\r\n")  # cut off, not finished
    assert b"read timeout" not in data
    rest = data.partition(b"\r\n\r\n")[2]
    while b"\r\n" in rest:  # every complete chunk is framed right; the last one may be cut
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if len(rest) < size + 2:
            break
        assert rest[size:size + 2] == b"\r\n"
        rest = rest[size + 2:]


async def test_keep_alive_reuse_works_past_descriptor_1023(nursery: trio.Nursery) -> None:
    """Found in review: the idle-connection check used select(), which refuses descriptors >= 1024, so every
    reuse failed on a busy relay. A busy relay is exactly where descriptors go that high."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        if hard != resource.RLIM_INFINITY and hard < 1200:
            pytest.skip(f"the descriptor limit ({hard}) is too low for this test")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1200 if hard == resource.RLIM_INFINITY else min(hard, 4096), hard))
    filler = [socket.socket() for _ in range(1100)]
    try:
        upstream = MockUpstream(lambda rec: completion({"role": "assistant", "content": "ok"}))
        await nursery.start(upstream.serve)
        relay = await start_relay(nursery, relay_config(upstream.base_url))
        body = orjson.dumps({"model": "mock-model", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
        raw = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: %b\r\ncontent-type: application/json\r\n"
               b"content-length: %d\r\n\r\n%b" % (RELAY_KEY.encode(), len(body), body))
        for _ in range(3):
            await relay_idle(relay)
            answer = await roundtrip(relay.port, raw)
            assert answer.status == 200 and orjson.loads(answer.body)["content"][0]["text"] == "ok"
        assert upstream.accepted == 1
    finally:
        for s in filler:
            s.close()


@pytest.mark.parametrize("cuts", [[100000], [5]], ids=["one-read", "cut"])
@pytest.mark.parametrize("tail", [b"x", b"\r\n", b"HTTP/1.1 200 OK\r\n"], ids=["byte", "crlf", "head"])
async def test_bytes_after_the_end_close_the_connection(nursery: trio.Nursery, cuts: list[int], tail: bytes) -> None:
    """The client gets its whole answer, but a connection that carried anything after the body's end would
    feed it to the next request: it is closed, and the next request opens a new one."""
    upstream = CuttingUpstream(cuts, chunked_sse(WORDS) + tail)
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url))
    for _ in range(2):
        await relay_idle(relay)
        answer = await roundtrip(relay.port, stream_request(), timeout=30)
        assert answer.status == 200 and answer.complete and texts(answer.body) == "".join(WORDS)
    assert upstream.accepted == 2


@pytest.mark.parametrize("cuts", [[100000], [3, 250]], ids=["one-read", "cut"])
async def test_a_framing_error_ends_the_stream_with_an_error_and_closes(nursery: trio.Nursery, cuts: list[int]) -> None:
    good = chunked_sse(WORDS[:5])
    broken = good[:good.index(b"\r\n", good.index(b"w002")) + 2] + b"zz\r\nnot a chunk\r\n0\r\n\r\n"
    upstream = CuttingUpstream(cuts, broken)
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url))
    for _ in range(2):
        await relay_idle(relay)
        answer = await roundtrip(relay.port, stream_request(), timeout=30)
        assert answer.status == 200 and answer.complete
        assert texts(answer.body) == "".join(WORDS[:3])
        assert b"event: error" in answer.body and b"broke mid-stream (RemoteProtocolError)" in answer.body
    assert upstream.accepted == 2


async def test_connection_close_and_http10_answers_are_not_reused(nursery: trio.Nursery) -> None:
    body = chunked_sse(WORDS[:4])
    head_end = body.index(b"\r\n\r\n") + 4
    for head in (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n"
                 b"transfer-encoding: chunked\r\n\r\n",
                 b"HTTP/1.0 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"):
        upstream = CuttingUpstream([100000], head + body[head_end:])
        await nursery.start(upstream.serve)
        relay = await start_relay(nursery, relay_config(upstream.base_url))
        for _ in range(2):
            await relay_idle(relay)
            answer = await roundtrip(relay.port, stream_request(), timeout=30)
            assert answer.status == 200 and texts(answer.body) == "".join(WORDS[:4])
        assert upstream.accepted == 2, head


async def test_a_sized_json_answer_with_bytes_after_it(nursery: trio.Nursery) -> None:
    """Content-Length framing: the body is exactly that many bytes; more closes the connection."""
    doc = orjson.dumps({"id": "x", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "sized"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1}})
    answer_bytes = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%b" % (len(doc), doc)
    for tail, connections in ((b"", 1), (b"junk", 2)):
        upstream = CuttingUpstream([7, 100000], answer_bytes + tail)
        await nursery.start(upstream.serve)
        relay = await start_relay(nursery, relay_config(upstream.base_url))
        for _ in range(2):
            await relay_idle(relay)
            body = orjson.dumps({"model": "mock-model", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]})
            answer = await roundtrip(relay.port, request_bytes(body, key=RELAY_KEY))
            assert answer.status == 200 and orjson.loads(answer.body)["content"][0]["text"] == "sized"
        assert upstream.accepted == connections


async def test_one_wait_and_one_read_of_a_plain_socket() -> None:
    """``SocketStream.waitable`` / ``read_ready`` (the paced chunk's read, without coroutines between): a wake-up
    with nothing to read gives None, not an end; a read that fills the buffer sends the next one through
    ``read`` (more is likely there); a socket closed under it is httpcore's ReadError."""
    import httpcore

    from relay.transport import SocketStream

    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    stream = SocketStream(ours)
    assert stream.waitable() is ours
    assert stream.read_ready(16) is None  # readable said, nothing there: not b"" (that is the peer closing)
    theirs.sendall(b"x" * 20)
    await trio.lowlevel.wait_readable(ours)
    assert stream.read_ready(16) == b"x" * 16
    assert stream.waitable() is None  # the buffer filled: the next read goes first, through ``read``
    assert await stream.read(16) == b"x" * 4
    assert stream.waitable() is ours
    theirs.close()
    await trio.lowlevel.wait_readable(ours)
    assert stream.read_ready(16) == b""  # the peer's end
    await stream.aclose()
    with pytest.raises(httpcore.ReadError):  # a socket closed under the read
        stream.read_ready(16)
