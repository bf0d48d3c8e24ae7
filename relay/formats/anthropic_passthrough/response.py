"""A non-streamed Anthropic Message from the upstream: already the answer, with the client's model name."""

from __future__ import annotations

from typing import Any

from relay.errors import RelayError, from_anthropic_error


def translate(doc: Any, model: str, *, secrets: tuple[str, ...] = (), provider: str = "upstream") -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise RelayError(502, f"{provider}: the upstream answered with something that is not a message", "api_error")
    if doc.get("type") == "error" or ("error" in doc and "content" not in doc):
        raise from_anthropic_error(doc, secrets, provider)
    doc["model"] = model
    usage = doc.get("usage")
    if not isinstance(usage, dict):
        usage = doc["usage"] = {}
    for key in ("input_tokens", "output_tokens"):
        if not isinstance(usage.get(key), int):
            usage[key] = 0
    return doc
