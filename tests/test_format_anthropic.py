"""format = "anthropic": the request re-targeted (bytes spliced, or re-serialised when that is not certainly safe),
the stream passed through byte for byte, and the whole path over loopback with the official anthropic SDK."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Provider
from relay.formats.anthropic import message_id, request_id
from relay.formats.anthropic_passthrough.request import forwarded_headers, retarget
from relay.formats.anthropic_passthrough.response import translate
from relay.formats.anthropic_passthrough.stream import PassthroughTranslator
from relay.errors import RelayError
from relay.formats.base import ClientRequest
from tests.anthropic_events import check_body
from tests.conftest import RELAY_KEY, UPSTREAM_KEY
from tests.format_mocks import anthropic_sse, anthropic_text_events, client, cut, format_relay, run
from tests.mock_upstream import MockUpstream, Reply, json_reply

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
PROVIDER = Provider(name="a", base_url="http://x", format="anthropic", auth="x-api-key")
USER = [{"role": "user", "content": "hi"}]


def incoming(raw: bytes, headers: tuple[tuple[bytes, bytes], ...] = ()) -> tuple[dict[str, Any], ClientRequest]:
    req = orjson.loads(raw)
    return req, ClientRequest(raw, req, headers)


# ---- request -----------------------------------------------------------------------------------------

def test_same_model_sends_the_clients_bytes() -> None:
    raw = b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi \\u00e9"}]}'
    req, client = incoming(raw)
    assert retarget(req, PROVIDER, "m", client) is raw


@pytest.mark.parametrize("raw", [
    b'{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[{"role":"user","content":"x"}]}',
    b' {\n  "model" : "claude-sonnet-4-5",\n  "messages": [], "tools": [{"input_schema": {"properties": {"model": {}}}}]}',
])
def test_model_first_is_spliced(raw: bytes) -> None:
    req, client = incoming(raw)
    out = retarget(req, PROVIDER, "kimi-k2", client)
    assert out.replace(b'"kimi-k2"', b'"claude-sonnet-4-5"', 1) == raw  # only the model's bytes changed
    assert orjson.loads(out) == {**req, "model": "kimi-k2"}


@pytest.mark.parametrize("raw", [
    b'{"max_tokens":5,"model":"claude-sonnet-4-5","messages":[]}',  # the Python SDK's key order
    b'{"model":"claude\\u002dsonnet-4-5","messages":[]}',  # escaped differently from how relay would write it
    b'{"metadata":{"model":"claude-sonnet-4-5"},"model":"claude-sonnet-4-5","messages":[]}',
])
def test_other_shapes_are_reserialised(raw: bytes) -> None:
    req, client = incoming(raw)
    assert orjson.loads(retarget(req, PROVIDER, "kimi-k2", client)) == {**req, "model": "kimi-k2"}


def test_relay_changes_are_not_lost() -> None:
    """A max_tokens relay fitted to the window (a new dict) or a provider cap forces a re-serialisation."""
    raw = b'{"model":"a","max_tokens":500,"messages":[]}'
    req, client = incoming(raw)
    assert orjson.loads(retarget({**req, "max_tokens": 100}, PROVIDER, "b", client))["max_tokens"] == 100
    assert orjson.loads(retarget(req, replace(PROVIDER, max_tokens_cap=50), "a", client)) == {**req, "max_tokens": 50}


def test_headers_forwarded() -> None:
    headers = ((b"x-api-key", b"client-secret"), (b"authorization", b"Bearer client"), (b"anthropic-version", b"2023-06-01"),
               (b"anthropic-beta", b"interleaved-thinking-2025-05-14"), (b"x-app", b"cli"))
    assert forwarded_headers(ClientRequest(b"{}", {}, headers)) == [
        (b"anthropic-version", b"2023-06-01"), (b"anthropic-beta", b"interleaved-thinking-2025-05-14")]
    assert forwarded_headers(None) == [(b"anthropic-version", b"2023-06-01")]


# ---- response and stream --------------------------------------------------------------------------------

def test_response_gets_the_clients_model_name() -> None:
    doc = {"id": "msg_1", "type": "message", "role": "assistant", "model": "kimi-k2", "content": [{"type": "text", "text": "hi"}],
           "stop_reason": "end_turn", "stop_sequence": None, "usage": {"input_tokens": 3, "output_tokens": 1}}
    assert translate(dict(doc), "claude-sonnet-4-5") == {**doc, "model": "claude-sonnet-4-5"}
    with pytest.raises(Exception) as info:
        translate({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "m")
    assert info.value.status == 529  # type: ignore[attr-defined]


def run_stream(pieces: list[bytes], model: str = "claude-sonnet-4-5") -> tuple[bytes, PassthroughTranslator]:
    translator = PassthroughTranslator(model)
    return b"".join(translator.feed(p) for p in pieces) + translator.finish(), translator


@pytest.mark.parametrize("name", ["anthropic_real_text.sse", "anthropic_real_thinking_signature.sse",
                                  "anthropic_real_text_then_tool_use_pings.sse", "anthropic_docs_tool_use_stream.sse",
                                  "anthropic_real_message_delta_input_tokens.sse"])
def test_corpus_streams_pass_through(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    out, translator = run_stream([data])
    head, rest = out.split(b"\n\n", 1)
    assert data.endswith(rest)  # everything after message_start is the upstream's own bytes
    outcome = check_body(out, strict=False, model="claude-sonnet-4-5")
    assert outcome.message is not None and outcome.error is None
    assert translator.done and translator.error is None and translator.has_usage
    assert translator.output_tokens == outcome.message["usage"]["output_tokens"]


def test_usage_from_message_start_and_delta() -> None:
    out, translator = run_stream([(CORPUS / "anthropic_real_message_delta_input_tokens.sse").read_bytes()])
    assert translator.input_tokens == 61  # message_delta's late input count wins over message_start's 43


def test_stream_without_event_lines() -> None:
    data = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in anthropic_text_events("hey"))
    out, translator = run_stream([data])
    assert b'"model":"claude-sonnet-4-5"' in out and translator.done and translator.output_tokens == 4


def test_error_before_message_start_is_an_http_error() -> None:
    translator = PassthroughTranslator("m")
    out = translator.feed(b'event: ping\ndata: {"type":"ping"}\n\nevent: error\ndata: {"type":"error","error":{"type":"rate_limit_error","message":"slow"}}\n\n')
    assert out == b"" and not translator.started
    assert translator.error is not None and translator.error.status == 429


def test_error_midstream_passes_through() -> None:
    events = anthropic_text_events("partial")[:4]
    data = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)
    data += (CORPUS / "anthropic_stream_error_event.sse").read_bytes()
    out, translator = run_stream([data])
    assert out.endswith((CORPUS / "anthropic_stream_error_event.sse").read_bytes())
    assert translator.error is not None and translator.error.status == 529


def test_truncated_stream_ends_with_an_error_event() -> None:
    events = anthropic_text_events("partial")[:4]
    data = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)
    out, translator = run_stream([data])
    outcome = check_body(out, strict=False)
    assert outcome.error is not None and "before message_stop" in outcome.error["message"]


def test_break_mid_event_drops_the_half_event() -> None:
    """An unfinished event is held back, so the error event that ends a broken stream parses cleanly."""
    events = anthropic_text_events("partial")[:4]
    data = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)
    half = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_de'
    translator = PassthroughTranslator("m")
    out = translator.feed(data + half)
    assert not out.endswith(half)
    out += translator.abort(RelayError(502, "up: connection reset", "api_error"))
    outcome = check_body(out, strict=False)
    assert outcome.error is not None and outcome.error["message"] == "up: connection reset"
    assert outcome.message is not None and outcome.message["content"][0]["text"] == "partial"


STREAM = (CORPUS / "anthropic_real_thinking_signature.sse").read_bytes().replace(b"\n", b"\r\n")


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, len(STREAM) - 1), max_size=40))
def test_any_split_gives_the_same_bytes(cuts: list[int]) -> None:
    out, translator = run_stream(cut(STREAM, cuts))
    assert out == run_stream([STREAM])[0]
    assert translator.done and translator.has_usage


# ---- over loopback with the SDK ---------------------------------------------------------------------------

async def test_sdk_streaming_passthrough(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "anthropic")
    upstream.handler = lambda r: anthropic_sse(*anthropic_text_events("Hello ✓"))

    def go() -> anthropic.types.Message:
        with client(relay).messages.stream(model="alias-model", max_tokens=50, messages=USER,
                                           extra_headers={"anthropic-beta": "interleaved-thinking-2025-05-14"}) as s:
            return s.get_final_message()

    msg = await run(go)
    assert msg.content[0].text == "Hello ✓" and msg.model == "alias-model" and msg.usage.output_tokens == 4
    sent = upstream.requests[0]
    assert sent.path == "/v1/messages" and sent.json["model"] == "real-upstream-model"
    assert sent.headers["x-api-key"] == UPSTREAM_KEY and "authorization" not in sent.headers
    assert RELAY_KEY not in str(sent.headers)
    assert sent.headers["anthropic-version"]  # whatever version the SDK sent, forwarded
    assert sent.headers["anthropic-beta"] == "interleaved-thinking-2025-05-14"


async def test_sdk_non_streaming_tools_and_thinking(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "anthropic", 'auth = "bearer"')
    content = [{"type": "thinking", "thinking": "hmm", "signature": "real-sig"},
               {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]
    upstream.handler = lambda r: json_reply({"id": "msg_1", "type": "message", "role": "assistant", "model": "x",
                                             "content": content, "stop_reason": "tool_use", "stop_sequence": None,
                                             "usage": {"input_tokens": 9, "output_tokens": 7}})
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]
    msg = await run(lambda: client(relay).messages.create(model="up-model", max_tokens=50, messages=USER, tools=tools,
                                                          thinking={"type": "enabled", "budget_tokens": 1024}))
    assert [b.to_dict() for b in msg.content] == content and msg.stop_reason == "tool_use"
    sent = upstream.requests[0]
    assert sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}" and "x-api-key" not in sent.headers
    assert sent.json["tools"] == tools and sent.json["thinking"] == {"type": "enabled", "budget_tokens": 1024}


async def test_sdk_errors(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "anthropic", "retries = 0")
    upstream.handler = lambda r: json_reply({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, 529)
    with pytest.raises(anthropic.InternalServerError) as info:
        await run(lambda: client(relay).messages.create(model="up-model", max_tokens=5, messages=USER))
    assert info.value.status_code == 529 and info.value.body["error"]["type"] == "overloaded_error"
    upstream.handler = lambda r: anthropic_sse({"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}})
    with pytest.raises(anthropic.RateLimitError):
        await run(lambda: client(relay).messages.create(model="up-model", max_tokens=5, messages=USER, stream=True))


async def test_count_tokens_forwarded(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "anthropic")
    upstream.handler = lambda r: json_reply({"input_tokens": 4242})
    count = await run(lambda: client(relay).messages.count_tokens(model="alias-model", messages=USER))
    assert count.input_tokens == 4242
    sent = upstream.requests[0]
    assert sent.path == "/v1/messages/count_tokens" and sent.json == {"model": "real-upstream-model", "messages": USER}
    upstream.handler = lambda r: json_reply({"type": "error", "error": {"type": "not_found_error", "message": "no"}}, 404)
    count = await run(lambda: client(relay).messages.count_tokens(model="alias-model", messages=USER))
    assert count.input_tokens > 0  # the upstream has no counter: relay's own estimate


async def test_client_disconnect_cancels_upstream(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "anthropic")
    events = anthropic_text_events("tick")
    first = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events[:4])
    upstream.handler = lambda r: Reply(pieces=[first, 30.0, b"event: message_stop\ndata: {}\n\n"])
    stream = await trio.open_tcp_stream("127.0.0.1", relay.port)
    body = b'{"model":"up-model","max_tokens":5,"stream":true,"messages":[{"role":"user","content":"hi"}]}'
    await stream.send_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\nx-api-key: " + RELAY_KEY.encode()
                          + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"tick" not in got:
        got += await stream.receive_some(65536)
    await stream.aclose()
    with trio.fail_after(5):
        await upstream.cancelled.wait()


def test_ids_are_distinct_and_a_forked_child_makes_its_own() -> None:
    """Ids come from a pool of the system's random bytes, refilled one call at a time: every id differs, across
    refills too, and a forked child (``--workers``) does not make the ids its parent makes next."""
    ids = [request_id() for _ in range(5000)] + [message_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"(req|msg)_01[0-9A-Za-z]{22}", i) for i in ids)
    request_id()  # the pool holds bytes now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out without running anything else
        os.write(write, request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert child.startswith("req_01") and child != request_id()
