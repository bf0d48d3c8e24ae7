"""Reading the Anthropic request: the validation and the format-neutral pieces every upstream format needs.

Each translated format (OpenAI Chat, Gemini, OpenAI Responses) decides what a field becomes; what the field
*is* (the system prompt without Claude Code's billing line, the tools the model may see, the thinking effort,
a bounded max_tokens) is decided once, here, so the formats cannot drift apart. Pure: dicts in, values out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

import orjson

from relay.config import Provider
from relay.errors import invalid

# Anthropic server tools and versioned built-in tools: the upstream model cannot run them.
SERVER_TOOL_PREFIXES = ("web_search", "web_fetch", "code_execution", "bash_", "text_editor", "computer_", "memory")
BILLING_HEADER = "x-anthropic-billing-header:"
EFFORTS = {"low": "low", "medium": "medium", "high": "high", "max": "high", "xhigh": "high", "minimal": "low"}


def text_of_blocks(content: Any, where: str) -> str:
    """The text of a string or a list of blocks (non-text blocks ignored), paragraphs joined by a blank line."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(f"{where}: expected a string or a list of content blocks")
    parts: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            raise invalid(f"{where}: content blocks must be objects")
        if block.get("type") == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}: text block without a string 'text'")
            parts.append(text)
    return "\n\n".join(parts)


def system_text(system: Any) -> str:
    """The leading system prompt. Claude Code's per-request billing header block is left out: it changes on
    every call and would defeat the upstream's prefix cache."""
    if system is None:
        return ""
    if isinstance(system, list):
        system = [
            b for b in system
            if not (isinstance(b, dict) and isinstance(b.get("text"), str) and b["text"].startswith(BILLING_HEADER))
        ]
    return text_of_blocks(system, "system")


def turns(req: dict[str, Any], start: int = 0) -> Iterator[tuple[int, str, str | list[Any]]]:
    """(index, role, content) for each message from ``start`` on (the ones before were translated with the request
    before: ``relay.formats.resume``), validated as Anthropic's API does. The index, not its place's name
    (``place``): a name is only needed for an error, and making one per message cost a third of this loop.
    (Exact type checks: the request is orjson's, which makes no subclasses, and ``type() is`` is the cheaper
    check; this runs for every message of every request.)"""
    messages = req.get("messages")
    if type(messages) is not list:
        raise invalid("messages: Field required (a list)")
    if not messages:
        raise invalid("messages: at least one message is required")
    for n, message in enumerate(messages[start:] if start else messages, start):
        if type(message) is not dict:
            raise invalid(f"{place(n)}: expected an object")
        role = message.get("role")
        content = message.get("content")
        if role != "user" and role != "assistant" and role != "system":
            raise invalid(f"{place(n)}.role: Input should be 'user' or 'assistant'")
        if not isinstance(content, (str, list)):
            if content is None:
                raise invalid(f"{place(n)}.content: Field required")
            raise invalid(f"{place(n)}.content: expected a string or a list of content blocks")
        yield n, role, content


def place(n: int) -> str:
    """The name of message ``n``'s place in the request, for an error (``messages.3``)."""
    return f"messages.{n}"


