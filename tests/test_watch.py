"""The watcher of streams being relayed (``relay.watch``: one per server; without epoll, a task per stream), end to
end over loopback: a client that leaves mid-stream cancels the upstream request, a silent upstream is cut at
read_timeout with pings in the silence, a client that stops reading is cut at read_timeout, a pipelined request
sent during a stream is answered after it, and the watcher keeps nothing of a stream once it is over. Every test
runs both ways: the server's watcher, and each stream watching itself."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from relay.watch import StreamWatch
from tests.anthropic_events import check_stream, parse_sse
from tests.client import messages_body, post, roundtrip, roundtrips
from tests.conftest import RelayHandle, start_relay
from tests.mock_upstream import MockUpstream, Reply, chunk, sse, text_stream
from tests.test_faults import SSE_HEAD, RawUpstream, _chunked
from tests.test_keepalive import config

READ_TIMEOUT = 1.0
KEEPALIVE = 0.3


@pytest.fixture(params=["server", "stream"])
def watcher(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def setup(nursery: trio.Nursery, watcher: str, reply: Reply) -> tuple[MockUpstream, RelayHandle]:
    upstream = MockUpstream(lambda r: reply)
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, config(upstream, keepalive=KEEPALIVE, start=20.0, read_timeout=READ_TIMEOUT))
    if watcher == "stream":
        relay.server.watch = None  # as on a system without epoll: each stream runs a watcher task of its own
    else:
        assert isinstance(relay.server.watch, StreamWatch)
    return upstream, relay


def started(*texts: str) -> list[bytes | float]:
    return sse(chunk({"role": "assistant", "content": ""}), *(chunk({"content": t}) for t in texts), done=False)


async def open_stream(relay: RelayHandle) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await stream.send_all(post("/v1/messages", messages_body("up-model", stream=True)))
    return stream


def assert_forgotten(relay: RelayHandle) -> None:
    """Nothing of the streams that ended stays with the server's watcher (a dead timer holds no stream)."""
    watch = relay.server.watch
    if watch is not None:
        assert len(watch) == 0
        assert all(entry[2] is None for entry in watch._timers)


async def test_a_client_that_leaves_mid_stream_cancels_the_upstream_request(nursery: trio.Nursery,
                                                                            watcher: str) -> None:
    upstream, relay = await setup(nursery, watcher, Reply(pieces=[*started("tick"), 30.0, b"data: [DONE]\n\n"]))
    stream = await open_stream(relay)
    got = b""
    with trio.fail_after(5):
        while b"tick" not in got:
            got += await stream.receive_some(65536)
    await stream.aclose()
    with trio.fail_after(5):  # promptly, not after the upstream's 30 s
        await upstream.cancelled.wait()
    with trio.fail_after(5):
        while relay.server.metrics.open_streams:
            await trio.sleep(0.01)
    assert_forgotten(relay)


async def test_a_silent_upstream_is_cut_at_read_timeout_with_pings_in_the_silence(nursery: trio.Nursery,
                                                                                  watcher: str) -> None:
    upstream, relay = await setup(nursery, watcher, Reply(pieces=[*started("a"), 30.0, b"data: [DONE]\n\n"]))
    answer = await roundtrip(relay.port, post("/v1/messages", messages_body("up-model", stream=True)), timeout=10)
    assert answer.status == 200 and answer.complete
    assert READ_TIMEOUT <= answer.elapsed < READ_TIMEOUT + 1.5, answer.elapsed
    events = parse_sse(answer.body)
    check_stream(events)
    names = [name for name, _ in events]
    assert names[-1] == "error" and "read timeout" in events[-1][1]["error"]["message"], names
    assert 1 <= names.count("ping") <= int(READ_TIMEOUT / KEEPALIVE) + 1, names
    with trio.fail_after(5):
        await upstream.cancelled.wait()  # the upstream connection was closed, not left open
    assert_forgotten(relay)


async def test_a_client_that_stops_reading_is_cut_at_read_timeout(nursery: trio.Nursery, watcher: str) -> None:
    big = "x" * 60_000  # ~12 MB in all: more than the sockets' buffers between relay and a client that reads nothing
    upstream, relay = await setup(nursery, watcher, Reply(pieces=[*started(*[big] * 200), b"data: [DONE]\n\n"]))
    stream = await open_stream(relay)
    with trio.fail_after(5):
        assert await stream.receive_some(1)  # the stream has started; from now on nothing more is read
    with trio.fail_after(READ_TIMEOUT + 5):
        await upstream.cancelled.wait()
    with trio.fail_after(5):
        while relay.server.metrics.open_streams:
            await trio.sleep(0.01)
    assert_forgotten(relay)
    await stream.aclose()


