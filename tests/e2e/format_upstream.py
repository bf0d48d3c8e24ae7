"""Scripted models that speak relay's other upstream formats, for Claude Code end-to-end runs through them.

- "gemini-native": Google's ``streamGenerateContent?alt=sse`` (CRLF-framed chunks of whole
  ``GenerateContentResponse`` objects; thought summaries as ``thought: true`` parts; the first function call of
  each answer carries a ``thoughtSignature``; ``finishReason: STOP`` even after calls; usage in every chunk).
- "responses": OpenAI's Responses API (typed ``event:`` lines; reasoning item with ``encrypted_content``;
  ``function_call`` items with streamed arguments; ``response.completed`` with usage).
- Anthropic passthrough needs nothing new: ``ScriptedModel("anthropic")`` already speaks ``/v1/messages``.

The script, turns and request log are ``upstream.ScriptedModel``'s; only the wire differs. A request is part of
the conversation when it offers tools, as there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from ..mock_upstream import Recorded, Reply, json_reply
from .upstream import JSON, PAUSE, Answer, ScriptedModel, Seen, _args, _pieces

SIGNATURE = "c2lnbmF0dXJlLW9mLXR1cm4t"  # base64-looking, as Gemini's are; the turn number is appended


def signature(turn: int) -> str:
    return f"{SIGNATURE}{turn}"


def encrypted(turn: int) -> str:
    return f"gAAAAB-encrypted-reasoning-{turn}"


def _sse(events: Iterator[bytes]) -> Reply:
    pieces: list[bytes | float] = []
    for event in events:
        pieces += [event, PAUSE]
    return Reply(headers=[("content-type", "text/event-stream")], pieces=pieces)


@dataclass
class FormatModel(ScriptedModel):
    def handle(self, request: Recorded) -> Reply:
        path = request.path.split("?", 1)[0]
        body: JSON = orjson.loads(request.body) if request.body else {}
        seen = Seen(request.method, request.path, request.headers, body, self._turn(body) if body.get("tools") else None)
        self.requests.append(seen)
        turn = self._script_turn(seen)
        answer = Answer(turn, str(body.get("model", "")), f"resp_mock{len(self.requests):04d}",
                        [f"call_mock{len(self.requests):02d}{i}" for i in range(len(turn.tool_calls))])
        number = seen.turn if seen.turn is not None else 99
        if self.dialect == "gemini-native":
            if not path.startswith("/v1beta/models/"):
                return json_reply({"error": {"code": 404, "message": f"no route {path}", "status": "NOT_FOUND"}}, 404)
            if path.endswith(":streamGenerateContent"):
                return _sse(b"data: " + orjson.dumps(c) + b"\r\n\r\n" for c in _gemini_chunks(answer, number))
            return json_reply(_gemini_whole(answer, number))
        if path != "/v1/responses":
            return json_reply({"error": {"message": f"no route {path}", "type": "invalid_request_error"}}, 404)
        if body.get("stream"):
            return _sse(b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
                        for e in _responses_events(answer, number))
        return json_reply(_responses_object(answer, number, completed=True))

    def _turn(self, body: JSON) -> int:
        """A retry (the same history as the last conversation request) gets the same turn again."""
        key = "contents" if self.dialect == "gemini-native" else "input"
        main = self.main
        if not main:
            return 0
        last = main[-1]
        assert last.turn is not None
        return last.turn if last.body.get(key) == body.get(key) else last.turn + 1


# ---- Gemini ------------------------------------------------------------------------------------------

GEMINI_USAGE = {"promptTokenCount": 1200, "candidatesTokenCount": 30, "thoughtsTokenCount": 10, "totalTokenCount": 1240}


def _gemini_parts(a: Answer, turn: int) -> Iterator[JSON]:
    """The answer's parts in streaming order (text in small pieces)."""
    for piece in _pieces(a.turn.reasoning, 40):
        yield {"text": piece, "thought": True}
    for piece in _pieces(a.turn.text, 40):
        yield {"text": piece}
    for i, tc in enumerate(a.turn.tool_calls):
        part: JSON = {"functionCall": {"name": tc.name, "args": dict(tc.arguments)}}
        if i == 0:
            part["thoughtSignature"] = signature(turn)
        yield part


