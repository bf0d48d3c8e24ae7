"""OpenAI Chat Completions SSE -> Anthropic Messages SSE, as an incremental sans-I/O state machine on
``formats.writer.BlockWriter`` (which owns the Anthropic side: blocks, message start and end, errors).

``feed(bytes)`` takes whatever one upstream read delivered and returns the Anthropic event bytes it
produces, at once. What waits: the closing ``message_delta`` (OpenAI sends usage after the finish chunk, so the
message closes at ``[DONE]``, or at EOF after a finish_reason; EOF with neither is an error), and the fragments
of a parallel tool call that arrive while another call's block is open (see ``_on_tool_delta``).

The hot path (``_delta_only``) handles the chunk nearly every read carries, one plain delta, with a few dict
lookups and one template; the general path (``_on_event``) everything else.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.errors import RelayError, from_stream_error
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
from relay.formats.writer import TEXT, THINKING, TOOL, BlockWriter


class _Call:
    """One upstream tool call: how the upstream keys it (``index``, ``id``), and its argument text so far."""

    __slots__ = ("index", "id", "name", "args")

    def __init__(self, index: Any, call_id: str, name: str) -> None:
        self.index = index
        self.id = call_id
        self.name = name
        self.args: list[str] = []

    def same(self, index: Any, call_id: str) -> bool:
        """A fragment keyed (``index``, ``call_id``) belongs to this call. Ollama gives every call of a batch
        index 0, so a different id under the same index is another call."""
        if index is not None and index != self.index:
            return False
        if call_id and self.id and call_id != self.id:
            return False
        return index is not None or (bool(call_id) and call_id == self.id)

    def complete(self) -> bool:
        """The arguments so far are a whole JSON object: nothing more can belong to them."""
        text = "".join(self.args)
        if not text or text.lstrip()[:1] != "{":
            return False
        try:
            return type(orjson.loads(text)) is dict
        except orjson.JSONDecodeError:
            return False


class StreamTranslator(BlockWriter):
    ENDED_WITHOUT = "no finish_reason and no [DONE]"

    def __init__(self, model: str, *, think_tags: bool = False, stop_sequences: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._splitter = ThinkSplitter() if think_tags else None
        self._stops = stop_sequences
        self._call: _Call | None = None  # the tool call whose tool_use block is open
        self._held: list[_Call] = []  # calls whose block cannot open yet (see _on_tool_delta)
        self._closed: list[_Call] = []  # calls whose block has closed
        self._finish: str | None = None
        self._matched: str | None = None

    # ---- BlockWriter hooks ------------------------------------------------------------------

    def _on_end(self) -> None:
        if self._finish is None:  # neither a finish_reason nor [DONE]: the answer was cut short
            super()._on_end()
        else:  # a finish_reason without [DONE]: several servers (llama.cpp without --send-done) stop there
            self._close_message()

    def _stop_reason(self) -> str:
        return stop_reason(self._finish, self.saw_tool, self._matched)

    def close_block(self) -> None:
        if self._block == TOOL and self._call is not None:
            self._closed.append(self._call)
            self._call = None
        super().close_block()

    def _open(self, kind: int) -> None:
        if self._held and kind != TOOL:  # text between parallel calls: the calls' blocks must close first
            self._release_held()
        super()._open(kind)

    def fail(self, error: RelayError) -> None:
        self._held.clear()  # calls not yet shown stay unshown: the turn failed
        super().fail(error)

    # ---- the upstream's events --------------------------------------------------------------

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
                self.fail(from_stream_error(chunk[0], self.secrets, self.provider))
            return
        if name == b"error" or ("error" in chunk and not chunk.get("choices")):
            self.fail(from_stream_error(chunk, self.secrets, self.provider))
            return
        choices = chunk.get("choices")
        choice: Any = None
        if choices and type(choices) is list:
            choice = choices[0]
            if len(choices) > 1 or (type(choice) is dict and choice.get("index", 0) != 0):
                choice = next((c for c in choices if isinstance(c, dict) and c.get("index", 0) == 0), None)
            if type(choice) is dict and choice.get("finish_reason") == "error":  # OpenRouter's in-band error
                self.fail(from_stream_error(choice if "error" in choice else chunk, self.secrets, self.provider))
                return
        self.start()
        if "usage" in chunk or "x_groq" in chunk or (type(choice) is dict and "usage" in choice):
            usage = chunk_usage(chunk, choice)
            if usage is not None:
                self.usage(*usage_numbers(usage))
        if type(choice) is not dict:
            return
        delta = choice.get("delta")
        if delta and type(delta) is dict:  # plain mid-stream deltas took the hot path (_delta_only) already
            self._on_delta(delta)
        finish = choice.get("finish_reason")
        if finish and isinstance(finish, str):
            self._finish = finish
            self._matched = matched_stop(choice, self._stops)
            self._flush_splitter()
            self._release_held()

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
                self.text(content)
                return True
            return False
        if content is not None:
            return False
        size -= "content" in delta  # DeepSeek's reasoning chunks carry "content": null
        if size == 1:
            calls = delta.get("tool_calls")
            if calls is not None:
                return self._block == TOOL and self._more_arguments(calls)
            text = delta.get("reasoning_content")
            if text is None:
                text = delta.get("reasoning")
            if type(text) is str:
                if text:
                    self.thinking(text)
                return True
        return False

    def _on_delta(self, delta: dict[str, Any]) -> None:
        if "reasoning_content" in delta or "reasoning" in delta or "reasoning_details" in delta:
            text, signature = reasoning_of(delta)
            if signature:
                self._signature = signature  # lands on the thinking block open now, or the next one to close
            if text:
                self.thinking(text)
        content = delta.get("content")
        if content:
            if isinstance(content, str):
                if self._splitter is None:
                    self.text(content)
                else:
                    self._emit(self._splitter.feed(content))
            else:
                self._emit(content_parts(content))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self.text(refusal)
        calls = delta.get("tool_calls")
        if calls and type(calls) is list:
            for call in calls:
                if isinstance(call, dict):
                    self._on_tool_delta(call)

    def _emit(self, pieces: list[tuple[str, str]]) -> None:
        for kind, text in pieces:
            if kind == "text":
                self.text(text)
            elif text:
                self.thinking(text)

    def _flush_splitter(self) -> None:
        if self._splitter is not None:
            self._emit(self._splitter.flush())

    # ---- tool calls -------------------------------------------------------------------------

    def _more_arguments(self, calls: Any) -> bool:
        """The other hot path: the next argument fragment of the tool call already open (no id, no name, same
        index). Anything else goes the general way."""
        if type(calls) is not list or len(calls) != 1:
            return False
        call = calls[0]
        open_call = self._call
        if type(call) is not dict or call.get("id") or open_call is None or call.get("index") != open_call.index \
                or self._held:
            return False
        function = call.get("function")
        if type(function) is not dict or function.get("name"):
            return False
        args = function.get("arguments")
        if type(args) is not str:
            return False
        if args:
            open_call.args.append(args)
            self._streamed.add(args)
            self._out.append(A.input_json_delta(self._index, args))
        return True

    def _on_tool_delta(self, call: dict[str, Any]) -> None:
        """One tool-call fragment into its own call's block.

        Anthropic's stream has one open content block at a time, and a closed block cannot reopen. Some servers
        interleave the fragments of parallel calls (index 0, 1, 0, ...), so when a new call appears while the
        open call's arguments are not yet a whole JSON object, that call is *held* (its id, name and fragments
        kept) until the open call is whole (its block closes and the held call's opens with what it gathered,
        then streams live) or the turn ends. That is the only holding the target grammar forces: a new call
        after a whole one, the usual sequential case, opens at once and streams as it comes."""
        index = call.get("index")
        call_id = text_field(call.get("id"))
        function = call.get("function")
        if not isinstance(function, dict):
            function = {}
        name = text_field(function.get("name"))
        args = function.get("arguments")
        if args is not None and not isinstance(args, str):
            args = orjson.dumps(args).decode()  # some servers send the arguments as an object
        open_call = self._call
        target: _Call | None = None
        if open_call is not None and (open_call.same(index, call_id) or (
                index is None and not call_id and not (name and open_call.args))):
            target = open_call  # (no index and no id: the open call's, unless a name starts a new one)
        else:
            target = next((c for c in self._held if c.same(index, call_id)), None)
        if target is None and not name and any(c.same(index, call_id) for c in self._closed):
            return  # a late fragment of a call whose block had to close (text came between): it cannot reopen
        if target is None:
            target = _Call(index, call_id, name)
            if open_call is None or (not self._held and open_call.complete()):
                self._open_tool(target)
                open_call = target
            else:
                self._held.append(target)
        if not target.id and call_id:
            target.id = call_id
        if not target.name and name and target is not open_call:
            target.name = name
        if args:
            target.args.append(args)
            if target is open_call:
                self.tool_args(args)
                if self._held and open_call.complete():
                    self._release_held(whole=True)

    def _open_tool(self, call: _Call) -> None:
        self.tool(call.id if call.id else A.tool_use_id(), call.name)
        self._call = call
        if call.args:
            self.tool_args("".join(call.args))

    def _release_held(self, whole: bool = False) -> None:
        """Held calls get their blocks in the order they appeared. With ``whole``, only while each open call is
        whole (the next may still stream live); otherwise all of them (the turn is over)."""
        while self._held:
            if whole and not (self._call is not None and self._call.complete()):
                return
            self._open_tool(self._held.pop(0))
        if not whole:
            self.close_block()

    def _close_message(self) -> None:
        self._flush_splitter()
        self._release_held()
        self.close(self._matched)
