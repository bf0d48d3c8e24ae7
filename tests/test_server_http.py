"""The HTTP surface over raw sockets: routes, auth, limits, framing, keep-alive, timeouts."""

from __future__ import annotations

from typing import Any

import h11
import orjson
import pytest
import trio

from relay.config import ConfigError, parse
from relay.http import BODY_READ
from tests.client import exchange, get, messages_body, post, request_bytes, roundtrip, split
from tests.conftest import RELAY_KEY, RelayHandle, relay_config, start_relay
from tests.mock_upstream import MockUpstream, completion, text_stream


async def test_health_and_claude_code_probe(relay: RelayHandle) -> None:
    for raw in (b"HEAD /api/hello HTTP/1.1\r\nhost: x\r\n\r\n", b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
                b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n"):
        status, headers, body = split(await exchange(relay.port, raw, head=raw.startswith(b"HEAD")))
        assert status == 200
        assert headers["request-id"].startswith("req_")
        if raw.startswith(b"HEAD"):
            assert body == b""
        else:
            assert orjson.loads(body) == {"status": "ok", "store": "up"}  # the store's state, never its address


async def test_unknown_path_is_anthropic_404(relay: RelayHandle) -> None:
    status, _, body = split(await exchange(relay.port, b"GET /v2/nothing HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert status == 404
    doc = orjson.loads(body)
    assert doc["type"] == "error" and doc["error"]["type"] == "not_found_error" and doc["request_id"].startswith("req_")


async def test_auth_required(relay: RelayHandle) -> None:
    status, _, body = split(await exchange(relay.port, post("/v1/messages", b"{}", key="wrong")))
    assert status == 401 and orjson.loads(body)["error"]["type"] == "authentication_error"
    raw = (b"GET /v1/models HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + RELAY_KEY.encode() + b"\r\n\r\n")
    status, _, body = split(await exchange(relay.port, raw))
    assert status == 200
    ids = [m["id"] for m in orjson.loads(body)["data"]]
    assert ids == ["alias-model", "mock/mock-model"]


async def test_bad_bodies_get_clear_400s(relay: RelayHandle) -> None:
    cases = {
        b"": "empty",
        b"{not json": "not valid JSON",
        b"[1,2]": "JSON object",
        b'{"max_tokens":5,"messages":[]}': "model",
        b'{"model":"mock-model","max_tokens":5}': "messages",
        b'{"model":"mock-model","messages":[{"role":"user","content":"x"}]}': "max_tokens: Field required",
        b'{"model":"mock-model","max_tokens":"10","messages":[{"role":"user","content":"x"}]}': "valid integer",
        b'{"model":"mock-model","max_tokens":0,"messages":[{"role":"user","content":"x"}]}': "greater than or equal to 1",
        b'{"model":"mock-model","max_tokens":5,"messages":[]}': "at least one message",
        b'{"model":"mock-model","max_tokens":5,"messages":[{"role":"robot","content":"x"}]}': "messages.0.role",
        b'{"model":"mock-model","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"ftp"}}]}]}': "image source",
    }
    for body, words in cases.items():
        status, _, out = split(await exchange(relay.port, post("/v1/messages", body)))
        doc = orjson.loads(out)
        assert status == 400, (body, doc)
        assert doc["error"]["type"] == "invalid_request_error"
        assert words in doc["error"]["message"], (words, doc)


async def test_unknown_model_is_404(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    config = relay_config(upstream.base_url).replace('default = "mock/mock-model"', "")
    relay = await start_relay(nursery, config)
    body = b'{"model":"gpt-nothing","max_tokens":5,"messages":[{"role":"user","content":"x"}]}'
    status, _, out = split(await exchange(relay.port, post("/v1/messages", body)))
    assert status == 404
    assert "gpt-nothing" in orjson.loads(out)["error"]["message"]


def test_non_http_base_url_is_a_clear_error() -> None:
    """relay's pool speaks HTTP/1.1 over TCP or TLS only: another scheme is refused by name when the config loads,
    never dialled (it used to pass the load and fail every request with a 500)."""
    with pytest.raises(ConfigError, match=r"providers\.mock\.base_url: 'ftp://127\.0\.0\.1:1/v1' needs to start with "
                                          r"http:// or https://"):
        parse(relay_config("ftp://127.0.0.1:1/v1"), "test.toml", env={})


async def test_body_limit_413(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace("[server]", "[server]\nbody_limit = 1000"))
    status, headers, out = split(await exchange(relay.port, post("/v1/messages", b"x" * 2000)))
    assert status == 413 and orjson.loads(out)["error"]["type"] == "request_too_large"
    # chunked bodies are counted as they arrive (with a key: without one, no body byte is read at all)
    raw = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: " + RELAY_KEY.encode() + b"\r\ntransfer-encoding: chunked\r\n\r\n"
           + b"".join(b"%x\r\n%s\r\n" % (300, b"y" * 300) for _ in range(5)) + b"0\r\n\r\n")
    status, _, out = split(await exchange(relay.port, raw))
    assert status == 413


async def test_chunked_request_body_and_keepalive(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: completion({"content": "ok"})
    body = b'{"model":"mock-model","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}'
    chunked = (b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: x\r\nx-api-key: " + RELAY_KEY.encode()
               + b"\r\ntransfer-encoding: chunked\r\n\r\n" + b"%x\r\n" % 10 + body[:10] + b"\r\n"
               + b"%x\r\n" % (len(body) - 10) + body[10:] + b"\r\n0\r\n\r\n")
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    for _ in range(3):  # three requests on one connection
        await stream.send_all(chunked)
        data = b""
        with trio.fail_after(10):
            while b'"end_turn"' not in data:
                data += await stream.receive_some(65536)
        assert data.startswith(b"HTTP/1.1 200")
    await stream.aclose()
    assert len(upstream.requests) == 3


async def test_count_tokens(relay: RelayHandle) -> None:
    body = orjson.dumps({"model": "mock-model", "system": "You are terse.", "messages": [
        {"role": "user", "content": "hello " * 400}],
        "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}]})
    status, _, out = split(await exchange(relay.port, post("/v1/messages/count_tokens", body)))
    assert status == 200
    n = orjson.loads(out)["input_tokens"]
    assert 500 < n < 800  # "hello " is one token each in real tokenizers: 400 words + framing


async def test_idle_connection_is_closed(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace("[server]", "[server]\nidle_timeout = 0.3\nheader_timeout = 0.3"))
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # silent client: closed, not held forever
    # a client (with a key) that starts a request but never finishes it gets a 408
    out = await exchange(relay.port, b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: " + RELAY_KEY.encode()
                         + b"\r\ncontent-length: 50\r\n\r\n{", read_until_close=True)
    assert out.startswith(b"HTTP/1.1 408")


async def test_a_head_begun_has_header_timeout_to_finish(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    """The idle allowance is for a connection with nothing sent; once a request's head has begun it has
    header_timeout to finish (the clock moves when relay finds the head incomplete, not before: a head whole in
    one read never moves it)."""
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace(
        "[server]", "[server]\nidle_timeout = 600\nheader_timeout = 0.3"))
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")  # no blank line: the head is not done
    out = b""
    with trio.fail_after(30):  # far below idle_timeout: only header_timeout can answer within it
        while more := await stream.receive_some(65536):
            out += more
    assert out.startswith(b"HTTP/1.1 408"), out[:200]
    assert b"request head not received within 0.3s" in out
    await stream.aclose()


async def test_malformed_http_gets_400(relay: RelayHandle) -> None:
    out = await exchange(relay.port, b"THIS IS NOT HTTP\r\n\r\n", read_until_close=True)
    status, headers, body = split(out)
    assert status == 400 and headers["request-id"].startswith("req_")
    error = orjson.loads(body)["error"]
    assert error["type"] == "invalid_request_error"
    assert "THIS IS NOT HTTP" in error["message"] and "bytearray" not in error["message"], error


@pytest.mark.parametrize("head", [
    b"x-big: " + b"a" * 70_000 + b"\r\n",  # one header past the limit, arriving whole in a read or two
    b"".join(b"x-h%d: %b\r\n" % (i, b"b" * 1000) for i in range(100)),  # many headers, ~101 KB together
], ids=["one-big-header", "many-headers"])
async def test_a_request_head_past_max_header_bytes_gets_431(relay: RelayHandle, head: bytes) -> None:
    out = await exchange(relay.port, b"GET /health HTTP/1.1\r\nhost: x\r\n" + head + b"\r\n", read_until_close=True)
    status, headers, body = split(out)
    assert status == 431, out[:200]
    assert "larger than 65536 bytes" in orjson.loads(body)["error"]["message"]
    assert headers["request-id"].startswith("req_")


async def test_metrics(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    from tests.mock_upstream import json_reply, text_stream
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace("[server]", '[server]\nmetrics_keys = ["m-key"]'))
    upstream.handler = lambda r: text_stream("a", "b", usage=(11, 2)) if r.json.get("stream") else json_reply({"error": {"message": "x"}}, 400)
    body = b'{"model":"mock-model","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
    streamed = await exchange(relay.port, post("/v1/messages", body, extra=b"connection: close\r\n"), read_until_close=True)
    assert b"event: message_stop" in streamed
    await exchange(relay.port, post("/v1/messages", body.replace(b',"stream":true', b"")))
    status, _, denied = split(await exchange(relay.port, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n"))
    assert status == 401
    want = 'relay_requests_total{path="/v1/messages",provider="mock",model="mock-model",status="400"} 1'
    for _ in range(50):  # relay books a request just after its response is written
        status, headers, text = split(await exchange(relay.port, b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-api-key: m-key\r\n\r\n"))
        if want in text.decode():
            break
        await trio.sleep(0.02)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    lines = text.decode().splitlines()
    assert 'relay_requests_total{path="/v1/messages",provider="mock",model="mock-model",status="200"} 1' in lines
    assert 'relay_requests_total{path="/v1/messages",provider="mock",model="mock-model",status="400"} 1' in lines
    assert 'relay_tokens_total{provider="mock",direction="input"} 11' in lines
    assert 'relay_upstream_errors_total{provider="mock",status="400"} 1' in lines
    assert 'relay_time_to_first_byte_seconds_count{provider="mock"} 1' in lines
    assert "relay_open_streams 0" in lines


async def test_message_and_tool_count_limits(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await start_relay(nursery, relay_config(upstream.base_url).replace("[server]", "[server]\nmax_messages = 3\nmax_tools = 2"))
    many = orjson.dumps({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}] * 4})
    status, _, out = split(await exchange(relay.port, post("/v1/messages", many)))
    assert status == 413 and "messages: 4 items" in orjson.loads(out)["error"]["message"]
    tools = orjson.dumps({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
                          "tools": [{"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(3)]})
    status, _, out = split(await exchange(relay.port, post("/v1/messages", tools)))
    assert status == 413 and orjson.loads(out)["error"]["type"] == "request_too_large"
    assert upstream.requests == []


async def test_a_full_provider_pool_answers_529_then_frees_up(nursery: trio.Nursery) -> None:
    """max_connections is a real limit: a request that finds no free upstream connection within
    connect_timeout gets overloaded_error (and may fall back); a freed connection serves the next one."""
    from tests.mock_upstream import Reply

    def slow_then_fast(rec: Any) -> Reply:  # the first request holds the only connection for a while
        if len(upstream.requests) == 1:
            return Reply(pieces=[1.5, b'data: {"choices":[{"index":0,"delta":{"content":"slow"},"finish_reason":"stop"}]}\n\n',
                                 b"data: [DONE]\n\n"])
        return completion({"role": "assistant", "content": "fast"})

    upstream = MockUpstream(slow_then_fast)
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url, "max_connections = 1\nconnect_timeout = 0.3\nretries = 0"))
    body = orjson.dumps({"model": "mock-model", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
    raw = (b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: %b\r\ncontent-type: application/json\r\n"
           b"content-length: %d\r\n\r\n%b" % (RELAY_KEY.encode(), len(body), body))
    stream_raw = raw.replace(b'"max_tokens":10', b'"max_tokens":10,"stream":true').replace(
        b"content-length: %d" % len(body), b"content-length: %d" % (len(body) + 14))
    first: list[Any] = []

    async def hold() -> None:
        first.append(await roundtrip(relay.port, stream_raw))

    nursery.start_soon(hold)
    await trio.sleep(0.2)
    status, _, answer = split(await exchange(relay.port, raw))
    assert status == 529 and orjson.loads(answer)["error"]["type"] == "overloaded_error", answer
    assert b"1 upstream connections are busy" in answer
    with trio.fail_after(5):
        while not first:
            await trio.sleep(0.05)
    assert first[0].status == 200 and b"slow" in first[0].body and first[0].complete
    status, _, answer = split(await exchange(relay.port, raw))
    assert status == 200 and orjson.loads(answer)["content"][0]["text"] == "fast"


async def _answers(port: int, raw: bytes | list[bytes], methods: list[bytes], pause: float = 0.05,
                   ) -> tuple[list[tuple[int, dict[bytes, bytes], bytes]], bool]:
    """Send ``raw`` (requests of these methods, all at once, or a list of pieces ``pause`` seconds apart) and read
    every answer with h11 as the client: (status, headers, body) per answer, and whether relay closed the
    connection after them. h11 is told of each request it reads an answer for, so it checks framing and
    keep-alive as a client would."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    for piece in [raw] if isinstance(raw, bytes) else raw:
        await stream.send_all(piece)
        if not isinstance(raw, bytes):
            await trio.sleep(pause)
    reader = h11.Connection(h11.CLIENT)
    answers: list[tuple[int, dict[bytes, bytes], bytes]] = []
    closed = False
    with trio.fail_after(20):
        for method in methods:
            reader.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
            reader.send(h11.EndOfMessage())
            status, headers, body = 0, {}, b""
            while True:
                event = reader.next_event()
                if event is h11.NEED_DATA:
                    reader.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status, headers = event.status_code, dict(event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            answers.append((status, headers, body))
            if reader.their_state is h11.MUST_CLOSE:  # the answer said it closes: see that it does
                closed = await stream.receive_some(1) == b""
                break
            reader.start_next_cycle()
    await stream.aclose()
    return answers, closed


async def test_answers_keep_h11s_framing_and_keep_alive(relay: RelayHandle, upstream: MockUpstream) -> None:
    """relay writes its answers itself; a client judging them with h11 sees the framing and keep-alive h11 gave:
    pipelined requests answered in order on one connection, ``Connection: close`` honoured, and an HTTP/1.0
    client's stream unframed and ended by closing."""
    upstream.handler = lambda r: text_stream("Hel", "lo") if r.json.get("stream") else completion({"content": "Hello"})
    streamed = messages_body(stream=True)
    three = get("/health") + request_bytes(streamed, key=RELAY_KEY) + post("/v1/messages", messages_body())
    answers, closed = await _answers(relay.port, three + get("/health"), [b"GET", b"POST", b"POST", b"GET"])
    assert [status for status, _, _ in answers] == [200, 200, 200, 200] and not closed  # none said it closes
    assert answers[1][1][b"transfer-encoding"] == b"chunked" and b"event: message_stop" in answers[1][2]
    assert orjson.loads(answers[2][2])["content"][0]["text"] == "Hello"

    answers, closed = await _answers(relay.port, request_bytes(streamed, key=RELAY_KEY, extra=[(b"connection", b"close")])
                                     + get("/health"), [b"POST", b"GET"])
    assert len(answers) == 1 and answers[0][1][b"connection"] == b"close" and closed  # the second is never answered

    http10 = request_bytes(streamed, key=RELAY_KEY).replace(b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", 1)
    answers, closed = await _answers(relay.port, http10, [b"POST"])
    (status, headers, body), = answers
    assert status == 200 and b"transfer-encoding" not in headers and headers[b"connection"] == b"close" and closed
    assert body.startswith(b"event: message_start") and body.rstrip().endswith(b'data: {"type":"message_stop"}')


@pytest.mark.parametrize("cuts", [
    (),  # sent at once: several reads of at most BODY_READ, none past the body
    (BODY_READ - 1, BODY_READ, BODY_READ + 1, 2 * BODY_READ + 7),  # around one read's size
    tuple(range(70_000, 2_600_000, 180_001)),  # many uneven pieces, each read taking what has come
])
async def test_a_body_larger_than_one_read_arrives_whole(relay: RelayHandle, upstream: MockUpstream,
                                                         cuts: tuple[int, ...]) -> None:
    """The rest of a Content-Length body is read up to BODY_READ bytes at a time: a body over twice that, sent at
    once or in pieces cut around a read's size, reaches the upstream character for character, and the request
    pipelined right behind its last byte is answered (no read took a byte past the body)."""
    upstream.handler = lambda r: completion({"content": "ok"})
    text = "".join(f"line {i:07d} \u00e9\u4e2d\n" for i in range(150_000))  # ~2.6 MB, multi-byte characters
    body = orjson.dumps({"model": "mock-model", "max_tokens": 5, "messages": [{"role": "user", "content": text}]})
    assert len(body) > 2 * BODY_READ
    raw = post("/v1/messages", body) + get("/health")
    bounds = [0, *(raw.index(b"\r\n\r\n") + 4 + cut for cut in cuts), len(raw)]
    answers, _ = await _answers(relay.port, [raw[start:end] for start, end in zip(bounds, bounds[1:])],
                                [b"POST", b"GET"], pause=0.02)
    assert [status for status, _, _ in answers] == [200, 200]
    (sent,) = upstream.requests
    assert sent.json["messages"] == [{"role": "user", "content": text}]


async def test_a_body_still_coming_is_read_to_its_length_and_no_further(relay: RelayHandle) -> None:
    """A body that does not come with its head is read past h11, to its Content-Length exactly: sent in pieces
    with a pipelined request glued to its last piece, it is counted as the same body sent at once, and the request
    after it is answered; a body cut short gets h11's 400."""
    body = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "word " * 60_000}]})
    raw = post("/v1/messages/count_tokens", body)
    status, _, whole = split(await exchange(relay.port, raw))
    assert status == 200
    head_end = raw.index(b"\r\n\r\n") + 4
    pieces = [raw[:head_end + 10], raw[head_end + 10:head_end + 150_000], raw[head_end + 150_000:] + get("/health")]
    answers, _ = await _answers(relay.port, pieces, [b"POST", b"GET"])
    assert [status for status, _, _ in answers] == [200, 200]
    assert orjson.loads(answers[0][2]) == orjson.loads(whole)  # the same body, byte for byte as far as JSON can tell

    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(raw[:head_end + 1000])
    await trio.sleep(0.05)
    await stream.send_eof()
    with trio.fail_after(10):
        answer = b""
        while chunk := await stream.receive_some(65536):
            answer += chunk
    status, _, out = split(answer)
    assert status == 400 and b"without sending complete message body" in out and b"expected %d" % len(body) in out
