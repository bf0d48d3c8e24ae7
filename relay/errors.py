"""Anthropic error types, the HTTP status mapping, and turning any upstream error body into one of ours.

Every failure a client sees has the Anthropic shape
``{"type":"error","error":{"type":...,"message":...}}`` with the matching status, whether the fault is the
client's, relay's, or the upstream's.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import orjson

from relay import output_cap
from relay.overflow import Overflow, detect

# status -> Anthropic error type (docs: "Errors"; 400 is also used for unlisted 4xx)
STATUS_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def type_for_status(status: int) -> str:
    if status in STATUS_TYPES:
        return STATUS_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


class RelayError(Exception):
    """An error that becomes an Anthropic error response (or an ``event: error`` mid-stream)."""

    def __init__(
        self,
        status: int,
        message: str,
        error_type: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or type_for_status(status)
        self.headers = headers or []
        self.overflow: Overflow | None = None  # the upstream said the context window overflowed
        self.output_cap: int | None = None  # the upstream refused max_tokens and said the most it accepts
        self.refusal = False  # relay refused the request itself: the upstream never saw it
        self.empty = False  # the upstream answered 200 and then nothing at all

    def body(self, request_id: str | None = None) -> bytes:
        doc: dict[str, Any] = {"type": "error", "error": {"type": self.error_type, "message": self.message}}
        if request_id:
            doc["request_id"] = request_id
        return orjson.dumps(doc)

    def sse(self) -> bytes:
        return b"event: error\ndata: " + self.body() + b"\n\n"


def invalid(message: str) -> RelayError:
    return RelayError(400, message, "invalid_request_error")


# Upstream statuses that do not map one to one onto an Anthropic status.
_UPSTREAM_STATUS = {422: 400, 502: 500, 520: 500, 522: 504, 524: 504}


def _message_from(doc: Any, depth: int = 0) -> str | None:
    """Dig the human message out of the many error shapes providers use."""
    if depth > 4:
        return None
    if isinstance(doc, list):
        for item in doc:  # Gemini's OpenAI endpoint wraps the error in an array
            found = _message_from(item, depth + 1)
            if found:
                return found
        return None
    if isinstance(doc, str):
        return doc or None
    if not isinstance(doc, dict):
        return None
    err = doc.get("error")
    if err is not None and err is not doc:
        found = _message_from(err, depth + 1)
        if found:
            # OpenRouter: "Provider returned error" with the provider's own body in metadata.raw
            raw = err.get("metadata", {}).get("raw") if isinstance(err, dict) and isinstance(err.get("metadata"), dict) else None
            if isinstance(raw, str) and raw:
                inner = raw
                try:
                    inner = _message_from(orjson.loads(raw), depth + 1) or raw
                except orjson.JSONDecodeError:
                    pass
                provider = err["metadata"].get("provider_name")
                found = f"{found}: {inner}" + (f" (provider {provider})" if provider else "")
            return found
    for key in ("message", "detail", "error_message", "msg"):
        value = doc.get(key)
        if isinstance(value, str) and value:
            return value
        if isinstance(value, (dict, list)):
            found = _message_from(value, depth + 1)
            if found:
                return found
    return None


def _retry_after_from(doc: Any) -> str | None:
    """Google RPC errors carry RetryInfo.retryDelay ("32s") in details[] instead of a header."""
    stack = [doc]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            delay = node.get("retryDelay")
            if isinstance(delay, str):
                m = re.fullmatch(r"(\d+(?:\.\d+)?)s", delay.strip())
                if m:
                    return str(max(1, math.ceil(float(m.group(1)))))  # never invite a retry too early
            stack.extend(v for v in node.values() if isinstance(v, (dict, list)))
        elif isinstance(node, list):
            stack.extend(node)
    return None


def from_upstream(
    status: int,
    body: bytes,
    secrets: tuple[str, ...] = (),
    retry_after: str | None = None,
    provider: str = "upstream",
) -> RelayError:
    """An upstream HTTP error response becomes the Anthropic error with the matching status and type."""
    text = body.decode("utf-8", "replace")
    doc: Any = None
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        pass
    message = _message_from(doc) if doc is not None else None
    if not message:
        message = _cut(redact(text.strip(), secrets), MESSAGE_LIMIT, secrets) or f"HTTP {status}"
    out_status = _UPSTREAM_STATUS.get(status, status)
    if not (400 <= out_status < 600):
        out_status = 500
    if retry_after is None and doc is not None and status == 429:
        retry_after = _retry_after_from(doc)
    headers = [(b"retry-after", retry_after.encode())] if retry_after else []
    err = RelayError(out_status, redact(f"{provider}: {message}", secrets), type_for_status(out_status), headers)
    return _read(err, message, doc)


def _read(err: RelayError, message: str, doc: Any) -> RelayError:
    """What an upstream's error says that relay can act on: a context overflow, or the output cap it stated."""
    err.overflow = detect(message, doc)
    if err.overflow is None and 400 <= err.status < 500 and err.status != 429:
        err.output_cap = output_cap.detect(message, doc)
    return err


def from_stream_error(doc: Any, secrets: tuple[str, ...] = (), provider: str = "upstream") -> RelayError:
    """A ``data: {"error": ...}`` event inside an HTTP 200 stream."""
    err = doc.get("error") if isinstance(doc, dict) else None
    status = 500
    if isinstance(err, dict):
        code = err.get("code")
        if isinstance(code, int) and 400 <= code < 600:
            status = _UPSTREAM_STATUS.get(code, code)
        elif isinstance(code, str) and code.isdigit() and 400 <= int(code) < 600:
            status = int(code)
        kind = str(err.get("type") or err.get("status") or "")
        if status == 500 and ("rate" in kind or "RESOURCE_EXHAUSTED" in kind):
            status = 429
        elif status == 500 and ("overload" in kind or "UNAVAILABLE" in kind):
            status = 529
        elif status == 500 and kind in ("invalid_request_error", "BadRequestError", "INVALID_ARGUMENT"):
            status = 400
    message = _message_from(doc) or "upstream reported an error"
    out = RelayError(status, redact(f"{provider}: {message}", secrets), type_for_status(status))
    return _read(out, message, doc)


