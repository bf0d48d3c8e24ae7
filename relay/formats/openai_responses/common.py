"""Pieces shared by the Responses request, response and stream translators: usage, stop reasons, errors,
and the reasoning item carried in a thinking block's signature.

Reasoning. With ``store: false`` nothing stays on OpenAI's side, so a reasoning model's chain of thought is
continued only by sending its reasoning item back with ``encrypted_content`` (asked for with
``include: ["reasoning.encrypted_content"]``). relay puts that blob in the thinking block's signature
(``relay-oair:<blob>``); Claude Code echoes it on the next request and it goes back as a reasoning item, without
its ``id`` (an id makes OpenAI look the item up in storage, which ``store: false`` never filled).
"""

from __future__ import annotations

from typing import Any

from relay.errors import RelayError, from_stream_error, redact
from relay.overflow import detect

SIGNATURE_PREFIX = "relay-oair:"

# Responses error codes (in ``error`` events and ``response.failed``) -> HTTP status.
CODES = {
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "server_is_overloaded": 529,
    "slow_down": 529,
    "invalid_prompt": 400,
    "invalid_request_error": 400,
    "context_length_exceeded": 400,
    "invalid_image": 400,
    "invalid_image_format": 400,
    "image_too_large": 400,
    "vector_store_timeout": 504,
}
INCOMPLETE = {"max_output_tokens": "max_tokens", "content_filter": "refusal"}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def usage_numbers(usage: Any) -> tuple[int, int, int]:
    """(input not read from cache, output including reasoning, cache read)."""
    if not isinstance(usage, dict):
        return 0, 0, 0
    prompt = _int(usage.get("input_tokens"))
    details = usage.get("input_tokens_details")
    cached = min(_int(details.get("cached_tokens")) if isinstance(details, dict) else 0, prompt)
    return prompt - cached, _int(usage.get("output_tokens")), cached


def stop_reason(response: Any, saw_tool: bool) -> str:
    if isinstance(response, dict) and response.get("status") == "incomplete":
        details = response.get("incomplete_details")
        reason = details.get("reason") if isinstance(details, dict) else None
        return INCOMPLETE.get(str(reason), "max_tokens")
    return "tool_use" if saw_tool else "end_turn"


def error_of(err: Any, secrets: tuple[str, ...], provider: str) -> RelayError:
    """An ``error`` event, or ``response.error`` of a failed response: ``{"code","message"}``."""
    if not isinstance(err, dict):
        return RelayError(502, f"{provider}: the upstream reported a failure without details", "api_error")
    if isinstance(err.get("error"), dict):
        err = err["error"]
    code = err.get("code") or err.get("type")
    status = CODES.get(str(code))
    if status is None:
        return from_stream_error({"error": err}, secrets, provider)
    message = err.get("message") if isinstance(err.get("message"), str) else str(code)
    out = RelayError(status, redact(f"{provider}: {message}", secrets))
    out.overflow = detect(message, {"error": err})
    return out


def encode_reasoning(encrypted: str) -> str:
    return SIGNATURE_PREFIX + encrypted


def decode_reasoning(signature: Any) -> str | None:
    if isinstance(signature, str) and signature.startswith(SIGNATURE_PREFIX) and len(signature) > len(SIGNATURE_PREFIX):
        return signature[len(SIGNATURE_PREFIX):]
    return None


def summary_text(item: dict[str, Any]) -> str:
    """A reasoning item's summaries (or raw reasoning text, from servers that send it) as one text."""
    texts = [s.get("text", "") for s in item.get("summary") or () if isinstance(s, dict)]
    if not any(texts):
        texts = [c.get("text", "") for c in item.get("content") or () if isinstance(c, dict)]
    return "\n\n".join(t for t in texts if isinstance(t, str) and t)