async def test_a_request_pipelined_during_a_stream_is_answered_after_it(nursery: trio.Nursery,
                                                                        watcher: str) -> None:
    reply = Reply(pieces=[*started("one"), 0.2, *sse(chunk({"content": " two"}), chunk({}, "stop"))])
    upstream, relay = await setup(nursery, watcher, reply)
    stream = await open_stream(relay)
    got = b""
    with trio.fail_after(5):
        while b"one" not in got:
            got += await stream.receive_some(65536)
    upstream.handler = lambda r: text_stream("second")
    await stream.send_all(post("/v1/messages", messages_body("up-model", stream=True)))  # while the first streams
    with trio.fail_after(10):
        while got.count(b"event: message_stop") < 2:
            more = await stream.receive_some(65536)
            assert more, got[-300:]
            got += more
    await stream.aclose()
    first, second = got.split(b"event: message_stop", 1)
    assert b"one" in first and b" two" in first and b"second" not in first
    assert b"HTTP/1.1 200" in second and b"second" in second
    assert len(upstream.requests) == 2
    assert_forgotten(relay)


async def test_many_streams_leave_nothing_behind(nursery: trio.Nursery, watcher: str) -> None:
    """Streams that end while others still run: each one's timer entry is dropped, the set of sockets empties."""
    reply = Reply(pieces=[*started("a"), 0.05, *sse(chunk({"content": "b"}), chunk({}, "stop"))])
    upstream, relay = await setup(nursery, watcher, reply)
    answers = await roundtrips(relay.port, post("/v1/messages", messages_body("up-model", stream=True)), 20)
    assert len(answers) == 20
    for answer in answers:
        assert answer.status == 200 and answer.complete
        assert "".join(orjson.loads(line[6:]).get("delta", {}).get("text", "") for line in answer.body.split(b"\n")
                       if line.startswith(b"data: ")) == "ab"
    assert_forgotten(relay)


def _texts(body: bytes) -> str:
    return "".join(orjson.loads(line[6:]).get("delta", {}).get("text", "") for line in body.split(b"\n")
                   if line.startswith(b"data: "))


@pytest.fixture
def pulls(monkeypatch: pytest.MonkeyPatch) -> dict[Any, int]:
    """What each read made by the server's watcher (``Pump.pull``) returned, counted (an exception as "raised")."""
    from relay.pump import Pump

    counts: dict[Any, int] = {}
    pull = Pump.pull

    def counted(self: Pump, now: float) -> bool | None:
        try:
            got = pull(self, now)
        except Exception:
            counts["raised"] = counts.get("raised", 0) + 1
            raise
        counts[got] = counts.get(got, 0) + 1
        if got is False and self.unsent:
            counts["unsent"] = counts.get("unsent", 0) + 1  # a write the client's socket did not take whole
        return got

    monkeypatch.setattr(Pump, "pull", counted)
    return counts


async def test_a_paced_stream_is_read_by_the_watcher_and_handed_back_for_a_slow_client(
        nursery: trio.Nursery, watcher: str, pulls: dict[Any, int]) -> None:
    """Chunks 5 ms apart are read, translated and written in the watcher's task; a client that reads nothing for
    a while (~8 MB come: more than the sockets' buffers, the client's kept small) fills its socket, so a write is left half done: the stream's
    task sends the rest and the watcher reads on. The client gets every byte, in order."""
    texts = [f"<{n}:" + "y" * (200_000 if n % 2 else 10) + ">" for n in range(80)]
    pieces: list[bytes | float] = [*started()]
    for text in texts:
        pieces += [0.005, *sse(chunk({"content": text}), done=False)]
    pieces += sse(chunk({}, "stop"))
    upstream, relay = await setup(nursery, watcher, Reply(pieces=pieces))
    sock = trio.socket.socket()
    sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, 65536)  # fixed: no autotuning to 32 MB
    await sock.connect(("127.0.0.1", relay.port))
    stream = trio.SocketStream(sock)
    await stream.send_all(post("/v1/messages", messages_body("up-model", stream=True)))
    got = b""
    with trio.fail_after(20):
        got += await stream.receive_some(4096)
        await trio.sleep(0.4)  # the stream goes on, the client's socket fills, a write is left half done (and
        # the wait ends well before read_timeout, after which a client that takes nothing is cut)
        while b"event: message_stop" not in got:
            more = await stream.receive_some(65536)
            assert more, got[-300:]
            got += more
    await stream.aclose()
    body = got.split(b"\r\n\r\n", 1)[1]
    unframed = b"".join(body.split(b"\r\n")[1::2])  # the chunks' payloads (no payload holds CRLF)
    check_stream(parse_sse(unframed))
    assert _texts(unframed) == "".join(texts)
    if watcher == "server":
        assert pulls.get(None, 0) > 20, pulls  # chunks relayed by the watcher, the stream's task asleep
        assert pulls.get("unsent", 0) >= 1, pulls  # handed back: a write the client's socket did not take whole
        assert pulls.get(True, 0) == 1, pulls
    else:
        assert not pulls
    assert_forgotten(relay)


