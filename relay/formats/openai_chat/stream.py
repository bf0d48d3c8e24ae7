"""OpenAI Chat Completions SSE -> Anthropic Messages SSE, as an incremental sans-I/O state machine.

``feed(bytes)`` takes whatever one upstream read delivered and returns the Anthropic event bytes it
produces, at once: nothing complete is held back. The only thing that waits is the closing
``message_delta``: OpenAI sends usage after the finish chunk, so the message closes at ``[DONE]`` or EOF.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from relay.errors import RelayError, empty_stream, from_stream_error
from relay.tokens import OutputCount
from relay.formats import anthropic as A
from relay.formats.openai_chat.common import (
    ThinkSplitter,
    chunk_usage,
    content_parts,
    matched_stop,
    reasoning_of,
    stop_reason,
    text_field,
    usage_numbers,
)
from relay.sse import SSEError, SSEParser

_NONE, _TEXT, _THINKING, _TOOL = 0, 1, 2, 3


class StreamTranslator:
    def __init__(
        self,
        model: str,
        *,
        input_tokens_hint: int = 0,
        think_tags: bool = False,
        stop_sequences: tuple[str, ...] = (),
        secrets: tuple[str, ...] = (),
        provider: str = "upstream",
        message_id: str | None = None,
        on_error: Callable[[RelayError], RelayError] | None = None,
    ) -> None:
        self.model = model
        self._on_error = on_error  # e.g. rewording a context overflow the way Anthropic says it
        self.message_id = message_id or A.message_id()
        self.started = False  # message_start has been produced
        self.done = False  # message_stop or an error event has been produced
        self.error: RelayError | None = None  # the upstream failed; if not started, answer with an HTTP error
        self.input_tokens = input_tokens_hint
        self.output_tokens = 0
        self.cache_read = 0
        self.has_usage = False
        self.usage_estimated = False  # no usage came: output_tokens is relay's estimate from the streamed text
        self._streamed = OutputCount()
        self._hint = input_tokens_hint
        self._parser = SSEParser()
        self._splitter = ThinkSplitter() if think_tags else None
        self._stops = stop_sequences
        self._secrets = secrets
        self._provider = provider
        self._out: list[bytes] = []
        self._block = _NONE
        self._index = -1
        self._signature: str | None = None
        self._tool_key_index: Any = None
        self._tool_key_id = ""
        self._tool_has_args = False
        self._saw_tool = False
        self._finish: str | None = None
        self._matched: str | None = None

    # ---- public API -------------------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        if self.done:
            return b""
        payload = self._parser.single(data)
        if payload is not None:
            self._on_event(None, payload)
            return self._flush()
        try:
            events = self._parser.feed(data)
        except SSEError as exc:  # an oversized event from a broken upstream
            self._fail(RelayError(502, f"{self._provider}: {exc}", "api_error"))
            return self._flush()
        for name, payload in events:
            self._on_event(name, payload)
            if self.done:
                break
        return self._flush()

    def finish(self) -> bytes:
        """The upstream body ended cleanly (with or without ``[DONE]``)."""
        if self.done:
            return b""
        for name, payload in self._parser.close():
            self._on_event(name, payload)
        if not self.done:
            if not self.started:
                self._fail(empty_stream(self._provider))
            else:
                self._close_message()
        return self._flush()

    def abort(self, error: RelayError) -> bytes:
        """The upstream connection failed mid-stream (reset, truncated, timed out)."""
        if self.done:
            return b""
        self._fail(error)
        return self._flush()

    @property
    def stop_reason(self) -> str:
        return stop_reason(self._finish, self._saw_tool, self._matched)

    # ---- internals --------------------------------------------------------------------------

    def _flush(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _fail(self, error: RelayError) -> None:
        if self._on_error is not None:
            error = self._on_error(error)
        self.error = error
        self.done = True
        if self.started:
            self._close_block()
            self._out.append(error.sse())

    def _start(self) -> None:
        self.started = True
        self._out.append(A.message_start(self.message_id, self.model, self._hint))

    def _on_event(self, name: bytes | None, payload: bytes) -> None:
        if payload[:6] == b"[DONE]":
            self._close_message()
            return
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return  # not a chunk (a provider's stray keep-alive text): nothing to translate
        if name is None and self.started and type(chunk) is dict and self._delta_only(chunk):
            return
        if not isinstance(chunk, dict):
            if isinstance(chunk, list) and chunk and isinstance(chunk[0], dict) and "error" in chunk[0]:
                self._fail(from_stream_error(chunk[0], self._secrets, self._provider))
            return
        if name == b"error" or ("error" in chunk and not chunk.get("choices")):
            self._fail(from_stream_error(chunk, self._secrets, self._provider))
            return
        choices = chunk.get("choices")
        choice: Any = None
        if choices and type(choices) is list:
            choice = choices[0]
            if len(choices) > 1 or (type(choice) is dict and choice.get("index", 0) != 0):
                choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
            if type(choice) is dict and choice.get("finish_reason") == "error":  # OpenRouter's in-band error
                self._fail(from_stream_error(choice if "error" in choice else chunk, self._secrets, self._provider))
                return
        if not self.started:
            self._start()
        if "usage" in chunk or "x_groq" in chunk or (type(choice) is dict and "usage" in choice):
            usage = chunk_usage(chunk, choice)
            if usage is not None:
                self.input_tokens, self.output_tokens, self.cache_read = usage_numbers(usage)
                self.has_usage = True
        if type(choice) is not dict:
            return
        delta = choice.get("delta")
        if delta and type(delta) is dict:  # plain mid-stream deltas took the hot path (_delta_only) already
            self._on_delta(delta)
        finish = choice.get("finish_reason")
        if finish and isinstance(finish, str):
            self._finish = finish
            self._matched = matched_stop(choice, self._stops)
            if self._splitter is not None:
                for kind, text in self._splitter.flush():
                    self._emit(kind, text)
            self._close_block()

    def _delta_only(self, chunk: dict[str, Any]) -> bool:
        """The hot path: a mid-stream chunk carrying one plain delta (text, reasoning text or the next argument
        fragment of the open tool call) and nothing else: no finish, usage, error or second choice. Handles it
        and says True; anything else is left to the general path."""
        choices = chunk.get("choices")
        if type(choices) is not list or len(choices) != 1 or chunk.get("usage") is not None or "error" in chunk \
                or "x_groq" in chunk:
            return False
        choice = choices[0]
        if type(choice) is not dict or choice.get("finish_reason") is not None or choice.get("index", 0) != 0 \
                or "usage" in choice:
            return False
        delta = choice.get("delta")
        if type(delta) is not dict or self._splitter is not None:
            return False
        size = len(delta) - ("role" in delta)
        content = delta.get("content")
        if type(content) is str:
            if size == 1:
                self._emit("text", content)
                return True
            return False
        if content is not None:
            return False
        size -= "content" in delta  # DeepSeek's reasoning chunks carry "content": null
        if size == 1:
            calls = delta.get("tool_calls")
            if calls is not None:
                return self._block == _TOOL and self._more_arguments(calls)
            text = delta.get("reasoning_content")
            if text is None:
                text = delta.get("reasoning")
            if type(text) is str:
                self._emit("thinking", text)
                return True
        return False

    def _on_delta(self, delta: dict[str, Any]) -> None:
        if "reasoning_content" in delta or "reasoning" in delta or "reasoning_details" in delta:
            text, signature = reasoning_of(delta)
            if signature:
                self._signature = signature
            if text:
                self._emit("thinking", text)
        content = delta.get("content")
        if content:
            if isinstance(content, str):
                if self._splitter is None:
                    self._emit("text", content)
                else:
                    for kind, text in self._splitter.feed(content):
                        self._emit(kind, text)
            else:
                for kind, text in content_parts(content):
                    self._emit(kind, text)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self._emit("text", refusal)
        calls = delta.get("tool_calls")
        if calls and type(calls) is list:
            for call in calls:
                if isinstance(call, dict):
                    self._on_tool_delta(call)

    def _emit(self, kind: str, text: str) -> None:
        if not text:
            return
        self._streamed.add(text)
        want = _TEXT if kind == "text" else _THINKING
        if self._block != want:
            self._close_block()
            self._index += 1
            self._block = want
            self._out.append(A.text_block_start(self._index) if want == _TEXT else A.thinking_block_start(self._index))
        if want == _TEXT:
            self._out.append(A.text_delta(self._index, text))
        else:
            self._out.append(A.thinking_delta(self._index, text))

    def _more_arguments(self, calls: Any) -> bool:
        """The other hot path: the next argument fragment of the tool call already open (no id, no name, same
        index). Anything else goes the general way."""
        if type(calls) is not list or len(calls) != 1:
            return False
        call = calls[0]
        if type(call) is not dict or call.get("id") or call.get("index") != self._tool_key_index:
            return False
        function = call.get("function")
        if type(function) is not dict or function.get("name"):
            return False
        args = function.get("arguments")
        if type(args) is not str:
            return False
        if args:
            self._tool_has_args = True
            self._streamed.add(args)
            self._out.append(A.input_json_delta(self._index, args))
        return True

    def _on_tool_delta(self, call: dict[str, Any]) -> None:
        index = call.get("index")
        call_id = text_field(call.get("id"))
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        name = text_field(function.get("name"))
        args = function.get("arguments")
        if args is not None and not isinstance(args, str):
            args = orjson.dumps(args).decode()  # some servers send the arguments as an object
        if (
            self._block != _TOOL
            or (index is not None and index != self._tool_key_index)
            or (call_id and self._tool_key_id and call_id != self._tool_key_id)
            or (index is None and not call_id and name and self._tool_has_args)
        ):
            self._close_block()
            self._index += 1
            self._block = _TOOL
            self._saw_tool = True
            self._tool_key_index = index
            self._tool_key_id = call_id
            self._tool_has_args = False
            self._out.append(A.tool_block_start(self._index, call_id if call_id else A.tool_use_id(), name))
            self._streamed.add(name)
        elif call_id and not self._tool_key_id:
            self._tool_key_id = call_id
        if args:
            self._tool_has_args = True
            self._streamed.add(args)
            self._out.append(A.input_json_delta(self._index, args))

    def _close_block(self) -> None:
        if self._block == _NONE:
            return
        if self._block == _THINKING:
            self._out.append(A.signature_delta(self._index, self._signature or A.thinking_signature()))
            self._signature = None
        self._out.append(A.block_stop(self._index))
        self._block = _NONE

    def _close_message(self) -> None:
        if not self.started:
            self._start()
        if self._splitter is not None:
            for kind, text in self._splitter.flush():
                self._emit(kind, text)
        self._close_block()
        if not self.has_usage:
            self.output_tokens, self.usage_estimated = self._streamed.tokens(), True
        usage = A.usage_dict(self.input_tokens, self.output_tokens, self.cache_read)
        self._out.append(A.message_delta(self.stop_reason, self._matched, usage))
        self._out.append(A.MESSAGE_STOP)
        self.done = True
