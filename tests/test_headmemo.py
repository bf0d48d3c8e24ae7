"""The request-head memo (``relay.headmemo``) against h11, its reference: whatever head it answers from memory is
the head h11 parses from the same bytes (the same request, the same headers, the body starting at the same byte),
and it answers the heads clients repeat. Then end to end: the memo's heads read each request's own body."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import h11
import orjson
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.headmemo import HeadMemo, RequestHead
from relay.http import BodyBudget, Connection, read_body
from tests.client import get, messages_body, post, request_bytes, split
from tests.conftest import RELAY_KEY, RelayHandle
from tests.mock_upstream import MockUpstream, Reply, completion, text_stream

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
TAIL = b'{"a":1}\r\n\r\nGET / HTTP/1.1\r\nhost: x\r\n\r\n'  # a body holding a blank line, then a pipelined request


Parsed = tuple[RequestHead, bytes, tuple[Any, ...]]  # the head, the bytes after it, how its body is read


def h11_parse(raw: bytes) -> Parsed | None:
    """What a fresh h11 parser makes of ``raw``: the head, the bytes after it and how the body is read from them
    (the body, whether it ended there, whether the client waits for a 100, the client's state after the body),
    or None (refused, or no whole head)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if type(event) is not h11.Request:
        return None
    head, rest, body, waits = RequestHead.of(event), conn.trailing_data[0], b"", conn.client_is_waiting_for_100_continue
    try:
        while type(event := conn.next_event()) is h11.Data:
            body += event.data
    except h11.RemoteProtocolError:
        event = None
    ended = type(event) is h11.EndOfMessage
    state = conn.their_state if ended else None  # (MUST_CLOSE is DONE with h11's keep-alive rule: relay's own, in
    return head, rest, (body, ended, waits, h11.DONE if state is h11.MUST_CLOSE else state)  # Connection.begin)


def memo_parse(memo: HeadMemo, raw: bytes) -> Parsed | None:
    """What relay's connection makes of ``raw`` from the memo, as ``Connection.next_event`` and ``read_body`` do:
    the head ends at the first blank line, and the body is the Content-Length's bytes after it (none without
    one); None when the memo does not answer. A head h11 parses is remembered."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        return None
    found = memo.find(raw[:end + 4])
    if found is not None:
        rest = raw[end + 4:]
        length = int(dict(found.headers).get(b"content-length", b"0"))
        return found, rest, (rest[:length], len(rest) >= length, False, h11.DONE if len(rest) >= length else None)
    parsed = h11_parse(raw)
    if parsed is not None:
        memo.remember(raw[:end + 4], parsed[0])
    return None


def same(a: Parsed, b: Parsed) -> bool:
    (x, rest_x, body_x), (y, rest_y, body_y) = a, b
    return ((x.method, x.target, x.http_version, x.headers, rest_x, body_x)
            == (y.method, y.target, y.http_version, y.headers, rest_y, body_y))


# ---- heads as clients write them, and as they should not --------------------------------------------------------

LENGTHS = [b"0", b"7", b"12345", b" 42", b"42 ", b"\t9\t", b"007", b"9" * 18, b"9" * 19, b"9" * 20, b"9" * 21,
           b"5,5", b"5, 6", b",5", b"5,", b"-1", b"+1", b"0x10", b"", b"1 2", b"\xd9\xa1", b"1e3"]
NAMES = [b"content-length", b"Content-Length", b"CONTENT-LENGTH", b"host", b"Host", b"x-api-key", b"accept",
         b"transfer-encoding", b"expect", b"upgrade", b"connection", b"x-stainless-retry-count", b"bad name"]
VALUES = [b"x", b"chunked", b"100-continue", b"websocket", b"close", b"keep-alive", b"application/json", b"",
          b"a  b", b"\xe9t\xe9"]

line_end = st.sampled_from([b"\r\n"] * 8 + [b"\n"])
header_line = st.tuples(st.sampled_from(NAMES), st.sampled_from([b": "] * 4 + [b":", b":\t", b" :"]),
                        st.one_of(st.sampled_from(VALUES), st.sampled_from(LENGTHS)), line_end,
                        st.sampled_from([b""] * 12 + [b" folded"]))


@st.composite
def heads(draw: Any) -> bytes:
    method = draw(st.sampled_from([b"POST", b"GET", b"HEAD", b"CONNECT", b"PUT"]))
    target = draw(st.sampled_from([b"/v1/messages", b"/v1/messages?beta=true", b"*", b"/a b"]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [method + b" " + target + b" " + version + draw(line_end)]
    if draw(st.booleans()):
        lines.append(b"host: relay\r\n")
    for name, colon, value, end, fold in draw(st.lists(header_line, max_size=7)):
        lines.append(name + colon + value + end + (fold + end if fold else b""))
    if draw(st.integers(0, 3)):
        lines.append(b"Content-Length: " + draw(st.sampled_from(LENGTHS)) + b"\r\n")
    return b"".join(lines) + draw(line_end)


def relength(head: bytes, length: bytes) -> bytes:
    """The same head with every Content-Length line's value replaced (any spelling of the name)."""
    lines = head.split(b"\r\n")
    return b"\r\n".join(line.split(b":", 1)[0] + b": " + length if line.lower().startswith(b"content-length:") else line
                        for line in lines)


@settings(max_examples=3000, deadline=None)
@given(first=heads(), length=st.sampled_from(LENGTHS), flip=st.integers(0, 10_000))
def test_the_memo_answers_only_what_h11_would(first: bytes, length: bytes, flip: int) -> None:
    """A head is remembered from h11's parse; then the same head with another length, and a head with one byte
    changed, are each either not answered or answered exactly as h11 parses them, body boundary included."""
    memo = HeadMemo()
    assert memo_parse(memo, first + TAIL) is None  # nothing is remembered yet
    again = relength(first, length)
    changed = bytearray(first)
    changed[flip % len(first)] ^= 1 << (flip % 7)
    for raw in (first + TAIL, again + TAIL, bytes(changed) + TAIL):
        answer = memo_parse(memo, raw)
        if answer is not None:
            reference = h11_parse(raw)
            assert reference is not None and same(answer, reference), (raw, answer[0].headers)


def claude_code_head(length: int) -> bytes:
    """The head Claude Code sends (its recorded headers: ``tests/fixtures/reference``), with this body length."""
    doc = json.loads((REFERENCE / "claude-code-2.1.331-request-1.json").read_text())
    lines = [b"POST /v1/messages?beta=true HTTP/1.1", b"Host: 127.0.0.1:8082"]
    lines += [f"{name}: {value}".encode() for name, value in doc["headers"].items()]
    return b"\r\n".join([*lines, b"Content-Length: %d" % length]) + b"\r\n\r\n"


def test_the_heads_clients_repeat_are_answered_from_memory() -> None:
    """Claude Code's head, the SDKs' and a bare one: after the first, every later one with another length is
    answered from the memo, as h11 parses it."""
    memo = HeadMemo()
    for make in (claude_code_head, lambda n: request_bytes(b"", key="k").replace(b"length: 0", b"length: %d" % n),
                 lambda n: b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % n):
        assert memo_parse(memo, make(10) + b"x" * 10) is None
        for n in (0, 3, 10, 123_456):
            raw = make(n) + b"y" * min(n, 50)
            answer = memo_parse(memo, raw)
            assert answer is not None and same(answer, h11_parse(raw))  # type: ignore[arg-type]
            assert dict(answer[0].headers)[b"content-length"] == str(n).encode()
    assert memo_parse(memo, get("/health")) is None and memo_parse(memo, get("/health")) is not None  # no length


def test_heads_whose_framing_is_more_than_a_length_are_not_answered() -> None:
    """Each of these heads, h11 parses; a change that leaves the memo's key alone changes h11's answer."""
    memo = HeadMemo()
    base = b"POST / HTTP/1.1\r\nhost: x\r\n"
    for first, then in [
        (base + b"content-length: 5\r\ncontent-length: 5\r\n\r\n",  # two lines, one value: h11 takes it
         base + b"content-length: 6\r\ncontent-length: 5\r\n\r\n"),  # and refuses this
        (base + b"transfer-encoding: chunked\r\n\r\n", base + b"transfer-encoding: chunked\r\n\r\n"),  # a chunked body
        (base + b"content-length: 5\r\n\r\n", base + b"content-length: " + b"1" * 21 + b"\r\n\r\n"),  # too long for h11
        (base + b"expect: 100-continue\r\ncontent-length: 5\r\n\r\n",  # the client waits for a 100 first
         base + b"expect: 100-continue\r\ncontent-length: 9\r\n\r\n"),
        (base + b"upgrade: websocket\r\ncontent-length: 0\r\n\r\n", base + b"upgrade: websocket\r\ncontent-length: 0\r\n\r\n"),
        (b"CONNECT x:1 HTTP/1.1\r\nhost: x\r\n\r\n", b"CONNECT x:1 HTTP/1.1\r\nhost: x\r\n\r\n"),  # h11 may switch
    ]:
        assert h11_parse(first + TAIL) is not None and memo_parse(memo, first + TAIL) is None
        assert memo.find(then) is None


def test_the_memo_is_bounded() -> None:
    memo = HeadMemo(size=4)
    raws = [b"GET /%d HTTP/1.1\r\nhost: x\r\n\r\n" % i for i in range(6)]
    for raw in raws:
        memo_parse(memo, raw)
    assert [memo.find(raw) is not None for raw in raws] == [False, False, True, True, True, True]  # oldest gone
    long = b"GET / HTTP/1.1\r\nhost: x\r\nx-long: " + b"a" * 9000 + b"\r\n\r\n"
    memo_parse(memo, long)
    assert memo_parse(memo, long) is None  # longer than LONGEST: never remembered
    many = b"GET / HTTP/1.1\r\nhost: x\r\n" + b"a: 1\r\n" * 65 + b"\r\n"  # short, but of many headers
    memo_parse(memo, many)
    assert memo_parse(memo, many) is None
    memo_parse(memo, raws[0])
    first, second = memo.find(raws[0]), memo.find(raws[0])
    assert first is not None and second is not None and first.headers is not second.headers  # each its own list


async def test_a_folded_head_pipelined_before_a_half_close_is_still_seen() -> None:
    """Requests pipelined while an answer is out, then the client's FIN, and the answer still counted whole (a
    watcher may read the FIN after the stream ended): the third head's obsolete folding is noticed, as it is
    without the memo (relay refuses folding: a front proxy may read a folded head otherwise). Found in review."""
    a, b = trio.socket.socketpair()
    conn = Connection(trio.SocketStream(a), 65536)
    client = trio.SocketStream(b)
    budget = BodyBudget(1 << 20)
    plain = b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
    folded = b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-a: 1\r\n folded\r\ncontent-length: 2\r\n\r\n{}"
    await client.send_all(plain)
    head = await conn.next_event()
    await read_body(conn, head.headers, 1 << 20, budget, 5)
    await client.send_all(plain + folded)  # while the answer is out
    with trio.fail_after(5):
        assert await conn.receive() == plain + folded
        b.shutdown(socket.SHUT_WR)
        assert await conn.receive() == b""
    for _ in range(2):
        conn.answered = True
        conn.next_cycle()
        head = await conn.next_event()
        assert not conn.folded or head.headers[1] == (b"x-a", b"1 folded")
        if head.headers[1][0] == b"x-a":
            break
        await read_body(conn, head.headers, 1 << 20, budget, 5)
    assert conn.folded
    await client.aclose()
    await conn.stream.aclose()


# ---- end to end -------------------------------------------------------------------------------------------------

async def test_remembered_heads_read_each_requests_own_body(relay: RelayHandle, upstream: MockUpstream) -> None:
    """One connection, one head repeated with other lengths: each request's body is its own, read to its length
    and no further, whether it came whole with its head, pipelined behind another, or in pieces; and the memo
    answered the heads after the first."""
    upstream.handler = lambda r: completion({"content": "ok"})
    found: list[bool] = []
    memo = relay.server.head_memo
    find = memo.find
    memo.find = lambda head: found.append((answer := find(head)) is not None) or answer  # type: ignore[method-assign]
    texts = ["a", "bb" * 50, "c" * 5000, "d" * 70_000, "e"]
    raws = [request_bytes(messages_body(text=text), key=RELAY_KEY) for text in texts]
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    reader = h11.Connection(h11.CLIENT)

    async def answer() -> int:
        reader.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        reader.send(h11.EndOfMessage())
        status = 0
        with trio.fail_after(10):
            while True:
                event = reader.next_event()
                if event is h11.NEED_DATA:
                    reader.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.EndOfMessage):
                    reader.start_next_cycle()
                    return status

    await stream.send_all(raws[0])  # parsed by h11, remembered
    assert await answer() == 200
    await stream.send_all(raws[1] + raws[2])  # the second pipelined behind the first
    assert await answer() == 200 and await answer() == 200
    head_end = raws[3].index(b"\r\n\r\n") + 4
    await stream.send_all(raws[3][:head_end + 100])  # the head and a little: the rest is still to come
    await trio.sleep(0.05)
    await stream.send_all(raws[3][head_end + 100:])
    assert await answer() == 200
    await stream.send_all(raws[4])  # after a body read past h11 (``read_rest``)
    assert await answer() == 200
    await stream.aclose()
    assert [r.json["messages"][0]["content"] for r in upstream.requests] == texts
    assert found == [False, True, True, True, True]


