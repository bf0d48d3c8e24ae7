"""Anthropic Messages request -> OpenAI Chat Completions request.

Every Anthropic field has a deliberate fate: mapped, or dropped on purpose (reported in ``dropped`` so the
server can log it at debug). Pure: dict in, dict out.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.config import Provider
from relay.errors import invalid
from relay.formats.fields import audit
from relay.formats.resume import Translation
from relay.formats.inbound import (
    INTERRUPTED,
    PendingCalls,
    client_tools,
    data_url,
    effort,
    asks_reasoning,
    block_place,
    max_tokens,
    openai_choice_fields,
    output_schema,
    place,
    prompt_cache_key,
    sampling,
    stop_sequences,
    system_text,
    text_of_blocks,
    thinking_budget,
    thinking_wanted,
    turns,
    user_pieces,
)
from relay.formats.structured import json_schema_format


def _user_parts(blocks: list[Any], where: str, dropped: set[str]) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for piece in user_pieces(blocks, where, dropped):
        kind = piece[0]
        if kind == "text":
            parts.append({"type": "text", "text": piece[1]})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": data_url(piece)}})
        elif kind == "file":
            _, media, data, name = piece
            parts.append({"type": "file", "file": {"filename": name, "file_data": f"data:{media};base64,{data}"}})
        else:  # a document by URL: Chat Completions has no file URLs
            parts.append({"type": "text", "text": f"{piece[2]}Document at {piece[1]}"})
    return parts


def _collapse(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]]:
    """Text-only content goes as a plain string: the form every OpenAI-compatible server accepts."""
    if all(p["type"] == "text" for p in parts):
        return "\n\n".join(p["text"] for p in parts)
    return parts


def _tool_result(block: dict[str, Any], n: int, i: int, dropped: set[str]) -> tuple[str, list[dict[str, Any]]]:
    """A tool_result's text for the tool message, and any images that must follow as a user message. (Its place,
    message ``n``'s block ``i``, is spelled out only for an error or a list. ``build`` takes the usual result,
    one string and no error, as it is without a call.)"""
    content = block.get("content", "")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for part in _user_parts(content, block_place(place(n), i), dropped):
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                images.append(part)
    else:
        raise invalid(f"{block_place(place(n), i)}: tool_result content must be a string or a list")
    text = "\n\n".join(texts)
    if block.get("is_error") and not text.lower().startswith("error"):
        text = "Error: " + text
    if images and not text:
        text = "(the result is the image below)"
    return text, images


def _tools(req: dict[str, Any], dropped: set[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for tool in client_tools(req, dropped):
        function: dict[str, Any] = {"name": tool["name"], "parameters": tool["input_schema"]}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        out.append({"type": "function", "function": function})
    return out


def _reasoning(body: dict[str, Any], req: dict[str, Any], provider: Provider, dropped: set[str]) -> None:
    """Claude's thinking settings in whichever control the provider accepts (``reasoning_control``)."""
    control = provider.reasoning_control
    level = effort(req)
    wanted = thinking_wanted(req)
    if control == "reasoning_effort":
        if level:
            body["reasoning_effort"] = level
    elif control == "thinking_type":  # DeepSeek, Kimi, GLM: thinking: {"type": "enabled" | "disabled"}
        if wanted is not None:
            body["thinking"] = {"type": "enabled" if wanted else "disabled"}
    elif control == "enable_thinking":  # DashScope, SiliconFlow: enable_thinking (+ thinking_budget)
        if wanted is not None:
            body["enable_thinking"] = wanted
            if wanted and (budget := thinking_budget(req)):
                body["thinking_budget"] = budget
    elif control == "reasoning_object":  # OpenRouter: reasoning: {"effort": ...}
        if level:
            body["reasoning"] = {"effort": level}
    elif control == "none":
        if asks_reasoning(req):
            dropped.add("thinking/output_config.effort (provider has no reasoning control)")
    else:
        dropped.add(f"thinking (reasoning_control {control} is not an OpenAI Chat control)")


