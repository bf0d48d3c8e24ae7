"""format = "gemini": the pure translators (request, schema cleaning, response, stream) and the whole path over
loopback with the official anthropic SDK as the client and a scripted native-Gemini upstream."""

from __future__ import annotations

import base64
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
from relay.formats.gemini import request as G
from relay.formats.gemini import schema
from relay.formats.gemini.common import PLACEHOLDER_SIGNATURE, encode_signature
from relay.formats.gemini.response import translate
from relay.formats.gemini.stream import GeminiStreamTranslator
from tests.anthropic_events import check_body
from tests.conftest import RELAY_KEY, UPSTREAM_KEY
from tests.format_mocks import client, cut, format_relay, gemini_chunk, gemini_sse, gemini_usage, run
from tests.mock_upstream import MockUpstream, json_reply

CORPUS = Path(__file__).parent / "fixtures" / "corpus"
PROVIDER = Provider(name="g", base_url="http://x", format="gemini", reasoning_control="thinking_budget")
USER = [{"role": "user", "content": "hi"}]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
WEATHER = {"name": "get_weather", "description": "Weather for a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def body_of(req: dict[str, Any], provider: Provider = PROVIDER) -> dict[str, Any]:
    return G.build({"model": "m", "max_tokens": 100, "messages": USER, **req}, provider, "gemini-2.5-pro", False)[0]


# ---- request -----------------------------------------------------------------------------------------

def test_system_roles_and_generation_config() -> None:
    body = body_of({
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=1"}, {"type": "text", "text": "Be brief."}],
        "messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                     {"role": "system", "content": "mid"}, {"role": "user", "content": [{"type": "text", "text": "c"}]}],
        "temperature": 0.5, "top_p": 0.9, "top_k": 40, "stop_sequences": ["END"],
    })
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "a"}]}, {"role": "model", "parts": [{"text": "b"}]},
                                {"role": "user", "parts": [{"text": "mid"}, {"text": "c"}]}]
    assert body["generationConfig"] == {"maxOutputTokens": 100, "stopSequences": ["END"], "temperature": 0.5,
                                        "topP": 0.9, "topK": 40}
    merged = body_of({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "mid"}]},
                     replace(PROVIDER, system_turns="merge"))
    assert merged["systemInstruction"] == {"parts": [{"text": "mid"}]}


def test_images_and_documents() -> None:
    body = body_of({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
        {"type": "document", "title": "Notes", "source": {"type": "text", "media_type": "text/plain", "data": "n1"}},
    ]}]})
    assert body["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "image/png", "data": PNG}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}},
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBERi0="}},
        {"text": "Document: Notes\n\nn1"},
    ]


def test_tool_loop_matched_by_name_and_order() -> None:
    """Gemini has no call ids: results go back in the order of the calls, whatever order the client used; an
    unanswered call gets a placeholder; a result for an unknown call becomes text; images follow."""
    body = body_of({"tools": [WEATHER], "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "toolu_c", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "cold", "is_error": False},
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": [
                {"type": "text", "text": "sunny"}, {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
            {"type": "tool_result", "tool_use_id": "toolu_zzz", "content": "stray"},
            {"type": "text", "text": "thanks"}]},
    ]})
    model, answer = body["contents"][1], body["contents"][2]
    assert [p["functionCall"] for p in model["parts"][1:]] == [
        {"name": "get_weather", "args": {"city": c}} for c in ("Paris", "Oslo", "Rome")]
    assert model["parts"][1]["thoughtSignature"] == PLACEHOLDER_SIGNATURE  # first call of the step, none known
    assert "thoughtSignature" not in model["parts"][2]
    assert answer["role"] == "user"
    assert [p.get("functionResponse") for p in answer["parts"][:3]] == [
        {"name": "get_weather", "response": {"output": "sunny"}},
        {"name": "get_weather", "response": {"output": "cold"}},
        {"name": "get_weather", "response": {"error": G.INTERRUPTED}},
    ]
    assert answer["parts"][3] == {"inlineData": {"mimeType": "image/png", "data": PNG}}
    assert answer["parts"][4] == {"text": "[result of tool call toolu_zzz]\nstray"}
    assert answer["parts"][5] == {"text": "thanks"}


def test_error_results_and_upstream_call_ids() -> None:
    body = body_of({"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_gc_abc", "name": "run", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_gc_abc", "content": "boom", "is_error": True}]},
    ]})
    assert body["contents"][1]["parts"][0]["functionCall"] == {"name": "run", "args": {}, "id": "abc"}
    assert body["contents"][2]["parts"][0] == {"functionResponse": {"name": "run", "response": {"error": "boom"}, "id": "abc"}}


