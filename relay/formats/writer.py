"""The Anthropic side of every translated stream (OpenAI Chat, Gemini, OpenAI Responses): parse the upstream's
SSE, open and close blocks, write deltas from the byte templates, close the message, turn a failure into an HTTP
error (nothing sent yet) or an ``event: error`` (after).

A format subclasses it and implements ``_on_event`` (one parsed SSE event) and ``_stop_reason``; ``feed``,
``finish`` and ``abort`` are the Translator protocol the server drives. The per-chunk path is kept short: a read
holding exactly one ``data:`` event skips the general parse (``SSEParser.single``), and ``text``/``thinking``
into an open block are one template each.
"""

from __future__ import annotations

from collections.abc import Callable

from orjson import dumps

from relay.errors import RelayError, empty_stream
from relay.formats import anthropic as A
from relay.formats.anthropic import DELTA_END
from relay.formats.base import ended_early
from relay.sse import Event, SSEError, SSEParser
from relay.tokens import OutputCount

NONE, TEXT, THINKING, TOOL = 0, 1, 2, 3
RUN = 4  # events in one read from which a format may translate runs of them at once (``BlockWriter._many``)


class BlockWriter:
    # Slots, not an instance dict: a stream's writer and its format's state come to over 30 attributes, past what
    # an instance's shared-key dict holds (CPython 3.11), so every stream made and then read a plain dict.
    __slots__ = ("model", "message_id", "started", "done", "error", "input_tokens", "output_tokens", "cache_read",
                 "has_usage", "usage_estimated", "_streamed", "saw_tool", "secrets", "provider", "_hint",
                 "_on_error", "_parser", "_out", "_block", "_index", "_head", "_signature")

    def __init__(self, model: str, *, input_tokens_hint: int = 0, secrets: tuple[str, ...] = (),
                 provider: str = "upstream", message_id: str | None = None,
                 on_error: Callable[[RelayError], RelayError] | None = None) -> None:
        self.model = model
        self.message_id = message_id or A.message_id()
        self.started = False  # message_start has been produced
        self.done = False  # message_stop or an error event has been produced
        self.error: RelayError | None = None
        self.input_tokens = input_tokens_hint
        self.output_tokens = 0
        self.cache_read = 0
        self.has_usage = False
        self.usage_estimated = False  # no usage came: output_tokens is relay's estimate of what was streamed
        self._streamed = OutputCount()  # for that estimate (llama-cpp-python sends no usage at all)
        self.saw_tool = False
        self.secrets = secrets
        self.provider = provider
        self._hint = input_tokens_hint
        self._on_error = on_error
        self._parser: SSEParser | None = None  # made at the first ``feed``: the server feeds events it parsed
        self._out: list[bytes] = []
        self._block = NONE
        self._index = -1
        self._head = b""  # the open block's delta head (``A.*_delta_head``): a delta is head + JSON string + end
        self._signature = ""  # the open (or next closed) thinking block's signature, once known

    # ---- the Translator protocol ------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        parser = self._parser
        if parser is None:
            parser = self._parser = SSEParser()
        payload = parser.single(data)
        if payload is not None:  # what a paced upstream's every read holds
            self._on_event(None, payload)
            return self.flush()
        try:
            events = parser.feed(data)
        except SSEError as exc:
            return self.bad_sse(exc)
        return self.feed_events(events)

    def feed_events(self, events: list[Event]) -> bytes:
        """Events already parsed (the server's body reader parses them in the same pass as the chunk framing)."""
        if self.done:
            return b""
        if len(events) >= RUN:
            self._many(events)
        else:
            for name, payload in events:
                self._on_event(name, payload)
                if self.done:
                    break
        return self.flush()

    def _many(self, events: list[Event]) -> None:
        """The events of a read that held many (a burst): one by one, unless a format takes runs of them at once."""
        for name, payload in events:
            self._on_event(name, payload)
            if self.done:
                return

    def bad_sse(self, exc: SSEError) -> bytes:
        """An oversized event from a broken upstream."""
        return self.abort(RelayError(502, f"{self.provider}: {exc}", "api_error"))

    def finish(self) -> bytes:
        """The upstream body ended."""
        if self.done:
            return b""
        for name, payload in self._parser.close() if self._parser is not None else ():
            self._on_event(name, payload)
            if self.done:
                return self.flush()
        if not self.started:
            self.fail(empty_stream(self.provider))
        else:
            self._on_end()
        return self.flush()

    def abort(self, error: RelayError) -> bytes:
        if self.done:
            return b""
        self.fail(error)
        return self.flush()

    def start_now(self) -> bytes:
        if self.started:
            return b""
        self.start()
        return self.flush()

    # ---- for the format ---------------------------------------------------------------------

    def _on_event(self, name: bytes | None, payload: bytes) -> None:
        raise NotImplementedError

    ENDED_WITHOUT = "no end event"  # what was missing when the body ended early (named in the error)

    def _on_end(self) -> None:
        """The body ended before the format's own end event: the answer was cut short (see ``ended_early``). A
        format whose end is a field of an ordinary event (Gemini's ``finishReason``) overrides this."""
        self.fail(ended_early(self.provider, self.ENDED_WITHOUT))

    def _stop_reason(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        if not self.started:
            self.started = True
            self._out.append(A.message_start(self.message_id, self.model, self._hint))

    def text(self, text: str) -> None:
        if text:
            self.delta(TEXT, text)

    def thinking(self, text: str, signature: str | None = None) -> None:
        """Thinking text into the open thinking block (opening one if needed); a signature, when given, is
        kept for the block's close."""
        if self._block != THINKING:
            self._open(THINKING)
        if text:
            self.delta(THINKING, text)
        if signature:
            self._signature = signature

    def delta(self, kind: int, text: str) -> None:
        """Non-empty ``text`` into the open block of ``kind``: TEXT or THINKING opens one when another is open;
        TOOL is only for the open tool block. The step every chunk of every stream takes, so it is kept to one
        template concatenation (and ``OutputCount.add``'s ASCII case inline)."""
        if self._block != kind:
            self._open(kind)
        count = self._streamed
        if text.isascii():
            count.chars += len(text)
        else:
            count.add(text)
        self._out.append(self._head + dumps(text) + DELTA_END)

    def deltas(self, kind: int, texts: list[str]) -> None:
        """``delta`` of each non-empty text, in order, as one piece: what a burst of plain deltas (many in one
        upstream read) comes to, with no Python step per text (``map`` and ``join`` run in C)."""
        texts = list(filter(None, texts))
        if not texts:
            return
        if self._block != kind:
            self._open(kind)
        self._streamed.add("".join(texts))
        head = self._head
        self._out.append(head + (DELTA_END + head).join(map(dumps, texts)) + DELTA_END)

    @property
    def in_thinking(self) -> bool:
        return self._block == THINKING

    @property
    def signed(self) -> bool:
        """The open thinking block already has its signature."""
        return self._block == THINKING and bool(self._signature)

    def tool(self, tool_id: str, name: str) -> None:
        self._open(TOOL)
        self.saw_tool = True
        self._streamed.add(name)
        self._out.append(A.tool_block_start(self._index, tool_id, name))
        self._head = A.input_json_delta_head(self._index)

    def tool_args(self, partial: str) -> None:
        if partial and self._block == TOOL:
            self.delta(TOOL, partial)

    def close_block(self) -> None:
        if self._block == NONE:
            return
        if self._block == THINKING:
            self._out.append(A.signature_delta(self._index, self._signature or A.thinking_signature()))
            self._signature = ""
        self._out.append(A.block_stop(self._index))
        self._block = NONE

    def usage(self, input_tokens: int, output_tokens: int, cache_read: int = 0) -> None:
        self.input_tokens, self.output_tokens, self.cache_read = input_tokens, output_tokens, cache_read
        self.has_usage = True

    def close(self, stop_sequence: str | None = None) -> None:
        """message_delta (stop reason, usage) and message_stop."""
        if not self.started:
            self.start()
        if self._block != NONE:
            self.close_block()
        if not self.has_usage:
            self.output_tokens, self.usage_estimated = self._streamed.tokens(), True
        self._out.append(A.message_end(self._stop_reason(), stop_sequence, self.input_tokens, self.output_tokens,
                                       self.cache_read))
        self.done = True

    def fail(self, error: RelayError) -> None:
        if self._on_error is not None:
            error = self._on_error(error)
        self.error = error
        self.done = True
        if self.started:
            self.close_block()
            self._out.append(error.sse())

    def flush(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _open(self, kind: int) -> None:
        if not self.started:  # (tested here: a call costs more than the test, and this runs for every block)
            self.start()
        if self._block != NONE:
            self.close_block()
        self._index += 1
        self._block = kind
        if kind == TEXT:
            self._out.append(A.text_block_start(self._index))
            self._head = A.text_delta_head(self._index)
        elif kind == THINKING:
            self._out.append(A.thinking_block_start(self._index))
            self._head = A.thinking_delta_head(self._index)
