"""format = "openai-responses": the pure translators (request, response, stream) and the whole path over loopback
with the official anthropic SDK as the client and a scripted Responses-API upstream."""

from __future__ import annotations

import base64
import re
from dataclasses import replace
from typing import Any

import anthropic
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Provider
from relay.formats.openai_responses import request as R
from relay.formats.openai_responses.response import translate
from relay.formats.openai_responses.stream import ResponsesStreamTranslator
from tests.anthropic_events import check_body
from tests.conftest import UPSTREAM_KEY
from tests.format_mocks import (
    call_events,
    client,
    completed,
    cut,
    created,
    format_relay,
    reasoning_events,
    response_obj,
    responses_sse,
    run,
    text_events,
)
from tests.mock_upstream import MockUpstream, json_reply

PROVIDER = Provider(name="r", base_url="http://x", format="openai-responses", reasoning_control="reasoning_effort")
USER = [{"role": "user", "content": "hi"}]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def body_of(req: dict[str, Any], provider: Provider = PROVIDER, stream: bool = False) -> dict[str, Any]:
    return R.build({"model": "m", "max_tokens": 100, "messages": USER, **req}, provider, "gpt-x", stream)[0]


# ---- request -----------------------------------------------------------------------------------------

def test_basic_request() -> None:
    body = body_of({"system": "Be brief.", "temperature": 0.2, "stop_sequences": ["X"], "top_k": 5}, stream=True)
    assert body == {"model": "gpt-x", "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                    "instructions": "Be brief.", "max_output_tokens": 100, "temperature": 0.2, "store": False,
                    "stream": True}
    assert body_of({"max_tokens": 1})["max_output_tokens"] == R.MIN_OUTPUT_TOKENS  # the API's minimum


def test_tool_loop_items() -> None:
    body = body_of({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
                    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "weather?"},
                                     {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "need data", "signature": "relay-oair:ENC1"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_b", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "call_a", "content": [
                {"type": "text", "text": "sunny"}, {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]},
            {"type": "text", "text": "thanks"}]},
    ]})
    assert body["input"] == [
        {"role": "user", "content": [{"type": "input_text", "text": "weather?"},
                                     {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}", "detail": "auto"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "need data"}], "encrypted_content": "ENC1"},
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": R.INTERRUPTED},
        {"role": "user", "content": [{"type": "input_text", "text": "[images returned by tool call call_a]"},
                                     {"type": "input_image", "image_url": "https://x/y.png", "detail": "auto"},
                                     {"type": "input_text", "text": "thanks"}]},
    ]
    assert body["tools"] == [{"type": "function", "name": "get_weather", "parameters": WEATHER["input_schema"],
                              "strict": False, "description": "Weather for a city"}]
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"} and body["parallel_tool_calls"] is False


def test_thinking_blocks_without_encrypted_content_are_dropped() -> None:
    body = body_of({"messages": [{"role": "user", "content": "a"},
                                 {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "relay-x"},
                                                                   {"type": "text", "text": "b"}]}]})
    assert [i.get("type", i.get("role")) for i in body["input"]] == ["user", "assistant"]


def test_reasoning_effort_and_documents() -> None:
    body = body_of({"thinking": {"type": "enabled", "budget_tokens": 20000}})
    assert body["reasoning"] == {"effort": "high", "summary": "auto"} and body["include"] == ["reasoning.encrypted_content"]
    assert "reasoning" not in body_of({"thinking": {"type": "enabled"}}, replace(PROVIDER, reasoning_control="none"))
    assert "reasoning" not in body_of({"thinking": {"type": "disabled"}})
    doc = body_of({"messages": [{"role": "user", "content": [
        {"type": "document", "title": "a.pdf", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}}]}]})
    assert doc["input"][0]["content"] == [{"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"}]


# ---- response and stream --------------------------------------------------------------------------------