def test_thought_signatures_go_back_where_they_came_from() -> None:
    body = body_of({"messages": [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "plan", "signature": "relay-abc"},  # relay-made: dropped
            {"type": "text", "text": "Sure."},
            {"type": "thinking", "thinking": "", "signature": encode_signature("SIG_TEXT", "p")},
            {"type": "thinking", "thinking": "why", "signature": encode_signature("SIG_CALL", "n")},
            {"type": "tool_use", "id": "t1", "name": "run", "input": {"x": 1}},
            {"type": "tool_use", "id": "t2", "name": "run", "input": {"x": 2}},
            {"type": "redacted_thinking", "data": "zzz"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "1"},
                                     {"type": "tool_result", "tool_use_id": "t2", "content": "2"}]},
    ]})
    assert body["contents"][1]["parts"] == [
        {"text": "Sure.", "thoughtSignature": "SIG_TEXT"},
        {"functionCall": {"name": "run", "args": {"x": 1}}, "thoughtSignature": "SIG_CALL"},
        {"functionCall": {"name": "run", "args": {"x": 2}}},
    ]


def test_thinking_config_from_claude_settings() -> None:
    enabled = {"thinking": {"type": "enabled", "budget_tokens": 5000}}
    assert body_of(enabled)["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": 5000}
    effort = {"thinking": {"type": "adaptive"}, "output_config": {"effort": "high"}}
    assert body_of(effort)["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": 24576}
    level = replace(PROVIDER, reasoning_control="thinking_level")
    assert body_of(effort, level)["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingLevel": "high"}
    assert body_of({"thinking": {"type": "enabled", "budget_tokens": 2000}}, level)["generationConfig"]["thinkingConfig"]["thinkingLevel"] == "low"
    assert "thinkingConfig" not in body_of({"thinking": {"type": "disabled"}})["generationConfig"]
    assert "thinkingConfig" not in body_of(enabled, replace(PROVIDER, reasoning_control="none"))["generationConfig"]


def test_tools_and_tool_choice() -> None:
    noargs = {"name": "now", "input_schema": {"type": "object", "properties": {}}}
    server = {"type": "web_search_20250305", "name": "web_search"}
    body = body_of({"tools": [WEATHER, noargs, server], "tool_choice": {"type": "tool", "name": "now"}})
    assert body["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather for a city",
         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
        {"name": "now"}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["now"]}}
    assert body_of({"tools": [WEATHER], "tool_choice": {"type": "any"}})["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert body_of({"tools": [WEATHER], "tool_choice": {"type": "none"}})["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


def test_paths() -> None:
    assert G.path("gemini-2.5-pro", True) == "/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
    assert G.path("models/gemini-2.5-pro", False) == "/models/gemini-2.5-pro:generateContent"


# ---- schema cleaning ---------------------------------------------------------------------------------

def test_schema_keywords_gemini_rejects_are_rewritten_or_removed() -> None:
    cleaned = schema.parameters({
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "additionalProperties": False,
        "properties": {
            "path": {"type": "string", "format": "uri", "minLength": 1},
            "when": {"type": "string", "format": "date-time"},
            "mode": {"const": "fast"},
            "count": {"type": ["integer", "null"], "exclusiveMinimum": 0, "format": "int64"},
            "maybe": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            "either": {"oneOf": [{"type": "string"}, {"type": "number"}]},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "uniqueItems": True},
            "tuple": {"type": "array", "items": [{"type": "integer"}, {"type": "string"}]},
            "meta": {"type": "object", "propertyNames": {"pattern": "^x"}, "additionalProperties": {"type": "string"}},
            "codes": {"type": "integer", "enum": [1, 2]},
            "wrong": {"type": "string", "properties": {"a": {"type": "string"}}, "required": ["a"]},
        },
        "required": ["path", "ghost"],
    })
    assert cleaned == {
        "type": "object",
        "properties": {
            "path": {"type": "string", "minLength": 1},
            "when": {"type": "string", "format": "date-time"},
            "mode": {"type": "string", "enum": ["fast"]},
            "count": {"type": "integer", "minimum": 0, "format": "int64", "nullable": True},
            "maybe": {"type": "string", "default": None, "nullable": True},
            "either": {"anyOf": [{"type": "string"}, {"type": "number"}]},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
            "tuple": {"type": "array", "items": {"type": "integer"}},
            "meta": {"type": "object"},
            "codes": {"type": "integer"},
            "wrong": {"type": "string"},
        },
        "required": ["path"],
    }