def blocks(content: list[Any], where: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """(index, type, block) for each content block of the turn at ``where``, each checked to be a typed object.
    The block's place (``block_place``) is named only where it is needed, as ``turns`` does."""
    for i, block in enumerate(content):
        if type(block) is not dict:
            raise invalid(f"{block_place(where, i)}: content blocks must be objects")
        kind = block.get("type")
        if type(kind) is not str:
            raise invalid(f"{block_place(where, i)}: content block without a type")
        yield i, kind, block


def block_place(where: str, i: int) -> str:
    """The name of block ``i``'s place in the turn at ``where`` (``messages.3.content.1``)."""
    return f"{where}.content.{i}"


Piece = tuple[Any, ...]


def user_pieces(content: list[Any], where: str, dropped: set[str]) -> list[Piece]:
    """A user turn's (or a tool result's) blocks as format-neutral pieces, each format then writing its own part:
    ``("text", text)``, ``("image", media_type, data, url)`` (base64: data; url: url),
    ``("file", media_type, data, name)`` (a base64 document) and ``("file_url", url, title_prefix)``."""
    pieces: list[Piece] = []
    for i, kind, block in blocks(content, where):
        if kind == "text":
            text = block.get("text")
            if type(text) is not str:
                raise invalid(f"{block_place(where, i)}: text block without a string 'text'")
            pieces.append(("text", text))
        elif kind == "image":
            pieces.append(_image(block.get("source"), block_place(where, i)))
        elif kind == "document":
            pieces.append(_document(block, block_place(where, i)))
        elif kind == "search_result":
            body = text_of_blocks(block.get("content", []), block_place(where, i))
            pieces.append(("text", f"{block.get('title', '')} ({block.get('source', '')})\n{body}"))
        elif kind == "tool_reference":
            pieces.append(("text", tool_loaded(block)))
        elif kind in ("thinking", "redacted_thinking"):
            dropped.add("user thinking block")
        else:
            dropped.add(f"content block type {kind}")
    return pieces


def _image(source: Any, where: str) -> Piece:
    if not isinstance(source, dict):
        raise invalid(f"{where}: image block without a source")
    kind = source.get("type")
    if kind == "base64":
        media, data = source.get("media_type"), source.get("data")
        if not isinstance(media, str) or not isinstance(data, str):
            raise invalid(f"{where}: base64 image needs media_type and data")
        return ("image", media, data, None)
    if kind == "url" and isinstance(source.get("url"), str):
        return ("image", None, None, source["url"])
    raise invalid(f"{where}: unsupported image source type {kind!r}")


def _document(block: dict[str, Any], where: str) -> Piece:
    source = block.get("source")
    title = block.get("title")
    prefix = f"Document: {title}\n\n" if isinstance(title, str) and title else ""
    if not isinstance(source, dict):
        raise invalid(f"{where}: document block without a source")
    kind = source.get("type")
    if kind == "text":
        return ("text", prefix + str(source.get("data", "")))
    if kind == "base64":
        name = title if isinstance(title, str) and title else "document.pdf"
        return ("file", source.get("media_type") or "application/pdf", str(source.get("data", "")), name)
    if kind == "url":
        return ("file_url", str(source.get("url")), prefix)
    if kind == "content":
        return ("text", prefix + text_of_blocks(source.get("content", []), where))
    raise invalid(f"{where}: unsupported document source type {kind!r}")


def data_url(piece: Piece) -> str:
    """An image piece as a URL: ``data:`` for base64, else its own URL."""
    _, media, data, url = piece
    return url if url is not None else f"data:{media};base64,{data}"


def split_tool_results(content: str | list[Any], where: str) -> tuple[list[tuple[str, str, dict[str, Any]]], list[Any]]:
    """A user turn's tool_result blocks as (place, tool_use_id, block), validated, and its other blocks. The
    place is the block's (``block_place``) when its content is a list of blocks, else the turn's: a string
    result has no inner place to name."""
    results: list[tuple[str, str, dict[str, Any]]] = []
    rest: list[Any] = []
    for i, kind, block in blocks(content, where) if isinstance(content, list) else ():
        if kind != "tool_result":
            rest.append(block)
            continue
        call_id = block.get("tool_use_id")
        if type(call_id) is not str:
            raise invalid(f"{block_place(where, i)}.tool_use_id: Field required")
        inner = block.get("content", "")
        if type(inner) is str:
            results.append((where, call_id, block))
        elif isinstance(inner, list):
            results.append((block_place(where, i), call_id, block))
        else:
            raise invalid(f"{block_place(where, i)}: tool_result content must be a string or a list")
    return results, rest


INTERRUPTED = "(no result: the tool call was interrupted)"
T = TypeVar("T")


class PendingCalls(Generic[T]):
    """The tool calls of the last assistant turn still waiting for their results, in call order.

    Every API relay translates to refuses a conversation with a call left unanswered (OpenAI Chat and Responses)
    or pairs results with calls by position (Gemini), and Claude Code leaves calls unanswered when the user
    interrupts a tool. So when the conversation moves on, each call still waiting gets ``INTERRUPTED`` as its
    result: the one place that repair is made; ``interrupted(call_id)`` writes it in the format's own shape."""

    def __init__(self, interrupted: Callable[[str], T]) -> None:
        self.ids: list[str] = []
        self._interrupted = interrupted

    def add(self, call_id: str) -> None:
        self.ids.append(call_id)

    def __contains__(self, call_id: str) -> bool:
        return call_id in self.ids

    def take(self, call_id: str) -> bool:
        """The result of ``call_id`` has come: True when that call was waiting (a result for a call the upstream
        never saw is the caller's to keep as text)."""
        if call_id in self.ids:
            self.ids.remove(call_id)
            return True
        return False

    def close(self, results: Mapping[str, T] | None = None) -> list[T]:
        """Every call still waiting answered, in call order: its result from ``results``, else ``INTERRUPTED``."""
        out = [results[c] if results and c in results else self._interrupted(c) for c in self.ids]
        self.ids.clear()
        return out


def tool_loaded(block: dict[str, Any]) -> str:
    """Claude Code's ToolSearch answers with tool_reference blocks; upstreams get them as this sentence."""
    return f"Tool {block.get('tool_name')} is now loaded and can be called."


def referenced_tools(messages: Any) -> set[str]:
    """Names of deferred tools that a tool_reference in the conversation has loaded."""
    names: set[str] = set()
    if type(messages) is not list:
        return names
    for message in messages:  # (every block of every request that has a deferred tool: exact type checks)
        content = message.get("content") if type(message) is dict else None
        if type(content) is not list:
            continue
        for block in content:
            if type(block) is dict and block.get("type") == "tool_result":
                inner_blocks = block.get("content")
                if type(inner_blocks) is list:
                    for inner in inner_blocks:
                        if type(inner) is dict and inner.get("type") == "tool_reference":
                            names.add(str(inner.get("tool_name")))
    return names


def client_tools(req: dict[str, Any], dropped: set[str]) -> list[dict[str, Any]]:
    """The tools the upstream model may call: validated, server tools dropped, deferred tools only once a
    tool_reference loaded them (as Anthropic does). Each has ``name`` and an object ``input_schema``."""
    tools = req.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("tools: expected a list")
    referenced: set[str] | None = None
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise invalid(f"tools.{i}: expected an object")
        kind = tool.get("type")
        name = tool.get("name")
        if kind not in (None, "custom"):
            if isinstance(kind, str) and kind.startswith(SERVER_TOOL_PREFIXES):
                dropped.add(f"server tool {kind} (the upstream cannot run it)")
            else:
                dropped.add(f"tool type {kind}")
            continue
        if not isinstance(name, str) or not name:
            raise invalid(f"tools.{i}.name: Field required")
        if tool.get("defer_loading"):
            if referenced is None:
                referenced = referenced_tools(req.get("messages"))
            if name not in referenced:
                continue
        schema = tool.get("input_schema")
        if isinstance(schema, dict):  # the usual tool is passed on as it came (callers only read it)
            out.append(tool)
        elif schema is None:
            out.append({**tool, "input_schema": {"type": "object", "properties": {}}})
        else:
            raise invalid(f"tools.{i}.input_schema: expected an object")
    return out


def tool_choice(req: dict[str, Any]) -> tuple[str | None, str | None, bool]:
    """(kind: auto/any/tool/none or None, the named tool, parallel calls disabled)."""
    choice = req.get("tool_choice")
    if not isinstance(choice, dict):
        return None, None, False
    kind = choice.get("type")
    name = choice.get("name") if kind == "tool" and isinstance(choice.get("name"), str) else None
    return (kind if kind in ("auto", "any", "tool", "none") else None), name, choice.get("disable_parallel_tool_use") is True


def openai_choice_fields(req: dict[str, Any], named: Callable[[str | None], Any]) -> dict[str, Any]:
    """tool_choice / parallel_tool_calls for the OpenAI APIs; ``named`` shapes a choice of one tool (Chat and
    Responses spell it differently)."""
    kind, name, serial = tool_choice(req)
    fields: dict[str, Any] = {}
    if kind is not None:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}.get(kind) or named(name)
    if serial:
        fields["parallel_tool_calls"] = False
    return fields