async def test_a_head_unlike_the_remembered_one_is_judged_anew(relay: RelayHandle, upstream: MockUpstream) -> None:
    """The memo keys on every byte but the length's: another key, a second framing or a bad length after a
    remembered head is h11's and relay's to judge, as if nothing were remembered."""
    upstream.handler = lambda r: completion({"content": "ok"})
    body = messages_body()
    good = post("/v1/messages", body)
    checks = [
        (good, 200, None),
        (post("/v1/messages", body, key="wrong-key"), 401, "authentication_error"),
        (good.replace(b"content-length: %d\r\n" % len(body), b"content-length: %d\r\ntransfer-encoding: chunked\r\n"
                      % len(body)), 400, "Content-Length and Transfer-Encoding"),
        (good.replace(b"content-length: %d" % len(body), b"content-length: %d, %d" % (len(body), len(body) + 1)),
         400, "malformed HTTP request"),
        (good.replace(b"content-length: %d" % len(body), b"content-length: 0x10"), 400, "malformed HTTP request"),
    ]
    for raw, status, words in checks:
        stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
        await stream.send_all(raw)
        data = b""
        with trio.fail_after(10):
            while b"\r\n\r\n" not in data or len(split(data)[2]) < int(split(data)[1].get("content-length", 0)):
                more = await stream.receive_some(65536)
                if not more:
                    break
                data += more
        await stream.aclose()
        got, _, out = split(data)
        assert got == status, (raw, data)
        if words:
            assert words in out.decode(), out
    assert len(upstream.requests) == 1
    assert orjson.loads(upstream.requests[0].body)["messages"][0]["content"] == "hi"


