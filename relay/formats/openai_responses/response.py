"""OpenAI Responses JSON (a ``response`` object) -> Anthropic Message."""

from __future__ import annotations

from typing import Any

from relay.errors import RelayError
from relay.formats import anthropic as A
from relay.formats.openai_chat.response import parse_arguments
from relay.formats.openai_responses.common import encode_reasoning, error_of, stop_reason, summary_text, usage_numbers


def translate(doc: Any, model: str, *, secrets: tuple[str, ...] = (), provider: str = "upstream",
              message_id: str | None = None) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise RelayError(502, f"{provider}: the upstream answered with something that is not a response", "api_error")
    if doc.get("status") == "failed" or (doc.get("error") and not doc.get("output")):
        raise error_of(doc.get("error"), secrets, provider)
    content: list[dict[str, Any]] = []
    saw_tool = False
    for item in doc.get("output") or ():
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "reasoning":
            encrypted = item.get("encrypted_content")
            text = summary_text(item)
            if text or encrypted:
                signature = encode_reasoning(encrypted) if isinstance(encrypted, str) and encrypted else A.thinking_signature()
                content.append({"type": "thinking", "thinking": text, "signature": signature})
        elif kind == "message":
            for part in item.get("content") or ():
                if not isinstance(part, dict):
                    continue
                value = part.get("text") if part.get("type") == "output_text" else part.get("refusal")
                if isinstance(value, str) and value:
                    if content and content[-1]["type"] == "text":
                        content[-1]["text"] += value
                    else:
                        content.append({"type": "text", "text": value})
        elif kind == "function_call":
            saw_tool = True
            content.append({"type": "tool_use", "id": str(item.get("call_id") or item.get("id") or A.tool_use_id()),
                            "name": str(item.get("name") or ""), "input": parse_arguments(item.get("arguments"))})
    input_tokens, output_tokens, cached = usage_numbers(doc.get("usage"))
    return A.message(message_id or A.message_id(), model, content, stop_reason(doc, saw_tool), None,
                     A.usage_dict(input_tokens, output_tokens, cached))
