"""Self-tests of the e2e harness: the scripted model's dialects, and Claude Code driven with no relay in between
(the scripted model speaking Anthropic Messages), so a failure in test_claude_code.py points at relay."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from ..mock_upstream import Recorded
from .conftest import Claude
from .test_claude_code import UNICODE
from .upstream import ScriptedModel, Turn, call, tools_turn

BODY = {"model": "m", "stream": True, "tools": [{"type": "function", "function": {"name": "Write"}}], "messages": []}
TURN = tools_turn(call("Write", file_path="/tmp/a b.txt", content="é🙂\n\"x\""), call("Bash", command="echo 1"), text="héllo", reasoning="hmm…")


def _chunks(dialect: str, body: dict[str, Any] = BODY) -> list[Any]:
    model = ScriptedModel(dialect, [TURN])  # type: ignore[arg-type]
    response = model.handle(Recorded("POST", "/v1/chat/completions", {}, orjson.dumps(body)))
    raw = b"".join(p for p in response.pieces if isinstance(p, bytes))
    if not response.chunked:
        return [orjson.loads(raw)]
    return [d if d == b"[DONE]" else orjson.loads(d) for d in (e.removeprefix(b"data: ") for e in raw.split(b"\n\n") if e)]


def test_openai_dialect_streams_incremental_indexed_tool_calls() -> None:
    chunks = _chunks("openai")
    assert chunks[-1] == b"[DONE]" and chunks[-2]["choices"] == [] and "usage" in chunks[-2]
    deltas = [c["choices"][0] for c in chunks[:-2]]
    assert deltas[0]["delta"]["role"] == "assistant" and deltas[-1]["finish_reason"] == "tool_calls"
    text = "".join(d["delta"].get("content") or "" for d in deltas)
    reasoning = "".join(d["delta"].get("reasoning_content", "") for d in deltas)
    calls: dict[int, dict[str, str]] = {}
    for d in deltas:
        for tc in d["delta"].get("tool_calls", []):
            entry = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            entry["id"] += tc.get("id", "")
            entry["name"] += tc.get("function", {}).get("name", "")
            entry["arguments"] += tc["function"]["arguments"]
    assert (text, reasoning) == (TURN.text, TURN.reasoning)
    assert [(c["name"], orjson.loads(c["arguments"])) for c in calls.values()] == [(t.name, t.arguments) for t in TURN.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert sum(len(d["delta"].get("tool_calls", [])) for d in deltas) > 4  # arguments really come in fragments


def test_gemini_dialect_sends_whole_calls_without_index_and_stops() -> None:
    chunks = _chunks("gemini")
    assert chunks[-1] == b"[DONE]"
    choices = [c["choices"][0] for c in chunks[:-1]]
    calls = [tc for c in choices for tc in c["delta"].get("tool_calls", [])]
    assert [(tc["function"]["name"], orjson.loads(tc["function"]["arguments"])) for tc in calls] == [
        (t.name, t.arguments) for t in TURN.tool_calls
    ]
    assert all("index" not in tc and tc["id"] == "" for tc in calls)
    assert sum(1 for c in choices if c["delta"].get("tool_calls")) == 2  # one chunk per call
    assert choices[-1]["finish_reason"] == "stop" and "usage" in chunks[-2]


def test_non_streaming_and_side_requests() -> None:
    (completion,) = _chunks("openai", {**BODY, "stream": False})
    message = completion["choices"][0]["message"]
    assert message["content"] == TURN.text and len(message["tool_calls"]) == 2
    (side,) = _chunks("openai", {"model": "m", "messages": []})
    assert side["choices"][0]["message"]["content"] == "ok"


@pytest.fixture
def dialect() -> str:
    return "anthropic"


async def test_claude_code_against_scripted_anthropic_model(claude: Claude, upstream: ScriptedModel) -> None:
    upstream.script = [tools_turn(call("Write", file_path=str(claude.project / "hi.txt"), content="hi\n")), Turn(text="wrote it")]
    run = await claude.run("write hi.txt", upstream.url)
    assert run.result_text == "wrote it"
    assert (claude.project / "hi.txt").read_text() == "hi\n"
    first, second = upstream.main
    assert first.path == "/v1/messages?beta=true" and first.headers["authorization"] == "Bearer test-key"
    assert any(t.get("defer_loading") for t in first.body["tools"])
    (result,) = [b for b in second.body["messages"][-1]["content"] if b["type"] == "tool_result"]
    assert result["tool_use_id"] == first_tool_use_id(run)


def first_tool_use_id(run: Any) -> str:
    return str(run.blocks("tool_use")[0]["id"])


async def test_claude_code_reports_tricky_text_byte_exact(claude: Claude, upstream: ScriptedModel) -> None:
    """The unicode scenario is fair: with no relay in between, Claude Code reports the text unchanged."""
    upstream.script = [Turn(text=UNICODE)]
    run = await claude.run("say something tricky", upstream.url)
    assert run.result_text == UNICODE
