"""A misbehaving upstream never leaves a client hanging or half-answered: resets, stalls, garbage, the wrong
content type, broken chunked framing, huge lines, empty bodies, non-HTTP answers and hang-ups all end cleanly
and in bounded time. Before any byte reached the client that is an Anthropic HTTP error; after, an
``event: error`` that closes the stream. Then a soak of good and faulty requests, some abandoned mid-stream,
must leave no task, file descriptor or memory behind, and relay must still answer.

Faults MockUpstream can script (it always frames HTTP properly) are chosen by the request's user text; the ones
below HTTP come from ``RawUpstream``, a bare trio socket server, one per behaviour, each a provider of its own.
"""

from __future__ import annotations

import gc
import os
import random
import socket
import struct
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anthropic
import orjson
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.conftest import RELAY_KEY, RelayHandle, relay_config, start_relay
from tests.mock_upstream import MockUpstream, Recorded, Reply, chunk, completion, json_reply, sse, text_stream
from tests.client import Answer, messages_body, request_bytes, roundtrip
from tests.client import ask as sdk_ask
from tests.robustness import (ANY_JSON, SharedRelay, assert_clean, check_exchange, encode, f, relay_idle, shared_relays,
                              trap_relay_logs)

__all__ = ["shared_relays"]  # the fixture, imported so pytest finds it

READ_TIMEOUT = 0.5  # the providers' read_timeout: every stall below outlasts it
FAULT_TIMEOUT = 5.0  # no fault may keep a client longer (a stall: at most two attempts of READ_TIMEOUT and a backoff)
BIG = "0123456789abcdef" * (4 * 1024 * 1024 // 16)  # one 4 MiB line: far past any read size, well under the SSE limit
GARBAGE = random.Random(6).randbytes(20_000)


# ---- the mock upstream's faults, chosen by the request's user text ------------------------------

def _first_events() -> list[bytes | float]:
    return sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}), chunk({"content": " world"}),
               done=False)


def _last_events() -> list[bytes | float]:
    return sse(chunk({}, "stop"), chunk(choices=False, usage={"prompt_tokens": 9, "completion_tokens": 2}))


UPSTREAM_ERROR = {"error": {"message": "the model is overloaded", "type": "overloaded_error"}}
JSON = [("content-type", "application/json")]


def mock_fault(fault: str, stream: bool) -> Reply:
    """What the mock upstream answers for ``fault`` (both a stream and a whole-body variant of each)."""
    whole = orjson.dumps({"id": "c", "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello world"},
                                                   "finish_reason": "stop"}]})
    if fault == "ok":
        return text_stream("Hello", " world") if stream else completion({"content": "Hello world"})
    if fault == "cut_mid":  # chunked body ends mid-way: the connection drops without the last chunk
        return Reply(pieces=_first_events(), cut=True) if stream else Reply(headers=JSON, pieces=[whole[:20]], cut=True)
    if fault == "cut_before":  # headers, then the connection drops before any body
        return Reply(cut=True) if stream else Reply(headers=JSON, cut=True)
    if fault == "stall_mid":  # silent for longer than read_timeout, in the middle of the body
        if stream:
            return Reply(pieces=[*_first_events(), 3.0, *_last_events()])
        return Reply(headers=JSON, pieces=[whole[:20], 3.0, whole[20:]])
    if fault == "garbage":  # random bytes where SSE (or JSON) should be
        return Reply(pieces=[GARBAGE]) if stream else Reply(headers=JSON, pieces=[GARBAGE], chunked=False)
    if fault == "garbage_after":  # a good start, then random bytes, then a clean end of body
        return Reply(pieces=[*_first_events(), GARBAGE]) if stream else Reply(headers=JSON, pieces=[whole, GARBAGE])
    if fault == "html":  # a proxy's error page with status 200
        return Reply(headers=[("content-type", "text/html")], pieces=[b"<html><body><h1>502 Bad Gateway</h1></body></html>"])
    if fault == "json_for_stream":  # the upstream ignores stream=true
        return completion({"content": "Hello world"})
    if fault == "json_error":  # an error in a 200 JSON body
        return json_reply(UPSTREAM_ERROR)
    if fault == "sse_error_mid":  # an error event after some output
        return Reply(pieces=[*_first_events(), *sse(UPSTREAM_ERROR, done=False)]) if stream else json_reply(UPSTREAM_ERROR)
    if fault == "empty":  # 200 with content-length 0
        return Reply(headers=[("content-type", "text/event-stream" if stream else "application/json")], chunked=False)
    if fault == "empty_chunked":  # 200, chunked, no chunks
        return Reply(headers=[("content-type", "text/event-stream" if stream else "application/json")])
    if fault == "no_done":  # a stream that ends without [DONE] (llama.cpp): still a whole message
        return Reply(pieces=[*_first_events(), *_last_events()]) if stream else completion({"content": "Hello world"})
    if fault == "huge_line":
        if stream:
            return Reply(pieces=sse(chunk({"role": "assistant", "content": ""}), chunk({"content": BIG}), chunk({}, "stop")))
        return completion({"content": BIG})
    if fault == "slow":  # a long, slow stream: for clients that hang up half way
        pieces: list[bytes | float] = []
        for event in sse(*(chunk({"content": f"{i} "}) for i in range(40)), chunk({}, "stop")):
            pieces += [event, 0.02]
        return Reply(pieces=pieces)
    raise AssertionError(f"no such fault {fault!r}")


