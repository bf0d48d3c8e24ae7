"""Scripted replies in relay's other upstream formats (native Gemini, OpenAI Responses, Anthropic), for the
same loopback ``MockUpstream``, and a relay configured for each format in front of it."""

from __future__ import annotations

from typing import Any

import anthropic
import orjson
import trio

from tests.conftest import RELAY_KEY, UPSTREAM_KEY, RelayHandle, start_relay
from tests.mock_upstream import MockUpstream, Reply

PREFIX = {"openai": "/v1", "gemini": "/v1beta", "openai-responses": "/v1", "anthropic": ""}


def format_config(upstream: MockUpstream, fmt: str, extra_provider: str = "") -> str:
    return f"""
[server]
api_keys = ["{RELAY_KEY}"]

[providers.up]
format = "{fmt}"
base_url = "http://127.0.0.1:{upstream.port}{PREFIX[fmt]}"
api_key = "{UPSTREAM_KEY}"
models = ["up-model"]
read_timeout = 5
{extra_provider}

[models]
"alias-model" = "up/real-upstream-model"

[routes]
default = "up/up-model"
"""


async def format_relay(nursery: trio.Nursery, upstream: MockUpstream, fmt: str, extra_provider: str = "") -> RelayHandle:
    return await start_relay(nursery, format_config(upstream, fmt, extra_provider))


def client(relay: RelayHandle) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=relay.url, api_key=RELAY_KEY, max_retries=0, timeout=20)


async def run(fn: Any) -> Any:
    """The synchronous SDK off the event loop."""
    return await trio.to_thread.run_sync(fn)


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` as the reads a split at ``cuts`` would deliver."""
    edges = [0, *sorted(set(cuts)), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def sse_reply(events: list[bytes]) -> Reply:
    return Reply(pieces=list(events))


# ---- Gemini --------------------------------------------------------------------------------------------

def gemini_chunk(*parts: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None,
                 response_id: str = "resp-1", **extra: Any) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": list(parts), "role": "model"}, "index": 0}
    if finish:
        candidate["finishReason"] = finish
    doc: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-x", "responseId": response_id, **extra}
    if usage is not None:
        doc["usageMetadata"] = usage
    return doc


def gemini_sse(*chunks: dict[str, Any]) -> Reply:
    """Gemini frames its SSE with CRLF."""
    return sse_reply([b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in chunks])


def gemini_usage(prompt: int = 10, output: int = 5, cached: int = 0, thoughts: int = 0) -> dict[str, int]:
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output + thoughts}
    if cached:
        usage["cachedContentTokenCount"] = cached
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


# ---- OpenAI Responses ---------------------------------------------------------------------------------

def responses_sse(*events: dict[str, Any]) -> Reply:
    return sse_reply([b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events])


def response_obj(output: list[dict[str, Any]] | None = None, status: str = "completed", usage: tuple[int, int, int] = (10, 5, 0),
                 **extra: Any) -> dict[str, Any]:
    return {"id": "resp_1", "object": "response", "status": status, "model": "gpt-x", "output": output or [],
            "usage": {"input_tokens": usage[0], "input_tokens_details": {"cached_tokens": usage[2]},
                      "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": usage[0] + usage[1]}, **extra}


def created() -> dict[str, Any]:
    return {"type": "response.created", "response": {**response_obj(status="in_progress"), "usage": None}}


def completed(output: list[dict[str, Any]] | None = None, **kwargs: Any) -> dict[str, Any]:
    return {"type": "response.completed", "response": response_obj(output, **kwargs)}


def text_events(*texts: str, index: int = 0) -> list[dict[str, Any]]:
    item = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": "".join(texts), "annotations": []}]}
    return [{"type": "response.output_item.added", "output_index": index, "item": {**item, "content": []}},
            *({"type": "response.output_text.delta", "output_index": index, "item_id": "msg_1", "content_index": 0,
               "delta": t} for t in texts),
            {"type": "response.output_item.done", "output_index": index, "item": item}]


def call_events(call_id: str, name: str, *fragments: str, index: int = 0) -> list[dict[str, Any]]:
    item = {"id": f"fc_{call_id}", "type": "function_call", "call_id": call_id, "name": name,
            "arguments": "".join(fragments), "status": "completed"}
    return [{"type": "response.output_item.added", "output_index": index, "item": {**item, "arguments": ""}},
            *({"type": "response.function_call_arguments.delta", "output_index": index, "item_id": item["id"],
               "delta": f} for f in fragments),
            {"type": "response.function_call_arguments.done", "output_index": index, "item_id": item["id"],
             "arguments": item["arguments"]},
            {"type": "response.output_item.done", "output_index": index, "item": item}]


def reasoning_events(*summary: str, encrypted: str | None = "gAAAA-enc", index: int = 0) -> list[dict[str, Any]]:
    item = {"id": "rs_1", "type": "reasoning", "encrypted_content": encrypted,
            "summary": [{"type": "summary_text", "text": "".join(summary)}]}
    return [{"type": "response.output_item.added", "output_index": index,
             "item": {**item, "summary": [], "encrypted_content": None}},
            {"type": "response.reasoning_summary_part.added", "output_index": index, "item_id": "rs_1",
             "summary_index": 0, "part": {"type": "summary_text", "text": ""}},
            *({"type": "response.reasoning_summary_text.delta", "output_index": index, "item_id": "rs_1",
               "summary_index": 0, "delta": s} for s in summary),
            {"type": "response.output_item.done", "output_index": index, "item": item}]


# ---- Anthropic ------------------------------------------------------------------------------------------

def anthropic_sse(*events: dict[str, Any]) -> Reply:
    return sse_reply([b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events])


def anthropic_text_events(text: str, model: str = "real-upstream-model", usage: tuple[int, int] = (12, 4)) -> list[dict[str, Any]]:
    return [
        {"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant", "model": model,
                                              "content": [], "stop_reason": None, "stop_sequence": None,
                                              "usage": {"input_tokens": usage[0], "output_tokens": 1,
                                                        "cache_read_input_tokens": 0}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": usage[1]}},
        {"type": "message_stop"},
    ]
