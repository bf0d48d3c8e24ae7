"""Anthropic request -> OpenAI request, on the real captured Claude Code requests and on edge cases."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from relay.config import Provider
from relay.errors import RelayError
from relay.formats.openai_chat.request import build

REFERENCE = Path(__file__).parent / "fixtures" / "reference"
PROVIDER = Provider(name="p", base_url="http://x")


def reference(name: str) -> dict[str, Any]:
    return json.loads((REFERENCE / f"claude-code-2.1.331-{name}.json").read_text())["body"]


def test_claude_code_first_request() -> None:
    req = reference("request-1")
    body, dropped = build(req, PROVIDER, "up-model", stream=True)
    msgs = body["messages"]
    # system blocks joined, billing header (changes every call, defeats prefix caches) left out
    assert msgs[0]["role"] == "system"
    assert msgs[0]["content"].startswith("You are a Claude agent")
    assert "x-anthropic-billing-header" not in msgs[0]["content"]
    # the user turn's text blocks become one string; the mid-conversation system turn stays in place
    assert msgs[1]["role"] == "user" and msgs[1]["content"].endswith("find webfetch")
    assert msgs[2]["role"] == "system" and msgs[2]["content"].startswith("# Environment")
    names = [t["function"]["name"] for t in body["tools"]]
    assert "DeferredToolPlaceholder" not in names and "WebFetch" not in names
    assert {"Bash", "Write", "ToolSearch", "Read", "Edit"} <= set(names)
    assert body["max_tokens"] == 32000 and body["stream"] is True
    for field in ("metadata", "thinking", "context_management", "output_config"):
        assert field not in body
    assert "metadata" in dropped and "context_management" in dropped


def test_tool_reference_loads_deferred_tool() -> None:
    req = reference("request-2")
    body, _ = build(req, PROVIDER, "m", stream=True)
    names = [t["function"]["name"] for t in body["tools"]]
    assert "WebFetch" in names and "DeferredToolPlaceholder" not in names
    tool_msg = body["messages"][-1]
    assert tool_msg == {"role": "tool", "tool_call_id": "toolu_01", "content": "Tool WebFetch is now loaded and can be called."}
    call = body["messages"][-2]["tool_calls"][0]
    assert call["function"] == {"name": "ToolSearch", "arguments": '{"query":"select:WebFetch","max_results":5}'}


def test_write_tool_result() -> None:
    body, _ = build(reference("request-after-write"), PROVIDER, "m", stream=True)
    assert body["messages"][-1]["role"] == "tool"
    assert body["messages"][-1]["content"].startswith("File created successfully")


@pytest.mark.parametrize(("mode", "expect"), [("keep", "system"), ("user", "user"), ("merge", None)])
def test_system_turns(mode: str, expect: str | None) -> None:
    req = reference("request-1")
    body, _ = build(req, replace(PROVIDER, system_turns=mode), "m", stream=False)
    roles = [m["role"] for m in body["messages"]]
    if expect is None:
        assert roles == ["system", "user"]
        assert "# Environment" in body["messages"][0]["content"]
    else:
        assert roles == ["system", "user", expect]


def test_reasoning_effort_only_when_provider_has_it() -> None:
    req = reference("request-1")  # adaptive thinking with output_config.effort = high
    body, _ = build(req, replace(PROVIDER, reasoning_control="reasoning_effort"), "m", stream=False)
    assert body["reasoning_effort"] == "high"
    req = {"model": "x", "max_tokens": 10, "messages": [{"role": "user", "content": "q"}],
           "thinking": {"type": "enabled", "budget_tokens": 2000}}
    assert build(req, replace(PROVIDER, reasoning_control="reasoning_effort"), "m", False)[0]["reasoning_effort"] == "low"
    assert "reasoning_effort" not in build(req, PROVIDER, "m", False)[0]


def test_thinking_sent_back_as_reasoning_content_when_required() -> None:
    req = {"model": "x", "max_tokens": 10, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"},
                                          {"type": "tool_use", "id": "c1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "done"}]}]}
    plain, _ = build(req, PROVIDER, "m", False)
    assert "reasoning_content" not in plain["messages"][1]
    deepseek, _ = build(req, replace(PROVIDER, reasoning_return=True), "m", False)
    assert deepseek["messages"][1]["reasoning_content"] == "hmm"
    assert deepseek["messages"][1]["content"] is None


def test_unanswered_and_orphan_tool_calls_are_repaired() -> None:
    req = {"model": "x", "max_tokens": 10, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {}},
                                          {"type": "tool_use", "id": "c2", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "one", "is_error": True},
                                     {"type": "tool_result", "tool_use_id": "zz", "content": "stray"}]}]}
    body, _ = build(req, PROVIDER, "m", False)
    msgs = body["messages"]
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": "Error: one"}
    assert msgs[3]["role"] == "tool" and msgs[3]["tool_call_id"] == "c2"  # every call answered
    assert msgs[4]["role"] == "user" and "stray" in msgs[4]["content"]


def test_tool_results_of_every_shape_in_every_format() -> None:
    """A string result (plain, empty, an error), a list of blocks, and a result for a call never made: each build
    takes a string result as it is without building parts (bench/README.md, session 7), and it must come out as
    the general path gives it, in every translated format."""
    from relay.formats.gemini.request import build as gemini_build
    from relay.formats.openai_responses.request import build as responses_build

    calls = [{"type": "tool_use", "id": f"c{i}", "name": "f", "input": {}} for i in range(1, 5)]
    req = {"model": "x", "max_tokens": 10, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": calls},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "one", "is_error": True},
            {"type": "tool_result", "tool_use_id": "c2", "content": ""},
            {"type": "tool_result", "tool_use_id": "c3", "content": [{"type": "text", "text": "see"}]},
            {"type": "tool_result", "tool_use_id": "c4", "content": "plain"},
            {"type": "tool_result", "tool_use_id": "zz", "content": "stray"}]}]}
    stray = "[result of tool call zz]\nstray"

    msgs = build(req, PROVIDER, "m", False)[0]["messages"]
    assert [(m["tool_call_id"], m["content"]) for m in msgs[2:6]] == [
        ("c1", "Error: one"), ("c2", ""), ("c3", "see"), ("c4", "plain")]
    assert msgs[6:] == [{"role": "user", "content": stray}]

    items = responses_build(req, PROVIDER, "m", False)[0]["input"]
    outputs = [(i["call_id"], i["output"]) for i in items if i.get("type") == "function_call_output"]
    assert outputs == [("c1", "Error: one"), ("c2", ""), ("c3", "see"), ("c4", "plain")]
    assert items[-1] == {"role": "user", "content": [{"type": "input_text", "text": stray}]}

    contents = gemini_build(req, PROVIDER, "m", False)[0]["contents"]
    answers = contents[-1]["parts"]
    assert [p["functionResponse"]["response"] for p in answers[:4]] == [
        {"error": "one"}, {"output": ""}, {"output": "see"}, {"output": "plain"}]
    assert answers[4:] == [{"text": stray}]


def test_tool_result_images_follow_as_user_message() -> None:
    req = {"model": "x", "max_tokens": 10, "messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "c1", "name": "shot", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "c1", "content": [
            {"type": "text", "text": "see"},
            {"type": "image", "source": {"type": "url", "url": "https://e/x.png"}}]}]}]}
    msgs = build(req, PROVIDER, "m", False)[0]["messages"]
    assert msgs[2] == {"role": "tool", "tool_call_id": "c1", "content": "see"}
    assert msgs[3]["role"] == "user"
    assert msgs[3]["content"][1] == {"type": "image_url", "image_url": {"url": "https://e/x.png"}}


def test_fields_and_caps() -> None:
    req = {"model": "x", "max_tokens": 100000, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBER"}},
        {"type": "text", "text": "sum", "cache_control": {"type": "ephemeral"}}]}],
        "stop_sequences": ["END"], "temperature": 0.2, "top_p": 0.9, "top_k": 5,
        "tools": [{"type": "web_search_20250305", "name": "web_search"}, {"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    body, dropped = build(req, replace(PROVIDER, max_tokens_cap=8192, max_tokens_field="max_completion_tokens"), "m", False)
    assert body["max_completion_tokens"] == 8192 and "max_tokens" not in body
    assert body["stop"] == ["END"] and body["temperature"] == 0.2 and body["top_p"] == 0.9 and "top_k" not in body
    assert [t["function"]["name"] for t in body["tools"]] == ["f"]
    assert body["tool_choice"] == "auto" and body["parallel_tool_calls"] is False
    assert body["messages"][0]["content"][0]["type"] == "file"
    assert any("web_search" in d for d in dropped)


@pytest.mark.parametrize("req", [
    {"model": "x", "max_tokens": 1, "messages": "nope"},
    {"model": "x", "max_tokens": 0, "messages": []},
    {"model": "x", "max_tokens": 1, "messages": [{"role": "user"}]},
    {"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"model": "x", "max_tokens": 1, "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": 3}]}]},
    {"model": "x", "max_tokens": 1, "messages": [], "tools": [{"description": "no name"}]},
    {"model": "x", "max_tokens": 1, "messages": [], "temperature": "hot"},
    {"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "q"}],
     "tools": [{"name": "f", "input_schema": ["not", "an", "object"]}]},
])
def test_invalid_requests_raise_400(req: dict[str, Any]) -> None:
    with pytest.raises(RelayError) as info:
        build(req, PROVIDER, "m", False)
    assert info.value.status == 400 and info.value.error_type == "invalid_request_error"


def test_tools_schemas_in_every_format() -> None:
    """A tool's schema goes on as it came (the request's own object, unchanged: builds pass the usual tool on
    without a copy, bench/README.md session 8); a tool without one gets an empty object schema."""
    import copy

    from relay.formats.gemini.request import build as gemini_build
    from relay.formats.openai_responses.request import build as responses_build

    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    req = {"model": "x", "max_tokens": 10, "messages": [{"role": "user", "content": "q"}],
           "tools": [{"name": "f", "description": "finds", "input_schema": schema}, {"name": "g"}]}
    before = copy.deepcopy(req)
    empty = {"type": "object", "properties": {}}

    tools = build(req, PROVIDER, "m", False)[0]["tools"]
    assert [t["function"] for t in tools] == [{"name": "f", "parameters": schema, "description": "finds"},
                                              {"name": "g", "parameters": empty}]
    tools = responses_build(req, PROVIDER, "m", False)[0]["tools"]
    assert [(t["name"], t["parameters"]) for t in tools] == [("f", schema), ("g", empty)]
    declarations = gemini_build(req, PROVIDER, "m", False)[0]["tools"][0]["functionDeclarations"]
    assert [d["name"] for d in declarations] == ["f", "g"]
    assert declarations[0]["parameters"]["required"] == ["q"]
    assert req == before
