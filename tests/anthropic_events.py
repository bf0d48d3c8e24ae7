"""Anthropic Messages streams, checked three ways: a strict event-grammar validator with its own accumulator,
the official SDK's accumulator (``accumulate_event``), and the official SDK's whole streaming client.

The validator knows the documented rules (Streaming Messages doc, quoted in
``tests/fixtures/corpus/anthropic_errors_and_stream_rules.md``). ``strict=True`` adds what relay itself promises
on top of the API's grammar (usage everywhere, no empty deltas, only the block types relay makes, no unknown
events); ``strict=False`` is the grammar alone, which real Anthropic captures and the docs' examples must pass.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx2
from anthropic._streaming import SSEDecoder
from anthropic.lib.streaming._messages import accumulate_event

Event = tuple[str, dict[str, Any]]

STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal",
                "model_context_window_exceeded"}
# Errors doc (tests/fixtures/corpus/anthropic_errors_and_stream_rules.md)
ERROR_TYPES = {"invalid_request_error", "authentication_error", "billing_error", "permission_error",
               "not_found_error", "conflict_error", "request_too_large", "rate_limit_error", "api_error",
               "timeout_error", "overloaded_error"}
USAGE_COUNTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
DELTA_FOR_BLOCK = {"text": {"text_delta"}, "thinking": {"thinking_delta", "signature_delta"},
                   "tool_use": {"input_json_delta"}}
DELTA_FIELDS = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature",
                "input_json_delta": "partial_json"}


class StreamViolation(AssertionError):
    pass


def _require(cond: Any, where: str, what: str) -> None:
    if not cond:
        raise StreamViolation(f"{where}: {what}")


# ---- parsing -------------------------------------------------------------------------------------

def parse_sse(body: bytes, *, strict: bool = True) -> list[Event]:
    """Anthropic SSE bytes -> [(event name, data)]. Every event must carry an ``event:`` name equal to its data's
    ``type`` (the SDK silently drops events without a name). ``strict`` (relay output): LF line ends, each event is
    exactly ``event: <name>`` then one ``data: <json>`` line, and the body ends with a blank line. The result must
    equal what the SDK's own SSE decoder reads from the same bytes."""
    sdk = [(e.event, e.data) for e in SSEDecoder().iter_bytes(iter([body]))]
    events: list[Event] = []
    for i, (name, data) in enumerate(sdk):
        where = f"SSE event {i}"
        _require(name, where, f"no `event:` line (the SDK skips such events): {data[:80]!r}")
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as exc:
            raise StreamViolation(f"{where} ({name}): data is not JSON: {exc}") from None
        _require(isinstance(doc, dict) and doc.get("type") == name, where,
                 f"event name {name!r} differs from data type {doc.get('type') if isinstance(doc, dict) else doc!r}")
        events.append((name, doc))
    if strict:
        text = body.decode("utf-8")  # raises on invalid UTF-8
        _require(b"\r" not in body, "body", "CR in relay output")
        _require(not body or body.endswith(b"\n\n"), "body", "does not end with a blank line")
        blocks = [b for b in text.split("\n\n") if b]
        _require(len(blocks) == len(events), "body", f"{len(blocks)} SSE blocks but {len(events)} events")
        for i, (block, (name, doc)) in enumerate(zip(blocks, events)):
            lines = block.split("\n")
            _require(len(lines) == 2 and lines[0] == f"event: {name}" and lines[1].startswith("data: "),
                     f"SSE event {i}", f"not exactly `event: {name}` + one `data:` line: {block[:120]!r}")
            _require(json.loads(lines[1][6:]) == doc, f"SSE event {i}", "SDK decoder read other data")
    return events


# ---- the grammar, with an accumulator -----------------------------------------------------------

@dataclass
class Outcome:
    message: dict[str, Any] | None  # the accumulated Message; None when an error came before message_start
    error: dict[str, Any] | None  # the `error` object of a final `event: error`, else None
    events: list[Event]


def _check_usage(usage: Any, where: str, *, strict: bool, need_output: bool) -> None:
    if usage is None and not strict:
        return
    _require(isinstance(usage, dict), where, f"usage is not an object: {usage!r}")
    if need_output:
        _require("output_tokens" in usage, where, "usage without output_tokens")
    for key in USAGE_COUNTS:
        _require(key in usage or not strict, where, f"usage.{key} missing")
        value = usage.get(key)
        if value is None and key != "output_tokens" and not strict:
            continue  # optional counts may be absent or null
        if key in usage:
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                     where, f"usage.{key} is not a count: {value!r}")


def _check_open_block(open_block: dict[str, Any] | None, data: dict[str, Any], last: int, where: str, what: str) -> None:
    _require(open_block is not None, where, f"{what} outside a block")
    _require(data.get("index") == last, where, f"index {data.get('index')!r}, open block is {last}")


