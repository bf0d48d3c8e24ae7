"""Logging setup and the one-line-per-request access log. Message contents and keys never go to info."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from relay.formats.anthropic import request_id

if TYPE_CHECKING:
    from relay.config import ClientKey

access = logging.getLogger("relay.access")


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with the access log's fields as keys, for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc, default=str).decode()


class _Escape(logging.Filter):
    """The one place where log text is made safe: every message, whatever put a client's or an upstream's
    words into it (a model id, a target, an upstream error, a failure note), leaves with its control
    characters escaped, so no line can be forged and no terminal escape sequence reaches a reader."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.isprintable():
            record.msg, record.args = escape(message), None
        return True


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Escape())
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        formatter.converter = time.gmtime  # UTC, like the JSON format; not for every formatter in the process
        handler.setFormatter(formatter)
    root = logging.getLogger("relay")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def escape(text: str) -> str:
    """Control characters (line breaks, ESC, ...) written as Python escapes: ``\\n``, ``\\x1b``."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def printable(text: str, limit: int = 200) -> str:
    """Client-chosen text (a model id) made safe for a log line, a terminal or a table, and bounded."""
    if text.isprintable() and len(text) <= limit:
        return text
    return escape(text[:limit]) + ("…" if len(text) > limit else "")


def access_line(
    method: str,
    path: str,
    status: int,
    *,
    model: str = "",
    target: str = "",
    ttfb_ms: float | None = None,
    duration_ms: float,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
    usage_estimated: bool = False,
    stream: bool | None = None,
    request_id: str = "",
    note: str = "",
    key: str = "",
    cost_usd: float | None = None,
) -> None:
    if not access.isEnabledFor(logging.INFO):
        return
    model, path, method = printable(model), printable(path, 2000), printable(method, 20)
    parts = [f"{method} {path} {status}"]
    if model:
        parts.append(f"model={model}" + (f" -> {target}" if target else ""))
    if stream is not None:
        parts.append("stream" if stream else "nostream")
    if ttfb_ms is not None:
        parts.append(f"ttfb={ttfb_ms:.1f}ms")
    parts.append(f"dur={duration_ms:.1f}ms")
    if input_tokens is not None:
        parts.append(f"in={input_tokens} out={output_tokens or 0}" + (" (estimated: no usage from upstream)"
                                                                      if usage_estimated else ""))
    if cost_usd is not None:
        parts.append(f"cost=${cost_usd:.6f}")
    if key:
        key = printable(key, 80)
        parts.append(f"key={key}")
    if request_id:
        parts.append(f"id={request_id}")
    if note:
        parts.append(note)
    fields = {"method": method, "path": path, "status": status, "model": model, "target": target,
              "stream": stream, "ttfb_ms": None if ttfb_ms is None else round(ttfb_ms, 2),
              "duration_ms": round(duration_ms, 2), "input_tokens": input_tokens, "output_tokens": output_tokens,
              "usage_estimated": usage_estimated,
              "request_id": request_id, "note": note, "key": key, "cost_usd": cost_usd}
    access.info(" ".join(parts), extra={"fields": fields})


@dataclass
class Exchange:
    """The access-log record of one request: filled in as the request is served, written once at its end."""

    method: str
    path: str
    route: str = "other"  # the route dispatch matched: what /metrics labels, never the raw path
    started: float = field(default_factory=time.perf_counter)
    status: int = 0  # 0 until a response head has gone out
    model: str = ""
    target: str = ""
    stream: bool | None = None
    ttfb: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    usage_estimated: bool = False  # the upstream reported no usage: the tokens are relay's estimates
    request_id: str = field(default_factory=request_id)
    note: str = ""
    client: ClientKey | None = None
    cache_read: int = 0  # of input_tokens, read from the upstream's prompt cache
    cache_write: int = 0  # written to it (counted apart from input_tokens, as Anthropic counts them)
    admitted: bool = False  # the gateway counted this request against its key (released once it is answered)
    cost_usd: float | None = None  # from the served model's price

    def add_note(self, note: str) -> None:
        self.note = (self.note + " " if self.note else "") + note

    def write(self, duration: float | None = None) -> None:
        """The access line (``duration`` in seconds: now, unless given), made only when it will be written."""
        if not access.isEnabledFor(logging.INFO):
            return
        access_line(
            self.method, self.path, self.status, model=self.model, target=self.target, stream=self.stream,
            ttfb_ms=None if self.ttfb is None else (self.ttfb - self.started) * 1000,
            duration_ms=(time.perf_counter() - self.started if duration is None else duration) * 1000,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens, usage_estimated=self.usage_estimated, request_id=self.request_id, note=self.note,
            key=self.client.name if self.client is not None else "", cost_usd=self.cost_usd,
        )
