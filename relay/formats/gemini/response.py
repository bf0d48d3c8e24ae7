"""Gemini ``generateContent`` JSON -> Anthropic Message."""

from __future__ import annotations

from typing import Any

from relay.errors import RelayError, from_stream_error, retry_after_header
from relay.formats import anthropic as A
from relay.formats.gemini.common import blocked, part_ops, stop_reason, usage_numbers


def error_of(doc: dict[str, Any], secrets: tuple[str, ...], provider: str) -> RelayError:
    """Google's ``{"error":{"code","message","status","details"}}``, with RetryInfo as Retry-After."""
    err = from_stream_error(doc, secrets, provider)
    if err.status == 429:
        err.headers = retry_after_header(doc)
    return err


def candidate_of(doc: dict[str, Any]) -> dict[str, Any]:
    candidates = doc.get("candidates")
    if isinstance(candidates, list):
        for candidate in candidates:
            if isinstance(candidate, dict) and candidate.get("index", 0) == 0:
                return candidate
    return {}


def translate(doc: Any, model: str, *, secrets: tuple[str, ...] = (), provider: str = "upstream",
              message_id: str | None = None) -> dict[str, Any]:
    if isinstance(doc, list) and len(doc) == 1:
        doc = doc[0]  # a streamGenerateContent answer without alt=sse is a JSON array of chunks
    if not isinstance(doc, dict):
        raise RelayError(502, f"{provider}: the upstream answered with something that is not a Gemini response", "api_error")
    if "error" in doc and not doc.get("candidates"):
        raise error_of(doc, secrets, provider)
    candidate = candidate_of(doc)
    content = candidate["content"] if isinstance(candidate.get("content"), dict) else {}
    blocks: list[dict[str, Any]] = []
    saw_tool = False
    for op in part_ops(content.get("parts"), str(doc.get("responseId") or ""), 0):
        kind = op[0]
        last = blocks[-1] if blocks else None
        if kind == "thinking":
            if last is not None and last["type"] == "thinking" and not last["signature"]:
                last["thinking"] += op[1]
                last["signature"] = op[2] or ""
            else:
                blocks.append({"type": "thinking", "thinking": op[1], "signature": op[2] or ""})
        elif kind == "text":
            if last is not None and last["type"] == "text":
                last["text"] += op[1]
            else:
                blocks.append({"type": "text", "text": op[1]})
        elif kind == "signature":
            if op[2] and last is not None and last["type"] == "thinking" and not last["signature"]:
                last["signature"] = op[1]
            else:
                blocks.append({"type": "thinking", "thinking": "", "signature": op[1]})
        else:
            saw_tool = True
            blocks.append({"type": "tool_use", "id": op[1], "name": op[2], "input": op[3]})
    for block in blocks:
        if block["type"] == "thinking" and not block["signature"]:
            block["signature"] = A.thinking_signature()
    input_tokens, output_tokens, cached = usage_numbers(doc.get("usageMetadata"))
    return A.message(
        message_id or A.message_id(),
        model,
        blocks,
        stop_reason(candidate.get("finishReason"), saw_tool, blocked(doc)),
        None,
        A.usage_dict(input_tokens, output_tokens, cached),
    )
