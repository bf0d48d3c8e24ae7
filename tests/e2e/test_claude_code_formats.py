"""Claude Code (the real, pinned CLI) -> relay -> a scripted model speaking each of relay's other upstream formats:
native Gemini, OpenAI Responses, and Anthropic passthrough. A Write tool loop through each, checking what Claude
Code did and what the model received back: the tool result in the format's own shape, and the opaque reasoning
state (Gemini's thought signature, the Responses encrypted reasoning) returned on the next request.

The harness's relay fixture is reused as is: `provider_extra` adds a provider of the format under test and an
alias that sends the model there.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
import trio

from ..mock_upstream import MockUpstream
from .conftest import CLIENT_KEY, MODEL, UPSTREAM_KEY, Claude
from .format_upstream import FormatModel, encrypted, signature
from .upstream import ScriptedModel, Turn, call, tools_turn

JSON = dict[str, Any]
FORMATS = {"gemini-native": ("gemini", "/v1beta"), "responses": ("openai-responses", "/v1"), "anthropic": ("anthropic", "")}


@pytest.fixture(params=sorted(FORMATS))
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def upstream(nursery: trio.Nursery, dialect: str) -> ScriptedModel:
    model = ScriptedModel("anthropic") if dialect == "anthropic" else FormatModel(dialect)  # type: ignore[arg-type]
    port = await nursery.start(MockUpstream(model.handle).serve)
    model.url = f"http://127.0.0.1:{port}"
    return model


@pytest.fixture
def provider_extra(upstream: ScriptedModel, dialect: str) -> str:
    fmt, prefix = FORMATS[dialect]
    return f"""
[providers.fmt]
format = "{fmt}"
base_url = "{upstream.url}{prefix}"
api_key = "{UPSTREAM_KEY}"
reasoning_control = "{'thinking_budget' if fmt == 'gemini' else 'reasoning_effort' if fmt == 'openai-responses' else 'none'}"
[models]
"{MODEL}" = "fmt/{MODEL}"
"""


def conversation(upstream: ScriptedModel, turns: int) -> list[JSON]:
    """The conversation requests' bodies, each turn sent once and streamed (a broken stream would make Claude
    Code retry or fall back to a non-streaming request)."""
    main = upstream.main
    summary = [(r.turn, r.body.get("stream") or ":streamGenerateContent" in r.path) for r in main]
    assert summary == [(i, True) for i in range(turns)], summary
    return [r.body for r in main]


async def test_write_tool_loop(claude: Claude, upstream: ScriptedModel, relay: str, dialect: str) -> None:
    target = claude.project / "hello.txt"
    content = 'line one\nline "two" é 🙂\n'
    upstream.script = [
        tools_turn(call("Write", file_path=str(target), content=content), reasoning="I should write the file."),
        Turn(text="Wrote hello.txt"),
    ]
    run = await claude.run("write hello.txt", relay)
    assert run.result_text == "Wrote hello.txt"
    assert target.read_bytes() == content.encode()
    (tool_use,) = run.blocks("tool_use")
    assert tool_use["name"] == "Write" and tool_use["input"] == {"file_path": str(target), "content": content}
    first, second = conversation(upstream, 2)
    for request in upstream.main:
        assert not any(CLIENT_KEY in v for v in request.headers.values())
    if dialect == "gemini-native":
        assert upstream.main[0].headers["x-goog-api-key"] == UPSTREAM_KEY
        assert first["generationConfig"]["thinkingConfig"]["includeThoughts"] is True
        assert "Write" in [d["name"] for d in first["tools"][0]["functionDeclarations"]]
        model_turn = next(c for c in second["contents"] if c["role"] == "model")
        (call_part,) = [p for p in model_turn["parts"] if "functionCall" in p]
        assert call_part["functionCall"] == {"name": "Write", "args": {"file_path": str(target), "content": content}}
        assert call_part["thoughtSignature"] == signature(0)  # the signature made the round trip through Claude Code
        answer = second["contents"][second["contents"].index(model_turn) + 1]
        (response,) = [p["functionResponse"] for p in answer["parts"] if "functionResponse" in p]
        assert response["name"] == "Write" and "File created successfully" in response["response"]["output"]
    elif dialect == "responses":
        assert upstream.main[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert first["store"] is False and first["reasoning"]["effort"]
        items = second["input"]
        kinds = [i.get("type", i.get("role")) for i in items]
        reasoning = next(i for i in items if i.get("type") == "reasoning")
        assert reasoning["encrypted_content"] == encrypted(0) and "id" not in reasoning
        (fc,) = [i for i in items if i.get("type") == "function_call"]
        (out,) = [i for i in items if i.get("type") == "function_call_output"]
        assert kinds.index("reasoning") < kinds.index("function_call") < kinds.index("function_call_output")
        assert fc["name"] == "Write" and orjson.loads(fc["arguments"]) == {"file_path": str(target), "content": content}
        assert out["call_id"] == fc["call_id"] and "File created successfully" in out["output"]
    else:
        request = upstream.main[0]
        assert request.path == "/v1/messages" and request.headers["x-api-key"] == UPSTREAM_KEY
        assert request.headers["anthropic-version"] and "authorization" not in request.headers
        assistant = next(m for m in second["messages"] if m["role"] == "assistant")
        kinds = [b["type"] for b in assistant["content"]]
        assert "tool_use" in kinds and "thinking" in kinds  # Claude Code's own blocks, passed through untouched
        thinking = next(b for b in assistant["content"] if b["type"] == "thinking")
        assert thinking["signature"] == "mock-signature"
        result = next(b for m in second["messages"] if m["role"] == "user" and isinstance(m["content"], list)
                      for b in m["content"] if b.get("type") == "tool_result")
        assert "File created successfully" in str(result["content"])


async def test_plain_text(claude: Claude, upstream: ScriptedModel, relay: str, dialect: str) -> None:
    text = "Hello through the other format ✓."
    upstream.script = [Turn(text=text)]
    run = await claude.run("say hello", relay)
    assert run.result_text == text
    conversation(upstream, 1)
