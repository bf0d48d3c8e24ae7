"""The client's request, re-targeted: its bytes with the model name swapped, and the headers Anthropic's API
reads. The client's own key is never among them (upstream.py sends only the provider's key).

Re-targeting splices bytes instead of re-serialising when that is certainly safe: when ``"model"`` is the first
key of the body (Claude Code writes it first) it is found at a fixed place, with no scan of the body. Anything
else (another key order, a max_tokens relay lowered or capped) goes through one orjson round trip.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from relay.config import Provider
from relay.formats.base import ClientRequest

MESSAGES_PATH = "/v1/messages"
COUNT_PATH = "/v1/messages/count_tokens"
DEFAULT_VERSION = b"2023-06-01"
_FIRST_KEY_MODEL = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"model"[ \t\r\n]*:[ \t\r\n]*')
# What Anthropic's API reads from request headers; everything else the client sent stays with relay.
FORWARDED = (b"anthropic-version", b"anthropic-beta")


def retarget(req: dict[str, Any], provider: Provider, model: str, client: ClientRequest | None) -> bytes:
    """The body for the upstream (a Messages or a count_tokens request alike)."""
    cap = provider.max_tokens_cap
    max_tokens = req.get("max_tokens")
    capped = cap is not None and isinstance(max_tokens, int) and max_tokens > cap
    if client is not None and req is client.json and not capped:
        if req.get("model") == model:
            return client.body
        spliced = _splice_model(client.body, req.get("model"), model)
        if spliced is not None:
            return spliced
    doc = {**req, "model": model}
    if capped:
        doc["max_tokens"] = cap
    return orjson.dumps(doc)


def _splice_model(body: bytes, old: Any, new: str) -> bytes | None:
    """The body with its first key's value replaced, when that key is ``"model"`` holding exactly ``old``."""
    if not isinstance(old, str):
        return None
    m = _FIRST_KEY_MODEL.match(body)
    if m is None:
        return None
    start = m.end()
    encoded = orjson.dumps(old)
    if not body.startswith(encoded, start):
        return None  # the client escaped the name some other way: re-serialise rather than guess
    return body[:start] + orjson.dumps(new) + body[start + len(encoded):]


def forwarded_headers(client: ClientRequest | None) -> list[tuple[bytes, bytes]]:
    headers = [(name, value) for name, value in (client.headers if client else ()) if name in FORWARDED]
    if not any(name == b"anthropic-version" for name, _ in headers):
        headers.append((b"anthropic-version", DEFAULT_VERSION))  # Anthropic's API refuses a request without it
    return headers
