"""OpenAI Responses SSE (typed events) -> Anthropic Messages SSE.

Output items map onto blocks one to one: a ``reasoning`` item is a thinking block (its summary text streamed as
thinking, its encrypted content as the signature at ``output_item.done``), a ``message`` item a text block
(``output_text`` and ``refusal`` deltas), a ``function_call`` item a tool_use block (arguments streamed as
``input_json_delta``). ``response.completed``/``incomplete`` close the message, ``response.failed`` and
``error`` end it with an error.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.formats.openai_responses.common import encode_reasoning, error_of, stop_reason, summary_text, usage_numbers
from relay.formats.writer import BlockWriter

_TEXT_DELTAS = (b"response.output_text.delta", b"response.refusal.delta")
_THINKING_DELTAS = (b"response.reasoning_summary_text.delta", b"response.reasoning_text.delta")


class ResponsesStreamTranslator(BlockWriter):
    __slots__ = ("_response", "_args_seen", "_thought")  # (as BlockWriter's: no instance dict per stream)
    ENDED_WITHOUT = "no response.completed"

    def __init__(self, model: str, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._response: Any = None
        self._args_seen: set[Any] = set()  # output indexes whose arguments came as deltas
        self._thought = False  # the open reasoning item has produced text

    def _on_event(self, name: bytes | None, payload: bytes) -> None:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(doc, dict):
            return
        kind = name or str(doc.get("type", "")).encode()
        if kind in _TEXT_DELTAS:
            self.text(doc.get("delta") or "")
        elif kind in _THINKING_DELTAS:
            self._thought = True
            self.thinking(doc.get("delta") or "")
        elif kind == b"response.function_call_arguments.delta":
            self._args_seen.add(doc.get("output_index"))
            self.tool_args(doc.get("delta") or "")
        elif kind == b"response.reasoning_summary_part.added":
            if doc.get("summary_index", 0) and self._thought:
                self.thinking("\n\n")
        elif kind == b"response.output_item.added":
            self._item_added(doc.get("item"))
        elif kind == b"response.output_item.done":
            self._item_done(doc.get("item"), doc.get("output_index"))
        elif kind in (b"response.completed", b"response.incomplete"):
            self._response = doc.get("response")
            if isinstance(self._response, dict):
                self.usage(*usage_numbers(self._response.get("usage")))
            self.close()
        elif kind == b"response.failed":
            response = doc.get("response")
            self.fail(error_of(response.get("error") if isinstance(response, dict) else None, self.secrets, self.provider))
        elif kind == b"error":
            self.fail(error_of(doc, self.secrets, self.provider))
        # response.created / in_progress carry nothing for the client: message_start waits for the first output,
        # so a response that fails before producing any is still answered with the HTTP error it deserves.

    def _item_added(self, item: Any) -> None:
        if not isinstance(item, dict):
            return
        self.start()
        if item.get("type") == "function_call":
            self.tool(str(item.get("call_id") or item.get("id") or ""), str(item.get("name") or ""))
        elif item.get("type") == "reasoning":
            self.close_block()
            self._thought = False

    def _item_done(self, item: Any, index: Any) -> None:
        if not isinstance(item, dict):
            return
        kind = item.get("type")
        if kind == "function_call":
            if index not in self._args_seen and isinstance(item.get("arguments"), str):
                self.tool_args(item["arguments"])  # a server that sends the arguments only whole
            self.close_block()
        elif kind == "reasoning":
            encrypted = item.get("encrypted_content")
            if not self._thought and (text := summary_text(item)):
                self.thinking(text)  # a server that sends the summary only whole
                self._thought = True
            if isinstance(encrypted, str) and encrypted:
                self.thinking("", encode_reasoning(encrypted))
            self.close_block()
        elif kind == "message":
            self.close_block()

    def _stop_reason(self) -> str:
        return stop_reason(self._response, self.saw_tool)