def sampling(req: dict[str, Any]) -> dict[str, Any]:
    """temperature and top_p where given (validated): the same fields in every OpenAI-style API."""
    fields: dict[str, Any] = {}
    for key in ("temperature", "top_p"):
        value = number(req, key)
        if value is not None:
            fields[key] = value
    return fields


def effort(req: dict[str, Any]) -> str | None:
    """Claude's thinking settings -> low/medium/high, or None when thinking is off or not asked for."""
    thinking = req.get("thinking")
    output_config = req.get("output_config")
    asked = output_config.get("effort") if isinstance(output_config, dict) else None
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return None
    if isinstance(asked, str) and asked in EFFORTS:
        return EFFORTS[asked]
    if kind == "enabled" and isinstance(thinking, dict):
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int):
            return "low" if budget < 4096 else "medium" if budget < 16384 else "high"
        return "medium"
    if kind == "adaptive":
        return "medium"
    return None


def thinking_wanted(req: dict[str, Any]) -> bool | None:
    """Whether the client asked for thinking (True), turned it off (False), or said nothing (None)."""
    thinking = req.get("thinking")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if kind == "disabled":
        return False
    return True if effort(req) else None


def thinking_budget(req: dict[str, Any]) -> int | None:
    """The explicit ``thinking.budget_tokens`` when thinking is enabled with one."""
    thinking = req.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
            return budget
    return None