def build(req: dict[str, Any], provider: Provider, model: str, stream: bool,
          history: tuple[Translation | None, Translation] | None = None) -> tuple[dict[str, Any], set[str]]:
    """Returns the upstream body and the set of things deliberately dropped (for a debug log line).

    ``history``: (the translation of the request before in the conversation, or None; this one's, to fill): the
    messages that are the very ones translated before are not translated again (``relay.formats.resume``). The
    body then holds their JSON as ``orjson.Fragment``s (it is only ever serialised)."""
    dropped: set[str] = set()
    messages_in = req.get("messages")
    if not isinstance(messages_in, list):
        raise invalid("messages: Field required (a list)")
    system = system_text(req.get("system"))
    merged: list[str] = []  # system turns merged into the system prompt
    out: list[dict[str, Any]] = []
    pending: PendingCalls[dict[str, Any]] = PendingCalls(
        lambda call_id: {"role": "tool", "tool_call_id": call_id, "content": INTERRUPTED})
    before, record = history if history is not None else (None, None)
    done = before.covers(messages_in, provider) if before is not None else 0  # messages translated before
    made = 0  # upstream messages carried from the translation before
    if record is not None:
        if before is not None and done:
            made, waiting, _, dropped_before = before.carry(done, record)
            pending.ids = list(waiting)
            dropped |= dropped_before
        out, merged = record.out, record.merged  # (made here, the record's are this translation's)
    seen = len(dropped)
    snapshot = frozenset(dropped)

    def answer_pending() -> None:
        if pending.ids:
            out.extend(pending.close())

    def mark() -> None:
        """The state after a message, into the record (one snapshot of ``dropped`` while it does not change)."""
        nonlocal seen, snapshot
        assert record is not None
        if len(dropped) != seen:
            seen, snapshot = len(dropped), frozenset(dropped)
        record.marks.append((len(out), tuple(pending.ids), len(merged), snapshot))

    # (Per message and per block: exact type checks, and a place named only for an error. A 1 MiB Claude Code
    # request has ~480 messages and ~700 blocks; see bench/README.md, session 7.)
    for n, role, content in turns(req, done):
        if record is not None and n > done:  # the state after the message before
            mark()
        if role == "system":
            text = text_of_blocks(content, f"{place(n)}.content")
            if provider.system_turns == "merge" or not out:  # a system turn before any other is the system prompt
                merged.append(text)
            else:
                answer_pending()
                out.append({"role": "user" if provider.system_turns == "user" else "system", "content": text})
            continue
        if type(content) is str:
            if role == "user" and pending.ids:
                answer_pending()
            out.append({"role": role, "content": content})
            continue
        if role == "assistant":
            if pending.ids:
                answer_pending()
            texts: list[str] = []
            reasoning: list[str] = []
            calls: list[dict[str, Any]] = []
            for i, block in enumerate(content):
                if type(block) is not dict:
                    raise invalid(f"{block_place(place(n), i)}: content blocks must be objects")
                kind = block.get("type")
                if kind == "text":
                    said = block.get("text")
                    if said and type(said) is str:
                        texts.append(said)
                elif kind == "tool_use":
                    call_id = block.get("id")
                    name = block.get("name")
                    if type(call_id) is not str or type(name) is not str:
                        raise invalid(f"{block_place(place(n), i)}: tool_use needs a string id and name")
                    given = block.get("input")
                    arguments = orjson.dumps(given if given is not None else {}).decode()
                    calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
                elif kind == "thinking":
                    if isinstance(block.get("thinking"), str):
                        reasoning.append(block["thinking"])
                elif kind == "redacted_thinking":
                    dropped.add("redacted_thinking")
                elif kind in ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result"):
                    dropped.add(f"assistant {kind}")
                elif kind is None:
                    raise invalid(f"{block_place(place(n), i)}: content block without a type")
                else:
                    dropped.add(f"assistant block {kind}")
            empty = None if calls and provider.tool_call_content == "null" else ""  # see config.TOOL_CALL_CONTENTS
            entry: dict[str, Any] = {"role": "assistant", "content": "\n\n".join(texts) if texts else empty}
            if calls:
                entry["tool_calls"] = calls
                for call in calls:
                    pending.add(call["id"])
            if reasoning:
                if provider.reasoning_return:
                    entry["reasoning_content"] = "\n\n".join(reasoning)
                else:
                    dropped.add("thinking blocks (the client's record)")
            out.append(entry)
            continue
        # user turn: tool results first (they must follow the calling assistant turn), then the rest
        rest: list[Any] = []
        follow_images: list[dict[str, Any]] = []
        for i, block in enumerate(content):
            if type(block) is dict and block.get("type") == "tool_result":
                call_id = block.get("tool_use_id")
                if type(call_id) is not str:
                    raise invalid(f"{block_place(place(n), i)}.tool_use_id: Field required")
                result = block.get("content", "")
                images: list[dict[str, Any]] = []
                if type(result) is str and not block.get("is_error"):
                    text = result
                else:
                    text, images = _tool_result(block, n, i, dropped)
                if pending.take(call_id):
                    out.append({"role": "tool", "tool_call_id": call_id, "content": text})
                else:  # a result for a call the upstream never saw: keep its content as plain text
                    rest.append({"type": "text", "text": f"[result of tool call {call_id}]\n{text}"})
                if images:
                    follow_images.append({"type": "text", "text": f"[images returned by tool call {call_id}]"})
                    follow_images.extend(images)
            else:
                rest.append(block)
        if pending.ids:
            answer_pending()
        parts = follow_images + _user_parts(rest, place(n), dropped) if rest else follow_images
        if parts:
            out.append({"role": "user", "content": _collapse(parts)})
    if record is not None and len(record.marks) < len(messages_in):  # the state after the last message
        mark()

    sent: list[Any] = record.json(made) + out[made:] if made and record is not None else out
    merged_system = [system, *merged] if system else merged
    if merged_system:
        sent = [{"role": "system", "content": "\n\n".join(merged_system)}, *sent]

    body: dict[str, Any] = {"model": model, "messages": sent}
    body[provider.max_tokens_field] = max_tokens(req, provider)

    tools = _tools(req, dropped)
    if tools:
        body["tools"] = tools
        body.update(openai_choice_fields(req, lambda name: {"type": "function", "function": {"name": name}}))

    stops = stop_sequences(req)
    if stops:
        body["stop"] = stops
    body.update(sampling(req))
    if req.get("top_k") is not None:
        if provider.pass_top_k:
            body["top_k"] = req["top_k"]
        else:
            dropped.add("top_k (not an OpenAI parameter)")
    _reasoning(body, req, provider, dropped)
    schema = output_schema(req, provider)
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": json_schema_format(schema, provider)}
    body.update(prompt_cache_key(req, provider, dropped))
    audit(req, "openai", dropped)
    if stream:
        body["stream"] = True
        if provider.stream_usage:
            body["stream_options"] = {"include_usage": True}
    return body, dropped