def test_response_translation() -> None:
    doc = response_obj([
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "think"}], "encrypted_content": "ENC"},
        {"type": "message", "content": [{"type": "output_text", "text": "Hi "}, {"type": "refusal", "refusal": "no."}]},
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": '{"a": 1}'},
    ], usage=(30, 12, 10))
    msg = translate(doc, "claude-x")
    assert msg["content"] == [{"type": "thinking", "thinking": "think", "signature": "relay-oair:ENC"},
                              {"type": "text", "text": "Hi no."},
                              {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}]
    assert msg["stop_reason"] == "tool_use" and msg["model"] == "claude-x"
    assert msg["usage"] == {"input_tokens": 20, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 10, "output_tokens": 12}
    incomplete = response_obj([{"type": "message", "content": [{"type": "output_text", "text": "cut"}]}],
                              status="incomplete", incomplete_details={"reason": "max_output_tokens"})
    assert translate(incomplete, "m")["stop_reason"] == "max_tokens"
    filtered = {**incomplete, "incomplete_details": {"reason": "content_filter"}}
    assert translate(filtered, "m")["stop_reason"] == "refusal"


def test_failed_response_is_an_error() -> None:
    with pytest.raises(Exception) as info:
        translate(response_obj(status="failed", error={"code": "rate_limit_exceeded", "message": "slow down"}), "m")
    assert info.value.status == 429 and "slow down" in info.value.message  # type: ignore[attr-defined]


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events)


STREAM = sse(created(), *reasoning_events("Plan: ", "call it.", encrypted="ENC9"), *text_events("Let ", "me ✓ check."),
             *call_events("call_1", "get_weather", '{"ci', 'ty": "Paris"}'),
             *call_events("call_2", "get_weather", '{"city": "Oslo"}', index=3),
             completed(usage=(50, 20, 30)))


def run_stream(pieces: list[bytes]) -> tuple[bytes, ResponsesStreamTranslator]:
    translator = ResponsesStreamTranslator("claude-x", message_id="msg_fixed")
    out = b"".join(translator.feed(p) for p in pieces) + translator.finish()
    return re.sub(rb'"relay-[A-Za-z0-9]{43}"', b'"relay-<generated>"', out), translator


def test_stream_translation() -> None:
    out, translator = run_stream([STREAM])
    message = check_body(out, model="claude-x").message
    assert message is not None
    assert message["content"][0] == {"type": "thinking", "thinking": "Plan: call it.", "signature": "relay-oair:ENC9"}
    assert message["content"][1] == {"type": "text", "text": "Let me ✓ check."}
    assert [(b["id"], b["input"]) for b in message["content"][2:]] == [("call_1", {"city": "Paris"}), ("call_2", {"city": "Oslo"})]
    assert message["stop_reason"] == "tool_use"
    assert (translator.input_tokens, translator.output_tokens, translator.cache_read) == (20, 20, 30)


def test_stream_summary_parts_and_whole_arguments() -> None:
    """A second summary part is a new paragraph; a server that sends arguments only in output_item.done works."""
    item = {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"x": 1}'}
    out, _ = run_stream([sse(
        created(),
        {"type": "response.output_item.added", "output_index": 0, "item": {"id": "rs", "type": "reasoning", "summary": []}},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "summary_index": 0, "delta": "one"},
        {"type": "response.reasoning_summary_part.added", "output_index": 0, "summary_index": 1},
        {"type": "response.reasoning_summary_text.delta", "output_index": 0, "summary_index": 1, "delta": "two"},
        {"type": "response.output_item.done", "output_index": 0, "item": {"id": "rs", "type": "reasoning", "summary": []}},
        {"type": "response.output_item.added", "output_index": 1, "item": {**item, "arguments": ""}},
        {"type": "response.output_item.done", "output_index": 1, "item": item},
        completed())])
    message = check_body(out).message
    assert message is not None and message["content"][0]["thinking"] == "one\n\ntwo"
    assert message["content"][1]["input"] == {"x": 1}


def test_stream_incomplete_and_refusal() -> None:
    out, _ = run_stream([sse(created(), *text_events("cut"),
                             {"type": "response.incomplete", "response": response_obj(
                                 status="incomplete", incomplete_details={"reason": "max_output_tokens"})})])
    message = check_body(out).message
    assert message is not None and message["stop_reason"] == "max_tokens"
    out, _ = run_stream([sse(created(), {"type": "response.refusal.delta", "output_index": 0, "delta": "I can't."}, completed())])
    message = check_body(out).message
    assert message is not None and message["content"] == [{"type": "text", "text": "I can't."}]


def test_stream_failure_before_output_is_an_http_error() -> None:
    translator = ResponsesStreamTranslator("m")
    out = translator.feed(sse({"type": "response.failed", "response": response_obj(
        status="failed", error={"code": "rate_limit_exceeded", "message": "Rate limit reached"})}))
    assert translator.error is not None and translator.error.status == 429
    assert out == b"" or not translator.started


