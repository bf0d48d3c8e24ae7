"""A scripted model behind an HTTP API: it answers each conversation request with the script's next turn,
in one of several wire dialects, and records every request it gets.

Dialects:
- "openai": OpenAI Chat Completions style: role chunk, incremental tool-call argument fragments with `index`,
  finish_reason "tool_calls", a `choices: []` usage chunk, `data: [DONE]`.
- "gemini": Gemini's OpenAI endpoint: every delta carries `role`, each whole tool call comes in one chunk without
  `index` and with `id: ""`, the last chunk has `finish_reason: "stop"` (also after tool calls) and the usage.
- "anthropic": Anthropic Messages (only to check the harness against Claude Code with no relay in between).

A request counts as the conversation ("main") when it offers tools; Claude Code's side requests (titles, quota
probes, ...) offer none and get `side_text`, so they never consume the script.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from ..mock_upstream import Recorded, Reply, json_reply

Dialect = Literal["openai", "gemini", "anthropic"]
JSON = dict[str, Any]

PIECE = 7  # characters per streamed fragment: small, so JSON and multi-byte text get split everywhere
PAUSE = 0.002  # seconds between streamed events, so each lands in its own TCP segment
CREATED = 1_700_000_000
USAGE = {"prompt_tokens": 1200, "completion_tokens": 40, "total_tokens": 1240}


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class Turn:
    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    reasoning: str = ""


def call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(name, arguments)


def tools_turn(*calls: ToolCall, text: str = "", reasoning: str = "") -> Turn:
    return Turn(text=text, tool_calls=calls, reasoning=reasoning)


@dataclass(frozen=True)
class Seen:
    """One request the model got."""

    method: str
    path: str
    headers: dict[str, str]
    body: JSON
    turn: int | None  # index among conversation requests; None for a side request


Script = Sequence[Turn] | Callable[[Seen], Turn]
Usage = Callable[[Seen], Mapping[str, int]]  # the OpenAI `usage` object to report for a request
Gate = Callable[[Seen], Reply | None]  # a reply that stands instead of the script's (e.g. a refusal), or None


def _pieces(text: str, size: int = PIECE) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _stream(events: Iterator[JSON], anthropic: bool = False) -> Reply:
    """OpenAI: `data:` lines and a final `[DONE]`; Anthropic: `event:` + `data:`, no `[DONE]`."""
    pieces: list[bytes | float] = []
    for event in events:
        name = b"event: " + event["type"].encode() + b"\n" if anthropic else b""
        pieces += [name + b"data: " + orjson.dumps(event) + b"\n\n", PAUSE]
    if not anthropic:
        pieces.append(b"data: [DONE]\n\n")
    return Reply(headers=[("content-type", "text/event-stream"), ("cache-control", "no-cache")], pieces=pieces)


@dataclass
class ScriptedModel:
    dialect: Dialect
    script: Script = ()
    side_text: str = "ok"
    usage: Usage | None = None  # default: the fixed USAGE
    gate: Gate | None = None  # asked first about every request to /v1/chat/completions (openai, gemini)
    url: str = ""  # set once serving
    requests: list[Seen] = field(default_factory=list)
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def main(self) -> list[Seen]:
        """The conversation requests, in order."""
        return [r for r in self.requests if r.turn is not None]

    @property
    def side(self) -> list[Seen]:
        return [r for r in self.requests if r.turn is None and r.method == "POST"]

    def handle(self, request: Recorded) -> Reply:
        path = request.path.split("?", 1)[0]
        body: JSON = orjson.loads(request.body) if request.body else {}
        seen = Seen(request.method, request.path, request.headers, body, self._turn(body) if body.get("tools") else None)
        self.requests.append(seen)
        if self.dialect == "anthropic":
            if request.method == "HEAD":
                return Reply(headers=[], chunked=False)
            if path == "/v1/messages/count_tokens":
                return json_reply({"input_tokens": 1200})
            if path != "/v1/messages":
                return json_reply({"type": "error", "error": {"type": "not_found_error", "message": path}}, 404)
        elif path != "/v1/chat/completions":
            return json_reply({"error": {"message": f"no route {path}", "type": "invalid_request_error"}}, 404)
        elif self.gate is not None and (refusal := self.gate(seen)) is not None:
            return refusal
        turn = self._script_turn(seen)
        n = len(self.requests)
        answer = Answer(
            turn,
            str(body.get("model", "mock-model")),
            # Unique per answer: Claude Code merges consecutive assistant messages that share an id.
            f"msg_mock{n:04d}" if self.dialect == "anthropic" else f"chatcmpl-mock{n:04d}",
            ["" if self.dialect == "gemini" else self._new_id() for _ in turn.tool_calls],
            dict(self.usage(seen)) if self.usage is not None else USAGE,
        )
        stream = bool(body.get("stream"))
        if self.dialect == "anthropic":
            return _stream(_anthropic_events(answer), anthropic=True) if stream else json_reply(_anthropic_message(answer))
        if not stream:
            return json_reply(_openai_completion(answer, self.dialect))
        return _stream(_openai_chunks(answer) if self.dialect == "openai" else _gemini_chunks(answer))

    def _turn(self, body: JSON) -> int:
        """A retry (same messages as the last conversation request) gets the same turn again."""
        main = self.main
        if not main:
            return 0
        last = main[-1]
        assert last.turn is not None
        return last.turn if last.body.get("messages") == body.get("messages") else last.turn + 1

    def _script_turn(self, seen: Seen) -> Turn:
        if seen.turn is None:
            return Turn(text=self.side_text)
        if callable(self.script):
            return self.script(seen)
        return self.script[seen.turn] if seen.turn < len(self.script) else Turn(text="(script exhausted)")

    def _new_id(self) -> str:
        n = next(self._ids)
        return f"toolu_mock{n:04d}" if self.dialect == "anthropic" else f"call_mock{n:04d}"


@dataclass(frozen=True)
class Answer:
    turn: Turn
    model: str
    id: str
    call_ids: list[str]
    usage: Mapping[str, int] = field(default_factory=lambda: USAGE)

    @property
    def calls(self) -> list[tuple[ToolCall, str]]:
        return list(zip(self.turn.tool_calls, self.call_ids))


def _args(call: ToolCall) -> str:
    return orjson.dumps(call.arguments).decode()


def _openai_chunks(a: Answer) -> Iterator[JSON]:
    base = {"id": a.id, "object": "chat.completion.chunk", "created": CREATED, "model": a.model}

    def chunk(delta: JSON, finish: str | None = None) -> JSON:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    yield chunk({"role": "assistant", "content": ""})
    for piece in _pieces(a.turn.reasoning):
        yield chunk({"reasoning_content": piece})
    for piece in _pieces(a.turn.text):
        yield chunk({"content": piece})
    for index, (tc, id_) in enumerate(a.calls):
        head = {"index": index, "id": id_, "type": "function", "function": {"name": tc.name, "arguments": ""}}
        yield chunk({"tool_calls": [head]})
        for piece in _pieces(_args(tc)):
            yield chunk({"tool_calls": [{"index": index, "function": {"arguments": piece}}]})
    yield chunk({}, "tool_calls" if a.calls else "stop")
    yield {**base, "choices": [], "usage": a.usage}


def _gemini_chunks(a: Answer) -> Iterator[JSON]:
    base = {"created": CREATED, "model": a.model, "object": "chat.completion.chunk"}

    def chunk(delta: JSON) -> JSON:
        return {**base, "choices": [{"delta": {"role": "assistant", **delta}, "index": 0}]}

    for piece in _pieces(a.turn.reasoning, 40):
        yield chunk({"reasoning_content": piece})
    for piece in _pieces(a.turn.text, 40):
        yield chunk({"content": piece})
    for tc, id_ in a.calls:
        yield chunk({"tool_calls": [{"function": {"arguments": _args(tc), "name": tc.name}, "id": id_, "type": "function"}]})
    yield {**base, "choices": [{"delta": {"role": "assistant"}, "finish_reason": "stop", "index": 0}], "usage": a.usage}


def _openai_completion(a: Answer, dialect: Dialect) -> JSON:
    message: JSON = {"role": "assistant", "content": a.turn.text or None}
    if a.turn.reasoning:
        message["reasoning_content"] = a.turn.reasoning
    if a.calls:
        message["tool_calls"] = [
            {"id": id_, "type": "function", "function": {"name": tc.name, "arguments": _args(tc)}} for tc, id_ in a.calls
        ]
    finish = "tool_calls" if a.calls and dialect == "openai" else "stop"
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return {"id": a.id, "object": "chat.completion", "created": CREATED, "model": a.model, "choices": [choice], "usage": a.usage}


def _anthropic_blocks(a: Answer) -> list[JSON]:
    blocks: list[JSON] = []
    if a.turn.reasoning:
        blocks.append({"type": "thinking", "thinking": a.turn.reasoning, "signature": "mock-signature"})
    if a.turn.text:
        blocks.append({"type": "text", "text": a.turn.text})
    return blocks + [{"type": "tool_use", "id": id_, "name": tc.name, "input": tc.arguments} for tc, id_ in a.calls]


def _anthropic_message(a: Answer) -> JSON:
    return {
        "id": a.id,
        "type": "message",
        "role": "assistant",
        "model": a.model,
        "content": _anthropic_blocks(a),
        "stop_reason": "tool_use" if a.calls else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 1200, "output_tokens": 40},
    }


def _block_deltas(block: JSON) -> list[JSON]:
    kind = block["type"]
    if kind == "thinking":
        deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(block["thinking"])]
        return deltas + [{"type": "signature_delta", "signature": block["signature"]}]
    if kind == "text":
        return [{"type": "text_delta", "text": p} for p in _pieces(block["text"])]
    return [{"type": "input_json_delta", "partial_json": p} for p in _pieces(orjson.dumps(block["input"]).decode())]


def _anthropic_events(a: Answer) -> Iterator[JSON]:
    message = {**_anthropic_message(a), "content": [], "stop_reason": None, "usage": {"input_tokens": 1200, "output_tokens": 1}}
    yield {"type": "message_start", "message": message}
    for index, block in enumerate(_anthropic_blocks(a)):
        empty = {"thinking": {"thinking": "", "signature": ""}, "text": {"text": ""}, "tool_use": {"input": {}}}[block["type"]]
        yield {"type": "content_block_start", "index": index, "content_block": {**block, **empty}}
        for delta in _block_deltas(block):
            yield {"type": "content_block_delta", "index": index, "delta": delta}
        yield {"type": "content_block_stop", "index": index}
    stop = "tool_use" if a.calls else "end_turn"
    yield {"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None}, "usage": {"output_tokens": 40}}
    yield {"type": "message_stop"}


# Reading OpenAI-shaped request bodies.


def text_of(content: Any) -> str:
    """The text of a message `content`: a string, or the text parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def tool_names(body: JSON) -> list[str]:
    return [t["function"]["name"] for t in body.get("tools", [])]


def tool_results(body: JSON) -> dict[str, str]:
    """tool_call_id -> text, for every `role: "tool"` message."""
    return {m["tool_call_id"]: text_of(m.get("content")) for m in body.get("messages", []) if m.get("role") == "tool"}


def assistant_tool_calls(body: JSON) -> list[JSON]:
    return [tc for m in body.get("messages", []) if m.get("role") == "assistant" for tc in m.get("tool_calls") or []]
