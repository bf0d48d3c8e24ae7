"""Anthropic Messages request -> Gemini ``generateContent`` request.

system -> ``systemInstruction``; user/assistant -> ``user``/``model`` contents; tools -> one
``functionDeclarations`` tool with schemas cleaned (``schema.py``); tool_use/tool_result ->
``functionCall``/``functionResponse`` parts (Gemini matches them by name and order: every call of a model turn
is answered, in order, in the next user content); thinking blocks carrying a Gemini thought signature put it
back on the part it came with (``common.py``); thinking settings -> ``generationConfig.thinkingConfig``.
Pure: dict in, dict out.
"""

from __future__ import annotations

from urllib.parse import quote

import mimetypes
from typing import Any

from relay.config import Provider
from relay.errors import invalid
from relay.formats.fields import audit
from relay.formats.gemini import schema
from relay.formats.gemini.common import PLACEHOLDER_SIGNATURE, PREVIOUS, decode_signature, upstream_call_id
from relay.formats.inbound import (
    INTERRUPTED,
    PendingCalls,
    block_place,
    blocks,
    client_tools,
    effort,
    asks_reasoning,
    max_tokens,
    number,
    output_schema,
    stop_sequences,
    split_tool_results,
    system_text,
    text_of_blocks,
    thinking_budget,
    tool_choice,
    place,
    turns,
    user_pieces,
)

# Thinking budgets for an effort when Claude gave none (Gemini 2.5 Pro: 128..32768; Flash: 0..24576).
BUDGETS = {"low": 1024, "medium": 8192, "high": 24576}
# Gemini 3 Pro takes thinkingLevel low|high only; medium is sent as high.
LEVELS = {"low": "low", "medium": "high", "high": "high"}

Part = dict[str, Any]


def _user_parts(content: str | list[Any], where: str, dropped: set[str]) -> list[Part]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[Part] = []
    for piece in user_pieces(content, where, dropped):
        kind = piece[0]
        if kind == "text":
            if piece[1]:
                parts.append({"text": piece[1]})
        elif kind == "image":
            _, media, data, url = piece
            parts.append({"inlineData": {"mimeType": media, "data": data}} if url is None else
                         {"fileData": {"mimeType": mimetypes.guess_type(url)[0] or "image/jpeg", "fileUri": url}})
        elif kind == "file":
            parts.append({"inlineData": {"mimeType": piece[1], "data": piece[2]}})
        else:
            parts.append({"fileData": {"mimeType": mimetypes.guess_type(piece[1])[0] or "application/pdf", "fileUri": piece[1]}})
    return parts


def _tool_result(block: dict[str, Any], where: str, dropped: set[str]) -> tuple[dict[str, Any], list[Part]]:
    """The ``functionResponse.response`` object and any media that must follow it as parts. Gemini reads
    ``output`` as the function's output and ``error`` as its failure (generateContent docs)."""
    content = block.get("content", "")
    media: list[Part] = []
    if type(content) is str:  # the usual result: its text as it is (no parts to build and join)
        text = content
    else:
        parts = _user_parts(content, where, dropped)
        text = "\n\n".join(p["text"] for p in parts if "text" in p)
        media = [p for p in parts if "text" not in p]
        if media and not text:
            text = "(the result is the media that follows)"
    return ({"error": text} if block.get("is_error") else {"output": text}), media


def _model_parts(content: str | list[Any], where: str, names: dict[str, str], pending: PendingCalls[Part],
                 dropped: set[str]) -> list[Part]:
    if isinstance(content, str):
        return [{"text": content}] if content else []
    parts: list[Part] = []
    carried: str | None = None  # a signature waiting for the next part
    for i, kind, block in blocks(content, where):
        part: Part
        if kind == "text":
            if not isinstance(block.get("text"), str) or not block["text"]:
                continue
            part = {"text": block["text"]}
        elif kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise invalid(f"{block_place(where, i)}: tool_use needs a string id and name")
            args = block.get("input")
            call: dict[str, Any] = {"name": name, "args": args if isinstance(args, dict) else {}}
            if (own := upstream_call_id(call_id)) is not None:
                call["id"] = own
            part = {"functionCall": call}
            names[call_id] = name
            pending.add(call_id)
        elif kind == "thinking":
            decoded = decode_signature(block.get("signature"))
            if decoded is None:
                dropped.add("thinking blocks (the client's record)")
            elif decoded[0] == PREVIOUS and parts:
                parts[-1].setdefault("thoughtSignature", decoded[1])
            else:
                carried = decoded[1]
            continue
        else:
            dropped.add(f"assistant block {kind}")
            continue
        if carried is not None:
            part["thoughtSignature"] = carried
            carried = None
        parts.append(part)
    if carried is not None and parts:
        parts[-1].setdefault("thoughtSignature", carried)
    first_call = next((p for p in parts if "functionCall" in p), None)
    if first_call is not None and "thoughtSignature" not in first_call:
        first_call["thoughtSignature"] = PLACEHOLDER_SIGNATURE
    return parts