# An empty answer to a prompt at least this share of the window is taken for an overflow: relay's estimate errs by
# ~15% on average (README), and some servers (llama-cpp-python) refuse a prompt that fills their window by ending
# the 200 stream they had already started, with nothing in it.
EMPTY_NEAR_WINDOW = 0.7


def empty_stream(provider: str) -> RelayError:
    """The upstream answered 200 and ended the stream without a single event."""
    err = RelayError(502, f"{provider}: the upstream stream ended without any data", "api_error")
    err.empty = True
    return err


def as_anthropic_overflow(err: RelayError, estimate: int, window: int | None, max_tokens: int | None,
                          local: bool = False) -> RelayError:
    """An upstream's context-overflow error in Anthropic's own words, which Claude Code parses to compact or to
    lower max_tokens; the upstream's words go to the log. An empty answer to a prompt near the known window is an
    overflow too (answered as prompt-too-long: retrying it, or lowering max_tokens, would fail the same way).
    ``local``: a server relay asks for its window (discover_context) and could not learn it."""
    log = logging.getLogger("relay.overflow")
    if err.overflow is None and err.empty:
        if window and estimate >= window * EMPTY_NEAR_WINDOW:
            log.info("%s; the prompt (~%d tokens by relay's estimate) is near the %d-token window: answered as an "
                     "overflow", err.message, estimate, window)
            out = RelayError(400, Overflow(None, window).to_anthropic(estimate, window), "invalid_request_error")
            out.overflow = Overflow(None, window)
            return out
        if not window:
            # From a local server (whose window relay asked for and did not learn) an empty 200 is its overflow
            # and every retry gets the same: a 400, which Claude Code shows at once and stops on, not a 5xx it
            # retries for minutes (measured with 2.1.331: 403 reads "Failed to authenticate", 404 blames the
            # model, 413 has a canned text, 409 is retried; 400 and 422 show ours). Elsewhere it may be a glitch
            # a retry gets past: a 502.
            hint = (" (servers such as llama-cpp-python's do this when the prompt does not fit their context window; "
                    "relay knows no window for this model: set context_window, or RELAY_CONTEXT_WINDOW without a "
                    "config file, and relay answers such requests as too long"
                    + ("; retrying gets the same answer)" if local else ")"))
            out = (RelayError(400, err.message + hint, "invalid_request_error") if local
                   else RelayError(err.status, err.message + hint, err.error_type, err.headers))
            out.empty = True
            return out
    if err.overflow is None:
        return err
    log.info("upstream context overflow: %s", err.message)
    out = RelayError(400, err.overflow.to_anthropic(estimate, window, max_tokens), "invalid_request_error")
    out.overflow = err.overflow
    return out


REDACTED = "[redacted]"
MESSAGE_LIMIT = 2000  # characters of a non-JSON upstream error body kept in the message


def _cut(text: str, limit: int, secrets: tuple[str, ...]) -> str:
    """``text`` (already redacted) bounded to ``limit``; a key the cut (or the upstream's own cut of its body)
    split in two leaves a prefix at the end, which is redacted too."""
    marker = text.find(REDACTED, max(0, limit - len(REDACTED) + 1), limit + len(REDACTED) - 1)
    text = text[:limit] if marker < 0 else text[:marker + len(REDACTED)]  # never half a marker
    for secret in secrets:
        for size in range(min(len(secret), len(text)) - 1, 3, -1):
            if text.endswith(secret[:size]):
                return text[:-size] + REDACTED
    return text


def redact(text: str, secrets: tuple[str, ...]) -> str:
    """Upstream keys never leave relay, even when an upstream echoes them back in an error."""
    for secret in secrets:
        if secret and len(secret) >= 4 and secret in text:
            text = text.replace(secret, REDACTED)
    # Key-looking tokens an upstream may echo (sk-..., AIza...) even when they are not ours.
    return re.sub(r"\b(sk-[A-Za-z0-9_\-]{8})[A-Za-z0-9_\-]{8,}", r"\1…[redacted]", text)


# Anthropic error type -> status, for upstreams that speak Anthropic's API (the inverse of STATUS_TYPES).
_TYPE_STATUS = {"invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
                "permission_error": 403, "not_found_error": 404, "conflict_error": 409, "request_too_large": 413,
                "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529}


def from_anthropic_error(doc: Any, secrets: tuple[str, ...] = (), provider: str = "upstream") -> RelayError:
    """An Anthropic-shaped error (``{"type":"error","error":{"type","message"}}``) from an upstream that speaks
    Anthropic's API: its own type decides the status, so an ``event: error`` before anything was sent becomes
    the HTTP error Anthropic would have answered with."""
    err = doc.get("error") if isinstance(doc, dict) else None
    kind = err.get("type") if isinstance(err, dict) else None
    if kind not in _TYPE_STATUS:
        return from_stream_error(doc, secrets, provider)
    message = _message_from(doc) or kind
    out = RelayError(_TYPE_STATUS[kind], redact(f"{provider}: {message}", secrets), kind)
    return _read(out, message, doc)


def retry_after_header(doc: Any) -> list[tuple[bytes, bytes]]:
    """A ``retry-after`` header from a Google RetryInfo in an error body, for errors that arrive in a stream."""
    delay = _retry_after_from(doc)
    return [(b"retry-after", delay.encode())] if delay else []