def max_tokens(req: dict[str, Any], provider: Provider) -> int:
    """The validated max_tokens, clamped to the provider's cap."""
    value = req.get("max_tokens")
    if value is None:
        raise invalid("max_tokens: Field required")
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid("max_tokens: Input should be a valid integer")
    if value < 1:
        raise invalid("max_tokens: Input should be greater than or equal to 1")
    if provider.max_tokens_cap is not None:
        value = min(value, provider.max_tokens_cap)
    return value


def stop_sequences(req: dict[str, Any]) -> list[str]:
    stops = req.get("stop_sequences")
    if not stops:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop_sequences: expected a list of strings")
    return stops


def number(req: dict[str, Any], key: str) -> float | int | None:
    value = req.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise invalid(f"{key}: expected a number")
    return value


def output_schema(req: dict[str, Any], provider: Provider) -> dict[str, Any] | None:
    """The JSON schema the answer must follow (``output_config.format``, or ``output_format``, its older beta
    spelling), validated; None when the client asked for none. A provider that cannot constrain its output
    (``structured_output = "none"``) is refused with a 400 naming the field: an answer in prose would only make
    the client's parser fail."""
    where = "output_config.format"
    config = req.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise invalid("output_config: expected an object")
    spec = config.get("format") if config else None
    if spec is None:
        where, spec = "output_format", req.get("output_format")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise invalid(f"{where}: expected an object")
    if spec.get("type") != "json_schema":
        raise invalid(f"{where}.type: Input should be 'json_schema'")
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise invalid(f"{where}.schema: Field required (a JSON schema object)")
    if provider.structured_output == "none":
        raise invalid(f"{where}: structured output is not available from provider {provider.name!r} "
                      f"(structured_output = \"none\"): route this request to a provider that supports it")
    return schema


def session_id(req: dict[str, Any]) -> str | None:
    """Claude Code's session id: ``metadata.user_id`` is a JSON string carrying ``session_id`` (other clients put
    a plain user id there, which is not a session)."""
    metadata = req.get("metadata")
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if not isinstance(user, str) or not user.startswith("{"):
        return None
    try:
        doc = orjson.loads(user)
    except orjson.JSONDecodeError:
        return None
    session = doc.get("session_id") if isinstance(doc, dict) else None
    return session if isinstance(session, str) and session else None


def prompt_cache_key(req: dict[str, Any], provider: Provider, dropped: set[str]) -> dict[str, str]:
    """``{"prompt_cache_key": session}`` for providers that route their prefix cache by it (OpenAI's Chat and
    Responses APIs; ``prompt_cache_key = true``), so one Claude Code session keeps hitting the same cache. Never
    sent as ``user``: Claude Code's user_id is a long JSON string some providers refuse there."""
    if req.get("metadata") is None:
        return {}
    session = session_id(req) if provider.prompt_cache_key else None
    if session is None:
        dropped.add("metadata")  # no session id in it, or the provider takes no prompt_cache_key
        return {}
    return {"prompt_cache_key": session}


def asks_reasoning(req: dict[str, Any]) -> bool:
    """The client said something about thinking (a provider without a reasoning control drops it)."""
    config = req.get("output_config")
    return bool(req.get("thinking")) or (isinstance(config, dict) and config.get("effort") is not None)