async def test_a_stream_the_watcher_cannot_follow_reads_in_its_own_task(nursery: trio.Nursery,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An epoll set that takes no more sockets (ENOSPC: the system's limit on watches) costs no stream: each reads
    its upstream in its own task, and is still watched for a client that leaves."""
    import errno

    async def full(self: StreamWatch, pump: Any, sock: Any) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StreamWatch, "follow", full)
    reply = Reply(pieces=[*started("a", "b"), 0.05, *sse(chunk({"content": "c"}), chunk({}, "stop"))])
    upstream, relay = await setup(nursery, "server", reply)
    answers = await roundtrips(relay.port, post("/v1/messages", messages_body("up-model", stream=True)), 5)
    for answer in answers:
        assert answer.status == 200 and answer.complete
        check_stream(parse_sse(answer.body))
        assert _texts(answer.body) == "abc"
    assert_forgotten(relay)


class _BreaksThenSilent(RawUpstream):
    """A stream whose chunked framing turns to nonsense after its first events, then nothing (the connection stays
    open)."""

    async def _misbehave(self, stream: trio.SocketStream, stream_wanted: bool) -> None:
        await stream.send_all(SSE_HEAD + b"".join(_chunked(p) for p in started("fine") if isinstance(p, bytes)))
        await trio.sleep(0.05)
        await stream.send_all(b"zz\r\nnot a chunk\r\n")
        await trio.sleep(30)


async def test_a_body_that_breaks_its_framing_while_followed_ends_with_an_error_event(
        nursery: trio.Nursery, watcher: str, pulls: dict[Any, int]) -> None:
    """Broken framing arriving while the watcher reads the stream, then silence: the stream ends at once with an
    error event (not at read_timeout), what came before it delivered."""
    upstream = _BreaksThenSilent("bad_chunk")
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, config(upstream, keepalive=KEEPALIVE, start=20.0, read_timeout=READ_TIMEOUT))
    if watcher == "stream":
        relay.server.watch = None
    answer = await roundtrip(relay.port, post("/v1/messages", messages_body("up-model", stream=True)), timeout=10)
    assert answer.status == 200 and answer.complete
    assert answer.elapsed < READ_TIMEOUT, answer.elapsed
    events = parse_sse(answer.body)
    check_stream(events)
    assert _texts(answer.body) == "fine"
    assert events[-1][0] == "error" and "broke" in events[-1][1]["error"]["message"], events[-1]
    if watcher == "server":
        assert pulls.get(None, 0) + pulls.get(False, 0) >= 1, pulls
    assert_forgotten(relay)


class _FakePump:
    """What the watcher reads of a pump: its client's socket, its clock, its next wake."""

    def __init__(self, sock: Any, due: float) -> None:
        self.out = type("Out", (), {"conn": type("Conn", (), {"stream": type("S", (), {"socket": sock})()})()})()
        self.deadlines = type("D", (), {"last_read": 0.0})()
        self.entry: Any = None
        self.watched_fd = -1
        self._due = due

    def wake_at(self, now: float) -> float:
        return self._due


def test_the_timers_of_streams_that_ended_do_not_pile_up() -> None:
    """With keepalive = 0 a stream's timer entry is due only read_timeout later: thousands of streams ending before
    then leave dead entries behind the first one, and the heap is rebuilt once they outnumber the live ones."""
    import socket

    watch = StreamWatch.create()
    assert watch is not None
    pairs = [socket.socketpair() for _ in range(2)]
    try:
        first = _FakePump(pairs[0][0], due=1.0)  # a stream still running, its timer first in line
        watch.add(first)  # type: ignore[arg-type]
        for i in range(5000):  # streams that come and go behind it (one socket for all, one at a time)
            pump = _FakePump(pairs[1][0], due=100.0 + i)
            watch.add(pump)  # type: ignore[arg-type]
            watch.discard(pump)  # type: ignore[arg-type]
        assert len(watch) == 1
        assert len(watch._timers) <= 2 * 1024 + 2, len(watch._timers)  # 5,001 without the rebuild
        assert [e for e in watch._timers if e[2] is not None] == [first.entry]
        assert watch._timers[0] is first.entry
    finally:
        for a, b in pairs:
            a.close()
            b.close()