def fault_handler(rec: Recorded) -> Reply:
    body = rec.json
    return mock_fault(body["messages"][-1]["content"], body.get("stream") is True)


# ---- faults below HTTP: a bare socket server ----------------------------------------------------

SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
JSON_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RawUpstream(MockUpstream):
    """MockUpstream's listener, but below HTTP: each connection gets one wrong thing, ``behavior`` (one of
    RAW_FAULTS)."""

    def __init__(self, behavior: str) -> None:
        super().__init__()
        self.behavior = behavior

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            if self.behavior != "close":
                stream_wanted = await self._read_request(stream)
                await self._misbehave(stream, stream_wanted)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await stream.aclose()

    @staticmethod
    async def _read_request(stream: trio.SocketStream) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            more = await stream.receive_some(65536)
            if not more:
                return False
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
        while len(body) < length:
            more = await stream.receive_some(65536)
            if not more:
                break
            body += more
        return orjson.loads(body).get("stream") is True

    async def _misbehave(self, stream: trio.SocketStream, stream_wanted: bool) -> None:
        events = b"".join(p for p in _first_events() if isinstance(p, bytes))
        if self.behavior == "rst":  # a reset instead of an answer
            _reset(stream)
        elif self.behavior == "rst_mid":  # a reset after some of the body
            await stream.send_all((SSE_HEAD + _chunked(events)) if stream_wanted else (JSON_HEAD + _chunked(b'{"id":"c",')))
            await trio.sleep(0.1)  # let relay read (and forward) what came first
            _reset(stream)
        elif self.behavior == "nonhttp":  # something else answers on the port
            await stream.send_all(b"SSH-2.0-OpenSSH_9.6p1 Ubuntu-3ubuntu13\r\n" + GARBAGE[:500])
        elif self.behavior == "stall_head":  # takes the request, never answers
            while await stream.receive_some(65536):
                pass
        elif self.behavior == "bad_chunk":  # chunked framing that turns to nonsense after the first chunk
            await stream.send_all((SSE_HEAD + _chunked(events)) if stream_wanted else (JSON_HEAD + _chunked(b'{"id":"c",')))
            await trio.sleep(0.1)
            await stream.send_all(b"zz\r\nnot a chunk\r\n\r\n")
            await trio.sleep(0.1)
        elif self.behavior == "short_body":  # content-length promises more than comes
            await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-length: 100000\r\n\r\n"
                                  % (b"text/event-stream" if stream_wanted else b"application/json") + b'data: {"choi')


