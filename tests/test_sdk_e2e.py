"""The official anthropic SDK against the real relay server in front of a scripted upstream, over loopback."""

from __future__ import annotations

import base64
from typing import Any

import anthropic
import pytest
import trio

from tests.conftest import RELAY_KEY, UPSTREAM_KEY, RelayHandle
from tests.mock_upstream import MockUpstream, Reply, chunk, completion, json_reply, sse, text_stream


def client(relay: RelayHandle) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0, timeout=20)


async def run(fn: Any) -> Any:
    return await trio.to_thread.run_sync(fn)


USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


async def test_non_streaming_text(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: completion({"content": "Hello there"}, usage=(12, 3))
    msg = await run(lambda: client(relay).messages.create(model="mock-model", max_tokens=100, messages=USER))
    assert msg.content[0].type == "text" and msg.content[0].text == "Hello there"
    assert msg.stop_reason == "end_turn"
    assert msg.model == "mock-model"
    assert msg.id.startswith("msg_")
    assert msg.usage.input_tokens == 12 and msg.usage.output_tokens == 3
    sent = upstream.requests[0]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.json["model"] == "mock-model"
    assert sent.json["messages"] == [{"role": "user", "content": "hi"}]
    assert sent.json["max_tokens"] == 100
    assert "stream" not in sent.json


async def test_streaming_text_accumulates(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: text_stream("Hel", "lo ", "wörld ✓", usage=(20, 4))

    def go() -> anthropic.types.Message:
        with client(relay).messages.stream(model="mock-model", max_tokens=50, messages=USER, system="be brief") as s:
            return s.get_final_message()

    msg = await run(go)
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "Hello wörld ✓"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.output_tokens == 4 and msg.usage.input_tokens == 20
    body = upstream.requests[0].json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"][0] == {"role": "system", "content": "be brief"}


def tool_stream() -> Reply:
    return Reply(pieces=sse(
        chunk({"role": "assistant", "content": None, "tool_calls": [
            {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]}),
        chunk({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}),
        chunk({}, "tool_calls"),
        chunk(choices=False, usage={"prompt_tokens": 30, "completion_tokens": 9}),
    ))


async def test_streaming_parallel_tool_calls(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: tool_stream()

    def go() -> anthropic.types.Message:
        with client(relay).messages.stream(model="mock-model", max_tokens=50, messages=USER, tools=TOOLS,
                                           tool_choice={"type": "any", "disable_parallel_tool_use": False}) as s:
            return s.get_final_message()

    msg = await run(go)
    assert msg.stop_reason == "tool_use"
    assert [(b.type, b.id, b.input) for b in msg.content] == [
        ("tool_use", "call_a", {"city": "Paris"}), ("tool_use", "call_b", {"city": "Oslo"})]
    body = upstream.requests[0].json
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city", "parameters": TOOLS[0]["input_schema"]}}]
    assert body["tool_choice"] == "required"


def burst_chunks() -> list[dict[str, Any]]:
    """What a fast model streams: thinking, text and a tool call's arguments, each in many small chunks."""
    words = [f"w{i} " for i in range(40)] + ["ünï ", "日本 ", 'q"uote\\ ', "\n"]
    city = '{"city": "Saint-Étienne, \\"la Verte\\""}'
    return [chunk({"role": "assistant", "content": ""}),
            *(chunk({"reasoning_content": f"step {i}. "}) for i in range(12)),
            *(chunk({"content": w}) for w in words),
            chunk({"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                                   "function": {"name": "get_weather", "arguments": ""}}]}),
            *(chunk({"tool_calls": [{"index": 0, "function": {"arguments": city[i:i + 3]}}]})
              for i in range(0, len(city), 3)),
            chunk({}, "tool_calls"), chunk(choices=False, usage={"prompt_tokens": 30, "completion_tokens": 70})]


@pytest.mark.parametrize("burst", [True, False])
async def test_a_burst_reads_as_the_same_message(relay: RelayHandle, upstream: MockUpstream, burst: bool) -> None:
    """The whole answer in one write, one HTTP chunk per event (relay reads it as runs: ``BodyReader._run``,
    ``StreamTranslator._run``), or one chunk per write with a pause between (one by one): the SDK gets the same
    message, a delta per upstream chunk."""
    pieces = sse(*burst_chunks())
    upstream.handler = lambda r: Reply(pieces=pieces, coalesce=True) if burst else Reply(
        pieces=[x for p in pieces for x in (p, 0.002)])

    def go() -> tuple[anthropic.types.Message, list[str]]:
        with client(relay).messages.stream(model="mock-model", max_tokens=500, messages=USER, tools=TOOLS) as s:
            kinds = [event.type for event in s]
            return s.get_final_message(), kinds

    msg, kinds = await run(go)
    assert [b.type for b in msg.content] == ["thinking", "text", "tool_use"]
    assert msg.content[0].thinking == "".join(f"step {i}. " for i in range(12))  # type: ignore[union-attr]
    assert msg.content[1].text == "".join(f"w{i} " for i in range(40)) + 'ünï 日本 q"uote\\ \n'  # type: ignore[union-attr]
    assert msg.content[2].input == {"city": 'Saint-Étienne, "la Verte"'}  # type: ignore[union-attr]
    assert msg.stop_reason == "tool_use" and msg.usage.output_tokens == 70
    assert kinds.count("text") == 44 and kinds.count("thinking") == 12  # a delta per upstream chunk, none merged


async def test_tool_loop_history_translated(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: completion({"content": "It is sunny."})
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "weather?"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "let me check", "signature": "sig"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": [{"type": "text", "text": "sunny"}]},
            {"type": "text", "text": "thanks"}]},
    ]
    msg = await run(lambda: client(relay).messages.create(
        model="mock-model", max_tokens=50, messages=messages, tools=TOOLS, tool_choice={"type": "tool", "name": "get_weather"}))
    assert msg.content[0].text == "It is sunny."
    sent = upstream.requests[0].json["messages"]
    assert sent[0] == {"role": "user", "content": [
        {"type": "text", "text": "weather?"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]}
    assert sent[1] == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}
    assert sent[2] == {"role": "tool", "tool_call_id": "call_a", "content": "sunny"}
    assert sent[3] == {"role": "user", "content": "thanks"}
    assert upstream.requests[0].json["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}


async def test_reasoning_stream_becomes_thinking_block(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: Reply(pieces=sse(
        chunk({"role": "assistant", "reasoning_content": ""}),
        chunk({"reasoning_content": "Think "}),
        chunk({"reasoning_content": "hard."}),
        chunk({"content": "Answer."}),
        chunk({}, "stop", usage={"prompt_tokens": 5, "completion_tokens": 7, "prompt_cache_hit_tokens": 2}),
    ))

    def go() -> anthropic.types.Message:
        with client(relay).messages.stream(model="mock-model", max_tokens=50, messages=USER,
                                           thinking={"type": "enabled", "budget_tokens": 2048}) as s:
            return s.get_final_message()

    msg = await run(go)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    assert msg.content[0].thinking == "Think hard." and msg.content[0].signature
    assert msg.content[1].text == "Answer."
    assert msg.usage.input_tokens == 3 and msg.usage.cache_read_input_tokens == 2


@pytest.mark.parametrize(("status", "exc", "etype"), [
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (401, anthropic.AuthenticationError, "authentication_error"),
    (403, anthropic.PermissionDeniedError, "permission_error"),
    (404, anthropic.NotFoundError, "not_found_error"),
    (413, anthropic.APIStatusError, "request_too_large"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (500, anthropic.InternalServerError, "api_error"),
    (503, anthropic.InternalServerError, "overloaded_error"),
    (529, anthropic.InternalServerError, "overloaded_error"),
])
async def test_upstream_http_errors(relay: RelayHandle, upstream: MockUpstream, status: int, exc: type, etype: str) -> None:
    upstream.handler = lambda r: json_reply(
        {"error": {"message": f"boom {status} key {UPSTREAM_KEY}", "type": "x"}}, status, [("retry-after", "7")])
    for stream in (False, True):
        with pytest.raises(exc) as info:
            await run(lambda: client(relay).messages.create(model="mock-model", max_tokens=5, messages=USER, stream=stream).__class__)
        err = info.value
        assert err.status_code == status
        assert err.body["error"]["type"] == etype
        assert f"boom {status}" in err.body["error"]["message"]
        assert UPSTREAM_KEY not in err.body["error"]["message"]
        assert err.response.headers.get("request-id", "").startswith("req_")
        if status == 429:
            assert err.response.headers["retry-after"] == "7"


async def test_midstream_error_event(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: Reply(pieces=sse(
        chunk({"role": "assistant", "content": "partial"}),
        {"error": {"message": "The server had an error", "type": "server_error"}}, done=False))

    def go() -> None:
        with client(relay).messages.stream(model="mock-model", max_tokens=50, messages=USER) as s:
            for _ in s:
                pass

    with pytest.raises(anthropic.APIStatusError) as info:
        await run(go)
    assert "The server had an error" in str(info.value)


async def test_error_in_first_chunk_is_http_error(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: Reply(pieces=sse({"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded", "code": 429}}))
    with pytest.raises(anthropic.RateLimitError):
        await run(lambda: client(relay).messages.create(model="mock-model", max_tokens=5, messages=USER, stream=True))


async def test_cut_connection_midstream(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: Reply(pieces=sse(chunk({"content": "abc"}), done=False), cut=True)

    def go() -> list[str]:
        seen = []
        with client(relay).messages.stream(model="mock-model", max_tokens=50, messages=USER) as s:
            for event in s:
                seen.append(event.type)
        return seen

    with pytest.raises(anthropic.APIStatusError) as info:
        await run(go)
    assert "broke mid-stream" in str(info.value)


async def test_unreachable_upstream(nursery: trio.Nursery) -> None:
    from tests.conftest import relay_config, start_relay
    relay = await start_relay(nursery, relay_config("http://127.0.0.1:9/v1"))
    with pytest.raises(anthropic.APIStatusError) as info:
        await run(lambda: client(relay).messages.create(model="mock-model", max_tokens=5, messages=USER))
    assert info.value.status_code == 502
    assert info.value.body["error"]["type"] == "api_error"
    assert "cannot connect" in info.value.body["error"]["message"]


async def test_client_disconnect_cancels_upstream(relay: RelayHandle, upstream: MockUpstream) -> None:
    upstream.handler = lambda r: Reply(pieces=[*sse(chunk({"content": "tick"}), done=False), 30.0, b"data: [DONE]\n\n"])
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    body = b'{"model":"mock-model","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: " + RELAY_KEY.encode()
                          + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"tick" not in got:
        got += await stream.receive_some(65536)
    await stream.aclose()
    with trio.fail_after(5):
        await upstream.cancelled.wait()  # the relay hung up on the upstream promptly, not after 30 s