def test_schema_refs_all_of_and_recursion() -> None:
    node = {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}, "$defs": {"Node": {}}}
    node["$defs"]["Node"] = {"type": "object", "properties": {"name": {"type": "string"}, "child": {"$ref": "#/$defs/Node"}}}
    cleaned = schema.parameters(node)
    assert cleaned is not None and cleaned["properties"]["child"]["properties"]["name"] == {"type": "string"}
    depth, inner = 0, cleaned
    while "child" in inner.get("properties", {}):
        inner, depth = inner["properties"]["child"], depth + 1
    assert depth <= schema.MAX_DEPTH + 1  # a recursive $ref ends, untyped, instead of recursing forever
    merged = schema.parameters({"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                                          {"properties": {"b": {"type": "number"}}}]})
    assert merged == {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "number"}}, "required": ["a"]}
    assert schema.parameters({"type": "object", "properties": {}}) is None


def test_claude_code_tool_schemas_are_clean() -> None:
    reference = orjson.loads((Path(__file__).parent / "fixtures" / "reference" / "claude-code-2.1.331-request-1.json").read_bytes())
    body = body_of({"tools": reference["body"]["tools"]})
    allowed = {"type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems", "properties",
               "required", "minProperties", "maxProperties", "minLength", "maxLength", "pattern", "example", "anyOf",
               "propertyOrdering", "default", "items", "minimum", "maximum"}

    def walk(node: Any) -> None:
        assert isinstance(node, dict) and set(node) <= allowed, node
        assert not isinstance(node.get("type"), list)
        for child in node.get("properties", {}).values():
            walk(child)
        for child in node.get("anyOf", ()):
            walk(child)
        if "items" in node:
            walk(node["items"])

    declarations = body["tools"][0]["functionDeclarations"]
    assert {"Bash", "Write", "Read", "Edit"} <= {d["name"] for d in declarations}
    for declaration in declarations:
        if "parameters" in declaration:
            walk(declaration["parameters"])


# ---- response and stream ---------------------------------------------------------------------------------

def answer_parts() -> list[dict[str, Any]]:
    return [{"text": "**Plan** look it up", "thought": True},
            {"text": "Let me check."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "SIG1"},
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]


def test_response_translation() -> None:
    doc = gemini_chunk(*answer_parts(), finish="STOP", usage=gemini_usage(100, 20, cached=40, thoughts=7))
    msg = translate(doc, "claude-x")
    kinds = [b["type"] for b in msg["content"]]
    assert kinds == ["thinking", "text", "thinking", "tool_use", "tool_use"]
    assert msg["content"][0]["thinking"] == "**Plan** look it up" and msg["content"][0]["signature"].startswith("relay-")
    assert msg["content"][2] == {"type": "thinking", "thinking": "", "signature": "relay-gemini:n:SIG1"}
    ids = [b["id"] for b in msg["content"][3:]]
    assert all(i.startswith("toolu_") for i in ids) and len(set(ids)) == 2
    assert ids == [b["id"] for b in translate(doc, "claude-x")["content"][3:]]  # stable for the same response
    assert msg["stop_reason"] == "tool_use" and msg["model"] == "claude-x"
    assert msg["usage"] == {"input_tokens": 60, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 40, "output_tokens": 27}


@pytest.mark.parametrize(("finish", "stop"), [("STOP", "end_turn"), ("MAX_TOKENS", "max_tokens"), ("SAFETY", "refusal"),
                                              ("RECITATION", "refusal"), ("PROHIBITED_CONTENT", "refusal"),
                                              ("MALFORMED_FUNCTION_CALL", "end_turn"), ("OTHER", "end_turn")])
def test_finish_reasons(finish: str, stop: str) -> None:
    assert translate(gemini_chunk({"text": "x"}, finish=finish), "m")["stop_reason"] == stop


def test_blocked_prompt_is_a_refusal() -> None:
    msg = translate({"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": gemini_usage(9, 0)}, "m")
    assert msg["content"] == [] and msg["stop_reason"] == "refusal"