def _reset(stream: trio.SocketStream) -> None:
    """Close with RST (SO_LINGER 0) rather than FIN."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


RAW_FAULTS = ["close", "rst", "rst_mid", "nonhttp", "stall_head", "bad_chunk", "short_body"]


# ---- the environment: mock + raw upstreams behind one relay -------------------------------------

@dataclass
class Faulty:
    relay: RelayHandle
    mock: MockUpstream
    raws: dict[str, RawUpstream]


async def start_faulty(nursery: trio.Nursery, retries: int = 0) -> Faulty:
    """The mock and every raw upstream behind one relay. ``retries = 0`` keeps each fault to one attempt (and
    the tests quick); the soak keeps relay's default retry so its backoff path is soaked too."""
    provider_extra = f"retries = {retries}"
    mock = MockUpstream(fault_handler)
    await nursery.start(mock.serve)
    raws = {b: RawUpstream(b) for b in RAW_FAULTS}
    blocks = []
    for name, raw in raws.items():
        await nursery.start(raw.serve)
        blocks.append(f'[providers.raw_{name}]\nbase_url = "{raw.base_url}"\nread_timeout = {READ_TIMEOUT}\n'
                      f"connect_timeout = 1\n{provider_extra}\n")
    config = relay_config(mock.base_url, extra_provider=provider_extra, extra="\n".join(blocks))
    config = config.replace("read_timeout = 5", f"read_timeout = {READ_TIMEOUT}")
    return Faulty(await start_relay(nursery, config), mock, raws)


def ask(stream: bool, model: str = "mock-model", text: str = "hi") -> bytes:
    """The raw request these suites send (max_tokens 64)."""
    return request_bytes(messages_body(model, stream, text, 64), key=RELAY_KEY)


def fault_model(fault: str) -> str:
    return f"raw_{fault}/m" if fault in RAW_FAULTS else "mock-model"


def fault_request(fault: str, stream: bool) -> bytes:
    """The request that provokes ``fault``: a raw fault is a provider of its own, a mock fault is the user text."""
    return ask(stream, fault_model(fault), fault)


# What a client must see for each fault: "ok" (a whole answer), "midstream" (200, the output so far, then an
# error event), or the HTTP status of an error that comes before any byte. (stream, whole body)
EXPECT: dict[str, tuple[str | int, str | int]] = {
    "ok": ("ok", "ok"),
    "cut_mid": ("midstream", 502),
    "cut_before": (502, 502),
    "stall_mid": ("midstream", 504),
    "garbage": (502, 502),
    "garbage_after": ("midstream", 502),  # the garbage is skipped, but no finish_reason nor [DONE] came: cut short
    "html": (502, 502),
    "json_for_stream": ("ok", "ok"),
    "json_error": (529, 529),
    "sse_error_mid": ("midstream", 529),
    "empty": (502, 502),
    "empty_chunked": (502, 502),
    "no_done": ("ok", "ok"),
    "huge_line": ("ok", "ok"),
    "close": (502, 502),
    "rst": (502, 502),
    "rst_mid": ("midstream", 502),
    "nonhttp": (502, 502),
    "stall_head": (504, 504),
    "bad_chunk": ("midstream", 502),
    "short_body": (502, 502),
}


def check_fault_answer(fault: str, stream: bool, answer: Answer) -> None:
    expect = EXPECT[fault][0 if stream else 1]
    outcome = assert_clean(answer, allow_5xx=True, model="mock-model" if fault not in RAW_FAULTS else None)
    if expect == "ok":
        assert answer.status == 200, (answer.status, answer.body[:300])
        message = outcome.message if stream else outcome  # type: ignore[union-attr]
        assert outcome is not None and (not stream or outcome.error is None)  # type: ignore[union-attr]
        text = "".join(b["text"] for b in message["content"] if b["type"] == "text")
        assert text == (BIG if fault == "huge_line" else "Hello world")
    elif expect == "midstream":
        assert answer.status == 200, (answer.status, answer.body[:300])
        assert answer.content_type.startswith("text/event-stream"), answer.content_type
        assert outcome.error is not None, "the stream ended as if whole"  # type: ignore[union-attr]
        # what came before the fault got through
        assert outcome.message["content"][0]["text"] == "Hello world"  # type: ignore[union-attr]
    else:
        assert answer.status == expect, (answer.status, answer.body[:300])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("fault", list(EXPECT))
