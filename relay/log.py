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


def setup(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
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


def printable(text: str, limit: int = 200) -> str:
    """Client-chosen text (a model id) made safe for a log line or a terminal: no control characters (no
    forged log lines, no escape sequences), and bounded."""
    if text.isprintable() and len(text) <= limit:
        return text
    cleaned = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text[:limit])
    return cleaned + ("…" if len(text) > limit else "")


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
    stream: bool | None = None,
    request_id: str = "",
    note: str = "",
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
        parts.append(f"in={input_tokens} out={output_tokens or 0}")
    if request_id:
        parts.append(f"id={request_id}")
    if note:
        parts.append(note)
    fields = {"method": method, "path": path, "status": status, "model": model, "target": target,
              "stream": stream, "ttfb_ms": None if ttfb_ms is None else round(ttfb_ms, 2),
              "duration_ms": round(duration_ms, 2), "input_tokens": input_tokens, "output_tokens": output_tokens,
              "request_id": request_id, "note": note}
    access.info(" ".join(parts), extra={"fields": fields})


@dataclass
class Exchange:
    """The access-log record of one request: filled in as the request is served, written once at its end."""

    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    status: int = 0  # 0 until a response head has gone out
    model: str = ""
    target: str = ""
    stream: bool | None = None
    ttfb: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    request_id: str = field(default_factory=request_id)
    note: str = ""
    client: ClientKey | None = None

    def add_note(self, note: str) -> None:
        self.note = (self.note + " " if self.note else "") + note

    def write(self) -> None:
        access_line(
            self.method, self.path, self.status, model=self.model, target=self.target, stream=self.stream,
            ttfb_ms=None if self.ttfb is None else (self.ttfb - self.started) * 1000,
            duration_ms=(time.perf_counter() - self.started) * 1000, input_tokens=self.input_tokens,
            output_tokens=self.output_tokens, request_id=self.request_id, note=self.note,
        )