def test_google_error_body_with_retry_info() -> None:
    doc = orjson.loads((CORPUS / "gemini_error_429_retryinfo.json").read_bytes())
    with pytest.raises(Exception) as info:
        translate(doc, "m", provider="g")
    err = info.value
    assert err.status == 429 and err.error_type == "rate_limit_error"  # type: ignore[attr-defined]
    ((name, value),) = err.headers  # type: ignore[attr-defined]
    assert name == b"retry-after" and int(value) in (34, 35)  # retryDelay "34.4s", rounded (up or to nearest)


def stream_of(*chunks: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks)


STREAM = stream_of(
    gemini_chunk(answer_parts()[0], usage=gemini_usage(100, 0)),
    gemini_chunk({"text": "Let me "}, usage=gemini_usage(100, 2)),
    gemini_chunk({"text": "check.", "thoughtSignature": "SIG_T"}, usage=gemini_usage(100, 4)),
    gemini_chunk(*answer_parts()[2:], finish="STOP", usage=gemini_usage(100, 20, cached=40, thoughts=7)),
)


def run_stream(pieces: list[bytes]) -> tuple[bytes, GeminiStreamTranslator]:
    translator = GeminiStreamTranslator("claude-x", message_id="msg_fixed")
    out = b"".join(translator.feed(p) for p in pieces) + translator.finish()
    return re.sub(rb'"relay-[A-Za-z0-9]{43}"', b'"relay-<generated>"', out), translator


def test_stream_translation() -> None:
    out, translator = run_stream([STREAM])
    outcome = check_body(out, strict=False, model="claude-x")  # strict refuses the empty signature-only blocks
    message = outcome.message
    assert message is not None
    assert [b["type"] for b in message["content"]] == ["thinking", "text", "thinking", "thinking", "tool_use", "tool_use"]
    assert message["content"][1]["text"] == "Let me check."
    assert message["content"][2]["signature"] == "relay-gemini:p:SIG_T"
    assert message["content"][3]["signature"] == "relay-gemini:n:SIG1"
    assert [b["input"] for b in message["content"][4:]] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert message["stop_reason"] == "tool_use"
    assert (translator.input_tokens, translator.output_tokens, translator.cache_read) == (60, 27, 40)