def test_stream_error_event_midway() -> None:
    out, translator = run_stream([sse(created(), *text_events("part"),
                                      {"type": "error", "code": "server_error", "message": "The server had an error"})])
    outcome = check_body(out)
    assert outcome.error is not None and "The server had an error" in outcome.error["message"]
    assert translator.error is not None and translator.error.status == 500


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, len(STREAM) - 1), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    assert run_stream(cut(STREAM, cuts))[0] == run_stream([STREAM])[0]


# ---- over loopback with the SDK ---------------------------------------------------------------------------

async def test_sdk_non_streaming(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "openai-responses")
    upstream.handler = lambda r: json_reply(response_obj(
        [{"type": "message", "content": [{"type": "output_text", "text": "Hello there"}]}], usage=(12, 3, 0)))
    msg = await run(lambda: client(relay).messages.create(model="alias-model", max_tokens=100, messages=USER))
    assert msg.content[0].text == "Hello there" and msg.model == "alias-model" and msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == 12 and msg.usage.output_tokens == 3
    sent = upstream.requests[0]
    assert sent.path == "/v1/responses" and sent.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert sent.json["model"] == "real-upstream-model" and sent.json["store"] is False and "stream" not in sent.json


async def test_sdk_streaming_tools_and_thinking(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "openai-responses", 'reasoning_control = "reasoning_effort"')
    upstream.handler = lambda r: responses_sse(created(), *reasoning_events("Plan."), *call_events("call_1", "get_weather", '{"city":', ' "Paris"}'),
                                               completed(usage=(40, 9, 0)))

    def go() -> anthropic.types.Message:
        with client(relay).messages.stream(model="up-model", max_tokens=50, messages=USER, tools=[WEATHER],
                                           thinking={"type": "enabled", "budget_tokens": 2048}) as s:
            return s.get_final_message()

    msg = await run(go)
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[0].thinking == "Plan." and msg.content[0].signature == "relay-oair:gAAAA-enc"
    assert msg.content[1].id == "call_1" and msg.content[1].input == {"city": "Paris"}
    assert msg.stop_reason == "tool_use"
    sent = upstream.requests[0].json
    assert sent["stream"] is True and sent["reasoning"] == {"effort": "low", "summary": "auto"}
    assert sent["include"] == ["reasoning.encrypted_content"]

    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [b.to_dict() for b in msg.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"}]}]
    upstream.handler = lambda r: json_reply(response_obj([{"type": "message", "content": [{"type": "output_text", "text": "Sunny."}]}]))
    again = await run(lambda: client(relay).messages.create(model="up-model", max_tokens=50, messages=history, tools=[WEATHER]))
    assert again.content[0].text == "Sunny."
    items = upstream.requests[1].json["input"]
    assert items[1] == {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Plan."}], "encrypted_content": "gAAAA-enc"}
    assert items[2]["type"] == "function_call" and items[3] == {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}


@pytest.mark.parametrize(("status", "exc", "etype"), [
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (401, anthropic.AuthenticationError, "authentication_error"),
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (500, anthropic.InternalServerError, "api_error"),
])
async def test_sdk_http_errors(nursery: trio.Nursery, upstream: MockUpstream, status: int, exc: type, etype: str) -> None:
    relay = await format_relay(nursery, upstream, "openai-responses", "retries = 0")
    upstream.handler = lambda r: json_reply({"error": {"message": f"boom {status}", "type": "x", "code": None}}, status,
                                            [("retry-after", "3")])
    with pytest.raises(exc) as info:
        await run(lambda: client(relay).messages.create(model="up-model", max_tokens=5, messages=USER, stream=True))
    assert info.value.status_code == status and info.value.body["error"]["type"] == etype
    if status == 429:
        assert info.value.response.headers["retry-after"] == "3"


async def test_sdk_failed_before_output_is_an_http_error(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "openai-responses", "retries = 0")
    upstream.handler = lambda r: responses_sse(created(), {"type": "response.failed", "response": response_obj(
        status="failed", error={"code": "rate_limit_exceeded", "message": "Rate limit reached for gpt-x"})})
    with pytest.raises(anthropic.RateLimitError) as info:
        await run(lambda: client(relay).messages.create(model="up-model", max_tokens=5, messages=USER, stream=True))
    assert "Rate limit reached" in info.value.body["error"]["message"]
