"""OpenAI Chat Completions JSON response -> Anthropic Message."""

from __future__ import annotations

from typing import Any

import orjson

from relay.errors import RelayError, from_stream_error
from relay.formats import anthropic as A
from relay.formats.openai_chat.common import (
    ThinkSplitter,
    content_parts,
    matched_stop,
    reasoning_of,
    stop_reason,
    text_field,
    usage_numbers,
)


def parse_arguments(raw: Any) -> dict[str, Any]:
    """Tool arguments as an object. Unparsable arguments are kept (not a crash), so the client can show the
    model its own malformed call and the model can retry."""
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str) or not raw.strip():
        return {}
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return {"_unparsed_arguments": raw}
    return value if isinstance(value, dict) else {"value": value}


def translate(
    doc: Any,
    model: str,
    *,
    think_tags: bool = False,
    stop_sequences: tuple[str, ...] = (),
    secrets: tuple[str, ...] = (),
    provider: str = "upstream",
    message_id: str | None = None,
) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise RelayError(502, f"{provider}: the upstream answered with something that is not a chat completion", "api_error")
    if "error" in doc and not doc.get("choices"):
        raise from_stream_error(doc, secrets, provider)
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RelayError(502, f"{provider}: the upstream response has no choices", "api_error")
    choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), choices[0])
    if choice.get("finish_reason") == "error" or "error" in choice:
        raise from_stream_error(choice if "error" in choice else doc, secrets, provider)
    message = choice.get("message")
    if not isinstance(message, dict):
        message = {}

    content: list[dict[str, Any]] = []

    def add(kind: str, text: str) -> None:
        if not text:
            return
        if content and content[-1]["type"] == kind:
            content[-1][kind] += text
        elif kind == "text":
            content.append({"type": "text", "text": text})
        else:
            content.append({"type": "thinking", "thinking": text, "signature": ""})

    reasoning, signature = reasoning_of(message)
    add("thinking", reasoning)
    pieces = content_parts(message.get("content"))
    if think_tags:
        splitter = ThinkSplitter()
        split: list[tuple[str, str]] = []
        for kind, text in pieces:
            split.extend(splitter.feed(text) if kind == "text" else [(kind, text)])
        pieces = split + splitter.flush()
    for kind, text in pieces:
        add(kind, text)
    refusal = message.get("refusal")
    if isinstance(refusal, str):
        add("text", refusal)
    for block in content:
        if block["type"] == "thinking":
            block["signature"] = signature or A.thinking_signature()

    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        calls = None
    saw_tool = False
    if isinstance(calls, list):
        for call in calls:
            if not isinstance(call, dict):
                continue
            function = call["function"] if isinstance(call.get("function"), dict) else {}
            saw_tool = True
            content.append({
                "type": "tool_use",
                "id": text_field(call.get("id")) or A.tool_use_id(),
                "name": text_field(function.get("name")),
                "input": parse_arguments(function.get("arguments")),
            })

    usage = doc.get("usage") if isinstance(doc.get("usage"), dict) else choice.get("usage")
    input_tokens, output_tokens, cached = usage_numbers(usage) if isinstance(usage, dict) else (0, 0, 0)
    matched = matched_stop(choice, stop_sequences)
    return A.message(
        message_id or A.message_id(),
        model,
        content,
        stop_reason(choice.get("finish_reason"), saw_tool, matched),
        matched,
        A.usage_dict(input_tokens, output_tokens, cached),
    )