async def test_fault_ends_cleanly(nursery: trio.Nursery, fault: str, stream: bool) -> None:
    env = await start_faulty(nursery)
    with trap_relay_logs() as trap:
        answer = await roundtrip(env.relay.port, fault_request(fault, stream), timeout=FAULT_TIMEOUT)
        await relay_idle(env.relay)
    assert not trap.crashes, trap.describe()
    check_fault_answer(fault, stream, answer)


@pytest.mark.parametrize("fault", ["ok", "cut_mid", "stall_mid", "garbage", "html", "rst_mid", "nonhttp", "close", "bad_chunk"])
async def test_sdk_sees_a_clean_end(nursery: trio.Nursery, fault: str) -> None:
    """The official SDK, streaming: a whole message, or an APIStatusError (never a connection error or a hang)."""
    env = await start_faulty(nursery)
    model = fault_model(fault)

    def run() -> Any:
        client = anthropic.Anthropic(base_url=env.relay.url, api_key=RELAY_KEY, max_retries=0, timeout=FAULT_TIMEOUT)
        try:
            with client.messages.stream(model=model, max_tokens=64, messages=[{"role": "user", "content": fault}]) as s:
                return s.get_final_message()
        except anthropic.APIError as exc:
            return exc

    with trio.fail_after(FAULT_TIMEOUT + 2):
        result = await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    if fault == "ok":
        assert isinstance(result, anthropic.types.Message)
        assert result.content[0].text == "Hello world"  # type: ignore[union-attr]
    else:
        assert isinstance(result, anthropic.APIStatusError), repr(result)


async def test_stall_is_cut_at_read_timeout(nursery: trio.Nursery) -> None:
    """A stalled stream ends at the read timeout, not at whatever the client's patience is."""
    env = await start_faulty(nursery)
    answer = await roundtrip(env.relay.port, fault_request("stall_mid", True), timeout=FAULT_TIMEOUT)
    check_fault_answer("stall_mid", True, answer)
    assert READ_TIMEOUT <= answer.elapsed < READ_TIMEOUT + 1.0, answer.elapsed
    assert "read timeout" in orjson.loads(answer.body.rsplit(b"data: ", 1)[1])["error"]["message"]


# ---- random upstream nonsense --------------------------------------------------------------------

TEXT = st.text(max_size=12)
USAGE = st.fixed_dictionaries({}, optional={
    "prompt_tokens": f(st.integers(0, 10_000)), "completion_tokens": f(st.integers(0, 10_000)),
    "prompt_tokens_details": f(st.fixed_dictionaries({"cached_tokens": f(st.integers(0, 100))}))})
FUNCTION = st.fixed_dictionaries({}, optional={
    "name": f(st.sampled_from(["get_weather", "Bash"])),
    "arguments": f(st.sampled_from(['{"city": "Oslo"}', '{"ci', 'ty": 1}']))})
TOOL_CALL = st.fixed_dictionaries({}, optional={
    "index": f(st.integers(0, 2)), "id": f(st.sampled_from(["call_a", "call_b"])), "type": st.just("function"),
    "function": f(FUNCTION)})
MESSAGE = st.fixed_dictionaries({}, optional={
    "role": st.just("assistant"), "content": f(TEXT), "reasoning_content": f(TEXT), "refusal": f(TEXT),
    "tool_calls": f(st.lists(TOOL_CALL, max_size=2))})
