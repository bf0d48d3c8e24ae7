"""Gemini ``streamGenerateContent?alt=sse`` -> Anthropic Messages SSE.

Each event is a whole ``GenerateContentResponse`` whose parts are new output (text pieces, whole function
calls). Usage is cumulative and the last chunk carries the finish reason; the body simply ends (no ``[DONE]``),
so the message closes at end of body, if a ``finishReason`` came (else the answer was cut short).
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.formats.gemini.common import blocked, part_ops, stop_reason, usage_numbers
from relay.formats.gemini.response import candidate_of, error_of
from relay.formats.writer import BlockWriter


class GeminiStreamTranslator(BlockWriter):
    ENDED_WITHOUT = "no finishReason"

    def __init__(self, model: str, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._finish: str | None = None
        self._blocked = False
        self._calls = 0
        self._response_id = ""

    def _on_event(self, name: bytes | None, payload: bytes) -> None:
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(doc, list) and doc and isinstance(doc[0], dict):
            doc = doc[0]
        if not isinstance(doc, dict):
            return
        if "error" in doc and not doc.get("candidates"):
            self.fail(error_of(doc, self.secrets, self.provider))
            return
        self.start()
        if not self._response_id and isinstance(doc.get("responseId"), str):
            self._response_id = doc["responseId"]
        if "usageMetadata" in doc:
            self.usage(*usage_numbers(doc["usageMetadata"]))
        if blocked(doc):
            self._blocked = True
        candidate = candidate_of(doc)
        content = candidate.get("content")
        if isinstance(content, dict):
            for op in part_ops(content.get("parts"), self._response_id, self._calls):
                self._apply(op)
        if candidate.get("finishReason"):
            self._finish = candidate["finishReason"]
            self.close_block()

    def _apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "thinking":
            if self.signed:  # that block's signature is set: this is a new thought
                self.close_block()
            self.thinking(op[1], op[2])
        elif kind == "text":
            self.text(op[1])
        elif kind == "signature":
            if not (op[2] and self.in_thinking and not self.signed):
                self.close_block()
            self.thinking("", op[1])
            self.close_block()
        else:
            self._calls += 1
            self.tool(op[1], op[2])
            if op[3]:
                self.tool_args(orjson.dumps(op[3]).decode())
            self.close_block()

    def _on_end(self) -> None:
        """Gemini's body just ends: the last chunk's ``finishReason`` (or a blocked prompt) is what says it
        finished."""
        if self._finish or self._blocked:
            self.close()
        else:
            super()._on_end()

    def _stop_reason(self) -> str:
        return stop_reason(self._finish, self.saw_tool, self._blocked)