def _contents(req: dict[str, Any], provider: Provider, system: list[str], dropped: set[str]) -> list[dict[str, Any]]:
    contents: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool_use id -> function name, for the functionResponse
    # the calls of the last model turn, in order, waiting for their results (answered in that order)
    pending: PendingCalls[Part] = PendingCalls(lambda cid: _response(cid, names[cid], {"error": INTERRUPTED}))

    def add(role: str, parts: list[Part]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for n, role, content in turns(req):
        where = place(n)
        if role == "system":
            text = text_of_blocks(content, f"{where}.content")
            if provider.system_turns == "merge" or not contents:
                system.append(text)
            else:
                add("user", [*pending.close(), {"text": text}])
            continue
        if role == "assistant":
            if pending.ids:
                add("user", pending.close())
            add("model", _model_parts(content, where, names, pending, dropped))
            continue
        results: dict[str, Part] = {}
        media: list[Part] = []
        found, rest = split_tool_results(content, where)
        strays: list[Any] = []  # results for calls the upstream never saw, as text ahead of the rest
        for at, call_id, block in found:
            response, extra = _tool_result(block, at, dropped)
            if call_id in pending:
                results[call_id] = _response(call_id, names[call_id], response)
                media.extend(extra)
            else:  # a result for a call the upstream never saw: keep its content as plain text
                text = response.get("output", response.get("error", ""))
                strays.append({"type": "text", "text": f"[result of tool call {call_id}]\n{text}"})
                media.extend(extra)
        if isinstance(content, str):
            user = _user_parts(content, where, dropped)
        else:
            user = _user_parts([*strays, *rest], where, dropped) if strays or rest else []
        add("user", [*pending.close(results), *media, *user])
    return contents


def _response(call_id: str, name: str, response: dict[str, Any]) -> Part:
    out: dict[str, Any] = {"name": name, "response": response}
    if (own := upstream_call_id(call_id)) is not None:
        out["id"] = own
    return {"functionResponse": out}


def _thinking_config(req: dict[str, Any], provider: Provider, dropped: set[str]) -> dict[str, Any] | None:
    control = provider.reasoning_control
    level = effort(req)
    if control == "none" or level is None:
        if control == "none" and asks_reasoning(req):
            dropped.add("thinking/output_config.effort (provider has no reasoning control)")
        return None
    if control == "thinking_budget":
        return {"includeThoughts": True, "thinkingBudget": thinking_budget(req) or BUDGETS[level]}
    return {"includeThoughts": True, "thinkingLevel": LEVELS[level]}  # thinking_level, reasoning_effort


def _tools(req: dict[str, Any], dropped: set[str]) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    declarations: list[dict[str, Any]] = []
    for tool in client_tools(req, dropped):
        declaration: dict[str, Any] = {"name": tool["name"]}
        if isinstance(tool.get("description"), str):
            declaration["description"] = tool["description"]
        parameters = schema.parameters(tool["input_schema"])
        if parameters is not None:
            declaration["parameters"] = parameters
        declarations.append(declaration)
    if not declarations:
        return [], None
    kind, name, serial = tool_choice(req)
    if serial:
        dropped.add("disable_parallel_tool_use (Gemini has no equivalent)")
    config: dict[str, Any] | None = None
    if kind in ("auto", "any", "none"):
        config = {"functionCallingConfig": {"mode": kind.upper()}}
    elif kind == "tool" and name:
        config = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": [name]}}
    return [{"functionDeclarations": declarations}], config


def build(req: dict[str, Any], provider: Provider, model: str, stream: bool) -> tuple[dict[str, Any], set[str]]:
    """The upstream body and the set of things deliberately dropped (for a debug log line)."""
    dropped: set[str] = set()
    system = [text] if (text := system_text(req.get("system"))) else []
    body: dict[str, Any] = {"contents": _contents(req, provider, system, dropped)}
    if system:
        body["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    tools, tool_config = _tools(req, dropped)
    if tools:
        body["tools"] = tools
    if tool_config:
        body["toolConfig"] = tool_config
    generation: dict[str, Any] = {"maxOutputTokens": max_tokens(req, provider)}
    stops = stop_sequences(req)
    if stops:
        generation["stopSequences"] = stops
    for key, name in (("temperature", "temperature"), ("top_p", "topP"), ("top_k", "topK")):
        value = number(req, key)
        if value is not None:
            generation[name] = value
    thinking = _thinking_config(req, provider, dropped)
    if thinking:
        generation["thinkingConfig"] = thinking
    wanted = output_schema(req, provider)
    if wanted is not None:  # JSON mode, constrained by the schema where Gemini's subset can say it
        generation["responseMimeType"] = "application/json"
        response_schema = schema.response_schema(wanted)
        if response_schema is not None:
            generation["responseSchema"] = response_schema
    body["generationConfig"] = generation
    audit(req, "gemini", dropped)
    return body, dropped


def path(model: str, stream: bool) -> str:
    # the id is one path segment: '/', '?', '#' or non-ASCII in it must not reshape the upstream URL
    model = quote(model.removeprefix("models/"), safe="-._~")
    return f"/models/{model}:streamGenerateContent?alt=sse" if stream else f"/models/{model}:generateContent"
