"""Anthropic Messages request -> OpenAI Responses request (``POST /responses``).

system -> ``instructions``; messages -> ``input`` items: user/assistant messages, ``function_call`` for each
tool_use, ``function_call_output`` for each tool_result (every call answered, as the API requires), reasoning
items from thinking blocks that carry one (``common.py``); tools -> function tools with ``strict: false``
(the API defaults to strict, which Claude Code's schemas do not satisfy); thinking -> ``reasoning.effort``.
Requests go with ``store: false``: relay sends the whole conversation each time. Pure: dict in, dict out.
"""

from __future__ import annotations

from typing import Any

import orjson

from relay.config import Provider
from relay.errors import invalid
from relay.formats.fields import audit
from relay.formats.structured import json_schema_format
from relay.formats.inbound import (
    INTERRUPTED,
    PendingCalls,
    block_place,
    blocks,
    client_tools,
    data_url,
    effort,
    asks_reasoning,
    max_tokens,
    openai_choice_fields,
    output_schema,
    prompt_cache_key,
    sampling,
    split_tool_results,
    stop_sequences,
    system_text,
    text_of_blocks,
    place,
    turns,
    user_pieces,
)
from relay.formats.openai_responses.common import decode_reasoning

MIN_OUTPUT_TOKENS = 16  # the API refuses max_output_tokens below 16 (Claude Code probes with max_tokens 1)

Item = dict[str, Any]


def _input_parts(content: str | list[Any], where: str, dropped: set[str]) -> list[Item]:
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}] if content else []
    parts: list[Item] = []
    for piece in user_pieces(content, where, dropped):
        kind = piece[0]
        if kind == "text":
            if piece[1]:
                parts.append({"type": "input_text", "text": piece[1]})
        elif kind == "image":
            parts.append({"type": "input_image", "image_url": data_url(piece), "detail": "auto"})
        elif kind == "file":
            _, media, data, name = piece
            parts.append({"type": "input_file", "filename": name, "file_data": f"data:{media};base64,{data}"})
        else:
            parts.append({"type": "input_file", "file_url": piece[1]})
    return parts


def _assistant_items(content: str | list[Any], where: str, pending: PendingCalls[Item], dropped: set[str]) -> list[Item]:
    if isinstance(content, str):
        return [{"role": "assistant", "content": content}] if content else []
    items: list[Item] = []
    for i, kind, block in blocks(content, where):
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str) or not text:
                continue
            if items and items[-1].get("role") == "assistant":
                items[-1]["content"] += "\n\n" + text
            else:
                items.append({"role": "assistant", "content": text})
        elif kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise invalid(f"{block_place(where, i)}: tool_use needs a string id and name")
            arguments = orjson.dumps(block.get("input") if block.get("input") is not None else {}).decode()
            items.append({"type": "function_call", "call_id": call_id, "name": name, "arguments": arguments})
            pending.add(call_id)
        elif kind == "thinking":
            encrypted = decode_reasoning(block.get("signature"))
            if encrypted is None:
                dropped.add("thinking blocks (the client's record)")
                continue
            thought = block.get("thinking")
            summary = [{"type": "summary_text", "text": thought}] if isinstance(thought, str) and thought else []
            items.append({"type": "reasoning", "summary": summary, "encrypted_content": encrypted})
        else:
            dropped.add(f"assistant block {kind}")
    return items


def _input(req: dict[str, Any], provider: Provider, system: list[str], dropped: set[str]) -> list[Item]:
    items: list[Item] = []
    pending: PendingCalls[Item] = PendingCalls(
        lambda call_id: {"type": "function_call_output", "call_id": call_id, "output": INTERRUPTED})

    def answer_pending() -> None:
        items.extend(pending.close())

    for n, role, content in turns(req):
        where = place(n)
        if role == "system":
            text = text_of_blocks(content, f"{where}.content")
            if provider.system_turns == "merge" or not items:
                system.append(text)
            else:
                answer_pending()
                items.append({"role": "user" if provider.system_turns == "user" else "system", "content": text})
            continue
        if role == "assistant":
            if pending.ids:
                answer_pending()
            items.extend(_assistant_items(content, where, pending, dropped))
            continue
        follow: list[Item] = []
        found, rest = split_tool_results(content, where)
        strays: list[Any] = []  # results for calls the upstream never saw, as text ahead of the rest
        for at, call_id, block in found:
            result = block.get("content", "")
            media: list[Item] = []
            if type(result) is str:  # the usual result: its text as it is (no parts to build and join)
                text = result
            else:
                parts = _input_parts(result, at, dropped)
                text = "\n\n".join(p["text"] for p in parts if p["type"] == "input_text")
                media = [p for p in parts if p["type"] != "input_text"]
            if block.get("is_error") and not text.lower().startswith("error"):
                text = "Error: " + text
            if media:
                text = text or "(the result is the image below)"
                follow += [{"type": "input_text", "text": f"[images returned by tool call {call_id}]"}, *media]
            if pending.take(call_id):
                items.append({"type": "function_call_output", "call_id": call_id, "output": text})
            else:  # a result for a call the upstream never saw: keep its content as plain text
                strays.append({"type": "text", "text": f"[result of tool call {call_id}]\n{text}"})
        if pending.ids:
            answer_pending()
        if isinstance(content, str):
            parts = follow + _input_parts(content, where, dropped)
        else:
            parts = follow + _input_parts([*strays, *rest], where, dropped) if strays or rest else follow
        if parts:
            items.append({"role": "user", "content": parts})
    return items


def _tools(req: dict[str, Any], dropped: set[str]) -> list[Item]:
    out: list[Item] = []
    for tool in client_tools(req, dropped):
        function: Item = {"type": "function", "name": tool["name"], "parameters": tool["input_schema"],
                          "strict": tool.get("strict") is True}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append(function)
    return out


def build(req: dict[str, Any], provider: Provider, model: str, stream: bool) -> tuple[dict[str, Any], set[str]]:
    """The upstream body and the set of things deliberately dropped (for a debug log line)."""
    dropped: set[str] = set()
    system = [text] if (text := system_text(req.get("system"))) else []
    body: dict[str, Any] = {"model": model, "input": _input(req, provider, system, dropped)}
    if system:
        body["instructions"] = "\n\n".join(system)
    body["max_output_tokens"] = max(max_tokens(req, provider), MIN_OUTPUT_TOKENS)
    tools = _tools(req, dropped)
    if tools:
        body["tools"] = tools
        body.update(openai_choice_fields(req, lambda name: {"type": "function", "name": name}))
    body.update(sampling(req))
    stop_sequences(req)  # validated; the Responses API has none (fields.FIELDS drops it)
    level = effort(req) if provider.reasoning_control != "none" else None
    if level:
        body["reasoning"] = {"effort": level, "summary": "auto"}
        body["include"] = ["reasoning.encrypted_content"]
    elif asks_reasoning(req):
        dropped.add("thinking/output_config.effort (provider has no reasoning control)")
    schema = output_schema(req, provider)
    if schema is not None:
        body["text"] = {"format": {"type": "json_schema", **json_schema_format(schema, provider)}}
    body.update(prompt_cache_key(req, provider, dropped))
    audit(req, "openai-responses", dropped)
    body["store"] = False
    if stream:
        body["stream"] = True
    return body, dropped