async def test_a_request_pipelined_while_a_stream_is_out_is_read_whole(relay: RelayHandle,
                                                                       upstream: MockUpstream) -> None:
    """The next request's head and the start of its body come with the one before; the rest of its body comes
    while the first one's answer is streaming. Its head is the remembered one's: its body is what was sent, all of
    it (relay's fresh parser after a stream holds what came during it, and the memo reads from there)."""
    def reply(r: Any) -> Reply:
        if r.json.get("stream"):
            slow = text_stream("one", "two")
            slow.pieces.insert(1, 0.3)  # the stream is out for a while
            return slow
        return completion({"content": "ok"})
    upstream.handler = reply
    first = request_bytes(messages_body(stream=True, text="streamed"), key=RELAY_KEY)
    second = request_bytes(messages_body(text="x" * 3000), key=RELAY_KEY)
    head_end = second.index(b"\r\n\r\n") + 4
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(first + second[:head_end + 10])
    await trio.sleep(0.15)  # the first answer has begun, and waits on its upstream
    await stream.send_all(second[head_end + 10:])
    data = b""
    with trio.fail_after(10):
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            data += await stream.receive_some(65536)
    await stream.aclose()
    assert b"event: message_stop" in data and data.count(b"HTTP/1.1 200") == 2
    assert [r.json["messages"][0]["content"] for r in upstream.requests] == ["streamed", "x" * 3000]
