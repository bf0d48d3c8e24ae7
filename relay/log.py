"""Logging setup and the one-line-per-request access log. Message contents and keys never go to info."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("relay")
access = logging.getLogger("relay.access")


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger("relay")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


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
    access.info(" ".join(parts))
