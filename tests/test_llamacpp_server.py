"""relay against a real local server: llama-cpp-python's OpenAI server (0.3.x) with SmolLM2-135M (issue 13 item 5,
issue 18 items 2-4). Every case sends the same request straight to the server and through relay, and compares.

What the server does, measured: it answers an assistant turn whose `content` is null beside `tool_calls` with a 500
(pydantic wants a string) and takes ""; it ignores `stream_options.include_usage` (its streams carry no usage); a
prompt over its window gets a 400 `context_length_exceeded` when not streamed, and, when streamed, a 200 whose stream
ends with nothing in it; it says nothing of its window anywhere (`/v1/models` has only ids), so relay cannot learn it.
"""

from __future__ import annotations

import logging
from typing import Any

import anthropic
import orjson
import pytest
import trio

from relay.tokens import text_tokens
from tests.conftest import RELAY_KEY, start_relay
from tests.local_llm import LlamaServer

QUESTION = [{"role": "user", "content": "Name three colours."}]
TOOL = {"name": "calc", "description": "Evaluate arithmetic", "input_schema": {
    "type": "object", "properties": {"expr": {"type": "string"}}, "required": ["expr"]}}
TOOL_LOOP = [  # Claude Code's second turn of a tool loop: the call (no text beside it), then its result
    {"role": "user", "content": "What is 2+2? Use the calc tool."},
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "calc", "input": {"expr": "2+2"}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "4"}]},
]
OPENAI_TOOL_LOOP = [
    {"role": "user", "content": "What is 2+2? Use the calc tool."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "calc", "arguments": '{"expr":"2+2"}'}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": "4"},
]
OPENAI_TOOLS = [{"type": "function", "function": {"name": "calc", "parameters": TOOL["input_schema"],
                                                  "description": TOOL["description"]}}]
# Digits tokenize one per character on SmolLM2 while relay's estimate counts four per token: a prompt relay thinks
# fits (~6000 of 8192) that really is ~24000 tokens. The window relay knows is the server's.
OVERSIZED = [{"role": "user", "content": "1234567890" * 2400}]


def config(server: LlamaServer, window: bool = True) -> str:
    return f"""
[server]
api_keys = ["{RELAY_KEY}"]

[providers.local]
preset = "llamacpp"
base_url = "{server.url}"
{f"context_window = {server.n_ctx}" if window else ""}
retries = 2

[routes]
default = "local/smollm2"
"""


def direct_stream_text(server: LlamaServer, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """Asked twice, the second answer kept: the server's first answer to a prompt differs from later identical ones
    (measured; it reuses the previous prompt's cache), and relay's request, sent next, is such a later one."""
    server.chat({**body, "stream": True})
    status, raw = server.chat({**body, "stream": True})
    text = ""
    for line in raw.split(b"\n"):
        if line.startswith(b"data: {"):
            choice = (orjson.loads(line[6:]).get("choices") or [{}])[0]
            text += (choice.get("delta") or {}).get("content") or ""
    return status, text, raw


def through_relay(port: int, **request: Any) -> anthropic.types.Message:
    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key=RELAY_KEY, max_retries=0)
    with client.messages.stream(model="claude-sonnet-5-5", extra_body={"temperature": 0}, **request) as stream:
        return stream.get_final_message()


async def test_text_stream_matches_the_server_direct(nursery: trio.Nursery, llama_server: LlamaServer) -> None:
    status, direct, raw = await trio.to_thread.run_sync(direct_stream_text, llama_server, {
        "model": "smollm2", "messages": QUESTION, "max_tokens": 24, "temperature": 0})
    assert status == 200 and direct and b'"usage"' not in raw  # and no usage in the stream, as the docstring says
    relay = await start_relay(nursery, config(llama_server))
    message = await trio.to_thread.run_sync(lambda: through_relay(relay.port, max_tokens=24, messages=QUESTION))
    assert message.content[0].type == "text" and message.content[0].text == direct
    assert message.stop_reason == "max_tokens"
    # no usage from the server: relay's estimate of what streamed, never a 0
    assert message.usage.output_tokens == text_tokens(direct) > 0