def check_stream(events: list[Event], *, strict: bool = True, model: str | None = None) -> Outcome:
    """Validate the event grammar of one Messages stream and accumulate its Message. Raises StreamViolation."""
    message: dict[str, Any] | None = None
    open_block: dict[str, Any] | None = None
    json_buf = ""
    signed = False
    deltas = 0
    final_delta_seen = False
    stopped = False
    error: dict[str, Any] | None = None
    tool_ids: set[str] = set()
    last = len(events) - 1

    for i, (name, data) in enumerate(events):
        where = f"event {i} ({name})"
        if name == "ping":
            _require(set(data) == {"type"}, where, f"ping with fields {data}")
            _require(message is not None, where, "a ping before message_start")
            continue
        if name == "error":
            _require(i == last, where, "`event: error` is not the last event")
            err = data.get("error")
            _require(isinstance(err, dict), where, "no error object")
            _require(isinstance(err.get("message"), str) and err["message"], where, "error without a message")
            _require(isinstance(err.get("type"), str), where, "error without a type")
            if strict:
                _require(err["type"] in ERROR_TYPES, where, f"unknown error type {err['type']!r}")
                _require(open_block is None, where, "relay closes the open block before an error event")
            error = err
            break
        if message is None:
            _require(name == "message_start", where, "the first event is not message_start")
        if name == "message_start":
            _require(message is None, where, "a second message_start")
            msg = data.get("message")
            _require(isinstance(msg, dict), where, "no message object")
            _require(msg.get("type") == "message" and msg.get("role") == "assistant", where, "not an assistant message")
            _require(msg.get("content") == [], where, "message_start content is not []")
            _require(msg.get("stop_reason") is None and msg.get("stop_sequence") is None, where,
                     "message_start already has a stop reason")
            _require(isinstance(msg.get("id"), str) and msg["id"].startswith("msg_"), where, f"bad id {msg.get('id')!r}")
            _require(isinstance(msg.get("model"), str), where, "no model")
            if model is not None:
                _require(msg["model"] == model, where, f"model {msg['model']!r}, expected {model!r}")
            _check_usage(msg.get("usage"), where, strict=strict, need_output=True)
            message = {k: msg[k] for k in ("id", "type", "role", "model")}
            message.update(content=[], stop_reason=None, stop_sequence=None, usage=dict(msg.get("usage") or {}))
            continue
        assert message is not None
        if name == "content_block_start":
            _require(open_block is None, where, f"block {data.get('index')} starts while block "
                     f"{len(message['content']) - 1} is open")
            _require(not final_delta_seen, where, "content block after message_delta")
            _require(data.get("index") == len(message["content"]), where,
                     f"index {data.get('index')!r}, expected {len(message['content'])}")
            block = data.get("content_block")
            _require(isinstance(block, dict), where, "no content_block")
            kind = block.get("type")
            if strict:
                _require(kind in DELTA_FOR_BLOCK, where, f"block type {kind!r}")
            if kind == "text":
                _require(block.get("text") == "", where, "text block starts with text")
                block = {"type": "text", "text": ""}
            elif kind == "thinking":
                _require(block.get("thinking") == "", where, "thinking block starts with text")
                if strict:
                    _require(block.get("signature") == "", where, "thinking block start without signature \"\"")
                block = {"type": "thinking", "thinking": "", "signature": block.get("signature", "")}
            elif kind == "tool_use":
                _require(isinstance(block.get("id"), str) and block["id"], where, "tool_use without an id")
                _require(block["id"] not in tool_ids, where, f"tool id {block['id']!r} used twice")
                tool_ids.add(block["id"])
                _require(isinstance(block.get("name"), str) and block["name"], where, "tool_use without a name")
                _require(block.get("input") == {}, where, "tool_use starts with input other than {}")
                block = {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}
            else:
                block = dict(block)
            message["content"].append(block)
            open_block, json_buf, signed, deltas = block, "", False, 0
            continue
        if name == "content_block_delta":
            _check_open_block(open_block, data, len(message["content"]) - 1, where, "delta")
            assert open_block is not None
            delta = data.get("delta")
            _require(isinstance(delta, dict), where, "no delta")
            dtype = delta.get("type")
            kind = open_block["type"]
            if kind in DELTA_FOR_BLOCK:
                _require(dtype in DELTA_FOR_BLOCK[kind], where, f"{dtype} in a {kind} block")
            _require(not signed, where, "delta after the signature_delta (it must come just before the stop)")
            deltas += 1
            field = DELTA_FIELDS.get(dtype)
            if field is None:
                _require(not strict, where, f"unknown delta type {dtype!r}")
                continue
            value = delta.get(field)
            _require(isinstance(value, str), where, f"{dtype} without {field}")
            _require(value or not strict, where, f"empty {dtype}")
            if dtype == "signature_delta":
                open_block["signature"] = value
                signed = True
            elif dtype == "input_json_delta":
                json_buf += value
            elif field in open_block:
                open_block[field] += value
            continue
        if name == "content_block_stop":
            _check_open_block(open_block, data, len(message["content"]) - 1, where, "stop")
            assert open_block is not None
            kind = open_block["type"]
            if kind == "text":
                _require(open_block["text"], where, "empty text block")
            elif kind == "thinking":
                _require(signed, where, "thinking block closed without a signature_delta")
                if strict:
                    _require(open_block["thinking"], where, "empty thinking block")
            elif kind == "tool_use":
                if json_buf:
                    try:
                        value = json.loads(json_buf)
                    except json.JSONDecodeError as exc:
                        raise StreamViolation(f"{where}: tool input is not JSON ({exc}): {json_buf!r}") from None
                    _require(isinstance(value, dict), where, f"tool input is not an object: {json_buf!r}")
                    open_block["input"] = value
            if strict and kind != "tool_use":
                _require(deltas, where, "block without deltas")
            open_block = None
            continue
        if name == "message_delta":
            _require(open_block is None, where, "message_delta while a block is open")
            _require(not final_delta_seen, where, "a second message_delta")
            final_delta_seen = True
            delta = data.get("delta")
            _require(isinstance(delta, dict), where, "no delta")
            reason, seq = delta.get("stop_reason"), delta.get("stop_sequence")
            _require(reason in STOP_REASONS, where, f"stop_reason {reason!r}")
            _require((seq is not None) == (reason == "stop_sequence"), where,
                     f"stop_sequence {seq!r} with stop_reason {reason!r}")
            _require(seq is None or isinstance(seq, str), where, "stop_sequence is not a string")
            has_tool = any(b["type"] == "tool_use" for b in message["content"])
            if reason == "tool_use":
                _require(has_tool, where, "stop_reason tool_use without a tool_use block")
            if reason == "end_turn":
                _require(not has_tool, where, "tool_use blocks but stop_reason end_turn")
            _check_usage(data.get("usage"), where, strict=strict, need_output=True)
            message["stop_reason"], message["stop_sequence"] = reason, seq
            for key, value in (data.get("usage") or {}).items():
                if value is not None:  # cumulative counts: present ones overwrite
                    message["usage"][key] = value
            continue
        if name == "message_stop":
            _require(final_delta_seen, where, "message_stop without a message_delta before it")
            _require(i == last, where, "message_stop is not the last event")  # nothing may follow it
            stopped = True
            continue
        _require(not strict, where, "unknown event type")  # the docs: tolerate unknown events
    if error is None:
        _require(stopped, "end of stream", "no message_stop and no error event at the end")
    return Outcome(message, error, events)