def test_stream_signature_joins_the_open_thought() -> None:
    out, _ = run_stream([stream_of(gemini_chunk({"text": "hmm", "thought": True}),
                                   gemini_chunk({"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "S"}, finish="STOP"))])
    message = check_body(out, strict=False).message
    assert message is not None and [b["type"] for b in message["content"]] == ["thinking", "tool_use"]
    assert message["content"][0] == {"type": "thinking", "thinking": "hmm", "signature": "relay-gemini:n:S"}


def test_stream_error_before_anything_is_an_http_error() -> None:
    translator = GeminiStreamTranslator("m")
    assert translator.feed(b'data: {"error": {"code": 503, "message": "The model is overloaded.", "status": "UNAVAILABLE"}}\r\n\r\n') == b""
    assert translator.error is not None and translator.error.status == 503 and not translator.started


def test_stream_error_midway_is_an_error_event() -> None:
    out, translator = run_stream([stream_of(gemini_chunk({"text": "partial"})),
                                  b'data: {"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}}\r\n\r\n'])
    outcome = check_body(out)
    assert outcome.error is not None and "Internal error" in outcome.error["message"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(1, len(STREAM) - 1), max_size=40))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    assert run_stream(cut(STREAM, cuts))[0] == run_stream([STREAM])[0]


# ---- over loopback with the SDK ---------------------------------------------------------------------------

async def test_sdk_non_streaming(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "gemini")
    upstream.handler = lambda r: json_reply(gemini_chunk({"text": "Hello there"}, finish="STOP", usage=gemini_usage(12, 3)))
    msg = await run(lambda: client(relay).messages.create(model="alias-model", max_tokens=100, messages=USER, system="sys"))
    assert msg.content[0].text == "Hello there" and msg.model == "alias-model" and msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == 12 and msg.usage.output_tokens == 3
    sent = upstream.requests[0]
    assert sent.path == "/v1beta/models/real-upstream-model:generateContent"
    assert sent.headers["x-goog-api-key"] == UPSTREAM_KEY and "authorization" not in sent.headers
    assert RELAY_KEY not in str(sent.headers)
    assert sent.json["systemInstruction"] == {"parts": [{"text": "sys"}]}
    assert sent.json["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


async def test_sdk_streaming_thinking_and_tools(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "gemini")
    upstream.handler = lambda r: gemini_sse(
        gemini_chunk(answer_parts()[0], usage=gemini_usage(30, 1)),
        gemini_chunk(*answer_parts()[1:], finish="STOP", usage=gemini_usage(30, 9, thoughts=4)))

    def go() -> anthropic.types.Message:
        with client(relay).messages.stream(model="up-model", max_tokens=50, messages=USER, tools=[WEATHER],
                                           thinking={"type": "enabled", "budget_tokens": 2048}) as s:
            return s.get_final_message()

    msg = await run(go)
    assert [b.type for b in msg.content] == ["thinking", "text", "thinking", "tool_use", "tool_use"]
    assert msg.content[2].signature == "relay-gemini:n:SIG1"
    assert [b.input for b in msg.content[3:]] == [{"city": "Paris"}, {"city": "Oslo"}]
    assert msg.stop_reason == "tool_use" and msg.usage.output_tokens == 13
    sent = upstream.requests[0]
    assert sent.path == "/v1beta/models/up-model:streamGenerateContent?alt=sse"
    assert sent.json["generationConfig"]["thinkingConfig"] == {"includeThoughts": True, "thinkingBudget": 2048}

    # the next turn: Claude Code sends the blocks back; the signature returns on the call it came with
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [b.to_dict() for b in msg.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": b.id, "content": "ok"}
                                            for b in msg.content if b.type == "tool_use"]}]
    upstream.handler = lambda r: gemini_sse(gemini_chunk({"text": "Done."}, finish="STOP", usage=gemini_usage(40, 2)))
    await run(lambda: client(relay).messages.create(model="up-model", max_tokens=50, messages=history, tools=[WEATHER], stream=True).close())
    contents = upstream.requests[1].json["contents"]
    assert contents[1]["parts"] == [{"text": "Let me check."},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": "SIG1"},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]
    assert [p["functionResponse"]["response"] for p in contents[2]["parts"]] == [{"output": "ok"}, {"output": "ok"}]


async def test_sdk_image_in_request(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "gemini")
    upstream.handler = lambda r: json_reply(gemini_chunk({"text": "A PNG."}, finish="STOP"))
    content = [{"type": "text", "text": "what is it?"},
               {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]
    msg = await run(lambda: client(relay).messages.create(model="up-model", max_tokens=20, messages=[{"role": "user", "content": content}]))
    assert msg.content[0].text == "A PNG."
    assert upstream.requests[0].json["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": PNG}}


@pytest.mark.parametrize(("status", "google", "exc", "etype"), [
    (400, "INVALID_ARGUMENT", anthropic.BadRequestError, "invalid_request_error"),
    (403, "PERMISSION_DENIED", anthropic.PermissionDeniedError, "permission_error"),
    (404, "NOT_FOUND", anthropic.NotFoundError, "not_found_error"),
    (429, "RESOURCE_EXHAUSTED", anthropic.RateLimitError, "rate_limit_error"),
    (500, "INTERNAL", anthropic.InternalServerError, "api_error"),
    (503, "UNAVAILABLE", anthropic.InternalServerError, "overloaded_error"),
])
async def test_sdk_google_errors(nursery: trio.Nursery, upstream: MockUpstream, status: int, google: str, exc: type, etype: str) -> None:
    relay = await format_relay(nursery, upstream, "gemini", "retries = 0")
    doc = {"error": {"code": status, "message": f"boom {google}", "status": google,
                     "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}
    upstream.handler = lambda r: json_reply(doc, status)
    for stream in (False, True):
        with pytest.raises(exc) as info:
            await run(lambda: client(relay).messages.create(model="up-model", max_tokens=5, messages=USER, stream=stream))
        assert info.value.status_code == status and info.value.body["error"]["type"] == etype
        assert f"boom {google}" in info.value.body["error"]["message"]
        if status == 429:
            assert info.value.response.headers["retry-after"] == "7"


async def test_sdk_midstream_error(nursery: trio.Nursery, upstream: MockUpstream) -> None:
    relay = await format_relay(nursery, upstream, "gemini")
    upstream.handler = lambda r: gemini_sse(gemini_chunk({"text": "partial"}),
                                            {"error": {"code": 500, "message": "Internal error encountered.", "status": "INTERNAL"}})

    def go() -> None:
        with client(relay).messages.stream(model="up-model", max_tokens=50, messages=USER) as s:
            for _ in s:
                pass

    with pytest.raises(anthropic.APIStatusError) as info:
        await run(go)
    assert "Internal error encountered." in str(info.value)
