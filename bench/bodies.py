"""Request bodies for the benchmark: tiny ones for stream tests, Claude Code-shaped ones of a chosen size.

Claude Code sends system blocks with ``cache_control``, a score of tools with long JSON schemas, and a history
that grows with every tool round trip; the relay parses, translates and re-serialises all of it on every
request, so its cost grows with body size. The bodies here start from the real captures in
``../shared/reference/*.json`` (system blocks, tools, opening messages, top-level options) when they exist and
from a bundled generator otherwise, then add tools up to 20 and tool-use turns until the target size is met.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import orjson

MODEL = "mock-model"
TOOL_COUNT = 20
# A text the load generator rewrites in every request (``bench.load.LoadSpec.vary``), to the same length. In the
# last message it makes each request the next turn of one conversation (as Claude Code's are: the history the
# same, the end new); in the first, each request a conversation of its own.
VARY = "[turn 0000000000]"


def reference_dir() -> Path:
    """``$RELAY_BENCH_REFERENCE``, else ``shared/reference`` beside the repository."""
    env = os.environ.get("RELAY_BENCH_REFERENCE")
    return Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "reference"


def simple_body(stream: bool = True, max_tokens: int = 1024) -> bytes:
    """The smallest useful request; the stream tests measure response handling, not request parsing."""
    return orjson.dumps({
        "model": MODEL,
        "max_tokens": max_tokens,
        "stream": stream,
        "messages": [{"role": "user", "content": "Say hello."}],
    })


def _synthetic_tool(i: int, rng: random.Random) -> dict[str, Any]:
    props = {
        f"param_{k}": {"type": rng.choice(["string", "number", "boolean"]),
                       "description": _prose(rng, rng.randint(60, 200))}
        for k in range(rng.randint(2, 6))
    }
    return {
        "name": f"BenchTool{i}",
        "description": _prose(rng, rng.randint(400, 1500)),
        "input_schema": {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": props,
            "required": sorted(props)[:1],
            "additionalProperties": False,
        },
    }


_WORDS = (
    "the file function returns value when error path config stream token request response model tool user "
    "assistant context cache schema parse bytes line test build run check update result output input async"
).split()


def _prose(rng: random.Random, size: int) -> str:
    """Text of about ``size`` characters with the newlines, quotes and code-ish punctuation of real prompts."""
    parts: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(_WORDS)
        roll = rng.random()
        if roll < 0.05:
            word += ".\n"
        elif roll < 0.08:
            word = f'"{word}"'
        elif roll < 0.10:
            word = f"`{word}()`"
        parts.append(word)
        length += len(word) + 1
    return " ".join(parts)[:size]


def _file_listing(rng: random.Random, size: int) -> str:
    """A tool result that looks like ``cat -n`` output of source code."""
    lines: list[str] = []
    length = 0
    n = 1
    while length < size:
        indent = " " * (4 * rng.randint(0, 3))
        line = f"{n:>6}\t{indent}{_prose(rng, rng.randint(10, 90))}"
        lines.append(line)
        length += len(line) + 1
        n += 1
    return "\n".join(lines)[:size]


def _turn(i: int, rng: random.Random, unicode: bool = False) -> list[dict[str, Any]]:
    """One tool round trip: the assistant reads a file, the user side returns it, the user asks on.
    ``unicode``: the texts each hold one dash (U+2014), as prose and source files so often do: one such
    character makes a whole str two bytes a character in CPython, and its UTF-8 form a conversion away."""
    tool_id = f"toolu_bench_{i:05d}"
    said, listing = _prose(rng, rng.randint(80, 400)), _file_listing(rng, rng.randint(1000, 6000))
    if unicode:
        said, listing = said[:-2] + " \u2014", listing[:-2] + " \u2014"
    return [
        {"role": "assistant", "content": [
            {"type": "text", "text": said},
            {"type": "tool_use", "id": tool_id, "name": "Read",
             "input": {"file_path": f"/home/user/project/src/module_{i}.py", "limit": 2000}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": tool_id, "content": listing},
        ]},
    ]


def _base(rng: random.Random) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(top-level fields, tools, opening messages) from a reference capture, or generated."""
    captures = sorted(reference_dir().glob("*.json")) if reference_dir().is_dir() else []
    for path in captures:
        try:
            body = orjson.loads(path.read_bytes())["body"]
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
            continue
        tools = list(body.get("tools") or [])
        messages = list(body.get("messages") or [])
        top = {k: v for k, v in body.items() if k not in ("tools", "messages")}
        return top, tools, messages
    top = {
        "max_tokens": 32000,
        "stream": True,
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=bench;"},
            {"type": "text", "text": "You are a Claude agent.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": _prose(rng, 6000), "cache_control": {"type": "ephemeral"}},
        ],
        "metadata": {"user_id": "bench"},
        "thinking": {"type": "adaptive"},
    }
    opening = [{"role": "user", "content": [{"type": "text", "text": _prose(rng, 300)}]}]
    return top, [], opening


def claude_code_body(target: int, seed: int = 4, unicode: bool = False, vary: str = "") -> bytes:
    """A streaming Claude Code-shaped request of ``target`` bytes (exact, unless the skeleton is bigger);
    ``unicode``: every turn's texts hold one character beyond ASCII (``_turn``); ``vary``: ``"last"`` or
    ``"first"``, the message that holds ``VARY``."""
    rng = random.Random(seed)
    top, tools, opening = _base(rng)
    while len(tools) < TOOL_COUNT:
        tools.append(_synthetic_tool(len(tools), rng))
    body: dict[str, Any] = {**top, "model": MODEL, "stream": True, "tools": [], "messages": list(opening)}
    budget = int(target * 0.6)  # small bodies keep some room for history rather than all the tools
    size = len(orjson.dumps(body))
    for tool in tools[:TOOL_COUNT]:
        extra = len(orjson.dumps(tool)) + 1
        if size + extra > budget and body["tools"]:
            break
        body["tools"].append(tool)
        size += extra
    closing_block: dict[str, Any] = {"type": "text", "text": ""}
    closing = {"role": "user", "content": [closing_block]}
    size += len(orjson.dumps(closing)) + 1
    i = 0
    while True:
        turn = _turn(i, rng, unicode)
        extra = sum(len(orjson.dumps(m)) + 1 for m in turn)
        if size + extra > target:
            break
        body["messages"] += turn
        size += extra
        i += 1
    body["messages"].append(closing)
    if vary == "first":
        first = body["messages"][0] = dict(body["messages"][0])
        content = first["content"]
        first["content"] = VARY + content if isinstance(content, str) else \
            [{**content[0], "text": VARY + content[0]["text"]}, *content[1:]]
    elif vary:
        closing_block["text"] = VARY
    pad = target - len(orjson.dumps(body))
    if pad > 0:
        closing_block["text"] += _prose(rng, pad).replace('"', "'").replace("\n", " ")
    return orjson.dumps(body)


if __name__ == "__main__":
    for kib in (10, 100, 400, 1024):
        raw = claude_code_body(kib * 1024)
        parsed = orjson.loads(raw)
        print(f"{kib:>5} KiB -> {len(raw):>8} bytes, {len(parsed['tools'])} tools, {len(parsed['messages'])} messages")