def check_body(body: bytes, *, strict: bool = True, model: str | None = None) -> Outcome:
    return check_stream(parse_sse(body, strict=strict), strict=strict, model=model)


# ---- the official SDK -----------------------------------------------------------------------------

def sdk_accumulate(events: list[Event]) -> dict[str, Any] | None:
    """The Message snapshot the SDK's own accumulator builds from the events (pings and errors are not
    message events; MessageStream skips them before accumulating)."""
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for name, data in events:
        if name in ("ping", "error"):
            continue
        snapshot = accumulate_event(event=data, current_snapshot=snapshot, json_bufs=json_bufs)  # type: ignore[arg-type]
    return None if snapshot is None else snapshot.to_dict()


def sdk_client(body: bytes, *, status: int = 200, headers: list[tuple[str, str]] | None = None) -> anthropic.Anthropic:
    """A real SDK client whose every request is answered with ``status`` and ``body`` (an event stream unless
    ``headers`` say otherwise)."""
    answer_headers = headers if headers is not None else [("content-type", "text/event-stream")]

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, headers=answer_headers, content=body)

    return anthropic.Anthropic(api_key="test", base_url="http://relay.invalid", max_retries=0,
                               http_client=httpx2.Client(transport=httpx2.MockTransport(answer)))


def sdk_final_message(body: bytes) -> anthropic.types.Message:
    """``messages.stream(...).get_final_message()`` over ``body``; an ``event: error`` raises APIStatusError."""
    with sdk_client(body).messages.stream(model="m", max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
        return s.get_final_message()


def assert_same_message(ours: dict[str, Any], sdk: dict[str, Any]) -> None:
    """Our accumulated message equals the SDK's, field by field on what the stream carried."""
    assert sdk["id"] == ours["id"] and sdk["model"] == ours["model"]
    assert sdk["stop_reason"] == ours["stop_reason"]
    assert sdk.get("stop_sequence") == ours["stop_sequence"]
    assert len(sdk["content"]) == len(ours["content"])
    for theirs, mine in zip(sdk["content"], ours["content"]):
        assert {k: theirs.get(k) for k in mine} == mine
    for key in USAGE_COUNTS:
        if key in ours["usage"]:
            assert sdk["usage"].get(key) == ours["usage"][key], key