def _gemini_chunks(a: Answer, turn: int) -> Iterator[JSON]:
    def chunk(parts: list[JSON], **extra: object) -> JSON:
        return {"candidates": [{"content": {"parts": parts, "role": "model"}, "index": 0, **extra}],
                "usageMetadata": GEMINI_USAGE, "modelVersion": a.model, "responseId": a.id}

    for part in _gemini_parts(a, turn):
        yield chunk([part])
    yield chunk([{"text": ""}], finishReason="STOP")


def _gemini_whole(a: Answer, turn: int) -> JSON:
    return {"candidates": [{"content": {"parts": list(_gemini_parts(a, turn)), "role": "model"}, "index": 0,
                            "finishReason": "STOP"}], "usageMetadata": GEMINI_USAGE, "responseId": a.id}


# ---- OpenAI Responses ----------------------------------------------------------------------------------

RESPONSES_USAGE = {"input_tokens": 1200, "input_tokens_details": {"cached_tokens": 200}, "output_tokens": 40,
                   "output_tokens_details": {"reasoning_tokens": 10}, "total_tokens": 1240}


def _items(a: Answer, turn: int) -> list[JSON]:
    items: list[JSON] = []
    if a.turn.reasoning:
        items.append({"id": f"rs_{turn}", "type": "reasoning", "encrypted_content": encrypted(turn),
                      "summary": [{"type": "summary_text", "text": a.turn.reasoning}]})
    if a.turn.text:
        items.append({"id": f"msg_{turn}", "type": "message", "status": "completed", "role": "assistant",
                      "content": [{"type": "output_text", "text": a.turn.text, "annotations": []}]})
    for (tc, call_id) in a.calls:
        items.append({"id": f"fc_{call_id}", "type": "function_call", "status": "completed", "call_id": call_id,
                      "name": tc.name, "arguments": _args(tc)})
    return items


def _responses_object(a: Answer, turn: int, *, completed: bool) -> JSON:
    return {"id": a.id, "object": "response", "model": a.model, "status": "completed" if completed else "in_progress",
            "output": _items(a, turn) if completed else [], "usage": RESPONSES_USAGE if completed else None}


def _responses_events(a: Answer, turn: int) -> Iterator[JSON]:
    n = iter(range(10_000))
    yield {"type": "response.created", "sequence_number": next(n), "response": _responses_object(a, turn, completed=False)}
    for index, item in enumerate(_items(a, turn)):
        kind = item["type"]
        start = {**item, "status": "in_progress"}
        if kind == "reasoning":
            start = {**start, "summary": [], "encrypted_content": None}
        elif kind == "message":
            start = {**start, "content": []}
        elif kind == "function_call":
            start = {**start, "arguments": ""}
        yield {"type": "response.output_item.added", "sequence_number": next(n), "output_index": index, "item": start}
        if kind == "reasoning":
            yield {"type": "response.reasoning_summary_part.added", "sequence_number": next(n), "item_id": item["id"],
                   "output_index": index, "summary_index": 0, "part": {"type": "summary_text", "text": ""}}
            for piece in _pieces(a.turn.reasoning):
                yield {"type": "response.reasoning_summary_text.delta", "sequence_number": next(n), "item_id": item["id"],
                       "output_index": index, "summary_index": 0, "delta": piece}
        elif kind == "message":
            for piece in _pieces(a.turn.text):
                yield {"type": "response.output_text.delta", "sequence_number": next(n), "item_id": item["id"],
                       "output_index": index, "content_index": 0, "delta": piece, "logprobs": []}
        else:
            for piece in _pieces(item["arguments"]):
                yield {"type": "response.function_call_arguments.delta", "sequence_number": next(n),
                       "item_id": item["id"], "output_index": index, "delta": piece}
            yield {"type": "response.function_call_arguments.done", "sequence_number": next(n), "item_id": item["id"],
                   "output_index": index, "arguments": item["arguments"]}
        yield {"type": "response.output_item.done", "sequence_number": next(n), "output_index": index, "item": item}
    yield {"type": "response.completed", "sequence_number": next(n), "response": _responses_object(a, turn, completed=True)}