FINISH = f(st.sampled_from(["stop", "length", "tool_calls", "content_filter", "error", None]))
ERROR = st.fixed_dictionaries({"message": TEXT}, optional={"code": ANY_JSON, "type": TEXT})
CHOICE = st.fixed_dictionaries({"index": f(st.just(0)), "delta": f(MESSAGE)},
                               optional={"finish_reason": FINISH, "usage": f(USAGE)})
CHUNK = st.fixed_dictionaries({"choices": f(st.lists(CHOICE, min_size=1, max_size=2))},
                              optional={"id": TEXT, "usage": f(USAGE), "error": f(ERROR)})
EVENT = st.integers(0, 9).flatmap(lambda i: (
    CHUNK.map(lambda c: b"data: " + encode(c) + b"\n\n") if i < 6  # mostly chunks, their fields sometimes anything
    else CHUNK.map(lambda c: b"event: error\ndata: " + encode(c) + b"\n\n") if i == 6
    else st.sampled_from([b"data: [DONE]\n\n", b": keep-alive\n\n", b"\r\n", b"data:\n\n", b"event: ping\n\n"]) if i == 7
    else ANY_JSON.map(lambda v: b"data: " + encode(v) + b"\n\n") if i == 8
    else st.binary(max_size=40)))
WHOLE_CHOICE = st.fixed_dictionaries({"index": f(st.just(0)), "message": f(MESSAGE)}, optional={"finish_reason": FINISH})
COMPLETION = st.fixed_dictionaries({"choices": f(st.lists(WHOLE_CHOICE, min_size=1, max_size=2))},
                                   optional={"id": TEXT, "usage": f(USAGE), "error": f(ERROR)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(stream=st.booleans(), events=st.lists(EVENT, max_size=8),
       whole=st.integers(0, 4).flatmap(lambda i: ANY_JSON if i == 4 else COMPLETION),
       joined=st.booleans(), cut=st.integers(0, 4).map(lambda i: i == 4),
       content_type=st.sampled_from(["text/event-stream", "text/event-stream", "application/json", "text/plain", ""]))
def test_any_upstream_answer_ends_cleanly(shared_relays: Callable[..., SharedRelay], stream: bool, events: list[bytes],
                                          whole: Any, joined: bool, cut: bool, content_type: str) -> None:
    """Whatever a 200 upstream sends (random chunks, fields of any type, stray bytes, a cut), the client gets a
    cleanly framed end: a well-formed stream or message, or an Anthropic error."""
    body = events if stream and content_type != "application/json" else [encode(whole)]
    pieces: list[bytes | float] = [b"".join(body)] if joined else list(body)
    reply = Reply(headers=[("content-type", content_type)] if content_type else [], pieces=pieces, cut=cut)
    raw = ask(stream)

    async def exchange(relay: RelayHandle, upstream: MockUpstream) -> str:
        upstream.handler = lambda rec: reply
        return await check_exchange(relay, raw, allow_5xx=True, loose=True)

    event(shared_relays(provider_config="retries = 0").run(exchange))


# ---- known bugs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("stream, upstream_doc", [
    (True, {"choices": 5}),
    (True, {"choices": {"0": {"delta": {"content": "x"}}}}),
    (True, {"choices": [{"index": 0, "delta": {"content": "x", "tool_calls": 5}}]}),
    (True, {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": ["stop"]}]}),
    (False, {"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": {"type": "stop"}}]}),
], ids=["choices-int", "choices-object", "tool_calls-int", "finish_reason-list", "whole-finish_reason-object"])
async def test_malformed_upstream_chunk_ends_the_answer_cleanly(relay: RelayHandle, upstream: MockUpstream, stream: bool,
                                                               upstream_doc: Any) -> None:
    upstream.handler = lambda rec: Reply(pieces=sse(upstream_doc)) if stream else json_reply(upstream_doc)
    with trap_relay_logs() as trap:
        answer = await roundtrip(relay.port, ask(stream))
        await relay_idle(relay)
    assert not trap.crashes, trap.describe()
    assert_clean(answer, allow_5xx=True, loose=True)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_negative_usage_is_never_passed_on(relay: RelayHandle, upstream: MockUpstream, stream: bool) -> None:
    usage = {"prompt_tokens": -5, "completion_tokens": -3}
    if stream:
        reply = Reply(pieces=sse(chunk({"content": "x"}), chunk({}, "stop"), chunk(choices=False, usage=usage)))
    else:
        reply = json_reply({"choices": [{"index": 0, "message": {"content": "x"}, "finish_reason": "stop"}], "usage": usage})
    upstream.handler = lambda rec: reply
    assert_clean(await roundtrip(relay.port, ask(stream)))  # usage counts must be >= 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_non_string_tool_call_id_and_name_give_a_valid_answer(relay: RelayHandle, upstream: MockUpstream,
                                                                 stream: bool) -> None:
    call = {"index": 0, "id": 12345, "type": "function", "function": {"name": 7, "arguments": "{}"}}
    if stream:
        reply = Reply(pieces=sse(chunk({"tool_calls": [call]}), chunk({}, "tool_calls")))
    else:
        reply = completion({"tool_calls": [call]}, finish="tool_calls")
    upstream.handler = lambda rec: reply
    assert_clean(await roundtrip(relay.port, ask(stream)))


