"""An Anthropic stream passed through: the upstream's bytes go out as they came in.

Only two things are read: ``message_start`` (held until it is complete, to put the client's model name in it
and take the input usage) and, after it, the event names, to take usage from ``message_delta`` and to notice
``message_stop`` and ``error``. Every other byte is forwarded untouched, in the read it arrived in, up to the end
of the last complete event: an unfinished event's bytes wait for the read that finishes it (the client could not
act on them anyway), so that when the upstream breaks off, relay's ``event: error`` is not glued to half an event.
After a long silence relay may have sent a message_start of its own (``start_now``, for the keep-alive): the
upstream's is then read for its usage and dropped, and everything after it forwarded as usual.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import orjson

from relay.errors import RelayError, from_anthropic_error
from relay.formats import anthropic as A
from relay.formats.base import ended_early
from relay.sse import SSEError, SSEParser

_TYPE = re.compile(rb'"type"\s*:\s*"([a-z_]+)"')
_EVENT_ENDS = (b"\n\n", b"\r\r", b"\r\n\r")  # an event ends where a line end meets an empty line's end
_BLANK_LINE = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")  # a line end, then an empty line's end


def _kind(name: bytes | None, payload: bytes) -> bytes:
    """The event type: its ``event:`` line, or (providers that leave that line out) the data's ``type``."""
    if name is not None:
        return name
    m = _TYPE.search(payload, 0, 80)
    return m.group(1) if m else b""


class PassthroughTranslator:
    def __init__(self, model: str, *, secrets: tuple[str, ...] = (), provider: str = "upstream",
                 on_error: Callable[[RelayError], RelayError] | None = None, input_tokens_hint: int = 0) -> None:
        self.model = model
        self.started = False  # bytes have gone to the client
        self._forwarding = False  # the upstream's first event is in: its bytes are forwarded from here on
        self._hint = input_tokens_hint  # for a message_start of relay's own (``start_now``)
        self.done = False
        self.error: RelayError | None = None
        self.has_usage = False
        self.usage_estimated = False
        self.input_tokens = 0
        self.output_tokens = 0
        self.cache_read = 0
        self._parser = SSEParser()
        self._head = b""  # raw bytes before message_start is complete
        self._skip_lf = False
        self._tail = b""  # forwarded-side bytes of an event not finished yet
        self._secrets = secrets
        self._provider = provider
        self._on_error = on_error

    def feed(self, data: bytes) -> bytes:
        if self.done:  # after message_stop only the rest of its framing can follow: still the upstream's bytes
            return data if self.error is None else b""
        try:
            events = self._parser.feed(data)
        except SSEError as exc:
            return self._fail(RelayError(502, f"{self._provider}: {exc}", "api_error"))
        if self._forwarding:
            for name, payload in events:
                self._after_start(_kind(name, payload), payload)
            if self._skip_lf:  # message_start ended a read on CR: this LF was its end, already written
                self._skip_lf = False
                data = data[1:] if data[:1] == b"\n" else data
            return self._complete(data)
        self._head += data
        return self._before_start(events)

    def finish(self) -> bytes:
        if self.done:
            return b""
        events = self._parser.close()  # a last event that ended without a blank line
        if not self._forwarding:
            out = self._before_start(events)
        else:
            out = b""
            for name, payload in events:
                self._after_start(_kind(name, payload), payload)
        if events and self._forwarding:  # that event is complete after all: its held bytes go out
            out, self._tail = out + self._tail, b""
        if self.done:
            return out
        if not self._forwarding:
            return out + self._fail(ended_early(self._provider, "no message_start"))
        return out + self._fail(ended_early(self._provider, "closed before message_stop"))

    def start_now(self) -> bytes:
        """A message_start of relay's own; the upstream's, when it comes, gives its usage and is not sent."""
        if self.started:
            return b""
        self.started = True
        return A.message_start(A.message_id(), self.model, self._hint)

    def abort(self, error: RelayError) -> bytes:
        if self.done:
            return b""
        return self._fail(error)

    # ---- internals --------------------------------------------------------------------------

    def _before_start(self, events: list[tuple[bytes | None, bytes]]) -> bytes:
        for number, (name, payload) in enumerate(events):
            kind = _kind(name, payload)
            if kind == b"ping":
                continue
            if kind == b"error":
                return self._fail(self._error(payload))
            early, self.started, self._forwarding = self.started, True, True
            head, self._head = self._head, b""
            if kind != b"message_start":  # a stream without message_start: not ours to fix, pass it on
                out = b""
            else:
                rest, self._skip_lf = _after_first_event(head, b'"message_start"')
                out = self._message_start(payload)
                if early:  # relay's own message_start is out already: this one only had the usage to give
                    out = b""
                head = rest
            for later_name, later in events[number + 1:]:
                self._after_start(_kind(later_name, later), later)
            return out + self._complete(head)
        return b""

    def _message_start(self, payload: bytes) -> bytes:
        try:
            doc = orjson.loads(payload)
            message = doc["message"]
            message["model"] = self.model
            self._usage(message.get("usage"))
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return b"event: message_start\ndata: " + payload + b"\n\n"
        return b"event: message_start\ndata: " + orjson.dumps(doc) + b"\n\n"

    def _after_start(self, kind: bytes, payload: bytes) -> None:
        if kind == b"message_delta":
            try:
                doc = orjson.loads(payload)
            except orjson.JSONDecodeError:
                return
            if isinstance(doc, dict):
                self._usage(doc.get("usage"))
        elif kind == b"message_stop":
            self.done = True
        elif kind == b"error":
            self.error = self._error(payload)
            self.done = True

    def _usage(self, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        if isinstance(usage.get("input_tokens"), int):
            self.input_tokens = usage["input_tokens"]
        if isinstance(usage.get("output_tokens"), int):
            self.output_tokens = usage["output_tokens"]
        if isinstance(usage.get("cache_read_input_tokens"), int):
            self.cache_read = usage["cache_read_input_tokens"]
        self.has_usage = True

    def _error(self, payload: bytes) -> RelayError:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = {"error": {"type": "api_error", "message": payload.decode("utf-8", "replace")[:500]}}
        error = from_anthropic_error(doc, self._secrets, self._provider)
        return self._on_error(error) if self._on_error else error

    def _complete(self, data: bytes) -> bytes:
        """``data`` (after what was held back) up to the end of its last complete event; the rest is held."""
        buf = self._tail + data if self._tail else data
        if self.done:  # message_stop or the upstream's error event has been read: nothing more to wait for
            self._tail = b""
            return buf
        end = 0
        for blank in _EVENT_ENDS:
            at = buf.rfind(blank)
            if at >= 0:
                end = max(end, at + len(blank))
        self._tail = buf[end:]
        return buf[:end]

    def _fail(self, error: RelayError) -> bytes:
        self.error = error
        self.done = True
        self._tail = b""  # an unfinished event is dropped: it would swallow the error event
        return error.sse() if self.started else b""


def _after_first_event(head: bytes, marker: bytes) -> tuple[bytes, bool]:
    """The raw bytes after the event that contains ``marker``, and whether that event's last line end may
    still continue (a CR at the end of the read, whose LF comes in the next one)."""
    at = head.find(marker)
    m = _BLANK_LINE.search(head, at) if at >= 0 else None
    if m is None:
        return b"", False
    return head[m.end():], m.end() == len(head) and head.endswith(b"\r")