async def test_tool_loop_second_turn(nursery: trio.Nursery, llama_server: LlamaServer) -> None:
    """The second turn of a tool loop: relay sends content "" beside the tool call (the llamacpp preset), which the
    server takes; null, OpenAI's own form, gets its 500."""
    body = {"model": "smollm2", "messages": OPENAI_TOOL_LOOP, "tools": OPENAI_TOOLS, "max_tokens": 24,
            "temperature": 0}
    status, direct, _ = await trio.to_thread.run_sync(direct_stream_text, llama_server, body)
    assert status == 200
    null_content = [{**m, "content": None} if m.get("tool_calls") else m for m in OPENAI_TOOL_LOOP]
    refused, _ = await trio.to_thread.run_sync(llama_server.chat, {**body, "messages": null_content})
    assert refused == 500, "the server takes null now: the tool_call_content quirk may be dropped for it"
    relay = await start_relay(nursery, config(llama_server))
    message = await trio.to_thread.run_sync(lambda: through_relay(
        relay.port, max_tokens=24, messages=TOOL_LOOP, tools=[TOOL]))
    texts = "".join(b.text for b in message.content if b.type == "text")
    assert texts == direct and direct


async def test_a_streamed_overflow_is_answered_as_prompt_too_long(nursery: trio.Nursery, llama_server: LlamaServer,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The server starts a 200 stream and ends it empty; with the window known, relay answers what Claude Code
    compacts on, at once and without retrying a request that would fail the same way."""
    status, text, raw = await trio.to_thread.run_sync(direct_stream_text, llama_server, {
        "model": "smollm2", "messages": OVERSIZED, "max_tokens": 16})
    assert status == 200 and text == "" and b"data:" not in raw  # the server's own answer: 200, then nothing
    status, raw = await trio.to_thread.run_sync(llama_server.chat, {
        "model": "smollm2", "messages": OVERSIZED, "max_tokens": 16})
    assert status == 400 and b"context_length_exceeded" in raw  # not streamed: it says so
    relay = await start_relay(nursery, config(llama_server))
    caplog.set_level(logging.INFO, logger="relay")
    before = len([r for r in caplog.records if "failed with" in r.getMessage()])
    for stream in (True, False):
        client = anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0)
        with pytest.raises(anthropic.BadRequestError) as info:
            def call() -> None:
                if stream:
                    with client.messages.stream(model="m", max_tokens=16, messages=OVERSIZED) as s:
                        s.get_final_message()
                else:
                    client.messages.create(model="m", max_tokens=16, messages=OVERSIZED)
            await trio.to_thread.run_sync(call)
        message = info.value.body["error"]["message"]  # type: ignore[index]
        assert message.startswith("prompt is too long: ") and message.endswith(f"> {llama_server.n_ctx} maximum")
    assert len([r for r in caplog.records if "failed with" in r.getMessage()]) == before  # nothing was retried


async def test_a_streamed_overflow_with_no_known_window_says_what_to_set(
        nursery: trio.Nursery, llama_server: LlamaServer, caplog: pytest.LogCaptureFixture) -> None:
    """Without a window relay cannot tell an overflow from a broken server: a 400 (which Claude Code shows and does
    not retry, tests/e2e/test_first_hour.py) that says what to set, and no retry of a request the server will answer
    the same empty way."""
    relay = await start_relay(nursery, config(llama_server, window=False))
    caplog.set_level(logging.INFO, logger="relay")
    client = anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0)

    def call() -> None:
        with client.messages.stream(model="m", max_tokens=16, messages=OVERSIZED) as s:
            s.get_final_message()

    with pytest.raises(anthropic.BadRequestError) as info:
        await trio.to_thread.run_sync(call)
    assert info.value.status_code == 400 and info.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "set context_window" in str(info.value) and "ended without any data" in str(info.value)
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    warned = [r for r in caplog.records if "could not learn the context window" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING  # the preset asked the server: it cannot say
