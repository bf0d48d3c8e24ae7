"""relay.tokens' rule, block by block: the estimate's loops count the common blocks in place (bench/README.md,
session 7), and each kind must still count as the module's rule says."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from relay import tokens


def one_message(*blocks: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": list(blocks)}]}


@pytest.mark.parametrize(("block", "expect"), [
    ({"type": "text", "text": "abcd" * 10}, 10),  # ASCII: 4 characters a token, rounded up
    ({"type": "text", "text": "abcde"}, 2),
    ({"type": "text", "text": ""}, 0),
    ({"type": "text", "text": "\u00e9" * 8}, 5),  # 8 extra bytes: 4 tokens for them, the other 4 characters 1
    ({"type": "text", "text": "\u4e2d" * 6}, 6),  # 2 extra bytes a character: one token each
    ({"type": "text", "text": 5}, 0),  # a field of the wrong type counts nothing (estimation comes before checks)
    ({"type": "tool_result", "tool_use_id": "x", "content": "abcd" * 10}, 14),  # its text + 4
    ({"type": "tool_result", "tool_use_id": "x", "content": "\u00e9" * 8}, 9),
    ({"type": "tool_result", "tool_use_id": "x", "content": [{"type": "text", "text": "abcdefgh"}]}, 6),
    ({"type": "tool_result", "tool_use_id": "x", "content": None}, 4),
    ({"type": "tool_result", "tool_use_id": "x"}, 4),
    ({"type": "tool_use", "id": "a", "name": "Read", "input": {"a": 1}}, 1 + 2 + 4),  # name, '{"a":1}', framing
    ({"type": "thinking", "thinking": "abcdefgh"}, 2),
    ({"type": "tool_reference", "tool_name": "Grep"}, 8),
    ({"type": "image", "source": {"type": "url", "url": "https://example.invalid/a.png"}}, tokens.IMAGE_TOKENS_MAX),
    ({"type": "unknown"}, 0),
    ("not a block", 0),
])
def test_each_block_kind_counts_by_the_rule(block: Any, expect: int) -> None:
    assert tokens.estimate(one_message(block)) == max(1, tokens.PER_MESSAGE + expect)


def test_a_request_adds_its_parts() -> None:
    """System, every message (framing each) and every tool (framing, name, description, its schema's JSON)."""
    schema = {"type": "object", "properties": {"path": {"type": "string"}}}
    req = {"system": [{"type": "text", "text": "abcd" * 25}],
           "messages": [{"role": "user", "content": "abcd" * 5},
                        {"role": "assistant", "content": [{"type": "text", "text": "abcdefgh"}]},
                        "not a message"],
           "tools": [{"name": "Read", "description": "abcd" * 3, "input_schema": schema}, "not a tool"]}
    schema_tokens = (len(orjson.dumps(schema)) + 3) // 4
    assert tokens.estimate(req) == (25 + 4) + (4 + 5) + (4 + 2) + (8 + 1 + 3 + schema_tokens)
    assert tokens.estimate({"messages": "not a list"}) == 1  # never below one, never an error


@pytest.mark.parametrize("words", ["Runs a command \u2026 in the shell", "caf\u00e9 \u2192 \u4e2d\u6587 \U0001f600", "plain"])
def test_a_schemas_json_counts_as_its_text(words: str) -> None:
    """A tool's schema (and a tool_use's input) count as their JSON text by the rule for text: counted on orjson's
    UTF-8 bytes, with no round trip through a str, they must count what the text itself counts."""
    schema = {"type": "object", "description": words, "properties": {"q": {"type": "string", "description": words}}}
    text = orjson.dumps(schema).decode()
    assert tokens._json_tokens(schema) == tokens.text_tokens(text)
    base = tokens.estimate({"tools": [{"name": "T", "input_schema": {}}]})
    with_schema = tokens.estimate({"tools": [{"name": "T", "input_schema": schema}]})
    assert with_schema - base == tokens.text_tokens(text) - tokens.text_tokens("{}")


@pytest.mark.parametrize("text", [
    "a" * 5000, "caf\u00e9 " * 400, "x" * 3000 + "\u2014", "\u4e2d\u6587" * 1500, "ok \U0001f600 " * 300,
    "\u00e9" * (tokens.FILL_FROM - 1), "\u00e9" * tokens.FILL_FROM, "a\ud800" * 700, "short \u2192",
])
def test_utf8_size_is_the_encoded_length(text: str) -> None:
    """Long strings are measured by CPython's own UTF-8 conversion (which keeps its result for orjson), short
    ones by encoding: both give the length of the UTF-8 form, lone surrogates included, and the body relay
    writes of such a string is unchanged."""
    expect = len(text.encode("utf-8", "surrogatepass"))
    assert tokens.utf8_size(text) == expect
    assert tokens.text_tokens(text) == tokens._tokens(len(text), expect - len(text))
    if "\ud800" not in text:
        assert orjson.dumps({"t": text}) == b'{"t":' + orjson.dumps(text) + b"}"
        assert orjson.loads(orjson.dumps(text)) == text