# ---- the soak -------------------------------------------------------------------------------------

SOAK_FAULTS = [name for name in EXPECT if name != "huge_line"]  # a 4 MiB answer a few times would only slow the soak down


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def settle(env: Faulty, target: tuple[int, int] | None = None) -> tuple[int, int]:
    """(tasks alive, open fds) once relay's idle upstream connections are closed and every task has had its
    moment to end: the first reading equal to ``target``, else the first that repeats, within 5 s."""
    last = (-1, -1)
    for _ in range(100):
        await env.relay.server.upstreams.aclose()
        gc.collect()  # relay's usage flush leaves its sqlite connection to the GC (test_usage_flush_closes_its_sqlite_connection)
        await trio.sleep(0.05)
        now = (trio.lowlevel.current_statistics().tasks_living, open_fds())
        if now == target or (target is None and now == last):
            return now
        last = now
    return last


async def soak_one(env: Faulty, fault: str, stream: bool, hang_up: bool) -> None:
    raw = fault_request(fault, stream)
    if hang_up:  # the client reads the first bytes (or nothing) and goes away
        await roundtrip(env.relay.port, raw, timeout=FAULT_TIMEOUT, stop_after_first_data=True)
        return
    check_fault_answer(fault, stream, await roundtrip(env.relay.port, raw, timeout=FAULT_TIMEOUT))


async def soak(env: Faulty, plan: list[tuple[str, bool, bool]], concurrency: int = 16) -> None:
    limiter = trio.CapacityLimiter(concurrency)

    async def one(item: tuple[str, bool, bool]) -> None:
        async with limiter:
            await soak_one(env, *item)

    async with trio.open_nursery() as nursery:
        for item in plan:
            nursery.start_soon(one, item)


async def test_soak_leaks_nothing(nursery: trio.Nursery) -> None:
    """220 requests, 16 at a time: every fault, streamed or whole, a fifth of them abandoned by the client and 20
    more abandoned mid-stream. Afterwards: the same tasks, the same file descriptors, no memory kept (beyond 4 MB),
    and relay still answers."""
    env = await start_faulty(nursery, retries=1)
    rng = random.Random(2024)
    plan = [(rng.choice(SOAK_FAULTS), rng.random() < 0.6, rng.random() < 0.2) for _ in range(200)]
    plan += [("slow", True, True)] * 20  # hang up on a stream that is still coming
    rng.shuffle(plan)
    with trap_relay_logs() as trap, trio.fail_after(60):
        # warm up: every path once, so what is made lazily (pools, caches, schemas) exists before the baseline
        await soak(env, [(fault, stream, False) for fault in SOAK_FAULTS for stream in (True, False)])
        base = await settle(env)
        tracemalloc.start()
        try:
            base_memory = tracemalloc.get_traced_memory()[0]
            await soak(env, plan)
            tasks, fds = await settle(env, base)
            env.mock.requests.clear()  # the mock's own record of what it was sent
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - base_memory
        finally:
            tracemalloc.stop()
        assert not trap.crashes, trap.describe()
        assert tasks == base[0], f"{tasks - base[0]} tasks more than before the soak"
        assert fds == base[1], f"{fds - base[1]} file descriptors more than before the soak"
        assert grown < 4 * 1024 * 1024, f"{grown / 1e6:.1f} MB still allocated after the soak"
        await soak_one(env, "ok", True, False)  # and relay still answers
        await soak_one(env, "ok", False, False)


