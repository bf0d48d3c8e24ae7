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
from relay.formats.writer import TEXT, BlockWriter


class GeminiStreamTranslator(BlockWriter):
    __slots__ = ("_finish", "_blocked", "_calls", "_response_id")  # (as BlockWriter's: no instance dict per stream)
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
        if type(doc) is dict and self.started and self._one_text(doc):
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

    def _one_text(self, doc: dict[str, Any]) -> bool:
        """The hot path: a mid-stream chunk whose one candidate carries one plain text or thought part (no
        signature, no call, no finish, no error) and perhaps the running usage. Handles it as
        ``part_ops`` + ``_apply`` would and says True; anything else is left to the general path."""
        try:
            candidates = doc["candidates"]
            if type(candidates) is not list or len(candidates) != 1 or "error" in doc \
                    or (not self._response_id and "responseId" in doc):  # (the general path keeps it)
                return False
            candidate = candidates[0]
            if type(candidate) is not dict or candidate.get("finishReason") \
                    or ("index" in candidate and candidate["index"] != 0):
                return False
            parts = candidate["content"]["parts"]
            if type(parts) is not list or len(parts) != 1:
                return False
            part = parts[0]
            text = part["text"]
            if type(text) is not str or "functionCall" in part or "thoughtSignature" in part:
                return False
        except (KeyError, TypeError):
            return False
        if "usageMetadata" in doc:
            self.usage(*usage_numbers(doc["usageMetadata"]))
        if part.get("thought") is True:
            if self.signed:  # that block's signature is set: this is a new thought
                self.close_block()
            self.thinking(text)
        elif text:
            self.delta(TEXT, text)
        return True

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