def test_usage_flush_closes_its_sqlite_connection(tmp_path: Any) -> None:
    from relay.store import Batch, UsageRow, connected

    path = tmp_path / "usage.sqlite3"

    async def write() -> None:
        async with connected(f"sqlite://{path}") as backend:
            await backend.apply(Batch([UsageRow("key", "model", "2025-01-01", 1, 0, 2, 3)], {}))

    gc.disable()
    try:
        trio.run(write)
        still_open = [fd for fd in os.listdir("/proc/self/fd")
                      if os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve())]
    finally:
        gc.enable()
    assert not still_open, f"{len(still_open)} descriptor(s) of {path.name} left open"


async def test_circuit_recovers_after_a_probe_client_hangs_up(nursery: trio.Nursery) -> None:
    first, second = MockUpstream(), MockUpstream()
    await nursery.start(first.serve)
    await nursery.start(second.serve)
    relay = await start_relay(nursery, f"""
[server]
api_keys = ["{RELAY_KEY}"]
[providers.a]
base_url = "{first.base_url}"
retries = 0
failure_threshold = 1
cooldown = 0.2
[providers.b]
base_url = "{second.base_url}"
[routes]
default = ["a/x", "b/y"]
""")
    body = ask(False, model="m")
    second.handler = lambda rec: completion({"content": "from b"})
    first.handler = lambda rec: json_reply({"error": {"message": "down"}}, 500)
    assert (await roundtrip(relay.port, body)).status == 200  # a fails, the circuit opens, b answers
    await trio.sleep(0.3)  # the cool-down passes: the next request probes a, slowly, and its client hangs up (RST)
    first.handler = lambda rec: Reply(headers=JSON, pieces=[0.3, orjson.dumps(
        {"choices": [{"index": 0, "message": {"content": "from a"}, "finish_reason": "stop"}]})], chunked=False)
    client = await trio.open_tcp_stream("127.0.0.1", relay.port)
    await client.send_all(body)
    await trio.sleep(0.1)
    _reset(client)
    await trio.sleep(0.5)
    assert len(first.requests) == 2  # the probe reached a, and a answered
    first.handler = lambda rec: completion({"content": "from a"})
    await trio.sleep(0.3)
    answer = await roundtrip(relay.port, body)
    assert b"from a" in answer.body, "a healthy provider is still skipped"


async def test_upstream_cut_after_done_is_not_an_error(nursery: trio.Nursery) -> None:
    """The stream is complete at [DONE]; an upstream that then drops the connection before the chunked
    terminator must not turn a finished answer into a crash (relay drains the rest to reuse the connection)."""
    from tests.conftest import relay_config, start_relay
    from tests.mock_upstream import MockUpstream, Reply, chunk, sse
    upstream = MockUpstream(lambda r: Reply(pieces=sse(chunk({"content": "whole"}), chunk({}, "stop")), cut=True))
    await nursery.start(upstream.serve)
    relay = await start_relay(nursery, relay_config(upstream.base_url))
    with trap_relay_logs() as trap:
        for _ in range(3):
            text = await trio.to_thread.run_sync(sdk_ask, relay.port)
            assert text == "whole"
        await relay_idle(relay)
    assert not trap.crashes, trap.describe()
